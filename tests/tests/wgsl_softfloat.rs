//! The WGSL exact path's integer fma (shaders/softfloat.wgsl), run on the
//! real GPU/driver, against `f32::mul_add` on millions of random and
//! edge-case triples: subnormal results, overflow, ties, exact cancellation.

use lockstep_kernels::conformance::{edge_triples, expected_arith, RandomTriples, EDGE_VALUES};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuOptions, WgpuPath};
use lockstep_tests::open_wgpu;

fn backend() -> Option<WgpuBackend> {
    open_wgpu(WgpuOptions {
        force_path: Some(WgpuPath::Exact),
        ..Default::default()
    })
}

fn check(gpu: &WgpuBackend, triples: &[[u32; 3]]) {
    let got = gpu.eval_arith(WgpuPath::Exact, triples).expect("GPU run");
    let mut bad = 0;
    for (t, g) in triples.iter().zip(&got) {
        let want = expected_arith(*t);
        if *g != want {
            if bad < 5 {
                eprintln!("fma/add/mul{t:08x?}: got {g:08x?}, want {want:08x?}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {} triples differ", triples.len());
}

#[test]
fn edge_value_triples_exhaustive() {
    let Some(gpu) = backend() else { return };
    check(&gpu, &edge_triples(EDGE_VALUES));
}

#[test]
fn eight_million_random_triples() {
    let Some(gpu) = backend() else { return };
    let triples: Vec<[u32; 3]> = RandomTriples::new(0x1234_5678_9ABC_DEF1)
        .take(8_000_000)
        .collect();
    check(&gpu, &triples);
}
