//! The whole model on CUDA against the CPU engine: the tiny llama2.c models
//! give the same logits bits, the same greedy tokens and the same
//! per-(position, layer) trace digests, alone and in a batch, with the
//! prompt fed at once or in chunks; SmolLM2 (Q4_1) too where it was
//! fetched. The same bodies as `wgsl_model.rs` (`tests/device_ops.rs`), on
//! CUDA device 0; skipped without a driver, a failure then with
//! `LOCKSTEP_REQUIRE_CUDA=1`.

use lockstep_tests::device_ops::{
    a_batch_and_chunked_prefill_match_the_cpu, smollm2_matches_the_cpu, tiny_models_match_the_cpu,
};

lockstep_tests::cuda_tests!(
    tiny_models_match_the_cpu,
    a_batch_and_chunked_prefill_match_the_cpu,
    smollm2_matches_the_cpu,
);
