// Rotary position embedding (CONTRACT.md §9.4), in place, on rows of heads,
// step for step rope::rope_spec (and shaders/rope.wgsl): each pair (a, b) at
// pair index i of a head becomes
//   (fma(a, cos_i, -mul(b, sin_i)), fma(a, sin_i, mul(b, cos_i))),
// with each row's cos/sin tables ([rows, head_dim/2]) computed on the host
// (ln and sin/cos stay there). One thread per (row, pair). Needs prim.cuh.

#if !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_rope(float* __restrict__ x, const float* __restrict__ cos_t,
              const float* __restrict__ sin_t, int width, int head_dim, int rows)
{
    const int half = width / 2;
    const int hh = head_dim / 2;
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        for (int pair = blockIdx.x * blockDim.x + threadIdx.x; pair < half;
             pair += gridDim.x * blockDim.x) {
            const int i = pair % hh;
            const float c = cos_t[(size_t)row * hh + i];
            const float s = sin_t[(size_t)row * hh + i];
            const size_t at = (size_t)row * width + 2 * (size_t)pair;
            const float a = x[at];
            const float b = x[at + 1];
            x[at] = ls_canon(__fmaf_rn(a, c, ls_neg(__fmul_rn(b, s))));
            x[at + 1] = ls_canon(__fmaf_rn(a, s, __fmul_rn(b, c)));
        }
    }
}
