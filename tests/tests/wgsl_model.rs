//! The whole model on WGSL (lavapipe in CI) against the CPU engine: the
//! tiny llama2.c models give the same logits bits, the same greedy tokens
//! and the same per-(position, layer) trace digests, alone and in a batch,
//! with the prompt fed at once or in chunks, on both WGSL paths.

use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::{Engine, Model};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuModel};
use lockstep_kernels::Digest;
use lockstep_tests::models::{shared_model, smollm2};

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Greedy generation on the CPU engine: the logits after the prompt and
/// after each generated token, and the trace.
fn cpu_run(model: &Model, prompt: &[u32], steps: usize) -> (Vec<Vec<u32>>, Vec<Vec<Digest>>) {
    let engine = Engine::new(model, 2, Isa::detect()).unwrap();
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
    (logits.iter().map(|l| bits(l)).collect(), seq.trace.unwrap())
}

/// [`cpu_run`] on WGSL.
fn gpu_run(
    on_gpu: &WgpuModel<'_>,
    prompt: &[u32],
    steps: usize,
) -> (Vec<Vec<u32>>, Vec<Vec<Digest>>) {
    let mut seq = on_gpu.sequence(prompt.len() + steps, true).unwrap();
    let mut logits = vec![on_gpu
        .forward(&mut [&mut seq], &[prompt])
        .unwrap()
        .pop()
        .unwrap()
        .unwrap()];
    for _ in 0..steps {
        let t = argmax_spec(logits.last().unwrap()).unwrap() as u32;
        logits.push(
            on_gpu
                .forward(&mut [&mut seq], &[&[t]])
                .unwrap()
                .pop()
                .unwrap()
                .unwrap(),
        );
    }
    (logits.iter().map(|l| bits(l)).collect(), seq.trace.unwrap())
}

const PROMPTS: &[&[u32]] = &[
    &[1, 400, 45, 300, 7, 90],
    &[1, 22],
    &[1, 5, 9, 200, 201, 3, 77, 18, 4],
];

fn tiny_models_match_the_cpu(gpu: &WgpuBackend) {
    for name in ["stories260K.bin", "aidreams260K.bin"] {
        let model = Model::load(&shared_model(name)).unwrap();
        let on_gpu = WgpuModel::new(gpu, &model).unwrap();
        for prompt in PROMPTS {
            let steps = 4;
            let (want, want_trace) = cpu_run(&model, prompt, steps);
            let (got, trace) = gpu_run(&on_gpu, prompt, steps);
            for (step, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(g == w, "{name} {prompt:?}: logits differ at step {step}");
            }
            assert_eq!(trace, want_trace, "{name} {prompt:?}: trace");
        }
    }
}

/// Three sequences in one batch, the longest prompt fed in two chunks:
/// each sequence's logits and trace are what it gets alone on the CPU.
fn a_batch_and_chunked_prefill_match_the_cpu(gpu: &WgpuBackend) {
    let model = Model::load(&shared_model("stories260K.bin")).unwrap();
    let on_gpu = WgpuModel::new(gpu, &model).unwrap();
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
    for (i, (l, seq)) in logits.iter().zip(seqs).enumerate() {
        assert!(bits(l) == want[i].0[0], "sequence {i}: logits differ");
        assert_eq!(seq.trace.unwrap(), want[i].1, "sequence {i}: trace");
    }
}

lockstep_tests::wgsl_tests!(
    tiny_models_match_the_cpu,
    a_batch_and_chunked_prefill_match_the_cpu
);

/// SmolLM2-135M (Q4_1) on WGSL: a prompt and three greedy tokens give the
/// CPU's logits bits at every step and its trace, on the path the probe
/// picks (the exact soft-float path on lavapipe: a few seconds).
#[test]
fn smollm2_on_wgsl_matches_the_cpu() {
    let Some(path) = smollm2() else { return };
    let Some(gpu) = lockstep_tests::open_wgsl(None) else {
        return;
    };
    let model = Model::load(&path).unwrap();
    // "The capital of France is" in SmolLM2's tokenizer.
    let prompt = [504u32, 3575, 282, 4649, 314];
    let steps = 3;
    let (want, want_trace) = cpu_run(&model, &prompt, steps);
    let t0 = std::time::Instant::now();
    let on_gpu = WgpuModel::new(&gpu, &model).unwrap();
    let (got, trace) = gpu_run(&on_gpu, &prompt, steps);
    eprintln!(
        "SmolLM2, {} + {steps} tokens on {:?}: {:.1} s",
        prompt.len(),
        gpu.path(),
        t0.elapsed().as_secs_f64()
    );
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!(g == w, "SmolLM2: logits differ at step {step}");
    }
    assert_eq!(trace, want_trace, "SmolLM2 trace");
}
