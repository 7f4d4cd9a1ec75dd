// The gated feed-forward activation (CONTRACT.md §9.5), step for step
// swiglu::swiglu_spec (and shaders/swiglu.wgsl): h = mul(silu(g), u),
// elementwise, silu = div(g, add(1, exp(-g))). Needs prim.cuh.

#if !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_swiglu(const float* __restrict__ g, const float* __restrict__ u,
                float* __restrict__ h, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        h[i] = ls_canon(__fmul_rn(ls_silu(g[i]), u[i]));
    }
}
