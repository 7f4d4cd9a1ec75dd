//! The `generate` op ([`crate::contract::generate`]) on a loaded model:
//! prompts in, generated ids and traces out, many sequences decoded as one
//! batch. Sequences join and leave between passes (continuous batching);
//! the engine's batch invariance means a sequence's bits do not depend on
//! who else is in the batch, so a worker may batch however it likes.

use super::{Engine, Forward, Model, Trace};
use crate::contract::generate::{digest_values, tokens_output, Generate};
use crate::contract::sample::sample_spec;
use crate::contract::Tensor;
use crate::digest::Digest;
use crate::error::{Error, Result};

/// What a backend answers when asked to run `generate` on its own.
pub fn not_a_backend_op() -> Error {
    Error::unavailable("generate needs its model: it runs through model::generate, not a backend")
}

/// One finished generation.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    pub prompt: Vec<u32>,
    pub tokens: Vec<u32>,
    /// `trace[pos][layer]`: the digest of every layer's output at every
    /// position fed (the prompt and every generated token but the last).
    pub trace: Vec<Vec<Digest>>,
    pub max_tokens: usize,
}

impl Generation {
    pub fn trace_root(&self) -> Digest {
        Trace::root(&self.trace)
    }

    /// The op's outputs: `tokens` [max_tokens] and `trace` [16].
    pub fn outputs(&self) -> Vec<Tensor> {
        vec![
            Tensor::new(
                vec![self.max_tokens],
                tokens_output(&self.tokens, self.max_tokens),
            ),
            Tensor::new(
                vec![crate::contract::generate::TRACE_VALUES],
                digest_values(&self.trace_root()),
            ),
        ]
    }
}

/// Checks a request against the model: the model it names, the prompt's
/// ids within the vocabulary, prompt plus max tokens within the context.
pub fn check(model: &Model, prompt: &[u32], g: &Generate) -> Result<()> {
    let c = &model.config;
    if g.model != model.digest {
        return Err(Error::model(format!(
            "the job names model {}, this is {}",
            g.model, model.digest
        )));
    }
    if prompt.is_empty() {
        return Err(Error::shape("the prompt has no tokens"));
    }
    if let Some(t) = prompt.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::shape(format!(
            "prompt token {t} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    if prompt.len().saturating_add(g.max_tokens) > c.max_seq {
        return Err(Error::too_large(format!(
            "a prompt of {} tokens plus max_tokens {} exceeds the model's context of {} tokens",
            prompt.len(),
            g.max_tokens,
            c.max_seq
        )));
    }
    Ok(())
}

/// Test-only faults, set by a worker's hidden switches so the system tests
/// can show a dispute pinning them: a bit flipped in one layer's output at
/// one position, or one sampled token replaced by the next id.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TestFault {
    /// (position, layer).
    pub layer: Option<(usize, usize)>,
    /// The index of the generated token to replace.
    pub token: Option<usize>,
}

struct Active<K, S> {
    key: K,
    seq: S,
    fault: TestFault,
    prompt: Vec<u32>,
    params: Generate,
    generated: Vec<u32>,
}

/// Sequences being decoded together. [`Batch::join`] adds one (its prompt
/// is fed in the next pass, beside the others' next tokens);
/// [`Batch::step`] runs one pass and returns the sequences that finished.
pub struct Batch<'e, E: Forward, K> {
    engine: &'e E,
    active: Vec<Active<K, E::Seq>>,
}

impl<'e, E: Forward, K> Batch<'e, E, K> {
    pub fn new(engine: &'e E) -> Self {
        Self {
            engine,
            active: Vec::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.active.len()
    }

    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Adds a sequence, or says why the model cannot run it (and gives
    /// the key back).
    pub fn join(
        &mut self,
        key: K,
        prompt: Vec<u32>,
        params: Generate,
        fault: TestFault,
    ) -> Result<(), (Error, K)> {
        if let Err(e) = check(self.engine.model(), &prompt, &params) {
            return Err((e, key));
        }
        let mut seq = match self.engine.sequence(prompt.len() + params.max_tokens, true) {
            Ok(s) => s,
            Err(e) => return Err((e, key)),
        };
        if let Err(e) = E::set_fault(&mut seq, fault.layer) {
            return Err((e, key));
        }
        self.active.push(Active {
            key,
            seq,
            fault,
            prompt,
            params,
            generated: Vec::new(),
        });
        Ok(())
    }

    /// Removes every sequence, unfinished; their keys.
    pub fn drain(&mut self) -> Vec<K> {
        self.active.drain(..).map(|a| a.key).collect()
    }

    /// One forward pass over every sequence: prompts of those that just
    /// joined, the last token of the others. Returns those that finished
    /// (a stop id, or max tokens).
    pub fn step(&mut self) -> Result<Vec<(K, Generation)>> {
        if self.active.is_empty() {
            return Ok(Vec::new());
        }
        let feed: Vec<Vec<u32>> = self
            .active
            .iter()
            .map(|a| match a.generated.last() {
                None => a.prompt.clone(),
                Some(&t) => vec![t],
            })
            .collect();
        let logits = {
            let mut seqs: Vec<&mut E::Seq> = self.active.iter_mut().map(|a| &mut a.seq).collect();
            let slices: Vec<&[u32]> = feed.iter().map(Vec::as_slice).collect();
            self.engine.forward(&mut seqs, &slices)?
        };
        let mut finished = Vec::new();
        for (a, l) in self.active.iter_mut().zip(logits) {
            let l = l.ok_or_else(|| Error::model("a sequence got no logits"))?;
            let position = (a.prompt.len() + a.generated.len()) as u64;
            let mut t = sample_spec(&l, &a.params.sampling(), position)
                .ok_or_else(|| Error::model("empty vocabulary"))? as u32;
            if a.fault.token == Some(a.generated.len()) {
                t = (t + 1) % l.len() as u32;
            }
            a.generated.push(t);
        }
        let mut i = 0;
        while i < self.active.len() {
            let a = &self.active[i];
            let last = *a.generated.last().expect("sampled above");
            if a.params.stop.contains(&last) || a.generated.len() >= a.params.max_tokens {
                let mut a = self.active.swap_remove(i);
                finished.push((
                    a.key,
                    Generation {
                        prompt: a.prompt,
                        tokens: a.generated,
                        trace: E::take_trace(&mut a.seq).unwrap_or_default(),
                        max_tokens: a.params.max_tokens,
                    },
                ));
            } else {
                i += 1;
            }
        }
        Ok(finished)
    }
}

/// Runs requests to the end as one batch, in order.
pub fn generate_all<E: Forward>(
    engine: &E,
    requests: &[(Vec<u32>, Generate)],
) -> Result<Vec<Generation>> {
    let mut batch = Batch::new(engine);
    for (i, (prompt, params)) in requests.iter().enumerate() {
        batch
            .join(i, prompt.clone(), params.clone(), TestFault::default())
            .map_err(|(e, _)| e)?;
    }
    let mut out: Vec<Option<Generation>> = vec![None; requests.len()];
    while !batch.is_empty() {
        for (i, g) in batch.step()? {
            out[i] = Some(g);
        }
    }
    Ok(out
        .into_iter()
        .map(|g| g.expect("every sequence finishes"))
        .collect())
}

/// What a replay of a generation gives: its trace, and one layer's inputs
/// when asked for.
pub struct Replay {
    pub trace: Vec<Vec<Digest>>,
    /// [positions, dim], when a layer was captured.
    pub inputs: Option<Vec<f32>>,
}

/// Feeds `tokens` from position 0 in one pass (the positions a generation
/// fed: its prompt and every generated token but the last) and returns the
/// trace, and layer `capture`'s inputs (`n_layers`: the last layer's
/// output) at every position. Batch invariance makes this the
/// generation's own trace, bit for bit.
pub fn replay(
    engine: &Engine<'_>,
    tokens: &[u32],
    capture: Option<usize>,
    fault: TestFault,
) -> Result<Replay> {
    let c = &engine.model.config;
    if tokens.is_empty() {
        return Err(Error::shape("no tokens to replay"));
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
        return Err(Error::shape(format!(
            "token {t} is outside the vocabulary of {}",
            c.vocab_size
        )));
    }
    if tokens.len() > c.max_seq {
        return Err(Error::too_large(format!(
            "{} tokens exceed the model's context of {} tokens",
            tokens.len(),
            c.max_seq
        )));
    }
    if let Some(l) = capture {
        if l > c.n_layers {
            return Err(Error::shape(format!(
                "layer {l}: the model has {} layers",
                c.n_layers
            )));
        }
    }
    let mut seq = engine.sequence(tokens.len(), true)?;
    seq.capture = capture.map(|l| (l, Vec::new()));
    seq.fault = fault.layer;
    engine.forward(&mut [&mut seq], &[tokens])?;
    Ok(Replay {
        trace: seq.trace.take().unwrap_or_default(),
        inputs: seq.capture.take().map(|(_, v)| v),
    })
}
