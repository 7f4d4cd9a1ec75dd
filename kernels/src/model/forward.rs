//! What a backend's model engine offers: a model resident somewhere (CPU
//! memory, a WGSL device, a CUDA device), sequences with their KV caches
//! there, and forward passes over many sequences at once. Generation
//! ([`super::generate`]), `lockstep generate`, the benchmarks and the
//! worker run on any [`Forward`]; every implementation returns the scalar
//! spec's bits ([`super::spec`]), which the tests check engine by engine.
//! The GPU engines implement it beside themselves (`wgpu/engine.rs`,
//! `cuda/engine.rs`), so `model` depends on no GPU backend.

use super::Model;
use crate::digest::Digest;
use crate::error::{Error, Result};

pub trait Forward {
    /// One sequence: its KV cache, its position and (when traced) its
    /// per-(position, layer) digests.
    type Seq;

    fn model(&self) -> &Model;

    /// Where it runs, for logs and messages ("cpu avx2 x2", "wgpu …").
    fn describe(&self) -> String;

    /// A new, empty sequence with room for `positions` tokens.
    fn sequence(&self, positions: usize, traced: bool) -> Result<Self::Seq>;

    /// Feeds `tokens[i]` to `seqs[i]` (each at its next positions) in one
    /// pass; for each sequence fed at least one token, the logits after
    /// its last token.
    fn forward(
        &self,
        seqs: &mut [&mut Self::Seq],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>>;

    /// The sequence's trace so far (`trace[pos][layer]`), taken out.
    fn take_trace(seq: &mut Self::Seq) -> Option<Vec<Vec<Digest>>>;

    /// Test only: flip a bit of layer `.1`'s output at position `.0` (a
    /// worker's hidden fault switch). Engines without the hook refuse.
    fn set_fault(seq: &mut Self::Seq, fault: Option<(usize, usize)>) -> Result<()> {
        let _ = seq;
        match fault {
            None => Ok(()),
            Some(_) => Err(Error::unavailable(
                "fault injection is a CPU engine test hook",
            )),
        }
    }
}

impl<'m> Forward for super::Engine<'m> {
    type Seq = super::Sequence;

    fn model(&self) -> &Model {
        self.model
    }

    fn describe(&self) -> String {
        format!("cpu {} x{}", self.isa().name(), self.threads())
    }

    fn sequence(&self, positions: usize, traced: bool) -> Result<Self::Seq> {
        super::Engine::sequence(self, positions, traced)
    }

    fn forward(
        &self,
        seqs: &mut [&mut Self::Seq],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        super::Engine::forward(self, seqs, tokens)
    }

    fn take_trace(seq: &mut Self::Seq) -> Option<Vec<Vec<Digest>>> {
        seq.trace.take()
    }

    fn set_fault(seq: &mut Self::Seq, fault: Option<(usize, usize)>) -> Result<()> {
        seq.fault = fault;
        Ok(())
    }
}
