// y[t, r] = W[r, :] · x[t, :] for a weight matrix stored packed, as the
// model file holds it (CONTRACT.md §9.1-9.2), under the lockstep contract:
// F32, F16 and BF16 rows are dot products in the contract's 256-chunks;
// Q8_0 and Q4_1 rows are summed block by block, each block's quants widened
// exactly in the kernel. Step for step quant::dot (and shaders/qmatmul.wgsl).
//
// One thread per (row, token): a row's bits depend on that row and x[t]
// only, never on the launch. Threads of a block take consecutive rows (the
// grid's x), the tokens are the grid's y; both are walked with a stride, so
// any grid covers them.
// Needs prim.cuh (prepended by kernels/src/cuda/mod.rs).

// K_CHUNK and LM_THREADS come from Rust as -D macros
// (kernels/src/cuda/mod.rs `defines`), so the launch and the kernel agree.
#if !defined(K_CHUNK) || !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

// Weight formats (kernels/src/cuda/ops.rs `format_code`).
#define FMT_F32 0
#define FMT_F16 1
#define FMT_BF16 2
#define FMT_Q8_0 3
#define FMT_Q4_1 4

// The little-endian 16-bit word at p (any alignment).
__device__ __forceinline__ unsigned ls_half_at(const unsigned char* p) {
    return (unsigned)p[0] | ((unsigned)p[1] << 8);
}

// Element k of a dense row.
__device__ __forceinline__ float ls_dense(const unsigned char* row, int format, int k) {
    if (format == FMT_F16) return ls_f16(ls_half_at(row + 2 * (size_t)k));
    if (format == FMT_BF16) return ls_bf16(ls_half_at(row + 2 * (size_t)k));
    return reinterpret_cast<const float*>(row)[k];
}

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_qmatmul(const unsigned char* __restrict__ w, const float* __restrict__ x,
                 float* __restrict__ y, int rows, int cols, int tokens, int format)
{
    const int nb = cols / 32;
    for (int r = blockIdx.x * blockDim.x + threadIdx.x; r < rows; r += gridDim.x * blockDim.x) {
        for (int t = blockIdx.y; t < tokens; t += gridDim.y) {
            const float* xr = x + (size_t)t * cols;
            float total = 0.0f;
            if (format <= FMT_BF16) {
                const size_t esize = format == FMT_F32 ? 4 : 2;
                const unsigned char* row = w + (size_t)r * cols * esize;
                for (int k0 = 0; k0 < cols; k0 += K_CHUNK) {
                    const int kend = min(k0 + K_CHUNK, cols);
                    float acc = 0.0f;
                    for (int k = k0; k < kend; ++k) acc = __fmaf_rn(ls_dense(row, format, k), xr[k], acc);
                    total = __fadd_rn(total, acc);
                }
            } else if (format == FMT_Q8_0) {
                // Blocks of 34 bytes: f16 d, 32 x i8 q.
                const unsigned char* row = w + (size_t)r * nb * 34;
                for (int b = 0; b < nb; ++b) {
                    const unsigned char* blk = row + (size_t)b * 34;
                    const float* xb = xr + (size_t)b * 32;
                    const float d = ls_f16(ls_half_at(blk));
                    float s = 0.0f;
#pragma unroll
                    for (int j = 0; j < 32; ++j) {
                        const int q = (int)(signed char)blk[2 + j];
                        s = __fmaf_rn(ls_int(q), xb[j], s);
                    }
                    total = __fmaf_rn(d, s, total);
                }
            } else {
                // Q4_1, blocks of 20 bytes: f16 d, f16 m, 16 bytes of nibbles
                // (element j low, element j+16 high).
                const unsigned char* row = w + (size_t)r * nb * 20;
                for (int b = 0; b < nb; ++b) {
                    const unsigned char* blk = row + (size_t)b * 20;
                    const float* xb = xr + (size_t)b * 32;
                    const float d = ls_f16(ls_half_at(blk));
                    const float m = ls_f16(ls_half_at(blk + 2));
                    float s = 0.0f;
                    // Byte by byte: its low nibble (element j), then its high (j+16).
#pragma unroll
                    for (int j = 0; j < 16; ++j) {
                        const int byte = blk[4 + j];
                        s = __fmaf_rn(ls_int(byte & 15), xb[j], s);
                        s = __fmaf_rn(ls_int(byte >> 4), xb[j + 16], s);
                    }
                    total = __fmaf_rn(d, s, total);
                    float xs = 0.0f;
#pragma unroll
                    for (int j = 0; j < 32; ++j) xs = __fadd_rn(xs, xb[j]);
                    total = __fmaf_rn(m, xs, total);
                }
            }
            y[(size_t)t * rows + r] = ls_canon(total);
        }
    }
}
