// The residual add (CONTRACT.md §9.7), step for step elementwise::add_spec
// (and shaders/residual.wgsl): x = add(x, y), elementwise, in place.
// Needs prim.cuh.

#if !defined(LM_THREADS)
#error "compile with the defines from kernels/src/cuda/mod.rs"
#endif

extern "C" __global__ void __launch_bounds__(LM_THREADS)
lockstep_residual(float* __restrict__ x, const float* __restrict__ y, long long n)
{
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = ls_canon(__fadd_rn(x[i], y[i]));
    }
}
