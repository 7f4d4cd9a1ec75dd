//! The language-model ops and the model engine on a GPU backend, written
//! once: [`DeviceOps`] is what the WGSL and CUDA backends offer beyond the
//! `Backend` op interface (each op on host slices, the exact primitives,
//! a resident model), and the test bodies here take any of them.
//! `tests/tests/wgsl_ops.rs` and `wgsl_model.rs` stamp them out on both
//! WGSL paths ([`crate::wgsl_tests!`]), `cuda_ops.rs` and `cuda_model.rs`
//! on CUDA device 0 ([`crate::cuda_tests!`]): one body, every backend
//! present.

use lockstep_kernels::conformance::{edge_triples, RandomTriples, EDGE_VALUES};
use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::contract::attention::{attention_spec, AttentionDims};
use lockstep_kernels::contract::canonicalize;
use lockstep_kernels::contract::elementwise::add_spec;
use lockstep_kernels::contract::prim;
use lockstep_kernels::contract::quant::{matvec_spec, Format};
use lockstep_kernels::contract::rmsnorm::rmsnorm_spec;
use lockstep_kernels::contract::rope::{rope_frequencies, rope_spec, rope_table};
use lockstep_kernels::contract::swiglu::swiglu_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::cuda::{CudaBackend, CudaModel};
use lockstep_kernels::model::{Engine, Forward, Model};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuModel};
use lockstep_kernels::{Digest, Result};
use rand::Rng;

use crate::models::{shared_model, smollm2};
use crate::{assert_bits_eq, random_values, random_weights, rng, Values};

/// A GPU backend's language-model ops on host slices, its exact
/// primitives, and its model engine.
pub trait DeviceOps {
    /// The model resident on this device.
    type Resident<'a>: Forward
    where
        Self: 'a;

    /// Uploads `model` (weights once; sequences keep their KV caches there).
    fn resident<'a>(&'a self, model: &'a Model) -> Result<Self::Resident<'a>>;

    /// `[div(a, b), sqrt(a), exp(c)]` for each triple of bit patterns.
    fn eval_prims(&self, triples: &[[u32; 3]]) -> Result<Vec<[u32; 3]>>;

    /// `W·x[t]` for each of `tokens` rows of `x` ([tokens, rows] out).
    fn qmatmul(
        &self,
        format: Format,
        raw: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
    ) -> Result<Vec<f32>>;

    fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>>;

    fn rope(
        &self,
        x: &[f32],
        width: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Vec<f32>>;

    fn attention(
        &self,
        dims: AttentionDims,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        pos0: usize,
    ) -> Result<Vec<f32>>;

    fn swiglu(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>>;

    fn residual(&self, x: &[f32], y: &[f32]) -> Result<Vec<f32>>;
}

/// Implements [`DeviceOps`] for a backend whose inherent methods have the
/// trait's names and signatures.
macro_rules! device_ops {
    ($backend:ty, $resident:ident) => {
        impl DeviceOps for $backend {
            type Resident<'a> = $resident<'a>;

            fn resident<'a>(&'a self, model: &'a Model) -> Result<$resident<'a>> {
                $resident::new(self, model)
            }

            fn eval_prims(&self, triples: &[[u32; 3]]) -> Result<Vec<[u32; 3]>> {
                <$backend>::eval_prims(self, triples)
            }

            fn qmatmul(
                &self,
                format: Format,
                raw: &[u8],
                rows: usize,
                cols: usize,
                x: &[f32],
                tokens: usize,
            ) -> Result<Vec<f32>> {
                <$backend>::qmatmul(self, format, raw, rows, cols, x, tokens)
            }

            fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
                <$backend>::rmsnorm(self, x, w, eps)
            }

            fn rope(
                &self,
                x: &[f32],
                width: usize,
                head_dim: usize,
                cos: &[f32],
                sin: &[f32],
            ) -> Result<Vec<f32>> {
                <$backend>::rope(self, x, width, head_dim, cos, sin)
            }

            fn attention(
                &self,
                dims: AttentionDims,
                q: &[f32],
                keys: &[f32],
                values: &[f32],
                pos0: usize,
            ) -> Result<Vec<f32>> {
                <$backend>::attention(self, dims, q, keys, values, pos0)
            }

            fn swiglu(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
                <$backend>::swiglu(self, g, u)
            }

            fn residual(&self, x: &[f32], y: &[f32]) -> Result<Vec<f32>> {
                <$backend>::residual(self, x, y)
            }
        }
    };
}

device_ops!(WgpuBackend, WgpuModel);
device_ops!(CudaBackend, CudaModel);

fn expected_prims([a, b, c]: [u32; 3]) -> [u32; 3] {
    let (a, b, c) = (f32::from_bits(a), f32::from_bits(b), f32::from_bits(c));
    [
        canonicalize(a / b).to_bits(),
        canonicalize(a.sqrt()).to_bits(),
        canonicalize(prim::exp(c)).to_bits(),
    ]
}

fn check_prims(gpu: &impl DeviceOps, triples: &[[u32; 3]]) {
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
    assert_eq!(got.len(), triples.len(), "results for every triple");
    assert_eq!(bad, 0, "{bad} of {} triples differ", triples.len());
}

/// Division, square root and exp: every triple of the edge values, random
/// triples aimed at the hard cases, exact quotients and square roots,
/// subnormal quotients, and exp over its whole finite range.
pub fn division_sqrt_and_exp_are_exact(gpu: &impl DeviceOps) {
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
pub fn qmatmul_matches_spec(gpu: &impl DeviceOps) {
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

pub fn rmsnorm_matches_spec(gpu: &impl DeviceOps) {
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

pub fn rope_matches_spec(gpu: &impl DeviceOps) {
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

pub fn attention_matches_spec(gpu: &impl DeviceOps) {
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

pub fn swiglu_and_residual_match_spec(gpu: &impl DeviceOps) {
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

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Greedy generation on any engine: the logits bits after the prompt and
/// after each generated token, and the trace.
pub fn greedy_run<F: Forward>(
    engine: &F,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<Digest>>) {
    let mut seq = engine.sequence(prompt.len() + steps, true).unwrap();
    let mut logits = vec![engine
        .forward(&mut [&mut seq], &[prompt])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()];
    for _ in 0..steps {
        let t = argmax_spec(logits.last().unwrap()).unwrap() as u32;
        logits.push(
            engine
                .forward(&mut [&mut seq], &[&[t]])
                .unwrap()
                .pop()
                .unwrap()
                .unwrap(),
        );
    }
    let trace = F::take_trace(&mut seq).unwrap();
    (logits.iter().map(|l| bits(l)).collect(), trace)
}

fn take_trace<F: Forward>(_: &F, seq: &mut F::Seq) -> Option<Vec<Vec<Digest>>> {
    F::take_trace(seq)
}

/// [`greedy_run`] on the CPU engine (the reference).
pub fn cpu_run(model: &Model, prompt: &[u32], steps: usize) -> (Vec<Vec<u32>>, Vec<Vec<Digest>>) {
    let engine = Engine::new(model, 2, Isa::detect()).unwrap();
    greedy_run(&engine, prompt, steps)
}

pub const PROMPTS: &[&[u32]] = &[
    &[1, 400, 45, 300, 7, 90],
    &[1, 22],
    &[1, 5, 9, 200, 201, 3, 77, 18, 4],
];

/// Both tiny llama2.c models: the device gives the CPU engine's logits
/// bits at every greedy step and its trace.
pub fn tiny_models_match_the_cpu(gpu: &impl DeviceOps) {
    for name in ["stories260K.bin", "aidreams260K.bin"] {
        let model = Model::load(&shared_model(name)).unwrap();
        let on_gpu = gpu.resident(&model).unwrap();
        for prompt in PROMPTS {
            let steps = 4;
            let (want, want_trace) = cpu_run(&model, prompt, steps);
            let (got, trace) = greedy_run(&on_gpu, prompt, steps);
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{name} {prompt:?}: logits differ at step {step}");
            }
            assert_eq!(trace, want_trace, "{name} {prompt:?}: trace");
        }
    }
}

/// Three sequences in one batch, the longest prompt fed in two chunks:
/// each sequence's logits and trace are what it gets alone on the CPU.
pub fn a_batch_and_chunked_prefill_match_the_cpu(gpu: &impl DeviceOps) {
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let on_gpu = gpu.resident(&model).unwrap();
    let want: Vec<_> = PROMPTS.iter().map(|p| cpu_run(&model, p, 0)).collect();
    let mut seqs: Vec<_> = PROMPTS
        .iter()
        .map(|p| on_gpu.sequence(p.len(), true).unwrap())
        .collect();
    let (a, b) = PROMPTS[2].split_at(4);
    let mut refs: Vec<&mut _> = seqs.iter_mut().collect();
    // First pass: prompts 0 and 1 whole, prompt 2's first chunk.
    let first = on_gpu
        .forward(&mut refs, &[PROMPTS[0], PROMPTS[1], a])
        .unwrap();
    // Second pass: prompt 2's rest alone (the others fed nothing).
    let second = on_gpu.forward(&mut refs, &[&[], &[], b]).unwrap();
    assert!(second[0].is_none() && second[1].is_none());
    let logits = [
        first[0].clone().unwrap(),
        first[1].clone().unwrap(),
        second[2].clone().unwrap(),
    ];
    for (i, (l, seq)) in logits.iter().zip(seqs.iter_mut()).enumerate() {
        assert!(bits(l) == want[i].0[0], "sequence {i}: logits differ");
        assert_eq!(
            take_trace(&on_gpu, seq),
            Some(want[i].1.clone()),
            "sequence {i}: trace"
        );
    }
}

/// SmolLM2-135M (Q4_1), where it was fetched: a prompt and three greedy
/// tokens give the CPU's logits bits at every step and its trace.
pub fn smollm2_matches_the_cpu(gpu: &impl DeviceOps) {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    // "The capital of France is" in SmolLM2's tokenizer.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let steps = 3;
    let (want, want_trace) = cpu_run(&model, &prompt, steps);
    let t0 = std::time::Instant::now();
    let on_gpu = gpu.resident(&model).unwrap();
    let (got, trace) = greedy_run(&on_gpu, &prompt, steps);
    eprintln!(
        "SmolLM2, {} + {steps} tokens on {}: {:.1} s",
        prompt.len(),
        on_gpu.describe(),
        t0.elapsed().as_secs_f64()
    );
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "SmolLM2: logits differ at step {step}");
    }
    assert_eq!(trace, want_trace, "SmolLM2 trace");
}
