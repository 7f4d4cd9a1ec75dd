//! Connecting to NATS and creating (idempotently) every stream, bucket and
//! object store the protocol uses.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, object_store, stream};

use crate::protocol::*;
use crate::store::{Limit, StoreLimits};

/// Handles to everything lockstep uses on one NATS server.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub jobs: stream::Stream,
    pub results: stream::Stream,
    pub workers: kv::Store,
    pub assign: kv::Store,
    pub faults: kv::Store,
    /// Which batch uses which blob ([`crate::store`]).
    pub refs: kv::Store,
    pub blobs: object_store::ObjectStore,
    /// The stream behind `blobs`, for reads without consumers.
    pub blobs_stream: stream::Stream,
}

impl Nats {
    /// The largest message the server accepts, from its INFO.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }
}

/// Connects and creates, where missing, every store with the default
/// limits ([`StoreLimits::default`], changed by `$LOCKSTEP_STORE_LIMITS`).
pub async fn connect(url: &str) -> Result<Nats> {
    connect_with(url, &StoreLimits::from_env()?).await
}

/// Connects and creates, where missing, every store with these limits.
/// Existing stores keep theirs (see [`crate::store::apply_limits`]).
pub async fn connect_with(url: &str, limits: &StoreLimits) -> Result<Nats> {
    let client = async_nats::ConnectOptions::new()
        .name("lockstep")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    let js = jetstream::new(client.clone());
    let stream_config = |name: &str, subjects: String, retention, limit: Limit| stream::Config {
        name: name.into(),
        subjects: vec![subjects],
        retention,
        storage: stream::StorageType::File,
        max_age: limit.max_age,
        max_bytes: limit.max_bytes,
        discard: stream::DiscardPolicy::New,
        duplicate_window: Duration::from_secs(600),
        ..Default::default()
    };
    let jobs = js
        .get_or_create_stream(stream_config(
            JOBS_STREAM,
            format!("{JOB_SUBJECT_PREFIX}.>"),
            stream::RetentionPolicy::WorkQueue,
            limits.jobs,
        ))
        .await
        .context(
            "cannot create the jobs stream (is JetStream enabled, nats-server -js? \
             if the server lacks storage for the limits, lower them with LOCKSTEP_STORE_LIMITS)",
        )?;
    let results = js
        .get_or_create_stream(stream_config(
            RESULTS_STREAM,
            format!("{RESULT_SUBJECT_PREFIX}.>"),
            stream::RetentionPolicy::Limits,
            limits.results,
        ))
        .await
        .context("cannot create the results stream")?;
    let workers = kv_bucket(&js, WORKERS_BUCKET, limits.workers).await?;
    let assign = kv_bucket(&js, ASSIGN_BUCKET, limits.plans).await?;
    let faults = kv_bucket(&js, FAULTS_BUCKET, limits.faults).await?;
    let refs = kv_bucket(&js, BLOB_REFS_BUCKET, limits.refs).await?;
    let blobs = match js.get_object_store(BLOBS_BUCKET).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: BLOBS_BUCKET.into(),
                storage: stream::StorageType::File,
                max_age: limits.blobs.max_age,
                max_bytes: limits.blobs.max_bytes,
                ..Default::default()
            })
            .await
            .context("cannot create the blob object store")?,
    };
    crate::store::adopt_limits(&js, limits).await?;
    let blobs_stream = js
        .get_stream(format!("OBJ_{BLOBS_BUCKET}"))
        .await
        .context("cannot open the blob store's stream")?;
    Ok(Nats {
        blobs_stream,
        client,
        js,
        jobs,
        results,
        workers,
        assign,
        faults,
        refs,
        blobs,
    })
}

async fn kv_bucket(js: &jetstream::Context, name: &str, limit: Limit) -> Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history: 1,
        max_age: limit.max_age,
        max_bytes: limit.max_bytes,
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .with_context(|| format!("cannot create KV bucket {name} (nats-server >= 2.10 needed)"))
}

/// Every live worker record (heartbeat within `timeout`).
pub async fn live_workers(nats: &Nats, timeout: Duration) -> Result<Vec<WorkerRecord>> {
    use futures::StreamExt;
    let mut keys = nats.workers.keys().await.context("listing workers")?;
    let mut out = Vec::new();
    let now = now_ms();
    while let Some(k) = keys.next().await {
        let Ok(k) = k else { continue };
        if let Ok(Some(v)) = nats.workers.get(&k).await {
            if let Ok(rec) = serde_json::from_slice::<WorkerRecord>(&v) {
                // Only workers that speak this protocol and contract.
                if rec.state == WorkerState::Up
                    && rec.protocol == PROTOCOL_VERSION
                    && rec.contract_version == lockstep_kernels::CONTRACT_VERSION
                    && now.saturating_sub(rec.heartbeat_ms) <= timeout.as_millis() as u64
                {
                    out.push(rec);
                }
            }
        }
    }
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
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
    // Read chunk by chunk with direct gets: the object store's own `get`
    // creates a consumer per read, and at thousands of reads a second those
    // hit the server's consumer limit before they expire.
    use object_store::InfoErrorKind;
    let info = match nats.blobs.info(digest.to_hex()).await {
        Ok(i) if !i.deleted => i,
        Ok(_) => anyhow::bail!(BlobMissing(*digest)),
        Err(e) if e.kind() == InfoErrorKind::NotFound => anyhow::bail!(BlobMissing(*digest)),
        Err(e) => anyhow::bail!("cannot look up object {digest}: {e}"),
    };
    let subject = format!("$O.{BLOBS_BUCKET}.C.{}", info.nuid);
    let mut buf = Vec::with_capacity(info.size);
    let mut seq = 0;
    for _ in 0..info.chunks {
        let m = nats
            .blobs_stream
            .direct_get_next_for_subject(subject.as_str(), Some(seq + 1))
            .await
            .with_context(|| format!("cannot read object {digest}"))?;
        seq = m.sequence;
        buf.extend_from_slice(&m.payload);
    }
    anyhow::ensure!(
        buf.len() == info.size,
        "object {digest} has {} bytes of the {} its metadata promises",
        buf.len(),
        info.size
    );
    Ok(buf)
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
        return Ok(());
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
