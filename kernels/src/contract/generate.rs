//! `generate`: text from a language model named by its digest
//! (CONTRACT.md §10). Unlike the tensor ops, its result depends on a model,
//! so no [`crate::Backend`] computes it alone: the model's forward pass
//! ([`crate::model::generate`]) does, layer by layer from the op specs of
//! §9, and the sampling of §9.10.
//!
//! On the wire it is an op like any other, so the coordinator, the verdicts
//! and the receipts need nothing of their own:
//! - one input, `prompt` [n]: the prompt's token ids as f32 (exact: ids are
//!   below 2^24);
//! - two outputs of fixed shape: `tokens` [max_tokens], the generated ids
//!   followed by −1 for every position not generated (a stop id ends the
//!   generation and is included), and `trace` [16], the trace root
//!   (SHA3-256 over every (position, layer) output digest,
//!   [`crate::model::Trace::root`]) as sixteen u16 values, big-endian
//!   pairs of its bytes. Replicas agree exactly when their tokens and
//!   every layer output at every position agree.

use serde::{Deserialize, Serialize};

use super::sample::Sampling;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// The longest generation a job may ask for.
pub const MAX_TOKENS: usize = 1 << 16;
/// The longest prompt a job may carry.
pub const MAX_PROMPT: usize = 1 << 20;
/// Elements of the `trace` output.
pub const TRACE_VALUES: usize = 16;

fn one() -> f32 {
    1.0
}

/// The parameters: which model, how many tokens, how to sample.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generate {
    /// The model digest ([`crate::model::Model::digest`]).
    pub model: Digest,
    /// The digest of the tokenizer that turned the prompt text into ids,
    /// when there was text: bound into the job (and so the receipt), not
    /// used by the worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<Digest>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Token ids that end the generation (the id is kept).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stop: Vec<u32>,
    /// 0: greedy. Read from JSON as the nearest f32.
    #[serde(default)]
    pub temperature: f32,
    /// 0: all tokens.
    #[serde(default)]
    pub top_k: usize,
    #[serde(default = "one")]
    pub top_p: f32,
    #[serde(default)]
    pub seed: u64,
}

/// A generation's sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenerateDims {
    pub prompt: usize,
    pub max_tokens: usize,
}

impl GenerateDims {
    /// Positions the sequence needs.
    pub fn positions(&self) -> usize {
        self.prompt + self.max_tokens
    }
}

impl Generate {
    pub const NAME: &'static str = "generate";
    pub const INPUTS: &'static [&'static str] = &["prompt"];
    pub const OUTPUTS: &'static [&'static str] = &["tokens", "trace"];

    /// Greedy decoding of up to `max_tokens` with `model`: no tokenizer,
    /// no stop ids (it runs to `max_tokens`).
    pub fn greedy(model: Digest, max_tokens: usize) -> Self {
        Self {
            model,
            tokenizer: None,
            max_tokens,
            stop: vec![],
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }

    pub fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            seed: self.seed,
        }
    }

    /// Checks the prompt's shape and the parameters (the model's own
    /// limits, its context and vocabulary, are checked where it is loaded).
    pub fn plan(&self, shapes: &[&[usize]]) -> Result<GenerateDims> {
        let &[n] = shapes[0] else {
            return Err(Error::shape(format!(
                "generate's prompt must be rank 1 (token ids), got rank {}",
                shapes[0].len()
            )));
        };
        if n == 0 {
            return Err(Error::shape("generate's prompt has no tokens"));
        }
        if n > MAX_PROMPT {
            return Err(Error::too_large(format!(
                "a prompt of {n} tokens is over the limit of {MAX_PROMPT}"
            )));
        }
        if self.max_tokens == 0 {
            return Err(Error::shape("max_tokens must be at least 1"));
        }
        if self.max_tokens > MAX_TOKENS {
            return Err(Error::too_large(format!(
                "max_tokens {} is over the limit of {MAX_TOKENS}",
                self.max_tokens
            )));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return Err(Error::shape("temperature must be a finite number ≥ 0"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::shape("top_p must be in (0, 1]"));
        }
        if self.stop.len() > 64 {
            return Err(Error::too_large("at most 64 stop ids"));
        }
        Ok(GenerateDims {
            prompt: n,
            max_tokens: self.max_tokens,
        })
    }
}

/// The prompt's ids from its f32 values: each an integer in [0, 2^24).
pub fn prompt_ids(values: &[f32]) -> Result<Vec<u32>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            if v.is_sign_positive() && v < (1u32 << 24) as f32 && v.fract() == 0.0 {
                Ok(v as u32)
            } else {
                Err(Error::shape(format!(
                    "prompt value {v} (index {i}) is not a token id"
                )))
            }
        })
        .collect()
}

/// The `tokens` output: the generated ids, then −1 up to `max_tokens`.
pub fn tokens_output(generated: &[u32], max_tokens: usize) -> Vec<f32> {
    let mut out: Vec<f32> = generated.iter().map(|&t| t as f32).collect();
    out.resize(max_tokens, -1.0);
    out
}

/// The generated ids in a `tokens` output (up to the first −1); `None` if a
/// value is neither an id nor the padding, or padding is followed by an id.
pub fn generated_ids(tokens: &[f32]) -> Option<Vec<u32>> {
    let n = tokens
        .iter()
        .position(|&v| v == -1.0)
        .unwrap_or(tokens.len());
    if tokens[n..].iter().any(|&v| v != -1.0) {
        return None;
    }
    prompt_ids(&tokens[..n]).ok()
}

/// The `trace` output: a digest as sixteen u16 values (bytes 2i, 2i+1
/// big-endian), exact in f32.
pub fn digest_values(d: &Digest) -> Vec<f32> {
    d.0.chunks_exact(2)
        .map(|p| u16::from_be_bytes([p[0], p[1]]) as f32)
        .collect()
}

/// The digest in a `trace` output (`None` unless sixteen u16 values).
pub fn values_digest(values: &[f32]) -> Option<Digest> {
    if values.len() != TRACE_VALUES {
        return None;
    }
    let mut d = [0u8; 32];
    for (i, &v) in values.iter().enumerate() {
        if !((0.0..=65535.0).contains(&v) && v.fract() == 0.0) {
            return None;
        }
        d[2 * i..2 * i + 2].copy_from_slice(&(v as u16).to_be_bytes());
    }
    Some(Digest(d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_round_trip() {
        let d = Digest([7u8; 32]);
        assert_eq!(values_digest(&digest_values(&d)), Some(d));
        let t = tokens_output(&[5, 0, 9], 6);
        assert_eq!(t, vec![5.0, 0.0, 9.0, -1.0, -1.0, -1.0]);
        assert_eq!(generated_ids(&t), Some(vec![5, 0, 9]));
        assert_eq!(generated_ids(&[1.0, -1.0, 2.0]), None);
        assert_eq!(generated_ids(&[1.5]), None);
        assert!(prompt_ids(&[-0.5]).is_err());
    }
}

/// `generate_trace`: the digest of every layer's output at every position
/// of a model fed `tokens` from position 0 (a generation's prompt and every
/// generated token but the last: the positions its trace covers). What a
/// coordinator asks of each side of a disputed generation; the answer must
/// hash to the trace root that side signed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateTrace {
    pub model: Digest,
    /// The model's layer count (fixes the output shape; a worker checks it).
    pub layers: usize,
}

/// `layer_inputs`: layer `layer`'s input at every position of a model fed
/// `tokens` from position 0 ([`crate::model::spec::layer_spec`]'s `x`); layer
/// `layers` (one past the last) is the last layer's output, the final
/// norm's input. What a coordinator needs to recompute one layer alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerInputs {
    pub model: Digest,
    pub layer: usize,
    /// The model's width (fixes the output shape; a worker checks it).
    pub dim: usize,
}

/// The sizes of a replay query: positions fed, and the width of each
/// position's output row (layers × 16 for a trace, dim for inputs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplayDims {
    pub positions: usize,
    pub width: usize,
}

fn replay_tokens(name: &str, shapes: &[&[usize]]) -> Result<usize> {
    let &[n] = shapes[0] else {
        return Err(Error::shape(format!(
            "{name}'s tokens must be rank 1, got rank {}",
            shapes[0].len()
        )));
    };
    if n == 0 {
        return Err(Error::shape(format!("{name} has no tokens")));
    }
    if n > MAX_PROMPT + MAX_TOKENS {
        return Err(Error::too_large(format!("{n} tokens is over the limit")));
    }
    Ok(n)
}

impl GenerateTrace {
    pub const NAME: &'static str = "generate_trace";
    pub const INPUTS: &'static [&'static str] = &["tokens"];
    pub const OUTPUTS: &'static [&'static str] = &["trace"];

    pub fn plan(&self, shapes: &[&[usize]]) -> Result<ReplayDims> {
        let positions = replay_tokens(Self::NAME, shapes)?;
        if self.layers == 0 || self.layers > 1024 {
            return Err(Error::shape("layers must be 1 to 1024"));
        }
        Ok(ReplayDims {
            positions,
            width: self.layers * TRACE_VALUES,
        })
    }
}

impl LayerInputs {
    pub const NAME: &'static str = "layer_inputs";
    pub const INPUTS: &'static [&'static str] = &["tokens"];
    pub const OUTPUTS: &'static [&'static str] = &["inputs"];

    pub fn plan(&self, shapes: &[&[usize]]) -> Result<ReplayDims> {
        let positions = replay_tokens(Self::NAME, shapes)?;
        if self.dim == 0 || self.dim > 1 << 16 || self.layer > 1024 {
            return Err(Error::shape(
                "dim must be 1 to 65536 and layer at most 1024",
            ));
        }
        Ok(ReplayDims {
            positions,
            width: self.dim,
        })
    }
}

/// A trace (`[positions][layers]` digests) as the `trace` output of
/// `generate_trace`: [positions, layers, 16].
pub fn trace_values(trace: &[Vec<Digest>]) -> Vec<f32> {
    trace.iter().flatten().flat_map(digest_values).collect()
}

/// The trace in a `generate_trace` output of `layers` layers (`None` if a
/// value is not a u16).
pub fn values_trace(values: &[f32], layers: usize) -> Option<Vec<Vec<Digest>>> {
    if layers == 0 || !values.len().is_multiple_of(layers * TRACE_VALUES) {
        return None;
    }
    values
        .chunks_exact(layers * TRACE_VALUES)
        .map(|row| row.chunks_exact(TRACE_VALUES).map(values_digest).collect())
        .collect()
}
