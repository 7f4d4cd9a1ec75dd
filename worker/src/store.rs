//! What lockstep keeps on the server, and for how long: explicit limits on
//! every stream, KV bucket and the object store (docs/PROTOCOL.md,
//! "Retention"), and the clean-up of a finished batch.
//!
//! Every store refuses new messages when full (discard policy `new`), so
//! nothing is ever dropped silently; a coordinator that meets a full store
//! fails its batch with a message that names the store and the setting.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures::StreamExt;

use crate::nats::Nats;
use crate::protocol::*;

/// The bytes and age one store may reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub max_bytes: i64,
    /// Zero: no age limit.
    pub max_age: Duration,
}

/// Limits of every store, by the names `--store-limits` uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreLimits {
    /// `LOCKSTEP_JOBS`: replicas waiting for their workers.
    pub jobs: Limit,
    /// `LOCKSTEP_RESULTS`: results, purged when their batch is done.
    pub results: Limit,
    /// `lockstep_assign`: plans, purged when their batch is done.
    pub plans: Limit,
    /// `lockstep_faults`: the evidence against faulty workers.
    pub faults: Limit,
    /// `lockstep_workers`: one record per worker, rewritten every heartbeat.
    pub workers: Limit,
    /// `lockstep_blobs`: tensors too large to travel inline.
    pub blobs: Limit,
    /// `lockstep_blob_refs`: which running batch uses which blob.
    pub refs: Limit,
    /// `lockstep_models`: model files by digest (`lockstep model push`).
    pub models: Limit,
    /// Each worker's own results stream (`LOCKSTEP_RESULTS_<worker>`): its
    /// quota of results not yet purged.
    pub quota_results: Limit,
    /// Each worker's own outputs stream (`LOCKSTEP_OUTPUTS_<worker>`): its
    /// quota of stored outputs not yet purged.
    pub quota_outputs: Limit,
    /// Copies of every store (`replicas=N`, 1 to 5). 0 (the default):
    /// 3 when the server is part of a cluster, else 1. Set when the stores
    /// are created.
    pub replicas: usize,
}

const GIB: i64 = 1 << 30;
const MIB: i64 = 1 << 20;
const DAY: u64 = 24 * 3600;

impl Default for StoreLimits {
    fn default() -> Self {
        let l = |bytes: i64, days: u64| Limit {
            max_bytes: bytes,
            max_age: Duration::from_secs(days * DAY),
        };
        Self {
            jobs: l(GIB, 7),
            results: l(GIB, 7),
            plans: l(256 * MIB, 7),
            faults: l(64 * MIB, 90),
            workers: l(16 * MIB, 1),
            blobs: l(4 * GIB, 7),
            refs: l(16 * MIB, 7),
            models: l(8 * GIB, 3650),
            quota_results: l(64 * MIB, 7),
            quota_outputs: l(512 * MIB, 7),
            replicas: 0,
        }
    }
}

impl StoreLimits {
    /// The names, as `--store-limits` spells them.
    pub const NAMES: [&'static str; 10] = [
        "jobs",
        "results",
        "plans",
        "faults",
        "workers",
        "blobs",
        "refs",
        "models",
        "quota_results",
        "quota_outputs",
    ];

    fn get_mut(&mut self, name: &str) -> Option<&mut Limit> {
        Some(match name {
            "jobs" => &mut self.jobs,
            "results" => &mut self.results,
            "plans" => &mut self.plans,
            "faults" => &mut self.faults,
            "workers" => &mut self.workers,
            "blobs" => &mut self.blobs,
            "refs" => &mut self.refs,
            "models" => &mut self.models,
            "quota_results" => &mut self.quota_results,
            "quota_outputs" => &mut self.quota_outputs,
            _ => return None,
        })
    }

    /// [`StoreLimits::parse`] of `$LOCKSTEP_STORE_LIMITS` (the defaults when
    /// unset).
    pub fn from_env() -> Result<Self> {
        let spec = std::env::var("LOCKSTEP_STORE_LIMITS").unwrap_or_default();
        Self::parse(&spec).context("in LOCKSTEP_STORE_LIMITS")
    }

    /// The defaults with changes: `results.bytes=2G,blobs.age=1d,…`. Sizes
    /// take K, M, G (powers of 1024); ages s, m, h, d.
    pub fn parse(spec: &str) -> Result<Self> {
        let mut limits = Self::default();
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (key, value) = item.split_once('=').with_context(|| {
                format!("{} is not NAME.bytes=SIZE or NAME.age=AGE", quote(item))
            })?;
            if key == "replicas" {
                limits.replicas = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=5).contains(n))
                    .with_context(|| format!("replicas={} is not 1 to 5", quote(value)))?;
                continue;
            }
            let (name, what) = key.split_once('.').unwrap_or((key, ""));
            let limit = limits.get_mut(name).with_context(|| {
                format!(
                    "no store named {} (stores: {})",
                    quote(name),
                    Self::NAMES.join(", ")
                )
            })?;
            match what {
                "bytes" => limit.max_bytes = parse_size(value)?,
                "age" => limit.max_age = parse_age(value)?,
                _ => bail!("{} must end in .bytes or .age", quote(key)),
            }
        }
        Ok(limits)
    }
}

fn parse_size(v: &str) -> Result<i64> {
    let (num, mult) = match v.chars().last() {
        Some('K' | 'k') => (&v[..v.len() - 1], 1i64 << 10),
        Some('M' | 'm') => (&v[..v.len() - 1], MIB),
        Some('G' | 'g') => (&v[..v.len() - 1], GIB),
        _ => (v, 1),
    };
    let n: i64 = num
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("{} is not a size like 512M or 2G", quote(v)))?;
    n.checked_mul(mult)
        .with_context(|| format!("{} is too large", quote(v)))
}

fn parse_age(v: &str) -> Result<Duration> {
    let (num, secs) = match v.chars().last() {
        Some('s') => (&v[..v.len() - 1], 1),
        Some('m') => (&v[..v.len() - 1], 60),
        Some('h') => (&v[..v.len() - 1], 3600),
        Some('d') => (&v[..v.len() - 1], DAY),
        _ => bail!("{} is not an age like 90m, 12h or 7d", quote(v)),
    };
    let n: u64 = num
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .with_context(|| format!("{} is not an age like 90m, 12h or 7d", quote(v)))?;
    Ok(Duration::from_secs(n * secs))
}

/// The server's stream behind each store, for updates and reports.
pub(crate) fn stream_names() -> [(&'static str, String); 8] {
    [
        ("jobs", JOBS_STREAM.to_string()),
        ("results", RESULTS_STREAM.to_string()),
        ("plans", format!("KV_{ASSIGN_BUCKET}")),
        ("faults", format!("KV_{FAULTS_BUCKET}")),
        ("workers", format!("KV_{WORKERS_BUCKET}")),
        ("blobs", format!("OBJ_{BLOBS_BUCKET}")),
        ("refs", format!("KV_{BLOB_REFS_BUCKET}")),
        ("models", format!("OBJ_{MODELS_BUCKET}")),
    ]
}

/// Sets these limits on every existing store (the coordinator does this
/// when given `--store-limits`; stores are created with them in any case).
pub async fn apply_limits(nats: &Nats, limits: &StoreLimits) -> Result<()> {
    set_limits(&nats.js, limits, false).await?;
    // Every worker's own streams take the quotas.
    for w in enrolled_names(nats).await? {
        for (stream, limit) in [
            (worker_results_stream(&w), limits.quota_results),
            (worker_outputs_stream(&w), limits.quota_outputs),
        ] {
            let Ok(mut s) = nats.js.get_stream(&stream).await else {
                continue;
            };
            let mut config = s.info().await?.config.clone();
            if config.max_bytes != limit.max_bytes || config.max_age != limit.max_age {
                config.max_bytes = limit.max_bytes;
                config.max_age = limit.max_age;
                nats.js
                    .update_stream(config)
                    .await
                    .with_context(|| format!("cannot set the quota of {stream}"))?;
            }
        }
    }
    Ok(())
}

/// Sets limits on the stores that have none at all (created by an older
/// lockstep, which set none), leaving deliberate settings alone.
pub(crate) async fn adopt_limits(
    js: &async_nats::jetstream::Context,
    limits: &StoreLimits,
) -> Result<()> {
    set_limits(js, limits, true).await
}

async fn set_limits(
    js: &async_nats::jetstream::Context,
    limits: &StoreLimits,
    only_unlimited: bool,
) -> Result<()> {
    let mut limits = limits.clone();
    for (name, stream) in stream_names() {
        let limit = *limits.get_mut(name).expect("every store has a limit");
        let mut s = js
            .get_stream(&stream)
            .await
            .with_context(|| format!("no stream {stream}"))?;
        let mut config = s.info().await?.config.clone();
        let unlimited = config.max_bytes <= 0 && config.max_age.is_zero();
        if only_unlimited && !unlimited {
            continue;
        }
        if config.max_bytes != limit.max_bytes || config.max_age != limit.max_age {
            config.max_bytes = limit.max_bytes;
            config.max_age = limit.max_age;
            config.discard = async_nats::jetstream::stream::DiscardPolicy::New;
            js.update_stream(config)
                .await
                .with_context(|| format!("cannot set the limits of {stream}"))?;
            tracing::info!(
                store = name,
                bytes = limit.max_bytes,
                age_s = limit.max_age.as_secs(),
                "store limits set"
            );
        }
    }
    Ok(())
}

/// Bytes each store holds now, by name.
pub async fn usage(nats: &Nats) -> Result<Vec<(&'static str, u64)>> {
    let mut out = Vec::new();
    for (name, stream) in stream_names() {
        let mut s = nats.js.get_stream(&stream).await?;
        out.push((name, s.info().await?.state.bytes));
    }
    Ok(out)
}

/// Whether a store is full (within one message of its limit): what it holds,
/// and what it may hold.
pub(crate) async fn full(
    nats: &Nats,
    stream: &async_nats::jetstream::stream::Stream,
) -> Option<(u64, i64)> {
    let info = stream.clone().info().await.ok()?.clone();
    let max = info.config.max_bytes;
    let headroom = nats.max_payload() as u64;
    (max > 0 && info.state.bytes + headroom >= max as u64).then_some((info.state.bytes, max))
}

/// An error from the server that says a store is full.
pub fn is_store_full(e: &str) -> bool {
    let e = e.to_ascii_lowercase();
    [
        "maximum bytes exceeded",
        "maximum messages exceeded",
        "insufficient resources",
        "resource limits exceeded",
    ]
    .iter()
    .any(|s| e.contains(s))
}

/// The key of a blob reference.
fn ref_key(digest: &lockstep_kernels::Digest, batch: &str) -> String {
    format!("{}.{batch}", digest.to_hex())
}

/// Records that `batch` uses the blob `digest` (before it is stored, so a
/// finishing batch never deletes a blob a starting one relies on).
pub async fn add_ref(nats: &Nats, digest: &lockstep_kernels::Digest, batch: &str) -> Result<()> {
    nats.refs
        .put(ref_key(digest, batch), bytes::Bytes::new())
        .await
        .context("cannot record a blob reference")?;
    Ok(())
}

/// Everything a finished batch leaves behind, removed: its results, its
/// plan entries, replicas still queued for workers, its references to the
/// `referenced` blobs, and every blob among `deletable` that no other batch
/// references.
pub async fn purge_batch(
    nats: &Nats,
    batch: &str,
    workers: &[String],
    referenced: &std::collections::BTreeSet<lockstep_kernels::Digest>,
    deletable: &std::collections::BTreeSet<lockstep_kernels::Digest>,
) -> Result<PurgeReport> {
    // Each worker's own streams first (the shared results stream sources
    // from them), all at once, then the shared one.
    let purges = workers.iter().flat_map(|w| {
        [
            (worker_results_stream(w), result_subject(batch, w), false),
            (
                worker_outputs_stream(w),
                format!("{OUTPUT_SUBJECT_PREFIX}.{w}.{batch}.>"),
                true,
            ),
        ]
    });
    let done = futures::future::join_all(purges.map(|(stream, filter, output)| async move {
        let s = nats.js.get_stream_no_info(&stream).await?;
        match s.purge().filter(filter).await {
            Ok(p) => Ok(if output { p.purged } else { 0 }),
            // A worker enrolled but never given its streams.
            Err(e) if e.to_string().contains("not found") => Ok(0),
            Err(e) => Err(anyhow::anyhow!("cannot purge the batch from {stream}: {e}")),
        }
    }))
    .await;
    let mut outputs = 0;
    for d in done {
        outputs += d?;
    }
    let results = purge(&nats.results, results_filter(batch), "results").await?;
    let plans = purge(
        &nats.assign.stream,
        format!("$KV.{ASSIGN_BUCKET}.{batch}.>"),
        "plan",
    )
    .await?;
    let jobs = purge(
        &nats.jobs,
        format!("{JOB_SUBJECT_PREFIX}.*.{batch}"),
        "queued replicas",
    )
    .await?;
    let mut report = PurgeReport {
        results,
        plans,
        jobs,
        outputs,
        blobs: 0,
        late: 0,
        orphan_chunks: 0,
    };
    let refs = &nats.refs.stream;
    for d in referenced.union(deletable) {
        refs.purge()
            .filter(format!("$KV.{BLOB_REFS_BUCKET}.{}", ref_key(d, batch)))
            .await
            .context("cannot drop a blob reference")?;
    }
    for d in deletable {
        let others = holds_any(refs, format!("$KV.{BLOB_REFS_BUCKET}.{}.>", d.to_hex())).await?;
        if !others && nats.blobs.delete(d.to_hex()).await.is_ok() {
            report.blobs += 1;
            // A delete leaves a marker under the object's name; drop it too,
            // so deleted blobs cost nothing.
            forget_object(nats, &d.to_hex()).await;
        }
    }
    Ok(report)
}

/// Every enrolled worker's name.
async fn enrolled_names(nats: &Nats) -> Result<Vec<String>> {
    let mut names = Vec::new();
    let mut keys = nats
        .enrolled
        .keys()
        .await
        .context("cannot list the enrolled workers")?;
    while let Some(k) = keys.next().await {
        if let Ok(k) = k {
            names.push(k);
        }
    }
    Ok(names)
}

/// Everything `worker` published is removed: its own results and outputs
/// streams, and its results in the shared results stream. Done when it is
/// quarantined (its word no longer counts), so whatever it flooded its
/// share with is gone and costs nobody anything. Returns the messages
/// removed.
pub async fn purge_worker(nats: &Nats, worker: &str) -> Result<u64> {
    let mut purged = 0;
    for stream in [worker_results_stream(worker), worker_outputs_stream(worker)] {
        if let Ok(s) = nats.js.get_stream_no_info(&stream).await {
            match s.purge().await {
                Ok(p) => purged += p.purged,
                Err(e) if e.to_string().contains("not found") => {}
                Err(e) => bail!("cannot purge {stream}: {e}"),
            }
        }
    }
    purged += purge(
        &nats.results,
        format!("{RESULT_SUBJECT_PREFIX}.*.{worker}"),
        "worker's results",
    )
    .await?;
    Ok(purged)
}

/// Removes the metadata an object store keeps under a deleted name
/// (`$O.<bucket>.M.<base64url of the name>`).
async fn forget_object(nats: &Nats, name: &str) {
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::URL_SAFE.encode(name);
    let _ = nats
        .blobs_stream
        .purge()
        .filter(format!("$O.{BLOBS_BUCKET}.M.{encoded}"))
        .await;
}

/// Purges the messages of `stream` on `filter`; how many went.
async fn purge(
    stream: &async_nats::jetstream::stream::Stream,
    filter: String,
    what: &str,
) -> Result<u64> {
    Ok(stream
        .purge()
        .filter(filter)
        .await
        .with_context(|| format!("cannot purge the batch's {what}"))?
        .purged)
}

/// What [`purge_batch`] removed.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct PurgeReport {
    pub results: u64,
    pub plans: u64,
    pub jobs: u64,
    /// Chunks of outputs workers stored.
    pub outputs: u64,
    pub blobs: u64,
    /// Result messages of batches purged earlier that arrived after their
    /// purge (a worker finishing a replica late), swept now.
    #[serde(default)]
    pub late: u64,
    /// Chunks of object puts that never completed (see
    /// [`sweep_orphan_chunks`]), swept now.
    #[serde(default)]
    pub orphan_chunks: u64,
}

/// The subjects `stream` holds messages on, among those `filter` matches.
async fn subjects(
    stream: &async_nats::jetstream::stream::Stream,
    filter: String,
) -> Result<Vec<String>> {
    Ok(stream
        .clone()
        .info_with_subjects(filter)
        .await?
        .filter_map(|r| async move { r.ok().map(|(subject, _)| subject) })
        .collect()
        .await)
}

/// Whether `stream` holds any message on a subject `filter` matches.
async fn holds_any(stream: &async_nats::jetstream::stream::Stream, filter: String) -> Result<bool> {
    Ok(stream
        .clone()
        .info_with_subjects(filter)
        .await?
        .next()
        .await
        .is_some())
}

/// How old an object chunk that no object names must be before it is
/// taken as left by a put that failed (refused by a full store, a writer
/// that died) rather than a put still in progress.
pub const ORPHAN_CHUNK_AGE: Duration = Duration::from_secs(600);

/// Removes the chunks of object puts that never completed: chunks under a
/// name (`$O.lockstep_blobs.C.<nuid>`) that no stored object's metadata
/// names, whose last chunk is older than `older_than`. Returns the chunks
/// removed.
pub async fn sweep_orphan_chunks(nats: &Nats, older_than: Duration) -> Result<u64> {
    let stream = &nats.blobs_stream;
    let chunks = subjects(stream, format!("$O.{BLOBS_BUCKET}.C.*")).await?;
    if chunks.is_empty() {
        return Ok(0);
    }
    let mut named = std::collections::HashSet::new();
    let mut list = nats.blobs.list().await?;
    while let Some(info) = list.next().await {
        named.insert(info?.nuid);
    }
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as i128;
    let mut removed = 0;
    for subject in chunks {
        let nuid = subject.rsplit('.').next().unwrap_or_default();
        if named.contains(nuid) {
            continue;
        }
        let Ok(last) = stream.get_last_raw_message_by_subject(&subject).await else {
            continue;
        };
        let age_ns = now_ns - last.time.unix_timestamp_nanos();
        if age_ns < older_than.as_nanos() as i128 {
            continue;
        }
        // Named by no object, and no put added to it for a while.
        removed += stream.purge().filter(subject).await?.purged;
    }
    if removed > 0 {
        tracing::info!(
            chunks = removed,
            "swept the chunks of object puts that never completed"
        );
    }
    Ok(removed)
}

/// Removes what workers stored for finished batches after those were
/// purged (a replica answered after its job was decided, a worker that
/// took a replica just before the purge): from each worker's own results
/// and outputs streams, and from the results stream. A batch is finished
/// when it has no plan left in `lockstep_assign` (every batch writes its
/// plan before it dispatches, and only a finished batch's plan is
/// purged); `current` is never touched. Returns the result messages
/// removed.
pub async fn sweep_late(nats: &Nats, workers: &[String], current: &str) -> Result<u64> {
    // Which batches each worker holds results of (one subject per batch).
    let held = futures::future::join_all(workers.iter().map(|w| async move {
        let list = async {
            let s = nats.js.get_stream(worker_results_stream(w)).await?;
            subjects(&s, format!("{RESULT_SUBJECT_PREFIX}.*.{w}")).await
        };
        (w, list.await.unwrap_or_default())
    }))
    .await;
    let mut finished: std::collections::HashMap<String, bool> = Default::default();
    let mut late = 0;
    for (w, subjects) in held {
        for subject in subjects {
            let Some(batch) = subject
                .strip_prefix(&format!("{RESULT_SUBJECT_PREFIX}."))
                .and_then(|rest| rest.strip_suffix(&format!(".{w}")))
                .map(str::to_string)
            else {
                continue;
            };
            if batch == current || !valid_token(&batch) {
                continue;
            }
            if !finished.contains_key(&batch) {
                let planned = holds_any(
                    &nats.assign.stream,
                    format!("$KV.{ASSIGN_BUCKET}.{batch}.>"),
                )
                .await?;
                finished.insert(batch.clone(), !planned);
            }
            if !finished[&batch] {
                continue;
            }
            let own = nats.js.get_stream_no_info(worker_results_stream(w)).await?;
            late += own.purge().filter(subject.clone()).await?.purged;
            let outputs = nats.js.get_stream_no_info(worker_outputs_stream(w)).await?;
            let _ = outputs
                .purge()
                .filter(format!("{OUTPUT_SUBJECT_PREFIX}.{w}.{batch}.>"))
                .await;
            purge(&nats.results, subject, "late results").await?;
        }
    }
    if late > 0 {
        tracing::info!(
            messages = late,
            "swept results that arrived after their batch was purged"
        );
    }
    Ok(late)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_say_what_is_wrong() {
        let l = StoreLimits::parse("results.bytes=2G, blobs.age=12h,jobs.bytes=512M").unwrap();
        assert_eq!(l.results.max_bytes, 2 * GIB);
        assert_eq!(l.blobs.max_age, Duration::from_secs(12 * 3600));
        assert_eq!(l.jobs.max_bytes, 512 * MIB);
        assert_eq!(l.plans, StoreLimits::default().plans);
        assert_eq!(StoreLimits::parse("").unwrap(), StoreLimits::default());
        for (bad, needle) in [
            ("results", "NAME.bytes"),
            ("cache.bytes=1G", "no store named"),
            ("results.size=1G", ".bytes or .age"),
            ("results.bytes=lots", "not a size"),
            ("results.age=7", "not an age"),
            ("results.bytes=-1", "not a size"),
        ] {
            let e = format!("{:#}", StoreLimits::parse(bad).unwrap_err());
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }
}
