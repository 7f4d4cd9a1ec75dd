// RMSNorm (CONTRACT.md §9.3) of each row of x: y = x · (1/√(mean(x²)+eps)) · w,
// step for step rmsnorm::rmsnorm_spec (and shaders/rmsnorm.wgsl).
//
// One block per row (rows walked with a stride, so any grid covers them).
// The sum of squares is the contract's 256-chunk rule: each chunk's fma
// chain from +0 is one thread's (chunk c in thread c mod blockDim, into
// shared memory), then one thread adds the chunk sums in order to +0 and
// forms the inverse; all threads then write. Needs prim.cuh.
// Dynamic shared memory: one float per chunk, ceil(dim / K_CHUNK).

#if !defined(K_CHUNK) || !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_rmsnorm(const float* __restrict__ x, const float* __restrict__ w,
                 float* __restrict__ y, int dim, int rows, float eps)
{
    extern __shared__ float chunk_sums[];
    __shared__ float inv_s;
    const int chunks = (dim + K_CHUNK - 1) / K_CHUNK;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const float* xr = x + (size_t)row * dim;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            const int k0 = c * K_CHUNK;
            const int kend = min(k0 + K_CHUNK, dim);
            float acc = 0.0f;
            for (int k = k0; k < kend; ++k) acc = __fmaf_rn(xr[k], xr[k], acc);
            chunk_sums[c] = acc;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            float ss = 0.0f;
            for (int c = 0; c < chunks; ++c) ss = __fadd_rn(ss, chunk_sums[c]);
            // div(1, sqrt(add(div(ss, n), eps))), n = dim as f32.
            inv_s = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, __int2float_rn(dim)), eps)));
        }
        __syncthreads();
        const float inv = inv_s;
        float* yr = y + (size_t)row * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) {
            yr[i] = ls_canon(__fmul_rn(__fmul_rn(xr[i], inv), w[i]));
        }
        // chunk_sums and inv_s are reused by the next row.
        __syncthreads();
    }
}
