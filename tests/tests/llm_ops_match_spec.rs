//! The language-model ops' fast paths against their scalar specs, bit for
//! bit, on every CPU ISA present (AVX-512, AVX2, portable) and 1–3 threads,
//! on random and edge values: ±0, subnormals, ±inf, NaN, huge, all-equal
//! rows. (WGSL and CUDA kernels for these ops come with the next issue; the
//! bodies take the ISA as their backend.)

use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::contract::attention::{attention_spec, AttentionDims};
use lockstep_kernels::contract::quant::{dequantize, matvec_spec, Format};
use lockstep_kernels::contract::sample::{sample_spec, Sampling};
use lockstep_kernels::contract::softmax::softmax_spec;
use lockstep_kernels::cpu::attention::KvLayer;
use lockstep_kernels::cpu::qmatvec::PackedMatrix;
use lockstep_kernels::cpu::team::Team;
use lockstep_kernels::cpu::Isa;
use lockstep_tests::{assert_bits_eq, random_values, random_weights, Values};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| i.is_supported() && *i != Isa::Neon)
        .collect()
}

fn pools() -> Vec<Option<Team>> {
    let mut v = vec![None];
    for t in [2, 3] {
        v.push(Some(Team::new(t).unwrap()));
    }
    v
}

#[test]
fn quantised_matvec_matches_spec() {
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let pools = pools();
    for format in [
        Format::Q4_1,
        Format::Q8_0,
        Format::F32,
        Format::F16,
        Format::BF16,
    ] {
        let col_sizes: &[usize] = match format {
            Format::Q4_1 | Format::Q8_0 => &[32, 96, 576],
            _ => &[1, 255, 256, 257, 600],
        };
        for &cols in col_sizes {
            for (rows, specials) in [(1, false), (37, true), (64, false), (200, true)] {
                let raw = random_weights(&mut rng, format, rows, cols, specials);
                let m = PackedMatrix::pack(format, rows, cols, &raw).unwrap();
                for tokens in [1, 3, 4, 9] {
                    let kind = if specials {
                        Values::Specials
                    } else {
                        Values::MixedMagnitudes
                    };
                    let x = random_values(&mut rng, tokens * cols, kind);
                    let want: Vec<f32> = x
                        .chunks(cols)
                        .flat_map(|xr| matvec_spec(format, &raw, rows, cols, xr))
                        .collect();
                    for isa in isas() {
                        for pool in &pools {
                            let mut y = vec![0f32; tokens * rows];
                            m.matmul(&x, tokens, &mut y, isa, pool.as_ref());
                            let what = format!("{format:?} [{rows}, {cols}] × {tokens} tokens on {isa:?}, {:?} threads", pool.as_ref().map(|p| p.size()));
                            assert_bits_eq(&y, &want, &what);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn dequantisation_is_exact_where_the_contract_says() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let raw = random_weights(&mut rng, Format::Q8_0, 4, 64, false);
    let w = dequantize(Format::Q8_0, &raw, 256);
    for (b, blk) in raw.chunks_exact(34).enumerate() {
        let d = lockstep_kernels::contract::quant::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]))
            as f64;
        for j in 0..32 {
            assert_eq!(
                w[b * 32 + j] as f64,
                (blk[2 + j] as i8) as f64 * d,
                "q·d is exact in f32"
            );
        }
    }
}

#[test]
fn attention_matches_spec() {
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    for dims in [
        AttentionDims {
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 8,
        },
        AttentionDims {
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
        },
        AttentionDims {
            n_heads: 2,
            n_kv_heads: 2,
            head_dim: 32,
        },
    ] {
        let n = 300; // crosses a 256-chunk of positions
        for kind in [Values::Plain, Values::Specials, Values::MixedMagnitudes] {
            let keys = random_values(&mut rng, n * dims.kv_dim(), kind);
            let values = random_values(&mut rng, n * dims.kv_dim(), kind);
            let mut kv = KvLayer::new(dims, n);
            for t in 0..n {
                kv.write(
                    t,
                    &keys[t * dims.kv_dim()..][..dims.kv_dim()],
                    &values[t * dims.kv_dim()..][..dims.kv_dim()],
                );
            }
            for pos in [0, 1, 15, 16, 17, 255, 256, 299] {
                let q = random_values(&mut rng, dims.q_dim(), kind);
                let mut want = vec![0f32; dims.q_dim()];
                attention_spec(dims, &q, &keys, &values, pos, &mut want);
                for isa in isas() {
                    let mut got = vec![0f32; dims.q_dim()];
                    kv.attend(&q, pos, &mut got, isa);
                    assert_bits_eq(&got, &want, &format!("{dims:?} pos {pos} {kind:?} {isa:?}"));
                    // Head by head, as the engine's team splits it.
                    let hd = dims.head_dim;
                    for h in 0..dims.n_heads {
                        let mut one = vec![0f32; hd];
                        kv.attend_heads(&q, pos, h..h + 1, &mut one, isa);
                        assert_bits_eq(
                            &one,
                            &want[h * hd..(h + 1) * hd],
                            &format!("{dims:?} head {h} pos {pos} {isa:?}"),
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn softmax_argmax_and_sampling_edges() {
    // All equal: uniform, exactly.
    let mut x = vec![3.5f32; 300];
    softmax_spec(&mut x);
    assert!(x.iter().all(|&v| v == x[0]));
    // NaN anywhere: all NaN (canonical).
    let mut x = vec![0.0, f32::NAN, 1.0];
    softmax_spec(&mut x);
    assert!(x.iter().all(|v| v.to_bits() == 0x7FC0_0000));
    // A +inf makes its own e = exp(inf − inf) NaN, so the sum and every
    // output are NaN, as written.
    let mut x = vec![0.0, f32::INFINITY];
    softmax_spec(&mut x);
    assert!(x.iter().all(|v| v.to_bits() == 0x7FC0_0000));
    // −inf entries get exactly 0.
    let mut x = vec![f32::NEG_INFINITY, 0.0, 0.0];
    softmax_spec(&mut x);
    assert_eq!(x, vec![0.0, 0.5, 0.5]);

    assert_eq!(
        argmax_spec(&[1.0, 3.0, 3.0, 2.0]),
        Some(1),
        "lowest index wins ties"
    );
    assert_eq!(argmax_spec(&[-0.0, 0.0]), Some(0), "−0 = +0");
    assert_eq!(
        argmax_spec(&[1.0, f32::NAN, 5.0, f32::NAN]),
        Some(1),
        "first NaN wins"
    );
    assert_eq!(argmax_spec(&[]), None);

    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let logits = random_values(&mut rng, 1000, Values::Plain)
        .iter()
        .map(|v| v * 8.0)
        .collect::<Vec<_>>();
    let s = Sampling {
        temperature: 0.8,
        top_k: 40,
        top_p: 0.9,
        seed: 42,
    };
    for pos in 0..50 {
        assert_eq!(
            sample_spec(&logits, &s, pos),
            sample_spec(&logits, &s, pos),
            "a draw is a function of (seed, position)"
        );
    }
    let draws: std::collections::BTreeSet<_> = (0..200)
        .map(|p| sample_spec(&logits, &s, p).unwrap())
        .collect();
    assert!(draws.len() > 1, "different positions draw differently");
    let top1 = Sampling { top_k: 1, ..s };
    assert_eq!(sample_spec(&logits, &top1, 3), argmax_spec(&logits));
    // A temperature so small that the scaled logits overflow: argmax.
    let tiny = Sampling {
        temperature: 1e-40,
        ..s
    };
    assert_eq!(sample_spec(&logits, &tiny, 3), argmax_spec(&logits));
    let greedy = Sampling::GREEDY;
    assert_eq!(sample_spec(&logits, &greedy, 3), argmax_spec(&logits));
}

#[test]
fn elementwise_steps_match_spec() {
    use lockstep_kernels::contract::elementwise::add_spec;
    use lockstep_kernels::contract::rmsnorm::rmsnorm_spec;
    use lockstep_kernels::contract::rope::{rope_frequencies, rope_spec, rope_table};
    use lockstep_kernels::contract::swiglu::swiglu_spec;
    use lockstep_kernels::model::engine::steps;
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    for kind in [Values::Plain, Values::Specials, Values::MixedMagnitudes] {
        for n in [1usize, 64, 255, 256, 257, 576] {
            let x = random_values(&mut rng, n, kind);
            let w = random_values(&mut rng, n, kind);
            let mut want = vec![0f32; n];
            rmsnorm_spec(&x, &w, 1e-5, &mut want);
            let mut want_add = x.clone();
            add_spec(&mut want_add, &w);
            let mut want_swiglu = vec![0f32; n];
            swiglu_spec(&x, &w, &mut want_swiglu);
            for isa in isas() {
                let mut got = vec![0f32; n];
                steps::rmsnorm(isa, &x, &w, 1e-5, &mut got);
                assert_bits_eq(&got, &want, &format!("rmsnorm {n} {kind:?} {isa:?}"));
                let mut got = x.clone();
                steps::residual(isa, &mut got, &w);
                assert_bits_eq(&got, &want_add, &format!("add {n} {kind:?} {isa:?}"));
                let mut got = vec![0f32; n];
                steps::swiglu(isa, &x, &w, &mut got);
                assert_bits_eq(&got, &want_swiglu, &format!("swiglu {n} {kind:?} {isa:?}"));
            }
        }
        for (theta, hd) in [(10_000.0f32, 8usize), (100_000.0, 64)] {
            let freqs = rope_frequencies(theta, hd);
            for pos in [0usize, 1, 17, 511, 8191] {
                let (cos, sin) = rope_table(&freqs, pos);
                let x = random_values(&mut rng, hd * 3, kind);
                let mut want = x.clone();
                rope_spec(&mut want, hd, &cos, &sin);
                for isa in isas() {
                    let mut got = x.clone();
                    steps::rope(isa, &mut got, hd, &cos, &sin);
                    assert_bits_eq(
                        &got,
                        &want,
                        &format!("rope θ {theta} pos {pos} {kind:?} {isa:?}"),
                    );
                }
            }
        }
    }
}
