// Causal attention with a KV cache (CONTRACT.md §9.8), for the rows of one
// sequence: row r (at position pos0 + r) and head h attend over cache
// positions 0..=pos. Six kernels, launched in order on one stream, each
// with short work per thread (no thread runs a whole head over the span),
// exactly the entry points of shaders/attention.wgsl:
//   scores  per (row, head, t): q·k in 256-chunks, times the scale;
//   stats   per (row, head): any NaN, and the maximum;
//   exps    per (row, head, t): e^(s - max);
//   sums    per (row, head): Σ e in 256-chunks of positions;
//   probs   per (row, head, t): e / Σ (all NaN if any score was);
//   mix     per (row, head, d): Σ p_t·v_t in 256-chunks of positions.
// That is softmax_spec and attention_spec operation for operation.
//
// scratch: [rows·heads, span] scores, then per (row, head) two values: the
// maximum (or a NaN when any score was NaN) and the sum. For the per-(row,
// head, t) and per-(row, head, d) kernels the (row, head) index rh is the
// grid's y and t or d its x; the per-(row, head) kernels take rh from x.
// Every loop strides by the grid, so any grid covers every item and no
// result depends on the launch. Needs prim.cuh.

#if !defined(K_CHUNK) || !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

#define LS_NAN __uint_as_float(0x7FC00000u)

// A key whose integer order is the float order (-0 and +0 equal), for
// non-NaN x: comparisons on it can never become a float max/min.
__device__ __forceinline__ int ls_key(float x) {
    const unsigned b = __float_as_uint(x);
    return (b & 0x80000000u) ? -(int)(b & 0x7FFFFFFFu) : (int)b;
}

// Where the two stats of (row, head) rh live.
__device__ __forceinline__ size_t ls_stat(int rows, int n_heads, int span, int rh) {
    return (size_t)rows * n_heads * span + 2 * (size_t)rh;
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_scores(const float* __restrict__ q, const float* __restrict__ keys,
                          float* __restrict__ scratch, int row0, int pos0, int rows,
                          int n_heads, int n_kv_heads, int head_dim, int span, float scale)
{
    const int group = n_heads / n_kv_heads;
    for (int rh = blockIdx.y; rh < rows * n_heads; rh += gridDim.y) {
        const int r = rh / n_heads;
        const int h = rh % n_heads;
        const int pos = pos0 + r;
        const float* qh = q + ((size_t)(row0 + r) * n_heads + h) * head_dim;
        for (int t = blockIdx.x * blockDim.x + threadIdx.x; t <= pos;
             t += gridDim.x * blockDim.x) {
            const float* kt = keys + ((size_t)t * n_kv_heads + h / group) * head_dim;
            float total = 0.0f;
            for (int d0 = 0; d0 < head_dim; d0 += K_CHUNK) {
                const int dend = min(d0 + K_CHUNK, head_dim);
                float acc = 0.0f;
                for (int d = d0; d < dend; ++d) acc = __fmaf_rn(qh[d], kt[d], acc);
                total = __fadd_rn(total, acc);
            }
            scratch[(size_t)rh * span + t] = __fmul_rn(total, scale);
        }
    }
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_stats(float* __restrict__ scratch, int pos0, int rows, int n_heads, int span)
{
    for (int rh = blockIdx.x * blockDim.x + threadIdx.x; rh < rows * n_heads;
         rh += gridDim.x * blockDim.x) {
        const float* s = scratch + (size_t)rh * span;
        const int pos = pos0 + rh / n_heads;
        // softmax_spec: any NaN makes every output NaN; else the maximum,
        // folded from -inf in order (`if v > m { v } else { m }`).
        float m = __uint_as_float(0xFF800000u);
        bool nan = false;
        for (int t = 0; t <= pos; ++t) {
            const float v = s[t];
            if (ls_is_nan(v)) nan = true;
            else if (ls_key(v) > ls_key(m)) m = v;
        }
        scratch[ls_stat(rows, n_heads, span, rh)] = nan ? LS_NAN : m;
    }
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_exps(float* __restrict__ scratch, int pos0, int rows, int n_heads, int span)
{
    for (int rh = blockIdx.y; rh < rows * n_heads; rh += gridDim.y) {
        const float m = scratch[ls_stat(rows, n_heads, span, rh)];
        if (ls_is_nan(m)) continue; // probs writes NaN everywhere
        const int pos = pos0 + rh / n_heads;
        for (int t = blockIdx.x * blockDim.x + threadIdx.x; t <= pos;
             t += gridDim.x * blockDim.x) {
            const size_t at = (size_t)rh * span + t;
            scratch[at] = ls_exp(ls_sub(scratch[at], m));
        }
    }
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_sums(float* __restrict__ scratch, int pos0, int rows, int n_heads, int span)
{
    for (int rh = blockIdx.x * blockDim.x + threadIdx.x; rh < rows * n_heads;
         rh += gridDim.x * blockDim.x) {
        const float* e = scratch + (size_t)rh * span;
        const int n = pos0 + rh / n_heads + 1;
        float sum = 0.0f;
        for (int t0 = 0; t0 < n; t0 += K_CHUNK) {
            const int tend = min(t0 + K_CHUNK, n);
            float acc = 0.0f;
            for (int t = t0; t < tend; ++t) acc = __fadd_rn(acc, e[t]);
            sum = __fadd_rn(sum, acc);
        }
        scratch[ls_stat(rows, n_heads, span, rh) + 1] = sum;
    }
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_probs(float* __restrict__ scratch, int pos0, int rows, int n_heads, int span)
{
    for (int rh = blockIdx.y; rh < rows * n_heads; rh += gridDim.y) {
        const size_t st = ls_stat(rows, n_heads, span, rh);
        const bool nan = ls_is_nan(scratch[st]);
        const float sum = scratch[st + 1];
        const int pos = pos0 + rh / n_heads;
        for (int t = blockIdx.x * blockDim.x + threadIdx.x; t <= pos;
             t += gridDim.x * blockDim.x) {
            const size_t at = (size_t)rh * span + t;
            scratch[at] = nan ? LS_NAN : ls_canon(__fdiv_rn(scratch[at], sum));
        }
    }
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_attention_mix(const float* __restrict__ values, const float* __restrict__ scratch,
                       float* __restrict__ out, int row0, int pos0, int rows, int n_heads,
                       int n_kv_heads, int head_dim, int span)
{
    const int group = n_heads / n_kv_heads;
    const size_t kvd = (size_t)n_kv_heads * head_dim;
    for (int rh = blockIdx.y; rh < rows * n_heads; rh += gridDim.y) {
        const int r = rh / n_heads;
        const int h = rh % n_heads;
        const int n = pos0 + r + 1;
        const float* p = scratch + (size_t)rh * span;
        for (int d = blockIdx.x * blockDim.x + threadIdx.x; d < head_dim;
             d += gridDim.x * blockDim.x) {
            const float* v = values + (size_t)(h / group) * head_dim + d;
            float total = 0.0f;
            for (int t0 = 0; t0 < n; t0 += K_CHUNK) {
                const int tend = min(t0 + K_CHUNK, n);
                float acc = 0.0f;
                for (int t = t0; t < tend; ++t) acc = __fmaf_rn(p[t], v[(size_t)t * kvd], acc);
                total = __fadd_rn(total, acc);
            }
            out[((size_t)(row0 + r) * n_heads + h) * head_dim + d] = ls_canon(total);
        }
    }
}
