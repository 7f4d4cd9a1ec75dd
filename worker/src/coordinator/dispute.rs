//! Disputes over a generation, settled by recomputing one layer at one
//! position (docs/PROTOCOL.md, "Disputes"):
//!
//! 1. each side is asked for its trace (`generate_trace` over the tokens it
//!    fed), which must hash to the trace root it signed;
//! 2. the first divergence is found: the first (position, layer) whose
//!    digests differ, or, when the traces agree up to it, the first
//!    generated token that differs (a divergence after the last layer);
//! 3. one side is asked for that layer's inputs at positions 0..=p
//!    (`layer_inputs`), each checked against the digest both sides agree
//!    on (the previous layer's output, or the embedding row);
//! 4. the coordinator recomputes that one layer by the scalar spec (or the
//!    final norm, classifier and sampling at that position), and every
//!    side whose digest or token differs from its own is at fault.
//!
//! A side that does not answer in time, or answers with data that does not
//! match what it signed, is at fault. What cannot be settled this way (more
//! than two distinct answers, both sides wrong at the divergence) falls
//! back to recomputing the whole generation.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use lockstep_kernels::contract::generate::{
    generated_ids, prompt_ids, values_digest, values_trace,
};
use lockstep_kernels::contract::sample::sample_spec;
use lockstep_kernels::contract::{Generate, GenerateTrace, LayerInputs};
use lockstep_kernels::model::{Engine, Model};
use lockstep_kernels::{tensor_digest_f32, Digest, Op};
use serde::Serialize;

use crate::nats::Nats;
use crate::protocol::*;

/// Where a dispute was settled, and what it cost.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct DisputeReport {
    /// The first position where the sides diverge.
    pub position: usize,
    /// The layer recomputed there; `None`: the divergence is after the last
    /// layer (final norm, classifier, sampling).
    pub layer: Option<usize>,
    /// Positions whose layer inputs the coordinator checked and replayed.
    pub positions_replayed: usize,
    /// The coordinator's recomputation of that one step.
    pub replay_ms: f64,
    /// The longest time a side reported for computing the whole generation.
    pub generation_ms: f64,
    /// The whole dispute, queries included.
    pub total_ms: f64,
}

/// How a dispute ended.
pub(super) struct Settled {
    /// The accepted outputs' digest and data (a side found right at the
    /// divergence), or `None` when the coordinator must recompute the whole
    /// generation.
    pub accepted: Option<(Digest, Vec<Vec<f32>>)>,
    /// Sides at fault, with why.
    pub faults: Vec<(String, String)>,
    pub report: Option<DisputeReport>,
}

/// One side of the dispute: a worker and what it signed.
struct Side {
    worker: String,
    key: String,
    digest: Digest,
    outputs: Vec<Vec<f32>>,
    tokens: Vec<u32>,
    root: Digest,
    compute_ms: f64,
}

impl Side {
    /// The tokens it fed: the prompt and every generated token but the last.
    fn fed(&self, prompt: &[u32]) -> Vec<u32> {
        let mut f = prompt.to_vec();
        f.extend_from_slice(&self.tokens[..self.tokens.len().saturating_sub(1)]);
        f
    }
}

/// Settles a generate job whose `ok` results disagree.
#[allow(clippy::too_many_arguments)]
pub(super) async fn settle_generation(
    nats: &Nats,
    batch: &str,
    job: &str,
    spec: &JobSpec,
    results: &BTreeMap<String, ResultMessage>,
    keys: &BTreeMap<String, String>,
    timeout: Duration,
    threads: usize,
) -> Settled {
    let t0 = Instant::now();
    let mut faults = Vec::new();
    let fallback = |faults| Settled {
        accepted: None,
        faults,
        report: None,
    };
    let Op::Generate(g) = &spec.op else {
        return fallback(faults);
    };
    let prompt = match spec
        .inputs
        .first()
        .and_then(|t| t.inline.as_ref())
        .and_then(|b| decode_f32(b).ok())
        .and_then(|p| prompt_ids(&p).ok())
    {
        Some(p) => p,
        None => return fallback(faults),
    };
    // The sides: one worker per distinct digest (the first by name).
    let mut sides: Vec<Side> = Vec::new();
    for (w, res) in results {
        let Outcome::Ok { digest, outputs } = &res.outcome else {
            continue;
        };
        if sides.iter().any(|s| s.digest == *digest) {
            continue;
        }
        let Some(key) = keys.get(w) else { continue };
        let mut data = Vec::new();
        for t in outputs {
            match super::verdict::load_output(nats, batch, w, t).await {
                Ok(d) => data.push(d),
                Err(_) => return fallback(faults),
            }
        }
        let parsed = data
            .first()
            .and_then(|t| generated_ids(t))
            .zip(data.get(1).and_then(|r| values_digest(r)));
        let Some((tokens, root)) = parsed.filter(|(t, _)| !t.is_empty()) else {
            faults.push((
                w.clone(),
                "its outputs are not a generation (token ids and a trace root)".into(),
            ));
            continue;
        };
        // The stop rule needs no replay: a generation ends at its first stop
        // id or at max tokens, and nowhere else.
        let stop_at = tokens.iter().position(|t| g.stop.contains(t));
        let ends_right = match stop_at {
            Some(i) => i + 1 == tokens.len(),
            None => tokens.len() == g.max_tokens,
        };
        if !ends_right {
            faults.push((
                w.clone(),
                format!(
                    "its generation of {} tokens does not end where the stop ids and max_tokens {} say",
                    tokens.len(),
                    g.max_tokens
                ),
            ));
            continue;
        }
        sides.push(Side {
            worker: w.clone(),
            key: key.clone(),
            digest: *digest,
            outputs: data,
            tokens,
            root,
            compute_ms: res.timings.compute_ms,
        });
    }
    match sides.len() {
        1 => {
            // The others were wrong on their face.
            let s = sides.remove(0);
            return Settled {
                accepted: Some((s.digest, s.outputs)),
                faults,
                report: None,
            };
        }
        2 => {}
        _ => return fallback(faults),
    }
    let model = match super::models::model(nats, &g.model).await {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(%job, "cannot load the model to settle a dispute: {e:#}");
            return fallback(faults);
        }
    };
    let layers = model.config.n_layers;
    // 1. Each side's trace, checked against the root it signed.
    let mut traces = Vec::new();
    for s in &sides {
        let op = Op::GenerateTrace(GenerateTrace {
            model: g.model,
            layers,
        });
        let fed = s.fed(&prompt);
        let answer = ask(nats, batch, job, &s.worker, &s.key, op, &fed, timeout).await;
        let trace = answer.and_then(|v| {
            let t = values_trace(&v, layers).context("its trace is not digests")?;
            anyhow::ensure!(
                t.len() == fed.len(),
                "its trace has {} positions, not {}",
                t.len(),
                fed.len()
            );
            anyhow::ensure!(
                lockstep_kernels::model::Trace::root(&t) == s.root,
                "its trace does not hash to the trace root it signed"
            );
            Ok(t)
        });
        match trace {
            Ok(t) => traces.push(t),
            Err(e) => {
                faults.push((s.worker.clone(), format!("dispute query (trace): {e:#}")));
                traces.push(Vec::new());
            }
        }
    }
    if traces.iter().any(Vec::is_empty) {
        // A side that cannot back its own result is at fault; who else is
        // wrong, a full recomputation says.
        return fallback(faults);
    }
    // 2. The first divergence.
    let (a, b) = (&sides[0], &sides[1]);
    let first_token = (0..a.tokens.len().min(b.tokens.len())).find(|&i| a.tokens[i] != b.tokens[i]);
    // Token i is sampled at position prompt + i − 1; positions up to there
    // fed the same tokens on both sides. With the same tokens, every
    // position did.
    let fed = a.fed(&prompt);
    let agreed_positions = match first_token {
        Some(i) => prompt.len() + i,
        None => fed.len().min(traces[0].len()).min(traces[1].len()),
    };
    let layer_divergence = (0..agreed_positions).find_map(|p| {
        (0..layers)
            .find(|&l| traces[0][p][l] != traces[1][p][l])
            .map(|l| (p, l))
    });
    let (position, layer, i) = match (layer_divergence, first_token) {
        (Some((p, l)), _) => (p, Some(l), 0),
        (None, Some(i)) => (prompt.len() + i - 1, None, i),
        (None, None) => return fallback(faults),
    };
    // 3. The inputs of that step at positions 0..=p, from either side,
    // checked against what both sides agree on.
    let capture = layer.unwrap_or(layers);
    let tokens = &fed[..=position];
    let mut inputs = None;
    for s in &sides {
        let op = Op::LayerInputs(LayerInputs {
            model: g.model,
            layer: capture,
            dim: model.config.dim,
        });
        let answer = ask(nats, batch, job, &s.worker, &s.key, op, tokens, timeout).await;
        let checked = answer.and_then(|v| {
            check_inputs(&model, &v, tokens, capture, &traces[0])?;
            Ok(v)
        });
        match checked {
            Ok(v) => {
                inputs = Some(v);
                break;
            }
            Err(e) => faults.push((
                s.worker.clone(),
                format!("dispute query (layer {capture} inputs to position {position}): {e:#}"),
            )),
        }
    }
    let Some(inputs) = inputs else {
        return fallback(faults);
    };
    // 4. That one step, by the scalar spec.
    let t = Instant::now();
    let (m, gen) = (model.clone(), g.clone());
    let verdict = tokio::task::spawn_blocking(move || {
        replay_step(&m, &gen, &inputs, position, layer, threads)
    })
    .await;
    let replay_ms = t.elapsed().as_secs_f64() * 1e3;
    let Ok(Ok(step)) = verdict else {
        return fallback(faults);
    };
    let mut right = Vec::new();
    for (k, s) in sides.iter().enumerate() {
        let (ok, what) = match (&step, layer) {
            (Step::Layer(d), Some(l)) => (
                traces[k][position][l] == *d,
                format!(
                    "layer {l} at position {position}: its trace says {}, the coordinator's replay of that layer gives {d}",
                    traces[k][position][l]
                ),
            ),
            (Step::Token(t), _) => (
                s.tokens[i] == *t,
                format!(
                    "after the last layer at position {position}: it generated token {}, the coordinator's final norm, classifier and sampling give {t}",
                    s.tokens[i]
                ),
            ),
            _ => (false, String::new()),
        };
        if ok {
            right.push(k);
        } else {
            faults.push((s.worker.clone(), what));
        }
    }
    let report = DisputeReport {
        position,
        layer,
        positions_replayed: position + 1,
        replay_ms,
        generation_ms: sides.iter().map(|s| s.compute_ms).fold(0.0, f64::max),
        total_ms: t0.elapsed().as_secs_f64() * 1e3,
    };
    tracing::info!(%job, position, ?layer, replay_ms, "dispute settled by a one-step replay");
    match right.as_slice() {
        [k] => {
            let s = &sides[*k];
            Settled {
                accepted: Some((s.digest, s.outputs.clone())),
                faults,
                report: Some(report),
            }
        }
        _ => Settled {
            accepted: None,
            faults,
            report: Some(report),
        },
    }
}

/// The coordinator's recomputation of the disputed step: layer `layer`
/// over positions 0..=p (its KV state rebuilt from the inputs), or the
/// final norm, classifier and sampling at the position. It runs on the
/// engine's kernels, which the tests hold bit for bit to the scalar spec
/// (`spec::layer_spec`, what `lockstep replay-layer` runs), batched over the
/// positions.
enum Step {
    /// The layer's output digest at the position.
    Layer(Digest),
    /// The token sampled at the position.
    Token(u32),
}

fn replay_step(
    model: &Model,
    g: &Generate,
    inputs: &[f32],
    position: usize,
    layer: Option<usize>,
    threads: usize,
) -> lockstep_kernels::Result<Step> {
    let c = &model.config;
    let engine = Engine::new(model, threads, lockstep_kernels::cpu::Isa::detect())?;
    Ok(match layer {
        Some(l) => {
            let out = engine.layer_alone(l, inputs)?;
            Step::Layer(tensor_digest_f32(&[c.dim], &out[position * c.dim..]))
        }
        None => {
            let logits = engine.logits(&inputs[position * c.dim..(position + 1) * c.dim]);
            let t = sample_spec(&logits, &g.sampling(), (position + 1) as u64).unwrap_or(0);
            Step::Token(t as u32)
        }
    })
}

/// Layer `layer`'s inputs at positions 0..=p are what both sides agree on:
/// the embedding rows of the tokens (layer 0), else the previous layer's
/// output digests in the trace.
fn check_inputs(
    model: &Model,
    values: &[f32],
    tokens: &[u32],
    layer: usize,
    trace: &[Vec<Digest>],
) -> Result<()> {
    let dim = model.config.dim;
    anyhow::ensure!(
        values.len() == tokens.len() * dim,
        "{} values, not {} positions of {dim}",
        values.len(),
        tokens.len()
    );
    for (pos, row) in values.chunks_exact(dim).enumerate() {
        let fine = if layer == 0 {
            let want = model.embedding.dequantize_row(tokens[pos] as usize);
            row.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits())
        } else {
            tensor_digest_f32(&[dim], row) == trace[pos][layer - 1]
        };
        if !fine {
            bail!("its input at position {pos} is not the agreed output of the layer before");
        }
    }
    Ok(())
}

/// Asks `worker` a dispute query about `job` of `batch` and waits (up to
/// `timeout`) for its signed answer: the one output's values, checked
/// against the digest it signed.
#[allow(clippy::too_many_arguments)]
async fn ask(
    nats: &Nats,
    batch: &str,
    job: &str,
    worker: &str,
    key: &str,
    op: Op,
    tokens: &[u32],
    timeout: Duration,
) -> Result<Vec<f32>> {
    use sha3::Digest as _;
    let data: Vec<f32> = tokens.iter().map(|&t| t as f32).collect();
    let limit = inline_limit(nats.max_payload());
    anyhow::ensure!(
        data.len() * 4 <= limit,
        "the query's tokens do not fit a message"
    );
    let spec = JobSpec {
        op,
        inputs: vec![TensorRef::inline(vec![data.len()], &data)],
    };
    let job_digest = spec.job_digest().context("a query digest")?;
    let mut h = sha3::Sha3_256::new();
    h.update(job.as_bytes());
    h.update(worker.as_bytes());
    h.update(job_digest.0);
    let id = format!("q-{}", &hex::encode(h.finalize())[..24]);
    let shapes = spec.op.plan(&spec.shapes())?.output_shapes();
    let msg = JobMessage {
        protocol: PROTOCOL_VERSION,
        batch: batch.into(),
        job: id.clone(),
        replica: 0,
        attempt: 0,
        redundancy: 1,
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        worker: worker.into(),
        spec,
    };
    // Watch the worker's own results stream first, so the answer is not
    // missed; an answer from an earlier run of this dispute counts.
    let stream = nats.js.get_stream(worker_results_stream(worker)).await?;
    let mut answers = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: result_subject(batch, worker),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id.as_str());
    nats.js
        .publish_with_headers(
            job_subject(worker, batch),
            headers,
            serde_json::to_vec(&msg)?.into(),
        )
        .await?
        .await
        .context("the query was not stored")?;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, answers.next()).await;
        let m = match next {
            Err(_) => bail!("no answer within {} s", timeout.as_secs()),
            Ok(None) => bail!("its results stream ended"),
            Ok(Some(Err(e))) => {
                tracing::debug!("dispute feed: {e}");
                continue;
            }
            Ok(Some(Ok(m))) => m,
        };
        let Ok(results) = parse_results(&m.payload) else {
            continue;
        };
        let Some(r) = results
            .into_iter()
            .find(|r| r.job == id && r.worker == worker)
        else {
            continue;
        };
        if let Some(why) = super::verdict::check_statement(key, &r, &job_digest, &shapes) {
            bail!("its answer was rejected: {why}");
        }
        return match &r.outcome {
            Outcome::Ok { outputs, .. } => {
                super::verdict::load_output(nats, batch, worker, &outputs[0])
                    .await
                    .map_err(|e| anyhow::anyhow!("its answer cannot be read back: {e}"))
            }
            Outcome::Error { code, message } => {
                bail!("it answered {code:?}: {}", shorten(message, 160))
            }
        };
    }
}
