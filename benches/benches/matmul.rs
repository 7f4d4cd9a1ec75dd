//! Matmul throughput: lockstep's CPU backend next to faer and
//! matrixmultiply with the same thread count, at several sizes. Compare the
//! ratios within one run; absolute times on shared machines are noise.
//!
//! `MATMUL_NUM_THREADS` sets matrixmultiply's threads (read once per process);
//! `LOCKSTEP_BENCH_THREADS` sets lockstep's and faer's (default 1).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lockstep::bench::random_matrix;
use lockstep_kernels::cpu::CpuBackend;
use lockstep_kernels::MatmulDims;

fn matmul(c: &mut Criterion) {
    let threads: usize = std::env::var("LOCKSTEP_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let cpu = CpuBackend::new(threads).expect("cpu backend");
    let mut group = c.benchmark_group(format!("matmul_f32_{threads}t"));
    group.sample_size(10);
    for &s in &[256usize, 512, 1024] {
        let dims = MatmulDims::new(s, s, s);
        let a = random_matrix(s * s, 1);
        let b = random_matrix(s * s, 2);
        let mut out = vec![0.0f32; s * s];
        group.throughput(Throughput::Elements(dims.flops() as u64));
        group.bench_with_input(BenchmarkId::new("lockstep", s), &s, |bench, _| {
            bench.iter(|| lockstep_kernels::backend::matmul(&cpu, &a, &b, dims).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("faer", s), &s, |bench, _| {
            bench.iter(|| {
                let par = if threads == 1 {
                    faer::Par::Seq
                } else {
                    faer::Par::rayon(threads)
                };
                let dst = faer::MatMut::from_row_major_slice_mut(&mut out, s, s);
                let lhs = faer::MatRef::from_row_major_slice(&a, s, s);
                let rhs = faer::MatRef::from_row_major_slice(&b, s, s);
                cpu.install(|| {
                    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, par)
                });
            })
        });
        group.bench_with_input(BenchmarkId::new("matrixmultiply", s), &s, |bench, _| {
            bench.iter(|| unsafe {
                matrixmultiply::sgemm(
                    s,
                    s,
                    s,
                    1.0,
                    a.as_ptr(),
                    s as isize,
                    1,
                    b.as_ptr(),
                    s as isize,
                    1,
                    0.0,
                    out.as_mut_ptr(),
                    s as isize,
                    1,
                )
            })
        });
    }
    group.finish();
}

fn spec_vs_fast(c: &mut Criterion) {
    // How much the fast path buys over the executable spec.
    let cpu = CpuBackend::new(1).expect("cpu backend");
    let s = 192;
    let dims = MatmulDims::new(s, s, s);
    let a = random_matrix(s * s, 1);
    let b = random_matrix(s * s, 2);
    let mut group = c.benchmark_group("spec_vs_fast_192");
    group.sample_size(10);
    group.bench_function("spec", |bench| {
        bench.iter(|| lockstep_kernels::matmul_spec(&a, &b, dims))
    });
    group.bench_function("fast", |bench| {
        bench.iter(|| lockstep_kernels::backend::matmul(&cpu, &a, &b, dims).unwrap())
    });
    group.finish();
}

criterion_group!(benches, matmul, spec_vs_fast);
criterion_main!(benches);
