// C[M,N] = A[M,K] * B[K,N], f32, row-major, under the lockstep contract
// (CONTRACT.md §4). Compiled by NVRTC with --fmad=false; every rounding step
// is written out (__fmaf_rn, __fadd_rn) so no compiler choice can change a bit.
//
// A block of 256 threads computes a 128x128 tile of C, each thread an 8x8
// register block (rows ty*4 + {0..3, 64..67}, columns tx*4 + {0..3, 64..67},
// so shared-memory reads are 16-byte vectors). K runs in the contract's
// chunks of 256, staged through shared memory 16 k at a time: per chunk the
// accumulators start at +0.0 and take one fma per k in increasing order, then
// total = total + acc with one rounding.

// K_CHUNK, MATMUL_TILE and MATMUL_THREADS come from Rust as -D macros
// (kernels/src/cuda/mod.rs `defines`), so the launch and the kernel agree.
#if !defined(K_CHUNK) || !defined(MATMUL_TILE) || !defined(MATMUL_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif
// The thread mapping below is written for 128x128 tiles and 256 threads.
#if MATMUL_TILE != 128 || MATMUL_THREADS != 256
#error "matmul.cu's thread mapping needs MATMUL_TILE=128 and MATMUL_THREADS=256"
#endif
#define BM MATMUL_TILE
#define BN MATMUL_TILE
#define BK 16
#define CHUNK K_CHUNK

__device__ __forceinline__ float lockstep_canon(float x) {
    return (x != x) ? __int_as_float(0x7FC00000) : x;
}

extern "C" __global__ void __launch_bounds__(MATMUL_THREADS)
lockstep_matmul_f32(const float* __restrict__ A, const float* __restrict__ B,
                    float* __restrict__ C, int M, int K, int N)
{
    __shared__ __align__(16) float As[2][BK][BM];
    __shared__ __align__(16) float Bs[2][BK][BN];

    const int tid = threadIdx.x;
    const int tx = tid % 16;
    const int ty = tid / 16;
    const int row0 = blockIdx.y * BM;
    const int col0 = blockIdx.x * BN;

    float total[8][8];
    float acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) total[i][j] = 0.0f;

    // Global->shared mapping: A tile is BM x BK (row, k), B tile BK x BN.
    // Each thread moves 8 values of each: A rows tid/16 + 16*l at k tid%16,
    // B row (tid/128) + 2*l at column tid%128.
    for (int k0 = 0; k0 < K; k0 += CHUNK) {
        const int kend = min(k0 + CHUNK, K);
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] = 0.0f;

        int buf = 0;
        // Load the first sub-tile of the chunk.
        {
            const int kt = k0;
#pragma unroll
            for (int l = 0; l < 8; ++l) {
                const int r = tid / 16 + 16 * l, k = tid % 16;
                As[0][k][r] = (row0 + r < M && kt + k < kend) ? A[(size_t)(row0 + r) * K + kt + k] : 0.0f;
                const int kb = tid / 128 + 2 * l, c = tid % 128;
                Bs[0][kb][c] = (col0 + c < N && kt + kb < kend) ? B[(size_t)(kt + kb) * N + col0 + c] : 0.0f;
            }
        }
        __syncthreads();
        for (int kt = k0; kt < kend; kt += BK) {
            // Prefetch the next sub-tile of this chunk into registers.
            const int kn_next = kt + BK;
            float pa[8], pb[8];
            if (kn_next < kend) {
#pragma unroll
                for (int l = 0; l < 8; ++l) {
                    const int r = tid / 16 + 16 * l, k = tid % 16;
                    pa[l] = (row0 + r < M && kn_next + k < kend) ? A[(size_t)(row0 + r) * K + kn_next + k] : 0.0f;
                    const int kb = tid / 128 + 2 * l, c = tid % 128;
                    pb[l] = (col0 + c < N && kn_next + kb < kend) ? B[(size_t)(kn_next + kb) * N + col0 + c] : 0.0f;
                }
            }
            const int kn = min(BK, kend - kt);
            if (kn == BK) {
#pragma unroll
                for (int kk = 0; kk < BK; ++kk) {
                    const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
                    const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4 + 64]);
                    const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
                    const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4 + 64]);
                    const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                    const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                    for (int i = 0; i < 8; ++i)
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
                }
            } else {
                // The chunk's last, partial sub-tile: exactly kn steps, no
                // padded k (an fma with 0*0 could turn -0 into +0).
                for (int kk = 0; kk < kn; ++kk) {
                    const float4 a0 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4]);
                    const float4 a1 = *reinterpret_cast<const float4*>(&As[buf][kk][ty * 4 + 64]);
                    const float4 b0 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4]);
                    const float4 b1 = *reinterpret_cast<const float4*>(&Bs[buf][kk][tx * 4 + 64]);
                    const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
                    const float bv[8] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
                    for (int i = 0; i < 8; ++i)
#pragma unroll
                        for (int j = 0; j < 8; ++j) acc[i][j] = __fmaf_rn(av[i], bv[j], acc[i][j]);
                }
            }
            if (kn_next < kend) {
                const int nb = buf ^ 1;
#pragma unroll
                for (int l = 0; l < 8; ++l) {
                    As[nb][tid % 16][tid / 16 + 16 * l] = pa[l];
                    Bs[nb][tid / 128 + 2 * l][tid % 128] = pb[l];
                }
                buf = nb;
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) total[i][j] = __fadd_rn(total[i][j], acc[i][j]);
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const int r = row0 + ty * 4 + (i & 3) + (i >> 2) * 64;
        if (r >= M) continue;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const int c = col0 + tx * 4 + (j & 3) + (j >> 2) * 64;
            if (c < N) C[(size_t)r * N + c] = lockstep_canon(total[i][j]);
        }
    }
}
