//! `lockstep worker`: self-tests its backends, registers, heartbeats, pulls
//! job replicas addressed to it, computes, publishes each result durably
//! *before* acking the job, and shuts down gracefully.
//!
//! A bad job (malformed, unknown op, missing or tampered blob, shapes over
//! the limits) gets an error result with a clear reason; nothing a message
//! contains can crash the worker.
//!
//! - [`backends`]: choosing and self-testing the backend;
//! - `registry`: the registry record and heartbeats;
//! - `handler`: one job message in, its results out, for any op;
//! - `publish`: results sized to the server's payload limit, split, stored,
//!   then the job acked;
//! - `cache`: inputs and outputs, the object store and the local blob cache;
//! - [`testing`]: test-only switches (fault injection, delays).

pub mod backends;
pub mod bus;
mod cache;
pub(crate) mod handler;
mod inflight;
pub mod models;
mod publish;
mod registry;
pub mod testing;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use lockstep_kernels::{Backend, BackendInfo, BackendKind};

pub use backends::{open_backend, BackendChoice};
pub use testing::{DisputeBehaviour, FaultInjection, TestSwitches};

use crate::auth::{ConnectConfig, Identity};
use crate::nats::connect_worker;
use crate::protocol::*;
use bus::WorkerNats;

/// Deliveries of one job message before the worker gives up on it with an
/// error result (it kept dying while computing it).
pub const MAX_DELIVER: i64 = 5;

#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// The server, and this worker's key (it logs in with it and signs
    /// every result with it).
    pub nats: ConnectConfig,
    pub name: String,
    pub backend: BackendChoice,
    pub concurrency: usize,
    pub heartbeat: Duration,
    /// Largest tensor (elements) a job may name.
    pub max_elements: usize,
    /// Largest job a worker accepts, in multiply-adds or comparable steps
    /// (`Plan::work`; M·K·N for matmul).
    pub max_macs: u64,
    /// CPU threads for the CPU backend (0 = all cores).
    pub threads: usize,
    /// Where downloaded blobs are cached (None: [`default_cache_dir`]).
    pub cache_dir: Option<PathBuf>,
    /// Most bytes the blob cache may hold (least recently used go first).
    pub cache_bytes: u64,
    /// Most bytes of model files kept on disk (in `<cache>/models`).
    pub model_cache_bytes: u64,
    /// The largest model file this worker takes (a larger one is answered
    /// `too_large`).
    pub max_model_bytes: u64,
    /// Models kept loaded in memory at once.
    pub max_models: usize,
    /// Where to serve Prometheus metrics (None: nowhere).
    pub metrics: Option<std::net::SocketAddr>,
    /// Test-only switches; all off unless a test sets them.
    pub test: TestSwitches,
}

impl WorkerOptions {
    pub fn new(nats: ConnectConfig, name: &str) -> Self {
        Self {
            nats,
            name: name.into(),
            backend: BackendChoice::Auto,
            concurrency: 1,
            heartbeat: Duration::from_secs(1),
            max_elements: 1 << 26,
            max_macs: 1 << 36,
            threads: 0,
            cache_dir: None,
            cache_bytes: 1 << 30,
            model_cache_bytes: 16 << 30,
            max_model_bytes: 8 << 30,
            max_models: 2,
            metrics: None,
            test: TestSwitches::default(),
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

/// Everything a job handler needs.
struct Ctx {
    nats: WorkerNats,
    /// Signs every result.
    identity: Identity,
    opts: WorkerOptions,
    backend: Arc<dyn Backend>,
    info: BackendInfo,
    cache: PathBuf,
    /// Job messages started and not yet acked, on disk.
    inflight: inflight::Inflight,
    /// Models fetched and loaded, for generate jobs.
    models: models::Models,
    done: AtomicU64,
    failed: AtomicU64,
    metrics: crate::metrics::WorkerMetrics,
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
    let identity = opts.nats.identity()?.context(
        "a worker signs its results with its key: give it the key file `lockstep enroll` wrote (--nkey FILE)",
    )?;
    let threads = opts.threads;
    let choice = opts.backend;
    let (backend, infos) =
        tokio::task::spawn_blocking(move || open_backend(choice, threads)).await??;
    let info = backend.info();
    let nats = connect_worker(&opts.nats, &opts.name).await?;
    let cache = opts.cache_dir.clone().unwrap_or_else(default_cache_dir);
    std::fs::create_dir_all(&cache)
        .with_context(|| format!("cannot create cache dir {}", cache.display()))?;
    ensure_name_is_free(&nats, &opts.name, opts.heartbeat).await?;
    // (A server reloading its configuration, when another worker is
    // enrolled, leaves JetStream unanswering for a moment: retry.)
    let t = std::time::Instant::now();
    let (mut consumer, created) = loop {
        let queue = async {
            let mut c = nats.queue(&opts.name).await?;
            let created = c.info().await?.created;
            anyhow::Ok((c, created))
        };
        match queue.await {
            Ok(c) => break c,
            Err(e) if t.elapsed() < Duration::from_secs(30) => {
                tracing::warn!("{e:#}; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e),
        }
    };
    // The queue is made once, at enrollment: its creation time names the
    // sequence numbers the in-flight records count by.
    let inflight = inflight::Inflight::new(&cache, &opts.name, &format!("{created:?}"));
    take_back(&nats, &inflight, &mut consumer).await;
    let engine_kind = match info.kind {
        BackendKind::Wgpu => models::EngineKind::Wgpu,
        BackendKind::Cuda => models::EngineKind::Cuda,
        BackendKind::Cpu => models::EngineKind::Cpu,
    };
    let metrics =
        crate::metrics::WorkerMetrics::new(&info.kind.to_string(), &info.device, &info.path);
    let ctx = Arc::new(Ctx {
        nats: nats.clone(),
        identity,
        opts: opts.clone(),
        backend,
        info,
        inflight,
        models: models::Models::new(
            cache.join("models"),
            opts.model_cache_bytes,
            opts.max_model_bytes,
            opts.max_models,
            opts.threads,
            engine_kind,
        ),
        cache,
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
        metrics,
    });
    if let Some(addr) = ctx.opts.metrics {
        let c = ctx.clone();
        let bound = crate::metrics::serve_metrics(addr, move || {
            c.metrics.models_loaded.set(c.models.loaded().len() as i64);
            c.metrics.resident.set(crate::metrics::resident_bytes());
            crate::metrics::render(&c.metrics.registry)
        })
        .await?;
        tracing::info!(%bound, "metrics at http://{bound}/metrics");
    }

    let started = now_ms();
    let put_record = {
        let (ctx, infos) = (ctx.clone(), infos.clone());
        move |state: WorkerState| {
            registry::publish_record(ctx.clone(), infos.clone(), started, state)
        }
    };
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

    // One pulling lane per job worked on at a time: each asks the server
    // for one message, works on it, asks again. (See [`lane`].)
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let lanes: Vec<_> = (0..opts.concurrency.max(1))
        .map(|_| tokio::spawn(lane(ctx.clone(), consumer.clone(), stop_rx.clone())))
        .collect();
    shutdown.await;
    // Drain: no new pulls; in-flight jobs finish and publish.
    tracing::info!("shutting down: finishing in-flight jobs");
    let _ = stop_tx.send(true);
    let _ = state_tx.send(WorkerState::Draining);
    let all = futures::future::join_all(lanes);
    if tokio::time::timeout(Duration::from_secs(60), all)
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

/// How long one pull request waits on the server for a message.
const PULL_EXPIRES: Duration = Duration::from_secs(3);
/// How long past its expiry a pull request may go unanswered (no message,
/// no timeout status) before it is taken as lost and asked again.
const PULL_GRACE: Duration = Duration::from_secs(1);

/// One pulling lane: a pull request for one message, with a short expiry,
/// then the job, then the next request. Every request is independent (its
/// own inbox, its own expiry), so a request the server forgets (a
/// restarted server, a consumer whose leader moved) or a status that never
/// arrives costs at most `PULL_EXPIRES + PULL_GRACE`; a long-lived pull
/// stream that counts outstanding messages could believe a request still
/// open that the server had already answered, and pulled nothing for 30 s.
/// On stop, a lane waits out its open request (a message the server hands
/// it then is worked on, not left unacked in a dropped inbox).
async fn lane(
    ctx: Arc<Ctx>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let request = consumer
            .batch()
            .max_messages(1)
            .expires(PULL_EXPIRES)
            .messages();
        let mut batch = match tokio::time::timeout(PULL_EXPIRES, request).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                tracing::warn!("pulling jobs: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            Err(_) => {
                tracing::warn!("pulling jobs: the server did not take the request; retrying");
                continue;
            }
        };
        let next = tokio::time::timeout(PULL_EXPIRES + PULL_GRACE, batch.next());
        tokio::pin!(next);
        let got = tokio::select! {
            got = &mut next => got,
            _ = stop.changed() => next.await,
        };
        match got {
            Ok(Some(Ok(msg))) => handler::handle(&ctx, msg).await,
            Ok(Some(Err(e))) => {
                tracing::warn!("pulling jobs: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // Expired with nothing to do.
            Ok(None) => {}
            Err(_) => tracing::debug!("a pull request went unanswered; asking again"),
        }
    }
}

/// Refuses to start under a name a live worker is using: its record is up
/// or draining and its heartbeat still advances. (A record left by a worker
/// that was killed stops advancing; then this one takes over.)
async fn ensure_name_is_free(nats: &WorkerNats, name: &str, heartbeat: Duration) -> Result<()> {
    let read = || nats.own_record(name);
    let Some(first) = read().await else {
        return Ok(());
    };
    let fresh = now_ms().saturating_sub(first.heartbeat_ms) < 10_000;
    if first.state == WorkerState::Stopped || !fresh {
        return Ok(());
    }
    // It may have died a moment ago: watch for a heartbeat (theirs come at
    // their own period; wait for two of ours, and at least 2.5 s).
    tokio::time::sleep((heartbeat * 2).max(Duration::from_millis(2500))).await;
    if let Some(second) = read().await {
        if second.heartbeat_ms != first.heartbeat_ms && second.state != WorkerState::Stopped {
            bail!(
                "a live worker named {} is already running (heartbeat {} ms ago); choose another --name",
                quote(name),
                now_ms().saturating_sub(second.heartbeat_ms)
            );
        }
    }
    Ok(())
}

/// Job messages a previous run of this worker left delivered but unacked
/// (it was killed mid-job) come back at once rather than after the 30 s ack
/// wait: their acknowledgement subjects were kept on disk ([`inflight`]),
/// and each gets a negative acknowledgement, which makes the server deliver
/// it again now. The work queue keeps every unacked message, so nothing is
/// lost either way; the in-flight records keep the per-message start
/// counts, so a message that keeps killing the worker is still given up.
async fn take_back(
    nats: &WorkerNats,
    inflight: &inflight::Inflight,
    consumer: &mut jetstream::consumer::Consumer<pull::Config>,
) {
    let Ok(pending) = consumer.info().await.map(|i| i.num_ack_pending) else {
        return;
    };
    if pending == 0 {
        // Nothing of an earlier run is in hand: its records (of messages
        // acked, or purged with their batch) are stale.
        inflight.clear();
        return;
    }
    let replies = inflight.unfinished();
    if replies.is_empty() {
        return;
    }
    tracing::info!(
        pending,
        "taking back the job messages a previous run of this worker left unacked"
    );
    for reply in replies {
        let _ = nats.client.publish(reply, "-NAK".into()).await;
    }
    let _ = nats.client.flush().await;
}
