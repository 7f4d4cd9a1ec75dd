// Split-K matmul for skinny products (LLM decode: M small, K and N large),
// under the lockstep contract (CONTRACT.md §4). Compiled by NVRTC with
// --fmad=false; every rounding is explicit.
//
// The contract sums K in fixed chunks of 256, so chunks may run on different
// blocks without changing a bit, as long as the chunk sums are added in
// increasing chunk order afterwards:
//   lockstep_chunk_sums_f32: partial[c][i][j] = fma chain over chunk c, from +0.0
//   lockstep_sum_chunks_f32: C[i][j] = (((+0 + partial[0]) + partial[1]) + ...)

// K_CHUNK and SPLITK_THREADS come from Rust as -D macros
// (kernels/src/cuda/mod.rs `defines`), so the launch and the kernel agree.
#if !defined(K_CHUNK) || !defined(SPLITK_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif
#define CHUNK K_CHUNK

extern "C" __global__ void __launch_bounds__(SPLITK_THREADS)
lockstep_chunk_sums_f32(const float* __restrict__ A, const float* __restrict__ B,
                        float* __restrict__ partial, int M, int K, int N)
{
    // grid: (ceil(N/SPLITK_THREADS), chunks, M); one thread per output column.
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    const int c = blockIdx.y;
    const int i = blockIdx.z;
    __shared__ float a_s[CHUNK];
    const int k0 = c * CHUNK;
    const int kn = min(CHUNK, K - k0);
    for (int t = threadIdx.x; t < kn; t += blockDim.x) a_s[t] = A[(size_t)i * K + k0 + t];
    __syncthreads();
    if (j >= N) return;
    const size_t n = (size_t)N;
    const float* b = B + (size_t)k0 * n + j;
    float acc = 0.0f;
#pragma unroll 4
    for (int k = 0; k < kn; ++k) acc = __fmaf_rn(a_s[k], b[(size_t)k * n], acc);
    partial[((size_t)c * M + i) * N + j] = acc;
}

extern "C" __global__ void __launch_bounds__(SPLITK_THREADS)
lockstep_sum_chunks_f32(const float* __restrict__ partial, float* __restrict__ C,
                        int M, int N, int chunks)
{
    const size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const size_t mn = (size_t)M * N;
    if (idx >= mn) return;
    float total = 0.0f;
    for (int c = 0; c < chunks; ++c) total = __fadd_rn(total, partial[(size_t)c * mn + idx]);
    C[idx] = (total != total) ? __int_as_float(0x7FC00000) : total;
}
