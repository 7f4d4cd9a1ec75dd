//! "Matches the reference": every backend variant present on this machine
//! computes matmul bit for bit like the scalar spec, on edge-case K values,
//! odd shapes, awkward values, and inside and outside a larger batch.

use lockstep_kernels::{matmul_spec, Backend, ErrorKind, MatmulDims};
use lockstep_tests::{assert_bits_eq, backend_tests, matmul, random_values, rng, Target, Values};
use rand::Rng;

/// How much work a target can afford in a test: lavapipe runs WGSL 15–30×
/// slower than the CPU, and the exact soft-float path is slower still.
fn budget(target: Target) -> (usize, usize) {
    // (random shapes, largest dimension)
    match target {
        Target::Cpu(..) | Target::Cuda => (2000, 600),
        Target::WgpuProbed => (150, 256),
        Target::WgpuExact => (60, 256),
    }
}

fn check(backend: &dyn Backend, dims: MatmulDims, values: Values, seed: u64) {
    let mut r = rng(seed);
    let a = random_values(&mut r, dims.m * dims.k, values);
    let b = random_values(&mut r, dims.k * dims.n, values);
    let got = matmul(backend, &a, &b, dims).unwrap_or_else(|e| panic!("{dims:?}: {e}"));
    let want = matmul_spec(&a, &b, dims);
    assert_bits_eq(&got, &want, &format!("{dims:?} {values:?} seed {seed}"));
}

fn k_around_chunk_boundaries(backend: &dyn Backend, _t: Target) {
    for (s, &k) in [0usize, 1, 255, 256, 257, 511, 513, 1000]
        .iter()
        .enumerate()
    {
        for (v, values) in [Values::Plain, Values::MixedMagnitudes, Values::Specials]
            .into_iter()
            .enumerate()
        {
            for &(m, n) in &[(1, 1), (1, 37), (13, 1), (7, 33), (29, 45)] {
                check(
                    backend,
                    MatmulDims::new(m, k, n),
                    values,
                    (s * 10 + v) as u64,
                );
            }
        }
    }
}

fn random_shapes(backend: &dyn Backend, target: Target) {
    let (count, max) = budget(target);
    let mut r = rng(7);
    for i in 0..count {
        // Mostly small shapes (cheap for the spec), now and then a wide one.
        let big = i % 50 == 0;
        let lim = if big { max } else { 48 };
        let m = r.random_range(1..=lim);
        let n = r.random_range(1..=lim);
        let k = r.random_range(0..=if big { max } else { 600 });
        let values = [Values::Plain, Values::MixedMagnitudes, Values::Specials][i % 3];
        check(backend, MatmulDims::new(m, k, n), values, 1000 + i as u64);
    }
}

fn square_sizes_up_to_256(backend: &dyn Backend, _t: Target) {
    for &s in &[31usize, 64, 100, 128, 255, 256] {
        check(backend, MatmulDims::new(s, s, s), Values::Plain, s as u64);
    }
    check(
        backend,
        MatmulDims::new(256, 256, 256),
        Values::MixedMagnitudes,
        3,
    );
}

fn batch_invariance(backend: &dyn Backend, _t: Target) {
    // Rows 37..81 of a 200-row product equal the product of those rows alone,
    // and a single row (matrix-vector) equals its row in the batch.
    let (m, k, n) = (200, 300, 70);
    let mut r = rng(99);
    let a = random_values(&mut r, m * k, Values::MixedMagnitudes);
    let b = random_values(&mut r, k * n, Values::MixedMagnitudes);
    let full = matmul(backend, &a, &b, MatmulDims::new(m, k, n)).unwrap();
    assert_bits_eq(
        &full,
        &matmul_spec(&a, &b, MatmulDims::new(m, k, n)),
        "full",
    );
    let (lo, hi) = (37, 81);
    let part = matmul(
        backend,
        &a[lo * k..hi * k],
        &b,
        MatmulDims::new(hi - lo, k, n),
    )
    .unwrap();
    assert_bits_eq(
        &part,
        &full[lo * n..hi * n],
        "rows 37..81 alone vs in batch",
    );
    let row = matmul(backend, &a[150 * k..151 * k], &b, MatmulDims::new(1, k, n)).unwrap();
    assert_bits_eq(&row, &full[150 * n..151 * n], "row 150 alone vs in batch");
}

fn bad_operands_are_errors_not_panics(backend: &dyn Backend, _t: Target) {
    let e = matmul(backend, &[1.0; 6], &[1.0; 5], MatmulDims::new(2, 3, 2)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape, "{e}");
    let e = matmul(backend, &[1.0; 5], &[1.0; 6], MatmulDims::new(2, 3, 2)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::Shape, "{e}");
    let e = matmul(backend, &[], &[], MatmulDims::new(usize::MAX, 2, 2)).unwrap_err();
    assert_eq!(e.kind, ErrorKind::TooLarge, "{e}");
}

fn empty_outputs(backend: &dyn Backend, _t: Target) {
    assert!(matmul(backend, &[], &[1.0; 3], MatmulDims::new(0, 1, 3))
        .unwrap()
        .is_empty());
    assert!(matmul(backend, &[1.0; 3], &[], MatmulDims::new(3, 1, 0))
        .unwrap()
        .is_empty());
    let c = matmul(backend, &[], &[], MatmulDims::new(2, 0, 2)).unwrap();
    assert_eq!(
        c.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        vec![0; 4]
    );
}

backend_tests!(
    k_around_chunk_boundaries,
    random_shapes,
    square_sizes_up_to_256,
    batch_invariance,
    bad_operands_are_errors_not_panics,
    empty_outputs,
);
