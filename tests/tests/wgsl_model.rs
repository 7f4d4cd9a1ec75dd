//! The whole model on WGSL (lavapipe in CI) against the CPU engine: the
//! tiny llama2.c models give the same logits bits, the same greedy tokens
//! and the same per-(position, layer) trace digests, alone and in a batch,
//! with the prompt fed at once or in chunks, on both WGSL paths. The
//! bodies are shared with CUDA (`cuda_model.rs`): `tests/device_ops.rs`.

use lockstep_tests::device_ops::{
    a_batch_and_chunked_prefill_match_the_cpu, smollm2_matches_the_cpu, tiny_models_match_the_cpu,
};

lockstep_tests::wgsl_tests!(
    tiny_models_match_the_cpu,
    a_batch_and_chunked_prefill_match_the_cpu
);

/// SmolLM2-135M (Q4_1) on WGSL: a prompt and three greedy tokens give the
/// CPU's logits bits at every step and its trace, on the path the probe
/// picks (the exact soft-float path on lavapipe: a few seconds).
#[test]
fn smollm2_on_wgsl_matches_the_cpu() {
    if let Some(gpu) = lockstep_tests::open_wgsl(None) {
        smollm2_matches_the_cpu(&gpu);
    }
}
