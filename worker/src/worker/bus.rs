//! A worker's view of the bus: exactly what its account may touch, opened
//! without reading any stream's metadata. A worker may not ask for a
//! stream's info: its subject names would tell it other workers' batches,
//! bundles, output digests and fault records (docs/PROTOCOL.md, "Trust").
//!
//! - its queue: the durable pull consumer `w-<worker>` on `LOCKSTEP_JOBS`,
//!   made for it at enrollment (it may read it, pull and ack; never create,
//!   change or delete it);
//! - its heartbeat: its own key of `lockstep_workers` (write, direct get);
//! - inputs: direct gets on the object store's stream;
//! - its results and outputs: plain JetStream publishes on its own subjects,
//!   stored in its own streams within its quotas.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, consumer::pull, object_store, stream};

use crate::auth::ConnectConfig;
use crate::protocol::*;

/// The handles a worker uses.
#[derive(Clone)]
pub struct WorkerNats {
    pub client: async_nats::Client,
    /// The JetStream API as the worker's account sees it
    /// ([`WORKER_API_PREFIX`]).
    pub js: jetstream::Context,
    /// `LOCKSTEP_JOBS`, for this worker's own consumer only.
    pub jobs: stream::Stream<()>,
    heartbeats: stream::Stream<()>,
    blobs: stream::Stream<()>,
    models: stream::Stream<()>,
}

impl WorkerNats {
    /// Connects with the worker's key and waits (a note every 10 s) until
    /// its consumer exists: `lockstep enroll` makes it, and a server
    /// reloading its configuration answers nothing for a moment.
    pub async fn connect(cfg: &ConnectConfig, name: &str) -> Result<Self> {
        let client = cfg
            .options()
            .await?
            .connect(cfg.urls())
            .await
            .with_context(|| format!("cannot connect to NATS at {}", cfg.url))?;
        crate::nats::check_server_payload(&client).await?;
        let js = jetstream::with_prefix(client.clone(), WORKER_API_PREFIX);
        let open = |name: String| {
            let js = js.clone();
            async move {
                js.get_stream_no_info(name)
                    .await
                    .map_err(|e| anyhow::anyhow!("{e}"))
            }
        };
        let nats = Self {
            jobs: open(JOBS_STREAM.into()).await?,
            heartbeats: open(format!("KV_{WORKERS_BUCKET}")).await?,
            blobs: open(format!("OBJ_{BLOBS_BUCKET}")).await?,
            models: open(format!("OBJ_{MODELS_BUCKET}")).await?,
            client,
            js,
        };
        let t = std::time::Instant::now();
        let mut noted = 0;
        loop {
            match nats.queue(name).await {
                Ok(_) => return Ok(nats),
                Err(e) => {
                    let waited = t.elapsed().as_secs();
                    if waited >= noted {
                        tracing::warn!(
                            "waiting for this worker's queue on {} (`lockstep enroll` makes it): {e:#}",
                            cfg.url
                        );
                        noted = waited + 10;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The largest message the server accepts, from its INFO.
    pub fn max_payload(&self) -> usize {
        self.client.max_payload()
    }

    /// This worker's queue (its durable pull consumer).
    pub async fn queue(&self, name: &str) -> Result<jetstream::consumer::Consumer<pull::Config>> {
        self.jobs
            .get_consumer::<pull::Config>(&worker_consumer(name))
            .await
            .map_err(|e| {
                anyhow::anyhow!(
                    "no queue for worker {} (was it enrolled by this version of `lockstep enroll`?): {e}",
                    quote(name)
                )
            })
    }

    /// Writes this worker's heartbeat (its own key of the heartbeat bucket).
    pub async fn put_heartbeat(&self, name: &str, record: &[u8]) -> Result<()> {
        let subject = format!("{WORKER_API_PREFIX}.$KV.{WORKERS_BUCKET}.{name}");
        self.js
            .publish(subject, bytes::Bytes::copy_from_slice(record))
            .await?
            .await
            .context("heartbeat not stored")?;
        Ok(())
    }

    /// This worker's last heartbeat, if any.
    pub async fn own_record(&self, name: &str) -> Option<WorkerRecord> {
        let m = self
            .heartbeats
            .direct_get_last_for_subject(format!("$KV.{WORKERS_BUCKET}.{name}"))
            .await
            .ok()?;
        serde_json::from_slice(&m.payload).ok()
    }

    /// Stores an output of this worker (`worker`) for `batch` in its own
    /// outputs stream, chunk by chunk (`lockstep.out.<worker>.<batch>.<hex>.<i>`,
    /// chunks of at most 128 KiB and within the server's message limit;
    /// every chunk but the last as long as the first). Storing it again
    /// replaces it.
    pub async fn put_output(
        &self,
        worker: &str,
        batch: &str,
        digest: &lockstep_kernels::Digest,
        data: &[f32],
    ) -> Result<()> {
        let bytes = f32_bytes(data);
        let chunk = (128 << 10).min(message_limit(self.max_payload()));
        let mut acks = Vec::new();
        for (i, part) in bytes.chunks(chunk).enumerate() {
            let ack = self
                .js
                .publish(
                    output_subject(worker, batch, digest, i),
                    bytes::Bytes::copy_from_slice(part),
                )
                .await
                .with_context(|| format!("cannot store output {digest}"))?;
            acks.push(ack);
        }
        for ack in acks {
            ack.await
                .with_context(|| format!("output {digest} was not stored"))?;
        }
        Ok(())
    }

    /// The bytes of an input in the object store (not yet checked: see
    /// [`decode_blob`]).
    pub async fn blob(&self, digest: &lockstep_kernels::Digest) -> Result<Vec<u8>> {
        read_object(&self.blobs, BLOBS_BUCKET, digest).await
    }

    /// The bytes of a model file in the model store (not yet checked: the
    /// worker loads them and compares the model digest with the name).
    pub async fn model_file(
        &self,
        digest: &lockstep_kernels::Digest,
        info: &object_store::ObjectInfo,
    ) -> Result<Vec<u8>> {
        read_chunks(&self.models, MODELS_BUCKET, digest, info).await
    }

    /// A model file's metadata in the model store (its size, its chunks).
    pub async fn model_info(
        &self,
        digest: &lockstep_kernels::Digest,
    ) -> Result<object_store::ObjectInfo> {
        object_info(&self.models, MODELS_BUCKET, digest).await
    }
}

/// The bytes of an object in `bucket` (the blob or the model store), read by direct gets from its
/// stream (metadata, then chunks): no consumer per read (at thousands of
/// reads a second those hit the server's consumer limit), and no stream
/// info (workers may not read it).
pub async fn read_object<I>(
    blobs: &stream::Stream<I>,
    bucket: &str,
    digest: &lockstep_kernels::Digest,
) -> Result<Vec<u8>> {
    let info = object_info(blobs, bucket, digest).await?;
    read_chunks(blobs, bucket, digest, &info).await
}

/// The chunks of the object `info` describes, checked to be as many bytes
/// as it says.
async fn read_chunks<I>(
    blobs: &stream::Stream<I>,
    bucket: &str,
    digest: &lockstep_kernels::Digest,
    info: &object_store::ObjectInfo,
) -> Result<Vec<u8>> {
    let subject = format!("$O.{bucket}.C.{}", info.nuid);
    let mut buf = Vec::with_capacity(info.size);
    let mut seq = 0;
    for _ in 0..info.chunks {
        let m = blobs
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

/// An object's metadata in `bucket` (missing or deleted: [`crate::nats::BlobMissing`]).
pub async fn object_info<I>(
    blobs: &stream::Stream<I>,
    bucket: &str,
    digest: &lockstep_kernels::Digest,
) -> Result<object_store::ObjectInfo> {
    use base64::Engine as _;
    let name = base64::engine::general_purpose::URL_SAFE.encode(digest.to_hex());
    let meta = match blobs
        .direct_get_last_for_subject(format!("$O.{bucket}.M.{name}"))
        .await
    {
        Ok(m) => m,
        Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => {
            bail!(crate::nats::BlobMissing(*digest))
        }
        Err(e) => bail!("cannot look up object {digest}: {e}"),
    };
    let info: object_store::ObjectInfo = serde_json::from_slice(&meta.payload)
        .with_context(|| format!("object {digest}: unreadable metadata"))?;
    if info.deleted {
        bail!(crate::nats::BlobMissing(*digest));
    }
    Ok(info)
}
