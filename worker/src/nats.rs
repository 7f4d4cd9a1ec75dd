//! Connecting to NATS and creating (idempotently) every stream, bucket and
//! object store the protocol uses.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, object_store, stream};

use crate::auth::ConnectConfig;
use crate::protocol::*;
use crate::store::{Limit, StoreLimits};

/// Handles to everything lockstep uses on one NATS server.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    /// Every worker's results (sourced from each worker's own stream).
    pub results: stream::Stream,
    /// Heartbeats (each worker writes its own key).
    pub workers: kv::Store,
    /// Enrollments: public keys, operators, quarantine.
    pub enrolled: kv::Store,
    pub assign: kv::Store,
    pub faults: kv::Store,
    /// Which batch uses which blob ([`crate::store`]).
    pub refs: kv::Store,
    pub blobs: object_store::ObjectStore,
    /// The stream behind `blobs`, for reads without consumers.
    pub blobs_stream: stream::Stream,
    /// Model files by model digest (`lockstep model push`).
    pub models: object_store::ObjectStore,
    pub models_stream: stream::Stream,
}

impl Nats {
    /// The largest message the server accepts, from its INFO.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }
}

/// Every stream behind lockstep's streams, buckets and object store, by
/// its JetStream name.
/// (Each worker also has two of its own: [`worker_results_stream`] and
/// [`worker_outputs_stream`].)
pub const STREAM_NAMES: [&str; 9] = [
    JOBS_STREAM,
    RESULTS_STREAM,
    "KV_lockstep_workers",
    "KV_lockstep_enrolled",
    "KV_lockstep_assign",
    "KV_lockstep_faults",
    "KV_lockstep_blob_refs",
    "OBJ_lockstep_blobs",
    "OBJ_lockstep_models",
];

/// Connects as a coordinator and creates, where missing, every store with
/// the default limits ([`StoreLimits::default`], changed by
/// `$LOCKSTEP_STORE_LIMITS`).
pub async fn connect(cfg: &ConnectConfig) -> Result<Nats> {
    connect_with(cfg, &StoreLimits::from_env()?).await
}

async fn client(cfg: &ConnectConfig) -> Result<async_nats::Client> {
    cfg.options()
        .await?
        .connect(cfg.urls())
        .await
        .with_context(|| format!("cannot connect to NATS at {}", cfg.url))
}

/// Connects as worker `name`: opens its corner of the bus (see
/// [`crate::worker::bus`]), waiting for its queue, and creates nothing.
pub async fn connect_worker(
    cfg: &ConnectConfig,
    name: &str,
) -> Result<crate::worker::bus::WorkerNats> {
    crate::worker::bus::WorkerNats::connect(cfg, name).await
}

async fn open_all(client: &async_nats::Client, js: &jetstream::Context) -> Result<Nats> {
    let stream = |name: &'static str| async move {
        js.get_stream(name)
            .await
            .with_context(|| format!("stream {name}"))
    };
    let kv = |name: &'static str| async move {
        js.get_key_value(name)
            .await
            .with_context(|| format!("bucket {name}"))
    };
    Ok(Nats {
        client: client.clone(),
        js: js.clone(),
        jobs: stream(JOBS_STREAM).await?,
        results: stream(RESULTS_STREAM).await?,
        workers: kv(WORKERS_BUCKET).await?,
        enrolled: kv(ENROLLED_BUCKET).await?,
        assign: kv(ASSIGN_BUCKET).await?,
        faults: kv(FAULTS_BUCKET).await?,
        refs: kv(BLOB_REFS_BUCKET).await?,
        blobs: js
            .get_object_store(BLOBS_BUCKET)
            .await
            .context("object store")?,
        blobs_stream: stream("OBJ_lockstep_blobs").await?,
        models: js
            .get_object_store(MODELS_BUCKET)
            .await
            .context("model store")?,
        models_stream: stream("OBJ_lockstep_models").await?,
    })
}

/// [`connect_with`], retried for up to `timeout`: a server reloading its
/// configuration (after an enrollment), or a new cluster electing its
/// JetStream leader, answers nothing for a moment.
pub async fn connect_retrying(
    cfg: &ConnectConfig,
    limits: &StoreLimits,
    timeout: Duration,
) -> Result<Nats> {
    let t = std::time::Instant::now();
    loop {
        match connect_with(cfg, limits).await {
            // A setting, not a moment: no use waiting.
            Err(e) if e.downcast_ref::<PayloadTooSmall>().is_some() => return Err(e),
            Err(e) if t.elapsed() < timeout => {
                tracing::debug!("not ready yet: {e:#}");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            r => return r,
        }
    }
}

/// Connects as a coordinator and creates, where missing, every store with
/// these limits. Existing stores keep theirs (see
/// [`crate::store::apply_limits`]).
pub async fn connect_with(cfg: &ConnectConfig, limits: &StoreLimits) -> Result<Nats> {
    let client = client(cfg).await?;
    check_server_payload(&client).await?;
    let limits = &resolve_replicas(&client, limits).await;
    let js = jetstream::new(client.clone());
    let stream_config = |name: &str, subjects: String, retention, limit: Limit| {
        stream_config(name, subjects, retention, limit, limits.replicas)
    };
    js.get_or_create_stream(stream_config(
        JOBS_STREAM,
        format!("{JOB_SUBJECT_PREFIX}.>"),
        stream::RetentionPolicy::WorkQueue,
        limits.jobs,
    ))
    .await
    .context(
        "cannot create the jobs stream (is JetStream enabled, nats-server -js? \
         is this identity a coordinator? if the server lacks storage for the limits, \
         lower them with LOCKSTEP_STORE_LIMITS)",
    )?;
    // Every worker's results, sourced from the workers' own streams (no
    // subjects of its own: those belong to the per-worker streams).
    js.get_or_create_stream(stream::Config {
        subjects: vec![],
        ..stream_config(
            RESULTS_STREAM,
            String::new(),
            stream::RetentionPolicy::Limits,
            limits.results,
        )
    })
    .await
    .context("cannot create the results stream")?;
    migrate_shared_streams(&js).await?;
    let r = limits.replicas;
    kv_bucket(&js, WORKERS_BUCKET, limits.workers, r).await?;
    kv_bucket(&js, ENROLLED_BUCKET, limits.workers, r).await?;
    kv_bucket(&js, ASSIGN_BUCKET, limits.plans, r).await?;
    kv_bucket(&js, FAULTS_BUCKET, limits.faults, r).await?;
    kv_bucket(&js, BLOB_REFS_BUCKET, limits.refs, r).await?;
    if js.get_object_store(BLOBS_BUCKET).await.is_err() {
        js.create_object_store(object_store::Config {
            bucket: BLOBS_BUCKET.into(),
            storage: stream::StorageType::File,
            max_age: limits.blobs.max_age,
            max_bytes: limits.blobs.max_bytes,
            num_replicas: limits.replicas,
            ..Default::default()
        })
        .await
        .context("cannot create the blob object store")?;
    }
    if js.get_object_store(MODELS_BUCKET).await.is_err() {
        js.create_object_store(object_store::Config {
            bucket: MODELS_BUCKET.into(),
            storage: stream::StorageType::File,
            max_age: limits.models.max_age,
            max_bytes: limits.models.max_bytes,
            num_replicas: limits.replicas,
            ..Default::default()
        })
        .await
        .context("cannot create the model object store")?;
    }
    crate::store::adopt_limits(&js, limits).await?;
    // Every enrolled worker has its own streams (enrolled by an older
    // lockstep, or its streams lost): made where missing.
    if let Ok(enrolled) = js.get_key_value(ENROLLED_BUCKET).await {
        use futures::StreamExt;
        if let Ok(mut keys) = enrolled.keys().await {
            let mut names = Vec::new();
            while let Some(Ok(k)) = keys.next().await {
                names.push(k);
            }
            for name in names.iter().filter(|n| valid_token(n)) {
                ensure_worker_streams(&js, name, limits).await?;
            }
        }
    }
    // Workers write their heartbeats there: a rollup header on one would
    // purge every other worker's record.
    let mut workers = js.get_stream(format!("KV_{WORKERS_BUCKET}")).await?;
    let mut config = workers.info().await?.config.clone();
    if config.allow_rollup || !config.deny_purge {
        config.allow_rollup = false;
        config.deny_purge = true;
        js.update_stream(config)
            .await
            .context("cannot forbid rollups on the heartbeat bucket")?;
    }
    open_all(&client, &js).await
}

/// Refuses a server whose payload limit is below what lockstep needs. (A
/// client that retries its first connect learns the server's INFO, and
/// with it the limit, only once connected: a round trip comes first.)
pub async fn check_server_payload(client: &async_nats::Client) -> Result<(), PayloadTooSmall> {
    let _ = client.flush().await;
    check_max_payload(client.max_payload())
}

/// `limits` with its copies per store decided: as given, else (0) three
/// on a server that is part of a cluster (it says so when a client
/// connects), one on a single server.
pub async fn resolve_replicas(client: &async_nats::Client, limits: &StoreLimits) -> StoreLimits {
    let mut limits = limits.clone();
    if limits.replicas == 0 {
        // (The server's INFO is in hand once a round trip has been made.)
        let _ = client.flush().await;
        limits.replicas = if client.server_info().cluster.is_some() {
            3
        } else {
            1
        };
    }
    limits
}

/// Every lockstep stream's configuration: file storage, within its limit,
/// refusing new messages when full, a 10-minute duplicate window.
fn stream_config(
    name: &str,
    subjects: String,
    retention: stream::RetentionPolicy,
    limit: Limit,
    replicas: usize,
) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![subjects],
        retention,
        storage: stream::StorageType::File,
        max_age: limit.max_age,
        max_bytes: limit.max_bytes,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(600),
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Streams of versions before per-worker quotas, made fit: the results
/// stream gives its subjects up to the workers' own streams (it sources
/// them), and the shared outputs stream (transient data) is removed.
async fn migrate_shared_streams(js: &jetstream::Context) -> Result<()> {
    let mut results = js.get_stream(RESULTS_STREAM).await?;
    let config = results.info().await?.config.clone();
    if !config.subjects.is_empty() {
        js.update_stream(stream::Config {
            subjects: vec![],
            ..config
        })
        .await
        .context("cannot hand the results subjects to the workers' own streams")?;
        tracing::info!("the results stream now sources each worker's own stream");
    }
    if js.get_stream(OLD_OUTPUTS_STREAM).await.is_ok() {
        js.delete_stream(OLD_OUTPUTS_STREAM)
            .await
            .context("cannot remove the shared outputs stream of an older lockstep")?;
        tracing::info!(
            "removed the shared outputs stream (outputs now live in each worker's own stream)"
        );
    }
    Ok(())
}

/// Creates, where missing, a worker's own results and outputs streams
/// (its quotas: `quota_results`, `quota_outputs`), and makes the shared
/// results stream source its results. `lockstep enroll` calls this; so does
/// every coordinator that connects, for each enrolled worker.
pub async fn ensure_worker_streams(
    js: &jetstream::Context,
    worker: &str,
    limits: &StoreLimits,
) -> Result<()> {
    anyhow::ensure!(valid_token(worker), "bad worker name {}", quote(worker));
    let config = |name: String, subject: String, limit: Limit| {
        stream_config(
            &name,
            subject,
            stream::RetentionPolicy::Limits,
            limit,
            limits.replicas,
        )
    };
    let results = worker_results_stream(worker);
    js.get_or_create_stream(config(
        results.clone(),
        format!("{RESULT_SUBJECT_PREFIX}.*.{worker}"),
        limits.quota_results,
    ))
    .await
    .with_context(|| format!("cannot create the results stream of {}", quote(worker)))?;
    js.get_or_create_stream(stream::Config {
        // One message per chunk subject: a worker storing an output again
        // replaces it; readers get the last one directly.
        max_messages_per_subject: 1,
        allow_direct: true,
        ..config(
            worker_outputs_stream(worker),
            format!("{OUTPUT_SUBJECT_PREFIX}.{worker}.>"),
            limits.quota_outputs,
        )
    })
    .await
    .with_context(|| format!("cannot create the outputs stream of {}", quote(worker)))?;
    ensure_queue(js, worker).await?;
    let mut shared = js.get_stream(RESULTS_STREAM).await?;
    let mut config = shared.info().await?.config.clone();
    let sources = config.sources.get_or_insert_with(Vec::new);
    if !sources.iter().any(|s| s.name == results) {
        sources.push(stream::Source {
            name: results,
            ..Default::default()
        });
        js.update_stream(config)
            .await
            .with_context(|| format!("cannot source the results of {}", quote(worker)))?;
    }
    Ok(())
}

/// A worker's queue: its durable pull consumer on the jobs stream, made
/// here (by `lockstep enroll` or a coordinator), never by the worker, which
/// may only read, pull and ack it. One that differs from this
/// configuration (made by an older lockstep, or changed) is made anew; its
/// unacked messages stay in the work queue and are delivered again.
async fn ensure_queue(js: &jetstream::Context, worker: &str) -> Result<()> {
    use jetstream::consumer::{pull, AckPolicy};
    let name = worker_consumer(worker);
    let config = pull::Config {
        durable_name: Some(name.clone()),
        filter_subject: worker_filter(worker),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(30),
        max_deliver: crate::worker::MAX_DELIVER,
        ..Default::default()
    };
    let jobs = js.get_stream_no_info(JOBS_STREAM).await?;
    if let Ok(mut existing) = jobs.get_consumer::<pull::Config>(&name).await {
        let c = existing.info().await?.config.clone();
        let same = c.deliver_subject.is_none()
            && c.filter_subject == config.filter_subject
            && c.filter_subjects.is_empty()
            && c.ack_policy == AckPolicy::Explicit
            && c.ack_wait == config.ack_wait
            && c.max_deliver == config.max_deliver;
        if same {
            return Ok(());
        }
        tracing::info!(%worker, "making this worker's queue anew (its configuration differed)");
        jobs.delete_consumer(&name)
            .await
            .with_context(|| format!("cannot remake the queue of {}", quote(worker)))?;
    }
    jobs.create_consumer(config)
        .await
        .with_context(|| format!("cannot make the queue of {}", quote(worker)))?;
    Ok(())
}

async fn kv_bucket(
    js: &jetstream::Context,
    name: &str,
    limit: Limit,
    replicas: usize,
) -> Result<kv::Store> {
    // A lookup can fail for a moment (a server reloading its
    // configuration); creating then fails on the existing bucket, whose
    // configuration lockstep has changed since: look again.
    let mut last = None;
    for _ in 0..10 {
        if let Ok(kv) = js.get_key_value(name).await {
            return Ok(kv);
        }
        match js
            .create_key_value(kv::Config {
                bucket: name.into(),
                history: 1,
                max_age: limit.max_age,
                max_bytes: limit.max_bytes,
                storage: stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
        {
            Ok(kv) => return Ok(kv),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last.expect("tried"))
        .with_context(|| format!("cannot create KV bucket {name} (nats-server >= 2.10 needed)"))
}

/// A worker that may get assignments: enrolled, active (not quarantined),
/// of this protocol and contract, heartbeating.
#[derive(Clone, Debug)]
pub struct LiveWorker {
    pub id: String,
    pub operator: String,
    pub record: WorkerRecord,
}

/// Every enrollment, by worker name.
pub async fn enrollments(nats: &Nats) -> Result<BTreeMap<String, Enrollment>> {
    use futures::StreamExt;
    let mut out = BTreeMap::new();
    let mut keys = match nats.enrolled.keys().await {
        Ok(k) => k,
        Err(e) => return Err(e).context("listing enrollments"),
    };
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        if let Ok(Some(v)) = nats.enrolled.get(&k).await {
            if let Ok(e) = serde_json::from_slice::<Enrollment>(&v) {
                if e.name == k {
                    out.insert(k, e);
                }
            }
        }
    }
    Ok(out)
}

/// Writes an enrollment (coordinators and `lockstep enroll` only: the
/// server refuses workers).
pub async fn put_enrollment(nats: &Nats, e: &Enrollment) -> Result<()> {
    nats.enrolled
        .put(&e.name, serde_json::to_vec(e)?.into())
        .await
        .with_context(|| format!("cannot write the enrollment of {}", quote(&e.name)))?;
    Ok(())
}

/// Every live worker (heartbeat within `timeout`) that is enrolled and
/// active, given the enrollments.
pub async fn live_workers_of(
    nats: &Nats,
    enrolled: &BTreeMap<String, Enrollment>,
    timeout: Duration,
) -> Result<Vec<LiveWorker>> {
    use futures::StreamExt;
    let mut keys = nats.workers.keys().await.context("listing workers")?;
    let mut out = Vec::new();
    let now = now_ms();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        let Some(e) = enrolled
            .get(&k)
            .filter(|e| e.state == EnrollmentState::Active)
        else {
            continue;
        };
        if let Ok(Some(entry)) = nats.workers.entry(&k).await {
            // When the server stored the heartbeat, not the time the worker
            // writes in it: a worker cannot date its own heartbeat ahead.
            let stored_ms = (entry.created.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
            if let Ok(rec) = serde_json::from_slice::<WorkerRecord>(&entry.value) {
                // Only workers that speak this protocol and contract.
                if rec.id == k
                    && entry.operation == kv::Operation::Put
                    && rec.state == WorkerState::Up
                    && rec.protocol == PROTOCOL_VERSION
                    && rec.contract_version == lockstep_kernels::CONTRACT_VERSION
                    && now.saturating_sub(stored_ms) <= timeout.as_millis() as u64
                {
                    out.push(LiveWorker {
                        id: k.clone(),
                        operator: e.operator.clone(),
                        record: rec,
                    });
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

/// Every live, enrolled, active worker (see [`live_workers_of`]).
pub async fn live_workers(nats: &Nats, timeout: Duration) -> Result<Vec<LiveWorker>> {
    live_workers_of(nats, &enrollments(nats).await?, timeout).await
}

/// Waits until every named worker has registered and is heartbeating.
pub async fn wait_for_workers(nats: &Nats, names: &[&str], timeout: Duration) -> Result<()> {
    let t = std::time::Instant::now();
    loop {
        let live = live_workers(nats, Duration::from_secs(5)).await?;
        if names.iter().all(|n| live.iter().any(|w| w.id == *n)) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            anyhow::bail!(
                "workers {names:?} did not all register within {timeout:?} (see their logs)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The bytes of an object in the blob store (not yet checked: see
/// [`decode_blob`]).
pub async fn get_blob(nats: &Nats, digest: &lockstep_kernels::Digest) -> Result<Vec<u8>> {
    crate::worker::bus::read_object(&nats.blobs_stream, BLOBS_BUCKET, digest).await
}

/// The error of [`get_blob`] when the blob is not in the store.
#[derive(Debug, thiserror::Error)]
#[error("object {0} is not in the object store")]
pub struct BlobMissing(pub lockstep_kernels::Digest);

/// Whether an error of [`get_blob`] means the blob is absent (rather than
/// the store failing).
pub fn blob_missing(e: &anyhow::Error) -> bool {
    e.downcast_ref::<BlobMissing>().is_some()
}

/// Whether the object store holds this blob (an object deleted by a
/// finished batch leaves a marker that `info` still returns).
pub async fn blob_exists(nats: &Nats, digest: &lockstep_kernels::Digest) -> bool {
    nats.blobs
        .info(digest.to_hex())
        .await
        .is_ok_and(|i| !i.deleted)
}

/// Stores a tensor in the blob store under its digest (if absent).
///
/// Replicas of a job store the same output at the same moment, and two
/// overlapping puts of one name would leave the first one's chunks behind
/// for good; so a put holds a lock (a key created atomically in the
/// references bucket) and the other writer waits for the object instead.
pub async fn put_blob(nats: &Nats, digest: &lockstep_kernels::Digest, data: &[f32]) -> Result<()> {
    if blob_exists(nats, digest).await {
        // Trust an object under this name only if it hashes to the name:
        // replace one that does not.
        let stored = get_blob(nats, digest).await;
        let fine = stored
            .as_ref()
            .is_ok_and(|bytes| bytes.len() == data.len() * 4 && f32_bytes(data) == *bytes);
        if fine {
            return Ok(());
        }
        tracing::warn!(%digest, "an object under this name does not hold it: replacing it");
        nats.blobs
            .delete(digest.to_hex())
            .await
            .map_err(|e| anyhow::anyhow!("cannot delete a corrupt object {digest}: {e}"))?;
    }
    use async_nats::jetstream::kv::CreateErrorKind;
    let lock = format!("{}._put", digest.to_hex());
    let stamp = || bytes::Bytes::from(now_ms().to_string());
    let t = std::time::Instant::now();
    let revision = loop {
        match nats.refs.create(&lock, stamp()).await {
            Ok(revision) => break revision,
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => anyhow::bail!("cannot lock object {digest} to store it: {e}"),
        }
        // Someone else is storing it: wait for the object.
        if blob_exists(nats, digest).await {
            return Ok(());
        }
        // A lock older than a minute belongs to a writer that died: take it
        // over (only if nobody else just did: the update names the revision).
        if let Ok(Some(entry)) = nats.refs.entry(&lock).await {
            let since: u64 = std::str::from_utf8(&entry.value)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            if now_ms().saturating_sub(since) > 60_000 {
                if let Ok(revision) = nats.refs.update(&lock, stamp(), entry.revision).await {
                    break revision;
                }
            }
        }
        if t.elapsed() > Duration::from_secs(180) {
            anyhow::bail!("object {digest}: another writer has held its lock for 3 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let stored = store_blob(nats, digest, data).await;
    release_lock(nats, &lock, revision).await;
    stored
}

/// Drops a blob lock if it is still the one taken (at `revision`).
async fn release_lock(nats: &Nats, lock: &str, revision: u64) {
    if let Ok(Some(entry)) = nats.refs.entry(lock).await {
        if entry.revision == revision {
            drop_ref_key(nats, lock).await;
        }
    }
}

/// Removes a key of the references bucket without a trace (a KV delete would
/// leave a marker that still counts as a reference).
pub(crate) async fn drop_ref_key(nats: &Nats, key: &str) {
    let _ = nats
        .refs
        .stream
        .purge()
        .filter(format!("$KV.{BLOB_REFS_BUCKET}.{key}"))
        .await;
}

async fn store_blob(nats: &Nats, digest: &lockstep_kernels::Digest, data: &[f32]) -> Result<()> {
    if blob_exists(nats, digest).await {
        return Ok(());
    }
    let bytes = f32_bytes(data);
    // Chunks are messages too: at most 128 KiB, and within the server's limit.
    let meta = object_store::ObjectMetadata {
        name: digest.to_hex(),
        chunk_size: Some((128 << 10).min(message_limit(nats.max_payload()))),
        ..Default::default()
    };
    nats.blobs
        .put(meta, &mut bytes.as_slice())
        .await
        .map_err(|e| anyhow::anyhow!("object store put: {e}"))?;
    Ok(())
}

/// Why an output could not be read back from its worker's copy.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// Not there (never stored, or no longer): nobody can tell whose fault
    /// that is, so it blames no one.
    #[error("{0}")]
    Missing(String),
    /// There, under the worker's own name, but not what it signed: only that
    /// worker can have written it.
    #[error("{0}")]
    Bad(String),
}

/// Reads an output `worker` stored for `batch` and checks it against its
/// digest and shape.
pub async fn get_output(
    nats: &Nats,
    worker: &str,
    batch: &str,
    shape: &[usize],
    digest: &lockstep_kernels::Digest,
) -> Result<Vec<f32>, OutputError> {
    let total = lockstep_kernels::contract::elements(shape)
        .ok()
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| OutputError::Bad("output shape overflows".into()))?;
    let mut buf = Vec::with_capacity(total);
    let mut chunk = 0;
    let mut i = 0;
    let stream = nats
        .js
        .get_stream_no_info(worker_outputs_stream(worker))
        .await
        .map_err(|e| OutputError::Missing(format!("no outputs stream for {worker}: {e}")))?;
    while buf.len() < total || i == 0 {
        let m = stream
            .direct_get_last_for_subject(output_subject(worker, batch, digest, i))
            .await
            .map_err(|e| {
                OutputError::Missing(format!(
                    "output {digest} of {worker}: chunk {i} is missing ({e})"
                ))
            })?;
        if i == 0 {
            chunk = m.payload.len();
        }
        if !(chunk > 0 && (m.payload.len() == chunk || buf.len() + m.payload.len() == total)) {
            return Err(OutputError::Bad(format!(
                "output {digest} of {worker}: chunk {i} has {} bytes",
                m.payload.len()
            )));
        }
        buf.extend_from_slice(&m.payload);
        i += 1;
        if total == 0 {
            break;
        }
    }
    decode_blob(shape, digest, &buf).map_err(OutputError::Bad)
}
