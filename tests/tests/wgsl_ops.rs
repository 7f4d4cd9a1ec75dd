//! The language-model ops' WGSL shaders against their scalar specs, bit for
//! bit, on both paths (the probe's choice and the forced exact soft-float
//! path), on random and edge values (±0, subnormals, ±inf, NaN, huge) and
//! sizes that are not multiples of 32 or 256 where the format allows.
//! Also the exact division, square root and e^x every shader uses.

use lockstep_kernels::conformance::{edge_triples, RandomTriples, EDGE_VALUES};
use lockstep_kernels::contract::attention::{attention_spec, AttentionDims};
use lockstep_kernels::contract::canonicalize;
use lockstep_kernels::contract::elementwise::add_spec;
use lockstep_kernels::contract::prim;
use lockstep_kernels::contract::quant::{matvec_spec, Format};
use lockstep_kernels::contract::rmsnorm::rmsnorm_spec;
use lockstep_kernels::contract::rope::{rope_frequencies, rope_spec, rope_table};
use lockstep_kernels::contract::swiglu::swiglu_spec;
use lockstep_kernels::wgpu::{WgpuBackend, WgpuOptions, WgpuPath};
use lockstep_tests::{assert_bits_eq, random_values, random_weights, rng, Values};
use rand::Rng;

fn expected_prims([a, b, c]: [u32; 3]) -> [u32; 3] {
    let (a, b, c) = (f32::from_bits(a), f32::from_bits(b), f32::from_bits(c));
    [
        canonicalize(a / b).to_bits(),
        canonicalize(a.sqrt()).to_bits(),
        canonicalize(prim::exp(c)).to_bits(),
    ]
}

fn check_prims(gpu: &WgpuBackend, triples: &[[u32; 3]]) {
    let got = gpu.eval_prims(triples).expect("GPU run");
    let mut bad = 0;
    for (t, g) in triples.iter().zip(&got) {
        let want = expected_prims(*t);
        if *g != want {
            if bad < 5 {
                eprintln!("div/sqrt/exp {t:08x?}: got {g:08x?}, want {want:08x?}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {} triples differ", triples.len());
}

/// Division, square root and exp: every triple of the edge values, random
/// triples aimed at the hard cases, exact quotients and square roots,
/// subnormal quotients, and exp over its whole finite range.
fn division_sqrt_and_exp_are_exact(gpu: &WgpuBackend) {
    let mut cases = edge_triples(EDGE_VALUES);
    cases.extend(RandomTriples::new(0xD1F1_5EED).take(400_000));
    let mut r = rng(7);
    for _ in 0..100_000 {
        // An exact quotient (a = b·k), a perfect square, exp in range.
        let b = f32::from_bits(r.random::<u32>() & 0x3FFF_FFFF);
        let k = r.random_range(1u32..4096) as f32;
        let s = r.random_range(1u32..4096) as f32
            * f32::from_bits(r.random_range(0x3000_0000u32..0x4800_0000));
        let e = r.random_range(-110.0f32..95.0);
        cases.push([(b * k).to_bits(), b.to_bits(), e.to_bits()]);
        cases.push([(s * s).to_bits(), r.random::<u32>(), r.random::<u32>()]);
        // Quotients near and in the subnormal range.
        let tiny = r.random_range(1u32..0x0100_0000);
        cases.push([
            tiny,
            r.random_range(0x3E00_0000u32..0x4200_0000),
            e.to_bits() ^ 0x8000_0000,
        ]);
    }
    check_prims(gpu, &cases);
}

/// The weight product, every format, odd sizes, specials in scales and x,
/// several tokens.
fn qmatmul_matches_spec(gpu: &WgpuBackend) {
    let mut r = rng(11);
    for format in [
        Format::F32,
        Format::F16,
        Format::BF16,
        Format::Q8_0,
        Format::Q4_1,
    ] {
        let col_sizes: &[usize] = match format {
            Format::Q4_1 | Format::Q8_0 => &[32, 96, 288],
            _ => &[1, 37, 256, 300],
        };
        for &cols in col_sizes {
            for (rows, specials) in [(1, false), (67, true), (130, false)] {
                let raw = random_weights(&mut r, format, rows, cols, specials);
                for tokens in [1, 3] {
                    let kind = if specials {
                        Values::Specials
                    } else {
                        Values::MixedMagnitudes
                    };
                    let x = random_values(&mut r, tokens * cols, kind);
                    let want: Vec<f32> = x
                        .chunks(cols)
                        .flat_map(|xr| matvec_spec(format, &raw, rows, cols, xr))
                        .collect();
                    let got = gpu.qmatmul(format, &raw, rows, cols, &x, tokens).unwrap();
                    let what = format!("{format:?} [{rows}, {cols}] x {tokens} tokens");
                    assert_bits_eq(&got, &want, &what);
                }
            }
        }
    }
}

fn rmsnorm_matches_spec(gpu: &WgpuBackend) {
    let mut r = rng(12);
    for dim in [1, 67, 256, 300, 576] {
        for kind in [Values::Plain, Values::MixedMagnitudes, Values::Specials] {
            let rows = 5;
            let x = random_values(&mut r, rows * dim, kind);
            let w = random_values(&mut r, dim, Values::Plain);
            let eps = 1e-5f32;
            let mut want = vec![0f32; rows * dim];
            for (xr, yr) in x.chunks(dim).zip(want.chunks_mut(dim)) {
                rmsnorm_spec(xr, &w, eps, yr);
            }
            let got = gpu.rmsnorm(&x, &w, eps).unwrap();
            assert_bits_eq(&got, &want, &format!("rmsnorm dim {dim} {kind:?}"));
        }
    }
}

fn rope_matches_spec(gpu: &WgpuBackend) {
    let mut r = rng(13);
    for (heads, hd) in [(3, 10), (9, 64), (1, 2)] {
        let width = heads * hd;
        let freqs = rope_frequencies(10000.0, hd);
        let positions = [0usize, 1, 17, 4095];
        for kind in [Values::Plain, Values::Specials] {
            let x = random_values(&mut r, positions.len() * width, kind);
            let (mut cos, mut sin) = (Vec::new(), Vec::new());
            let mut want = x.clone();
            for (i, &pos) in positions.iter().enumerate() {
                let (c, s) = rope_table(&freqs, pos);
                rope_spec(&mut want[i * width..(i + 1) * width], hd, &c, &s);
                cos.extend(c);
                sin.extend(s);
            }
            let got = gpu.rope(&x, width, hd, &cos, &sin).unwrap();
            assert_bits_eq(&got, &want, &format!("rope {heads}x{hd} {kind:?}"));
        }
    }
}

fn attention_matches_spec(gpu: &WgpuBackend) {
    let mut r = rng(14);
    for (dims, pos0, rows, kind) in [
        (
            AttentionDims {
                n_heads: 4,
                n_kv_heads: 2,
                head_dim: 12,
            },
            5,
            3,
            Values::Plain,
        ),
        (
            AttentionDims {
                n_heads: 3,
                n_kv_heads: 3,
                head_dim: 7,
            },
            0,
            4,
            Values::MixedMagnitudes,
        ),
        (
            AttentionDims {
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 8,
            },
            2,
            2,
            Values::Specials,
        ),
        // More than one 256-chunk of positions and of head dims.
        (
            AttentionDims {
                n_heads: 1,
                n_kv_heads: 1,
                head_dim: 8,
            },
            300,
            1,
            Values::Plain,
        ),
        (
            AttentionDims {
                n_heads: 2,
                n_kv_heads: 1,
                head_dim: 260,
            },
            300,
            1,
            Values::Plain,
        ),
    ] {
        let span = pos0 + rows;
        let q = random_values(&mut r, rows * dims.q_dim(), kind);
        let keys = random_values(&mut r, span * dims.kv_dim(), kind);
        let values = random_values(&mut r, span * dims.kv_dim(), kind);
        let mut want = vec![0f32; q.len()];
        for i in 0..rows {
            let pos = pos0 + i;
            attention_spec(
                dims,
                &q[i * dims.q_dim()..(i + 1) * dims.q_dim()],
                &keys[..(pos + 1) * dims.kv_dim()],
                &values[..(pos + 1) * dims.kv_dim()],
                pos,
                &mut want[i * dims.q_dim()..(i + 1) * dims.q_dim()],
            );
        }
        let got = gpu.attention(dims, &q, &keys, &values, pos0).unwrap();
        assert_bits_eq(
            &got,
            &want,
            &format!("attention {dims:?} at {pos0}, {kind:?}"),
        );
    }
}

fn swiglu_and_residual_match_spec(gpu: &WgpuBackend) {
    let mut r = rng(15);
    for kind in [Values::Plain, Values::MixedMagnitudes, Values::Specials] {
        let n = 1000;
        let g = random_values(&mut r, n, kind);
        let u = random_values(&mut r, n, kind);
        let mut want = vec![0f32; n];
        swiglu_spec(&g, &u, &mut want);
        assert_bits_eq(
            &gpu.swiglu(&g, &u).unwrap(),
            &want,
            &format!("swiglu {kind:?}"),
        );
        let mut sum = g.clone();
        add_spec(&mut sum, &u);
        assert_bits_eq(
            &gpu.residual(&g, &u).unwrap(),
            &sum,
            &format!("residual {kind:?}"),
        );
    }
}

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
