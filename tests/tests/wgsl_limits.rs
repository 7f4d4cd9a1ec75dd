//! The WGSL backend under small binding limits: products whose A or C do not
//! fit one buffer run in row passes and still equal the spec bit for bit;
//! a B that cannot fit is a clear `TooLarge` error, not a device error.

use lockstep_kernels::wgpu::{WgpuBackend, WgpuOptions};
use lockstep_kernels::{matmul_spec, ErrorKind, MatmulDims};
use lockstep_tests::{assert_bits_eq, matmul, open_wgpu, random_values, rng, Values};

fn backend(limit: u64) -> Option<WgpuBackend> {
    open_wgpu(WgpuOptions {
        max_binding_bytes: Some(limit),
        ..Default::default()
    })
}

#[test]
fn large_a_and_c_run_in_row_passes() {
    // 96 KiB per binding: A (150x300 f32 = 176 KiB) needs two passes or more.
    let Some(gpu) = backend(96 << 10) else { return };
    let dims = MatmulDims::new(150, 300, 70);
    let mut r = rng(3);
    let a = random_values(&mut r, dims.m * dims.k, Values::MixedMagnitudes);
    let b = random_values(&mut r, dims.k * dims.n, Values::MixedMagnitudes);
    let got = matmul(&gpu, &a, &b, dims).unwrap();
    assert_bits_eq(&got, &matmul_spec(&a, &b, dims), "row passes");
}

#[test]
fn b_over_the_limit_is_a_clear_error() {
    let Some(gpu) = backend(16 << 10) else { return };
    let dims = MatmulDims::new(2, 100, 100); // B = 39 KiB
    let e = matmul(&gpu, &vec![1.0; 200], &vec![1.0; 10_000], dims).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
    assert!(e.message.contains("binds at most"), "{e}");
}
