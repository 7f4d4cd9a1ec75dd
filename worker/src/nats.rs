//! Connecting to NATS and creating (idempotently) every stream, bucket and
//! object store the protocol uses.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream::{self, kv, object_store, stream};

use crate::protocol::*;

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
    pub blobs: object_store::ObjectStore,
}

impl Nats {
    /// The largest message the server accepts, from its INFO.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }
}

/// How long job and result messages are kept.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

pub async fn connect(url: &str) -> Result<Nats> {
    let client = async_nats::ConnectOptions::new()
        .name("lockstep")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    let js = jetstream::new(client.clone());
    let jobs = js
        .get_or_create_stream(stream::Config {
            name: JOBS_STREAM.into(),
            subjects: vec![format!("{JOB_SUBJECT_PREFIX}.>")],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            max_age: RETENTION,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .context("cannot create the jobs stream (is JetStream enabled? nats-server -js)")?;
    let results = js
        .get_or_create_stream(stream::Config {
            name: RESULTS_STREAM.into(),
            subjects: vec![format!("{RESULT_SUBJECT_PREFIX}.>")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            max_age: RETENTION,
            duplicate_window: Duration::from_secs(600),
            ..Default::default()
        })
        .await
        .context("cannot create the results stream")?;
    let workers = kv_bucket(&js, WORKERS_BUCKET, 1, Duration::ZERO).await?;
    let assign = kv_bucket(&js, ASSIGN_BUCKET, 1, RETENTION).await?;
    let faults = kv_bucket(&js, FAULTS_BUCKET, 1, Duration::ZERO).await?;
    let blobs = match js.get_object_store(BLOBS_BUCKET).await {
        Ok(s) => s,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: BLOBS_BUCKET.into(),
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .context("cannot create the blob object store")?,
    };
    Ok(Nats {
        client,
        js,
        jobs,
        results,
        workers,
        assign,
        faults,
        blobs,
    })
}

async fn kv_bucket(
    js: &jetstream::Context,
    name: &str,
    history: i64,
    max_age: Duration,
) -> Result<kv::Store> {
    if let Ok(kv) = js.get_key_value(name).await {
        return Ok(kv);
    }
    js.create_key_value(kv::Config {
        bucket: name.into(),
        history,
        max_age,
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
    use tokio::io::AsyncReadExt;
    let mut obj = nats
        .blobs
        .get(digest.to_hex())
        .await
        .with_context(|| format!("object {digest} is not in the object store"))?;
    let mut buf = Vec::new();
    obj.read_to_end(&mut buf)
        .await
        .with_context(|| format!("cannot read object {digest}"))?;
    Ok(buf)
}

/// Stores a tensor in the blob store under its digest (if absent).
pub async fn put_blob(nats: &Nats, digest: &lockstep_kernels::Digest, data: &[f32]) -> Result<()> {
    if nats.blobs.info(digest.to_hex()).await.is_ok() {
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
