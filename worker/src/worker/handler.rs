//! One job message in, one result message out, for any op: read the job,
//! check it against the op's contract module and this worker's limits,
//! fetch the inputs, compute on the backend, store the outputs, publish the
//! result, then ack.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use lockstep_kernels::contract::views;
use lockstep_kernels::{outputs_digest, BackendKind, ErrorKind, Op, CONTRACT_VERSION};

use super::cache::{fetch, put_output};
use super::publish::{publish_then_ack, Answer};
use super::{Ctx, MAX_DELIVER};
use crate::protocol::*;

/// CPU jobs up to this many multiply-adds run on the async thread itself.
const INLINE_COMPUTE_MACS: u64 = 1 << 16;

/// A job-level failure: the code and the message sent back.
pub(super) struct JobError(pub ErrorCode, pub String);

pub(super) fn job_err(code: ErrorCode, msg: impl Into<String>) -> JobError {
    JobError(code, msg.into())
}

pub(super) async fn handle(ctx: &Ctx, msg: jetstream::Message) {
    let (seq, server_count) = msg
        .info()
        .map(|i| (i.stream_sequence, i.delivered))
        .unwrap_or((0, 1));
    // The server's count restarts when a restarted worker takes its messages
    // back; the worker's own count does not.
    let reply = msg.reply.as_ref().map_or("", |r| r.as_str());
    let delivered = server_count.max(ctx.inflight.start(seq, reply));
    // However long the bundle takes (fetching, computing, storing, the
    // publish retries), tell the server every 10 s that it is in hand, so
    // it is not redelivered to this worker meanwhile.
    let work = handle_counted(ctx, &msg, delivered);
    tokio::pin!(work);
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    let answered = loop {
        tokio::select! {
            answered = &mut work => break answered,
            _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
        }
    };
    if answered {
        ctx.inflight.done(seq);
    }
}

/// Answers one job message; whether it was answered and acked.
async fn handle_counted(ctx: &Ctx, msg: &jetstream::Message, delivered: i64) -> bool {
    // The message is read once. A job bundle (`batch`, `id`, `jobs`) has
    // each job read on its own, so one bad job (an unknown op, bad params)
    // gets its own error result and the others run.
    let value = serde_json::from_slice::<serde_json::Value>(&msg.payload).ok();
    let bundle = value.as_ref().and_then(|v| {
        let text = |k: &str| v.get(k).and_then(|s| s.as_str());
        Some((text("batch")?, text("id")?, v.get("jobs")?.as_array()?))
    });
    if ctx.opts.test.dispute == Some(super::DisputeBehaviour::Silent) {
        let op = value
            .as_ref()
            .and_then(|v| v.get("op"))
            .and_then(|o| o.as_str());
        if matches!(op, Some("generate_trace" | "layer_inputs")) {
            tracing::warn!("DISPUTE SILENT: ignoring a dispute query (test switch)");
            let _ = msg.ack().await;
            return true;
        }
    }
    if let Some((batch, id, jobs)) = bundle {
        // Several replicas in one message: compute each, answer together.
        let mut results = Vec::with_capacity(jobs.len());
        for job in jobs {
            results.push(answer_one(ctx, delivered, Some(job)).await);
        }
        let answer = Answer {
            subject: answer_subject(ctx, batch),
            id: message_id(&[batch, id, &ctx.opts.name]),
            batch: batch.to_string(),
            bundled: true,
        };
        return publish_then_ack(ctx, msg, answer, results).await;
    }
    let result = answer_one(ctx, delivered, value.as_ref()).await;
    let answer = Answer {
        subject: answer_subject(ctx, &result.batch),
        id: message_id(&[
            &result.batch,
            &result.job,
            &result.replica.to_string(),
            &result.attempt.to_string(),
            &ctx.opts.name,
        ]),
        batch: result.batch.clone(),
        bundled: false,
    };
    publish_then_ack(ctx, msg, answer, vec![result]).await
}

/// Where this worker's answer for `batch` goes: its results subject, or
/// the unroutable one when the message named no valid batch.
fn answer_subject(ctx: &Ctx, batch: &str) -> String {
    if valid_token(batch) {
        result_subject(batch, &ctx.opts.name)
    } else {
        result_subject(UNROUTABLE_BATCH, &ctx.opts.name)
    }
}

/// The result for one job message (`None`: not even JSON).
async fn answer_one(ctx: &Ctx, delivered: i64, value: Option<&serde_json::Value>) -> ResultMessage {
    use serde::Deserialize as _;
    let t0 = Instant::now();
    // The op, for the metrics (only known names, so labels stay few).
    let op = value
        .and_then(|v| v.get("op"))
        .and_then(|o| o.as_str())
        .filter(|o| Op::NAMES.contains(o))
        .unwrap_or("unknown");
    ctx.metrics.inflight.inc();
    let parsed = match value {
        Some(v) => JobMessage::deserialize(v).map_err(|e| e.to_string()),
        None => Err("not JSON".to_string()),
    };
    let (mut result, outcome) = match parsed {
        Ok(job) => {
            let mut result = blank_result(ctx, &job.batch, &job.job, job.replica, job.attempt);
            result.job_digest = job.spec.job_digest();
            let outcome = job_outcome(ctx, &job, delivered, &mut result.timings).await;
            (result, outcome)
        }
        Err(e) => unreadable(ctx, value, e),
    };
    finish(ctx, &mut result, outcome, t0);
    ctx.metrics.inflight.dec();
    let outcome = match &result.outcome {
        Outcome::Ok { .. } => "ok".to_string(),
        Outcome::Error { code, .. } => format!("{code:?}").to_lowercase(),
    };
    ctx.metrics.jobs.with_label_values(&[op, &outcome]).inc();
    ctx.metrics
        .job_seconds
        .with_label_values(&[op])
        .observe(t0.elapsed().as_secs_f64());
    result
}

/// A job message that does not parse: read what can be read, so the error
/// reaches the batch (if the message names a valid one) under the job's id,
/// and say so if it names an unknown op.
fn unreadable(
    ctx: &Ctx,
    v: Option<&serde_json::Value>,
    e: String,
) -> (ResultMessage, Result<Outcome, JobError>) {
    let field = |k: &str| v.and_then(|v| v.get(k));
    let text = |k: &str| field(k).and_then(|b| b.as_str()).map(str::to_string);
    let number = |k: &str| field(k).and_then(|n| n.as_u64()).unwrap_or(0) as u32;
    // (`blank_result` keeps only ids that are valid tokens.)
    let result = blank_result(
        ctx,
        &text("batch").unwrap_or_default(),
        &text("job").unwrap_or_default(),
        number("replica"),
        number("attempt"),
    );
    let outcome = match text("op") {
        Some(k) if !Op::NAMES.contains(&k.as_str()) => Err(job_err(
            ErrorCode::UnknownOp,
            format!(
                "unknown op {} (this worker knows: {})",
                quote(&k),
                Op::NAMES.join(", ")
            ),
        )),
        _ => Err(job_err(
            ErrorCode::BadMessage,
            format!("not a valid job message: {}", shorten(&e, 200)),
        )),
    };
    (result, outcome)
}

async fn job_outcome(
    ctx: &Ctx,
    job: &JobMessage,
    delivered: i64,
    timings: &mut Timings,
) -> Result<Outcome, JobError> {
    if delivered >= MAX_DELIVER {
        return Err(job_err(
            ErrorCode::Redelivered,
            format!("delivered {delivered} times without completing; giving up"),
        ));
    }
    execute(ctx, job, timings).await
}

fn finish(ctx: &Ctx, result: &mut ResultMessage, outcome: Result<Outcome, JobError>, t0: Instant) {
    result.outcome = match outcome {
        Ok(o) => {
            ctx.done.fetch_add(1, Ordering::Relaxed);
            o
        }
        Err(JobError(code, message)) => {
            ctx.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(job = %result.job, ?code, "job failed: {message}");
            Outcome::Error { code, message }
        }
    };
    result.timings.total_ms = t0.elapsed().as_secs_f64() * 1e3;
}

/// A result for a job, its outcome still to fill in. Ids that are not valid
/// tokens are not echoed (such a job is answered `bad_message`, unroutable).
fn blank_result(ctx: &Ctx, batch: &str, job: &str, replica: u32, attempt: u32) -> ResultMessage {
    let token = |s: &str| {
        if valid_token(s) {
            s.to_string()
        } else {
            String::new()
        }
    };
    ResultMessage {
        protocol: PROTOCOL_VERSION,
        batch: token(batch),
        job: token(job),
        replica,
        attempt,
        worker: ctx.opts.name.clone(),
        backend: ctx.info.kind.to_string(),
        device: ctx.info.device.clone(),
        path: ctx.info.path.clone(),
        contract_version: CONTRACT_VERSION,
        outcome: Outcome::Error {
            code: ErrorCode::BadMessage,
            message: String::new(),
        },
        timings: Timings::default(),
        job_digest: None,
        signature: String::new(),
        merkle: Default::default(),
    }
}

async fn execute(ctx: &Ctx, job: &JobMessage, timings: &mut Timings) -> Result<Outcome, JobError> {
    let t = Instant::now();
    let plan = check_job(job, ctx.opts.max_elements, ctx.opts.max_macs)?;
    let spec = &job.spec;
    match &spec.op {
        Op::Generate(g) => return generate(ctx, job, g, timings).await,
        Op::GenerateTrace(_) | Op::LayerInputs(_) => return replay_query(ctx, job, timings).await,
        Op::Matmul(_) => {}
    }
    let work = plan.work();
    let mut data = Vec::with_capacity(spec.inputs.len());
    for input in &spec.inputs {
        data.push(fetch(ctx, input).await?);
    }
    timings.fetch_ms = t.elapsed().as_secs_f64() * 1e3;
    compute_and_store(ctx, job, data, work, timings).await
}

/// Everything checked of a job before its inputs are fetched: versions,
/// ids, this worker's limits, the op's contract module.
pub(super) fn check_job(
    job: &JobMessage,
    max_elements: usize,
    max_macs: u64,
) -> Result<lockstep_kernels::contract::Plan, JobError> {
    if job.protocol != PROTOCOL_VERSION {
        return Err(job_err(
            ErrorCode::BadMessage,
            format!("protocol {} is not {PROTOCOL_VERSION}", job.protocol),
        ));
    }
    if job.contract_version != CONTRACT_VERSION {
        return Err(job_err(
            ErrorCode::WrongContract,
            format!(
                "job wants contract v{}, this worker implements v{CONTRACT_VERSION}",
                job.contract_version
            ),
        ));
    }
    if !valid_token(&job.batch) || !valid_token(&job.job) {
        return Err(job_err(
            ErrorCode::BadMessage,
            "batch and job ids must be 1-64 of [A-Za-z0-9_-]",
        ));
    }
    let spec = &job.spec;
    // This worker's limits on every input first (a huge input is refused
    // before anything else looks at it), then the op's contract module
    // (counts, ranks, agreeing shapes).
    let names = spec.op.input_names();
    for (i, input) in spec.inputs.iter().enumerate() {
        check_input(
            names.get(i).copied().unwrap_or("input"),
            input,
            max_elements,
        )?;
    }
    let plan = spec.op.plan(&spec.shapes()).map_err(kernel_err)?;
    let work = plan.work();
    if work > max_macs {
        return Err(job_err(
            ErrorCode::TooLarge,
            format!(
                "{} is {work} multiply-adds, over this worker's limit of {}",
                spec.op.name(),
                max_macs
            ),
        ));
    }
    for shape in plan.output_shapes() {
        let n = shape.iter().map(|&d| d as u64).product::<u64>();
        if n > max_elements as u64 {
            return Err(job_err(
                ErrorCode::TooLarge,
                format!(
                    "output {} is over this worker's limit of {} elements",
                    lockstep_kernels::contract::short_shape(&shape),
                    max_elements
                ),
            ));
        }
    }
    Ok(plan)
}

/// Computes a checked job on the worker's backend and stores outputs too
/// large for the result message.
async fn compute_and_store(
    ctx: &Ctx,
    job: &JobMessage,
    data: Vec<Vec<f32>>,
    work: u64,
    timings: &mut Timings,
) -> Result<Outcome, JobError> {
    let spec = &job.spec;
    let t = Instant::now();
    if !ctx.opts.test.delay.is_zero() {
        tokio::time::sleep(ctx.opts.test.delay).await;
    }
    let shapes: Vec<Vec<usize>> = spec.inputs.iter().map(|t| t.shape.clone()).collect();
    let run = {
        let backend = ctx.backend.clone();
        let op = spec.op.clone();
        move || backend.run(&op, &views(&shapes, &data))
    };
    let out = if work <= INLINE_COMPUTE_MACS && ctx.info.kind == BackendKind::Cpu {
        // Tiny jobs: a thread hop would cost more than the arithmetic.
        run()
    } else {
        // (`handle` keeps the message alive with progress acks meanwhile.)
        tokio::task::spawn_blocking(run).await.unwrap_or_else(|e| {
            Err(lockstep_kernels::Error::device(format!(
                "backend task failed: {e}"
            )))
        })
    };
    let outputs = out.map_err(|e| job_err(ErrorCode::Backend, e.to_string()))?;
    timings.compute_ms = t.elapsed().as_secs_f64() * 1e3;
    store_outputs(ctx, job, outputs).await
}

/// A generate job: the model by its digest (memory, disk cache or the
/// model store), the prompt's ids, and the model's decoding thread, which
/// batches it with the other generations it runs.
async fn generate(
    ctx: &Ctx,
    job: &JobMessage,
    g: &lockstep_kernels::contract::Generate,
    timings: &mut Timings,
) -> Result<Outcome, JobError> {
    let t = Instant::now();
    let prompt = fetch(ctx, &job.spec.inputs[0]).await?;
    let prompt = lockstep_kernels::contract::generate::prompt_ids(&prompt).map_err(kernel_err)?;
    let runner = ctx.models.get(ctx, &g.model).await?;
    // A model file that carries its tokenizer (GGUF) must be the job's;
    // one kept beside the weights (tokenizer.json, a llama2.c tokenizer
    // file) is the coordinator's to attest, as it tokenised the prompt.
    if let (Some(want), Some(have)) = (g.tokenizer, runner.tokenizer) {
        if have != want {
            return Err(job_err(
                ErrorCode::BadShape,
                format!(
                    "the job's tokenizer {want} is not the tokenizer of model {}",
                    g.model
                ),
            ));
        }
    }
    timings.fetch_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    if !ctx.opts.test.delay.is_zero() {
        tokio::time::sleep(ctx.opts.test.delay).await;
    }
    let generation = runner
        .generate(prompt, g.clone(), ctx.opts.test.generation)
        .await
        .map_err(kernel_err)?;
    timings.compute_ms = t.elapsed().as_secs_f64() * 1e3;
    ctx.metrics.tokens.inc_by(generation.tokens.len() as u64);
    store_outputs(ctx, job, generation.outputs()).await
}

/// A dispute query about a generation this worker may have computed: the
/// trace of the tokens it fed, or one layer's inputs at every position,
/// recomputed (the bits are the generation's own: batch invariance).
async fn replay_query(
    ctx: &Ctx,
    job: &JobMessage,
    timings: &mut Timings,
) -> Result<Outcome, JobError> {
    use lockstep_kernels::contract::generate::trace_values;
    let t = Instant::now();
    let (model, capture, check) = match &job.spec.op {
        Op::GenerateTrace(q) => (q.model, None, (q.layers, None)),
        Op::LayerInputs(q) => (q.model, Some(q.layer), (0, Some(q.dim))),
        _ => unreachable!("the caller matched the op"),
    };
    let tokens = fetch(ctx, &job.spec.inputs[0]).await?;
    let tokens = lockstep_kernels::contract::generate::prompt_ids(&tokens).map_err(kernel_err)?;
    let runner = ctx.models.get(ctx, &model).await?;
    let c = &runner.model.config;
    if (check.0 != 0 && check.0 != c.n_layers) || check.1.is_some_and(|d| d != c.dim) {
        return Err(job_err(
            ErrorCode::BadShape,
            format!(
                "the query's shape does not fit model {model} ({} layers, width {})",
                c.n_layers, c.dim
            ),
        ));
    }
    timings.fetch_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let n = tokens.len();
    let replay = runner
        .replay(tokens, capture, ctx.opts.test.generation)
        .await
        .map_err(kernel_err)?;
    timings.compute_ms = t.elapsed().as_secs_f64() * 1e3;
    let output = match &job.spec.op {
        Op::GenerateTrace(q) => {
            let mut trace = replay.trace;
            if ctx.opts.test.dispute == Some(super::DisputeBehaviour::Lie) {
                if let Some(d) = trace.first_mut().and_then(|p| p.first_mut()) {
                    d.0[0] ^= 1;
                    tracing::warn!(job = %job.job, "DISPUTE LIE: answering with a changed trace (test switch)");
                }
            }
            lockstep_kernels::Tensor::new(
                vec![
                    n,
                    q.layers,
                    lockstep_kernels::contract::generate::TRACE_VALUES,
                ],
                trace_values(&trace),
            )
        }
        _ => lockstep_kernels::Tensor::new(vec![n, c.dim], replay.inputs.unwrap_or_default()),
    };
    // (No test fault switch here: `fault_inject_every` corrupts answers to
    // jobs, the layer and token switches the generation itself.)
    store_outputs_unfaulted(ctx, job, vec![output]).await
}

/// Signs nothing yet: applies the test fault switch, then puts outputs too
/// large for the result message in this worker's outputs stream.
async fn store_outputs(
    ctx: &Ctx,
    job: &JobMessage,
    mut outputs: Vec<lockstep_kernels::Tensor>,
) -> Result<Outcome, JobError> {
    if let Some(f) = ctx.opts.test.fault {
        f.apply(&job.job, &mut outputs);
    }
    store_outputs_unfaulted(ctx, job, outputs).await
}

/// Puts outputs too large for the result message in this worker's outputs
/// stream; the outcome with their digest.
async fn store_outputs_unfaulted(
    ctx: &Ctx,
    job: &JobMessage,
    outputs: Vec<lockstep_kernels::Tensor>,
) -> Result<Outcome, JobError> {
    let digests: Vec<_> = outputs.iter().map(|t| t.digest()).collect();
    let inline = inline_limit(ctx.nats.max_payload());
    let mut refs = Vec::with_capacity(outputs.len());
    for (t, digest) in outputs.iter().zip(&digests) {
        refs.push(if t.data.len() * 4 <= inline {
            TensorRef::inline(t.shape.clone(), &t.data)
        } else {
            put_output(ctx, &job.batch, digest, &t.data).await?;
            TensorRef::object(t.shape.clone(), *digest)
        });
    }
    Ok(Outcome::Ok {
        digest: outputs_digest(&digests),
        outputs: refs,
    })
}

/// A kernel-side rejection as the job's fault: shapes that do not fit the
/// op, or sizes that overflow.
fn kernel_err(e: lockstep_kernels::Error) -> JobError {
    let code = match e.kind {
        ErrorKind::Shape => ErrorCode::BadShape,
        ErrorKind::TooLarge => ErrorCode::TooLarge,
        // A request that does not fit the model (a token outside its
        // vocabulary): the job's fault, as a bad shape is.
        ErrorKind::Model => ErrorCode::BadShape,
        _ => ErrorCode::Backend,
    };
    job_err(code, e.message)
}

fn check_input(name: &str, t: &TensorRef, max_elements: usize) -> Result<(), JobError> {
    match t.elements() {
        Some(n) if n <= max_elements => {}
        _ => {
            return Err(job_err(
                ErrorCode::TooLarge,
                format!(
                    "{name} {} is over this worker's limit of {max_elements} elements",
                    lockstep_kernels::contract::short_shape(&t.shape)
                ),
            ))
        }
    }
    if t.inline.is_some() == t.object.is_some() {
        return Err(job_err(
            ErrorCode::BadMessage,
            format!("{name} must have exactly one of `inline` and `object`"),
        ));
    }
    Ok(())
}

/// What a worker makes of a job message, without a server: the message read
/// as a bundle or a single job, each job checked, its inline inputs decoded
/// and checked, and computed on `backend`; objects are not fetched. Per job,
/// the outputs digest or the error a worker would answer. For the fuzzer.
pub(crate) fn inspect_message(
    bytes: &[u8],
    max_elements: usize,
    max_macs: u64,
    backend: &dyn lockstep_kernels::Backend,
) -> Vec<Result<lockstep_kernels::Digest, String>> {
    use serde::Deserialize as _;
    let value = serde_json::from_slice::<serde_json::Value>(bytes).ok();
    let jobs: Vec<Option<&serde_json::Value>> = match value
        .as_ref()
        .and_then(|v| v.get("jobs"))
        .and_then(|j| j.as_array())
    {
        Some(jobs) => jobs.iter().map(Some).collect(),
        None => vec![value.as_ref()],
    };
    jobs.into_iter()
        .map(|v| {
            let job = match v {
                Some(v) => JobMessage::deserialize(v).map_err(|e| shorten(&e.to_string(), 200))?,
                None => return Err("not JSON".to_string()),
            };
            let _ = job.spec.job_digest();
            let plan = check_job(&job, max_elements, max_macs).map_err(|e| e.1)?;
            let mut data = Vec::new();
            for t in &job.spec.inputs {
                let Some(b64) = &t.inline else {
                    return Err("input is an object (not fetched here)".into());
                };
                let d = decode_f32(b64)?;
                if Some(d.len()) != t.elements() {
                    return Err(format!("inline tensor has {} values", d.len()));
                }
                data.push(d);
            }
            let _ = plan;
            let shapes: Vec<Vec<usize>> = job.spec.inputs.iter().map(|t| t.shape.clone()).collect();
            let out = backend
                .run(&job.spec.op, &views(&shapes, &data))
                .map_err(|e| e.to_string())?;
            let digests: Vec<_> = out.iter().map(|t| t.digest()).collect();
            Ok(outputs_digest(&digests))
        })
        .collect()
}
