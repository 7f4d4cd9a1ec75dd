//! The language-model ops' CUDA kernels (`kernels/cuda/*.cu`) against their
//! scalar specs, bit for bit, on random and edge values (±0, subnormals,
//! ±inf, NaN, huge) and sizes that are not multiples of 32 or 256 where the
//! format allows; also the division, square root and e^x of `prim.cuh`.
//! The same bodies as the WGSL shaders' (`tests/device_ops.rs`), on CUDA
//! device 0; skipped without a driver, a failure then with
//! `LOCKSTEP_REQUIRE_CUDA=1`.

use lockstep_tests::device_ops::{
    attention_matches_spec, division_sqrt_and_exp_are_exact, qmatmul_matches_spec,
    rmsnorm_matches_spec, rope_matches_spec, swiglu_and_residual_match_spec,
};

lockstep_tests::cuda_tests!(
    division_sqrt_and_exp_are_exact,
    qmatmul_matches_spec,
    rmsnorm_matches_spec,
    rope_matches_spec,
    attention_matches_spec,
    swiglu_and_residual_match_spec,
);
