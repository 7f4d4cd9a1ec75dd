//! `lockstep worker`: self-tests its backends, registers, heartbeats, pulls
//! job replicas addressed to it, computes, publishes each result durably
//! *before* acking the job, and shuts down gracefully.
//!
//! A bad job (malformed, unknown kind, missing or tampered blob, shapes over
//! the limits) gets an error result with a clear reason; nothing a message
//! contains can crash the worker.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures::StreamExt;
use lockstep_kernels::{
    tensor_digest_f32, Backend, BackendInfo, BackendKind, Digest, MatmulDims, CONTRACT_VERSION,
};
use sha3::Digest as _;
use tokio::sync::Semaphore;

use crate::nats::{connect, Nats};
use crate::protocol::*;

/// CPU products up to this many multiply-adds run on the async thread itself.
const INLINE_COMPUTE_MACS: u64 = 1 << 16;

/// Deliveries of one job message before the worker gives up on it with an
/// error result (it kept dying while computing it).
pub const MAX_DELIVER: i64 = 5;

/// Which backends a worker may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The fastest backend that passes the self-test: CUDA, then a WGSL GPU
    /// (not a software rasteriser), then the CPU.
    Auto,
    Only(BackendKind),
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            Ok(BackendChoice::Auto)
        } else {
            s.parse()
                .map(BackendChoice::Only)
                .map_err(|e: String| format!("{e}, or auto"))
        }
    }
}

/// Deterministic test-only fault injection: flip the lowest bit of the first
/// output value of every job whose id hashes into 1 of `every` buckets.
#[derive(Clone, Copy, Debug)]
pub struct FaultInjection {
    pub every: u64,
}

impl FaultInjection {
    /// Whether this job is one the faulty worker corrupts. Public so tests
    /// know the ground truth.
    pub fn selects(&self, job: &str) -> bool {
        let h = sha3::Sha3_256::digest(job.as_bytes());
        u64::from_le_bytes(h[..8].try_into().unwrap()) % self.every.max(1) == 0
    }
}

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    pub nats_url: String,
    pub name: String,
    pub backend: BackendChoice,
    pub concurrency: usize,
    pub heartbeat: Duration,
    /// Largest tensor (elements) a job may name.
    pub max_elements: usize,
    /// Largest matmul (M·K·N) a job may ask for.
    pub max_macs: u64,
    /// CPU threads for the CPU backend (0 = all cores).
    pub threads: usize,
    /// Where downloaded blobs are cached (None: [`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    pub fault: Option<FaultInjection>,
    /// Test only: sleep this long before each computation (to make jobs long).
    pub test_delay: Duration,
}

impl WorkerOptions {
    pub fn new(nats_url: &str, name: &str) -> Self {
        Self {
            nats_url: nats_url.into(),
            name: name.into(),
            backend: BackendChoice::Auto,
            concurrency: 1,
            heartbeat: Duration::from_secs(1),
            max_elements: 1 << 26,
            max_macs: 1 << 36,
            threads: 0,
            cache_dir: None,
            fault: None,
            test_delay: Duration::ZERO,
        }
    }
}

/// `$XDG_CACHE_HOME/lockstep/blobs`, else `~/.cache/lockstep/blobs`, else a
/// folder in the temporary directory. Blobs are named by digest and verified
/// on every read, so workers on one machine can share it.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("lockstep").join("blobs")
}

/// Default worker name: host name and process id.
pub fn default_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(40)
        .collect();
    format!(
        "{}-{}",
        if host.is_empty() { "worker" } else { &host },
        std::process::id()
    )
}

/// Opens the chosen backend(s) and self-tests each against the spec; returns
/// the one to compute with and the infos of all that passed.
pub fn open_backend(
    choice: BackendChoice,
    threads: usize,
) -> Result<(Arc<dyn Backend>, Vec<BackendInfo>)> {
    let kinds: Vec<BackendKind> = match choice {
        BackendChoice::Auto => vec![BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu],
        BackendChoice::Only(k) => vec![k],
    };
    let mut passing: Vec<(Arc<dyn Backend>, BackendInfo)> = Vec::new();
    for kind in kinds {
        match lockstep_kernels::backend::open_with_threads(kind, threads)
            .map(Arc::<dyn Backend>::from)
        {
            Ok(b) => match self_test(&*b) {
                Ok(()) => {
                    let info = b.info();
                    tracing::info!(backend = %kind, device = %info.device, path = %info.path, "self-test passed");
                    passing.push((b, info));
                }
                Err(e) => tracing::warn!(backend = %kind, "self-test FAILED, not advertised: {e}"),
            },
            Err(e) if choice == BackendChoice::Auto => {
                tracing::info!(backend = %kind, "absent: {e}")
            }
            Err(e) => bail!("backend {kind} is not usable: {e}"),
        }
    }
    if passing.is_empty() {
        bail!("no backend passed the self-test");
    }
    // A software Vulkan device is slower than the CPU backend: prefer the CPU then.
    let pick = passing
        .iter()
        .position(|(_, i)| !(i.kind == BackendKind::Wgpu && i.device.contains("Cpu")))
        .unwrap_or(0);
    let chosen = passing[pick].0.clone();
    Ok((chosen, passing.into_iter().map(|(_, i)| i).collect()))
}

/// The conformance self-test: a product that crosses chunk boundaries with
/// subnormals, signed zeros and infinities must equal the spec bit for bit.
pub fn self_test(backend: &dyn Backend) -> Result<()> {
    let dims = MatmulDims::new(9, 300, 7);
    let mut s = 0x853C_49E6_748F_EA9Bu64;
    let mut gen = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let bits = (s >> 32) as u32;
                match i % 23 {
                    0 => f32::from_bits(bits & 0x807F_FFFF),
                    1 => -0.0,
                    _ => f32::from_bits((bits & 0x83FF_FFFF) | 0x3C00_0000),
                }
            })
            .collect()
    };
    let a = gen(dims.m * dims.k);
    let b = gen(dims.k * dims.n);
    let got = backend.matmul(&a, &b, dims)?;
    let want = lockstep_kernels::matmul_spec(&a, &b, dims);
    if got
        .iter()
        .zip(&want)
        .any(|(g, w)| g.to_bits() != w.to_bits())
    {
        bail!("matmul differs from the contract's spec");
    }
    Ok(())
}

/// Everything a job handler needs.
struct Ctx {
    nats: Nats,
    opts: WorkerOptions,
    backend: Arc<dyn Backend>,
    info: BackendInfo,
    cache: PathBuf,
    done: AtomicU64,
    failed: AtomicU64,
}

/// Runs a worker until `shutdown` resolves, then drains: stops pulling,
/// finishes in-flight jobs (up to `drain_timeout`), and marks itself stopped.
pub async fn run(
    opts: WorkerOptions,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    if !valid_token(&opts.name) {
        bail!(
            "worker name `{}` must be 1-64 characters of A-Z a-z 0-9 _ -",
            opts.name
        );
    }
    let threads = opts.threads;
    let choice = opts.backend;
    let (backend, infos) =
        tokio::task::spawn_blocking(move || open_backend(choice, threads)).await??;
    let info = backend.info();
    let nats = connect(&opts.nats_url).await?;
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create cache dir {}", cache.display()))?;
    let ctx = Arc::new(Ctx {
        nats: nats.clone(),
        opts: opts.clone(),
        backend,
        info,
        cache,
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });

    let started = now_ms();
    let put_record = {
        let (ctx, infos) = (ctx.clone(), infos.clone());
        move |state: WorkerState| publish_record(ctx.clone(), infos.clone(), started, state)
    };
    let consumer = nats
        .jobs
        .get_or_create_consumer(
            &format!("w-{}", opts.name),
            pull::Config {
                durable_name: Some(format!("w-{}", opts.name)),
                filter_subject: job_subject(&opts.name),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: MAX_DELIVER,
                ..Default::default()
            },
        )
        .await
        .context("cannot create this worker's consumer")?;
    put_record(WorkerState::Up).await;
    // Heartbeats run on their own task, so a worker waiting for jobs (or busy
    // with a long one) still shows it is alive.
    let (state_tx, mut state_rx) = tokio::sync::watch::channel(WorkerState::Up);
    let beat = {
        let put = put_record.clone();
        let period = opts.heartbeat;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    changed = state_rx.changed() => if changed.is_err() { break },
                }
                let state = *state_rx.borrow();
                put(state).await;
            }
        })
    };
    tracing::info!(worker = %opts.name, backend = %ctx.info.kind, device = %ctx.info.device, "worker up");

    let permits = Arc::new(Semaphore::new(opts.concurrency.max(1)));
    let mut messages = consumer.messages().await.context("cannot pull jobs")?;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => {
                let permit = permit.expect("semaphore open");
                let msg = tokio::select! {
                    _ = &mut shutdown => break,
                    m = messages.next() => m,
                };
                match msg {
                    Some(Ok(msg)) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move {
                            handle(&ctx, msg).await;
                            drop(permit);
                        });
                    }
                    Some(Err(e)) => {
                        tracing::warn!("pulling jobs: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    None => {
                        tracing::warn!("job stream ended; reconnecting");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        messages = consumer.messages().await.context("cannot pull jobs")?;
                    }
                }
            }
        }
    }
    // Drain: no new pulls; wait for in-flight jobs to finish and publish.
    drop(messages);
    tracing::info!("shutting down: finishing in-flight jobs");
    let _ = state_tx.send(WorkerState::Draining);
    let all = opts.concurrency.max(1) as u32;
    if tokio::time::timeout(Duration::from_secs(60), permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight jobs did not finish in 60 s; they will be redelivered or reassigned"
        );
    }
    drop(state_tx);
    let _ = beat.await;
    put_record(WorkerState::Stopped).await;
    ctx.nats.client.flush().await.ok();
    tracing::info!(done = ctx.done.load(Ordering::Relaxed), "worker stopped");
    Ok(())
}

/// Writes this worker's registry record (a heartbeat).
async fn publish_record(
    ctx: Arc<Ctx>,
    backends: Vec<BackendInfo>,
    started_ms: u64,
    state: WorkerState,
) {
    let rec = WorkerRecord {
        protocol: PROTOCOL_VERSION,
        id: ctx.opts.name.clone(),
        backends,
        contract_version: CONTRACT_VERSION,
        concurrency: ctx.opts.concurrency,
        started_ms,
        heartbeat_ms: now_ms(),
        state,
        jobs_done: ctx.done.load(Ordering::Relaxed),
        jobs_failed: ctx.failed.load(Ordering::Relaxed),
    };
    let value = serde_json::to_vec(&rec).expect("serialisable");
    if let Err(e) = ctx.nats.workers.put(&rec.id, value.into()).await {
        tracing::warn!("heartbeat failed: {e}");
    }
}

/// A job-level failure: the code and the message sent back.
struct JobError(ErrorCode, String);

fn job_err(code: ErrorCode, msg: impl Into<String>) -> JobError {
    JobError(code, msg.into())
}

async fn handle(ctx: &Ctx, msg: jetstream::Message) {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1);
    if let Ok(bundle) = serde_json::from_slice::<JobBundle>(&msg.payload) {
        // Several replicas in one message: compute each, answer with one message.
        let mut results = Vec::with_capacity(bundle.jobs.len());
        for job in &bundle.jobs {
            let t0 = Instant::now();
            let mut result = blank_result(ctx, &job.batch, &job.job, job.replica, job.attempt);
            let outcome = job_outcome(ctx, &msg, job, delivered, &mut result.timings).await;
            finish(ctx, &mut result, outcome, t0);
            results.push(result);
        }
        let subject = if valid_token(&bundle.batch) {
            result_subject(&bundle.batch)
        } else {
            UNROUTABLE_RESULT_SUBJECT.to_string()
        };
        let answer = ResultBundle {
            protocol: PROTOCOL_VERSION,
            batch: bundle.batch.clone(),
            worker: ctx.opts.name.clone(),
            results,
        };
        let id = format!("{}.{}.{}", bundle.batch, bundle.id, ctx.opts.name);
        publish_then_ack(
            ctx,
            &msg,
            subject,
            serde_json::to_vec(&answer).expect("serialisable"),
            id,
        )
        .await;
        return;
    }
    let t0 = Instant::now();
    let parsed: Result<JobMessage, _> = serde_json::from_slice(&msg.payload);
    let (subject, mut result, outcome) = match parsed {
        Ok(job) => {
            let mut result = blank_result(ctx, &job.batch, &job.job, job.replica, job.attempt);
            let outcome = job_outcome(ctx, &msg, &job, delivered, &mut result.timings).await;
            (result_subject(&job.batch), result, outcome)
        }
        Err(e) => {
            // Read what we can: route the error to the batch if the message
            // names a valid one, and say so if it names an unknown kind.
            let v: Option<serde_json::Value> = serde_json::from_slice(&msg.payload).ok();
            let field = |k: &str| {
                v.as_ref()
                    .and_then(|v| v.get(k))
                    .and_then(|b| b.as_str())
                    .map(str::to_string)
            };
            let batch = field("batch").filter(|b| valid_token(b));
            let subject = batch
                .as_deref()
                .map_or(UNROUTABLE_RESULT_SUBJECT.to_string(), result_subject);
            let result = blank_result(
                ctx,
                batch.as_deref().unwrap_or(""),
                &field("job").unwrap_or_default(),
                0,
                0,
            );
            let outcome = match field("kind") {
                Some(k) if k != "matmul" => Err(job_err(
                    ErrorCode::UnknownKind,
                    format!("unknown job kind `{k}` (this worker knows: matmul)"),
                )),
                _ => Err(job_err(
                    ErrorCode::BadMessage,
                    format!("not a valid job message: {e}"),
                )),
            };
            (subject, result, outcome)
        }
    };
    finish(ctx, &mut result, outcome, t0);
    let id = format!(
        "{}.{}.{}.{}.{}",
        result.batch, result.job, result.replica, result.attempt, ctx.opts.name
    );
    publish_then_ack(
        ctx,
        &msg,
        subject,
        serde_json::to_vec(&result).expect("serialisable"),
        id,
    )
    .await;
}

async fn job_outcome(
    ctx: &Ctx,
    msg: &jetstream::Message,
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
    execute(ctx, msg, job, timings).await
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

/// Stores the answer durably, then acks the job message. If the answer cannot
/// be stored (the server may be restarting) it retries for 10 s, then leaves
/// the job unacked so it comes back; the message id makes a repeated publish
/// harmless.
async fn publish_then_ack(
    ctx: &Ctx,
    msg: &jetstream::Message,
    subject: String,
    payload: Vec<u8>,
    id: String,
) {
    let payload: bytes::Bytes = payload.into();
    for attempt in 0..40 {
        let publish = ctx.nats.js.send_publish(
            subject.clone(),
            jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.clone()),
        );
        let stored = match publish.await {
            Ok(ack) => ack.await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match stored {
            Ok(_) => {
                // A plain ack: if it is lost, the job is redelivered and its
                // answer, published again under the same id, is deduplicated.
                if let Err(e) = msg.ack().await {
                    tracing::warn!(
                        "ack failed (job may be redelivered; results are deduplicated): {e}"
                    );
                }
                return;
            }
            Err(e) => {
                tracing::warn!(attempt, "result not stored yet: {e}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    tracing::error!(%id, "could not store the result; the job stays unacked and will come back");
}

fn blank_result(ctx: &Ctx, batch: &str, job: &str, replica: u32, attempt: u32) -> ResultMessage {
    ResultMessage {
        protocol: PROTOCOL_VERSION,
        batch: batch.into(),
        job: job.into(),
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
    }
}

async fn execute(
    ctx: &Ctx,
    msg: &jetstream::Message,
    job: &JobMessage,
    timings: &mut Timings,
) -> Result<Outcome, JobError> {
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
    let JobSpec::Matmul { a, b } = &job.spec;
    let t = Instant::now();
    check_matrix("a", a, ctx.opts.max_elements)?;
    check_matrix("b", b, ctx.opts.max_elements)?;
    if a.shape[1] != b.shape[0] {
        return Err(job_err(
            ErrorCode::BadShape,
            format!("a is {:?} and b is {:?}: K differs", a.shape, b.shape),
        ));
    }
    let dims = MatmulDims::new(a.shape[0], a.shape[1], b.shape[1]);
    let macs = (dims.m as u64)
        .saturating_mul(dims.k as u64)
        .saturating_mul(dims.n as u64);
    if macs > ctx.opts.max_macs {
        return Err(job_err(
            ErrorCode::TooLarge,
            format!(
                "{dims:?} is {macs} multiply-adds, over this worker's limit of {}",
                ctx.opts.max_macs
            ),
        ));
    }
    if (dims.m as u64) * (dims.n as u64) > ctx.opts.max_elements as u64 {
        return Err(job_err(
            ErrorCode::TooLarge,
            format!(
                "output {}x{} is over this worker's limit of {} elements",
                dims.m, dims.n, ctx.opts.max_elements
            ),
        ));
    }
    let av = fetch(ctx, a).await?;
    let bv = fetch(ctx, b).await?;
    timings.fetch_ms = t.elapsed().as_secs_f64() * 1e3;

    let t = Instant::now();
    if !ctx.opts.test_delay.is_zero() {
        tokio::time::sleep(ctx.opts.test_delay).await;
    }
    let out = if macs <= INLINE_COMPUTE_MACS && ctx.info.kind == lockstep_kernels::BackendKind::Cpu
    {
        // Tiny products: a thread hop would cost more than the arithmetic.
        ctx.backend.matmul(&av, &bv, dims)
    } else {
        let backend = ctx.backend.clone();
        let mut compute = tokio::task::spawn_blocking(move || backend.matmul(&av, &bv, dims));
        // Long jobs: tell the server we are alive so the job is not redelivered.
        let mut progress = tokio::time::interval(Duration::from_secs(10));
        progress.tick().await;
        loop {
            tokio::select! {
                r = &mut compute => break r,
                _ = progress.tick() => { let _ = msg.ack_with(AckKind::Progress).await; }
            }
        }
        .unwrap_or_else(|e| {
            Err(lockstep_kernels::Error::device(format!(
                "backend task failed: {e}"
            )))
        })
    };
    let mut c = out.map_err(|e| job_err(ErrorCode::Backend, e.to_string()))?;
    timings.compute_ms = t.elapsed().as_secs_f64() * 1e3;
    if let Some(f) = ctx.opts.fault {
        if f.selects(&job.job) && !c.is_empty() {
            c[0] = f32::from_bits(c[0].to_bits() ^ 1);
            tracing::warn!(job = %job.job, "FAULT INJECTED: flipped one output bit (test switch)");
        }
    }
    let shape = vec![dims.m, dims.n];
    let digest = tensor_digest_f32(&shape, &c);
    let output = if c.len() * 4 <= INLINE_MAX_BYTES {
        TensorRef::inline(shape.clone(), &c)
    } else {
        put_blob(ctx, &digest, &c).await?;
        TensorRef::object(shape.clone(), digest)
    };
    Ok(Outcome::Ok {
        shape,
        digest,
        output,
    })
}

fn check_matrix(name: &str, t: &TensorRef, max_elements: usize) -> Result<(), JobError> {
    if t.shape.len() != 2 {
        return Err(job_err(
            ErrorCode::BadShape,
            format!("{name} has shape {:?}; it must be a matrix", t.shape),
        ));
    }
    match t.elements() {
        Some(n) if n <= max_elements => {}
        _ => {
            return Err(job_err(
                ErrorCode::TooLarge,
                format!(
                    "{name} {:?} is over this worker's limit of {max_elements} elements",
                    t.shape
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

/// The tensor's data: decoded inline, or fetched from the object store (or
/// the local cache) and re-hashed against its name.
async fn fetch(ctx: &Ctx, t: &TensorRef) -> Result<Vec<f32>, JobError> {
    let n = t.elements().unwrap_or(0);
    if let Some(b64) = &t.inline {
        let data = decode_f32(b64).map_err(|e| job_err(ErrorCode::BadShape, e))?;
        if data.len() != n {
            return Err(job_err(
                ErrorCode::BadShape,
                format!(
                    "inline tensor {:?} has {} values, expected {n}",
                    t.shape,
                    data.len()
                ),
            ));
        }
        return Ok(data);
    }
    let digest = t.object.expect("checked: inline or object");
    let cached = ctx.cache.join(digest.to_hex());
    let bytes = match std::fs::read(&cached) {
        Ok(b) => b,
        Err(_) => crate::nats::get_blob(&ctx.nats, &digest)
            .await
            .map_err(|e| job_err(ErrorCode::MissingBlob, format!("input {e:#}")))?,
    };
    let data = decode_blob(&t.shape, &digest, &bytes).map_err(|e| {
        let _ = std::fs::remove_file(&cached);
        job_err(ErrorCode::TamperedBlob, e)
    })?;
    if !cached.exists() {
        // Write then rename: a reader never sees a partial blob.
        let tmp = cached.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &bytes).is_ok() {
            let _ = std::fs::rename(&tmp, &cached);
        }
    }
    Ok(data)
}

async fn put_blob(ctx: &Ctx, digest: &Digest, data: &[f32]) -> Result<(), JobError> {
    crate::nats::put_blob(&ctx.nats, digest, data)
        .await
        .map_err(|e| job_err(ErrorCode::Backend, format!("cannot store output: {e}")))
}
