// Elementwise check of prim.cuh (as shaders/prim_check.wgsl): for each
// triple of bit patterns (a, b, c), writes div(a, b), sqrt(a) and exp(c),
// canonicalised. Tests compare them with the CPU's correctly rounded / and
// sqrt and the contract's exp. Needs prim.cuh.

#if !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_prim_check(const unsigned* __restrict__ triples, unsigned* __restrict__ results,
                    long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float a = __uint_as_float(triples[3 * i]);
        const float b = __uint_as_float(triples[3 * i + 1]);
        const float c = __uint_as_float(triples[3 * i + 2]);
        results[3 * i] = __float_as_uint(ls_canon(__fdiv_rn(a, b)));
        results[3 * i + 1] = __float_as_uint(ls_canon(__fsqrt_rn(a)));
        results[3 * i + 2] = __float_as_uint(ls_canon(ls_exp(c)));
    }
}
