//! The language-model ops' WGSL shaders against their scalar specs, bit for
//! bit, on both paths (the probe's choice and the forced exact soft-float
//! path), on random and edge values (±0, subnormals, ±inf, NaN, huge) and
//! sizes that are not multiples of 32 or 256 where the format allows.
//! Also the exact division, square root and e^x every shader uses. The
//! bodies are shared with CUDA (`cuda_ops.rs`): `tests/device_ops.rs`.

use lockstep_kernels::contract::quant::{matvec_spec, Format};
use lockstep_kernels::wgpu::{WgpuOptions, WgpuPath};
use lockstep_tests::device_ops::{
    attention_matches_spec, division_sqrt_and_exp_are_exact, qmatmul_matches_spec,
    rmsnorm_matches_spec, rope_matches_spec, swiglu_and_residual_match_spec,
};
use lockstep_tests::{assert_bits_eq, random_values, random_weights, rng, Values};

lockstep_tests::wgsl_tests!(
    division_sqrt_and_exp_are_exact,
    qmatmul_matches_spec,
    rmsnorm_matches_spec,
    rope_matches_spec,
    attention_matches_spec,
    swiglu_and_residual_match_spec,
);

/// A weight matrix larger than one binding is uploaded in parts of whole
/// rows; the product is the same bits.
#[test]
fn weights_beyond_one_binding_run_in_parts() {
    let Some(gpu) = lockstep_tests::open_wgpu(WgpuOptions {
        force_path: Some(WgpuPath::Exact),
        max_binding_bytes: Some(4096),
    }) else {
        return;
    };
    let mut r = rng(16);
    for (format, cols) in [(Format::F32, 100), (Format::Q8_0, 64)] {
        let rows = 200;
        let raw = random_weights(&mut r, format, rows, cols, false);
        let x = random_values(&mut r, 2 * cols, Values::Plain);
        let w = gpu.upload_matrix(format, rows, cols, &raw).unwrap();
        assert!(w.parts() > 1, "{format:?}: {} part(s)", w.parts());
        let want: Vec<f32> = x
            .chunks(cols)
            .flat_map(|xr| matvec_spec(format, &raw, rows, cols, xr))
            .collect();
        let got = gpu.qmatmul(format, &raw, rows, cols, &x, 2).unwrap();
        assert_bits_eq(&got, &want, &format!("{format:?} in parts"));
    }
}
