//! `lockstep submit`: dispatches a batch with redundancy r to r distinct
//! workers per job, collects results (at most one per job and worker), and
//! decides every job:
//!
//! - **verified**: r workers returned the same digest;
//! - **resolved**: the digests disagreed; the coordinator recomputed the job
//!   with its own CPU backend (which the tests prove equal to the contract's
//!   spec), named each worker whose digest differs, and recorded the fault in
//!   the registry;
//! - **failed**: the job itself is bad (every honest worker would reject it);
//! - **unresolved**: not decided before the deadline.
//!
//! The plan is durable: each replica's assignment is written to KV before the
//! job is published, results are durable in a stream, and a restarted
//! coordinator rebuilds its state from both and carries on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use lockstep_kernels::{tensor_digest_f32, Backend, Digest, MatmulDims, CONTRACT_VERSION};
use rand::seq::IndexedRandom;
use serde::Serialize;

use crate::batch::{BatchJob, Tensor};
use crate::nats::{live_workers, Nats};
use crate::protocol::*;

#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub redundancy: u32,
    /// Batch id; by default derived from the batch's content, so running the
    /// same batch again resumes it.
    pub batch_id: Option<String>,
    /// Where report.json and outputs/ go (None: nothing written).
    pub out_dir: Option<PathBuf>,
    /// A worker whose heartbeat is older than this is considered dead.
    pub worker_timeout: Duration,
    /// A replica without a result after this long is reassigned.
    pub job_timeout: Duration,
    /// Give up (jobs left unresolved) after this long; None: wait for ever.
    pub deadline: Option<Duration>,
    pub progress: bool,
    /// CPU threads for dispute resolution.
    pub threads: usize,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            redundancy: 2,
            batch_id: None,
            out_dir: None,
            worker_timeout: Duration::from_secs(5),
            job_timeout: Duration::from_secs(300),
            deadline: None,
            progress: true,
            threads: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Verified,
    Resolved,
    Failed,
    Unresolved,
}

#[derive(Clone, Debug, Serialize)]
pub struct ReplicaReport {
    pub worker: String,
    pub replica: u32,
    pub attempt: u32,
    pub backend: String,
    pub device: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub compute_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct JobReport {
    pub job: String,
    pub verdict: Verdict,
    /// The accepted digest of the output (verified or resolved jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    pub shape: Vec<usize>,
    pub results: Vec<ReplicaReport>,
    /// Workers whose digest differed from the accepted one.
    pub faulty_workers: Vec<String>,
    /// Workers a replica was taken away from (dead, timed out, failed).
    pub reassigned_from: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Milliseconds from the job's dispatch to its verdict (this run).
    pub latency_ms: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub protocol: u32,
    pub contract_version: u32,
    pub batch: String,
    pub redundancy: u32,
    pub jobs: Vec<JobReport>,
    pub verified: usize,
    pub resolved: usize,
    pub failed: usize,
    pub unresolved: usize,
    pub faults: Vec<FaultRecord>,
    pub elapsed_s: f64,
}

impl Report {
    /// All jobs have an accepted output.
    pub fn all_accepted(&self) -> bool {
        self.failed == 0 && self.unresolved == 0
    }
}

/// The batch id derived from the jobs' content.
pub fn batch_id_for(jobs: &[BatchJob]) -> String {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    for j in jobs {
        h.update(j.id.as_bytes());
        for t in [&j.a, &j.b] {
            match t {
                Tensor::Data { shape, data } => h.update(tensor_digest_f32(shape, data).0),
                Tensor::Object { digest, .. } => h.update(digest.0),
            }
        }
    }
    format!("b-{}", &hex::encode(h.finalize())[..16])
}

/// A replica of a job: (job id, replica index).
type ReplicaKey = (String, usize);
/// A replica to publish: (job, replica, redundancy, what to compute, to whom).
type NewReplica = (String, usize, u32, JobSpec, Assignment);

struct JobState {
    spec: JobSpec,
    /// Per replica: who computes it now.
    assignments: Vec<Option<Assignment>>,
    /// At most one result per worker.
    results: BTreeMap<String, ResultMessage>,
    /// Workers that must not get this job again (dead, errored, timed out).
    excluded: HashSet<String>,
    decided: Option<JobReport>,
    dispatched: Option<Instant>,
}

/// Runs a batch to completion (or to the deadline) and returns the report.
pub async fn submit(nats: &Nats, jobs: Vec<BatchJob>, opts: &SubmitOptions) -> Result<Report> {
    anyhow::ensure!(opts.redundancy >= 1, "--redundancy must be at least 1");
    let t_start = Instant::now();
    let batch = opts.batch_id.clone().unwrap_or_else(|| batch_id_for(&jobs));
    anyhow::ensure!(
        valid_token(&batch),
        "batch id `{batch}` must be 1-64 of [A-Za-z0-9_-]"
    );
    let r = opts.redundancy as usize;
    tracing::info!(%batch, jobs = jobs.len(), redundancy = r, "submitting");

    // Inputs: small ones inline, large ones as objects named by digest.
    let mut state: BTreeMap<String, JobState> = BTreeMap::new();
    let order: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    for j in jobs {
        let a = to_ref(nats, &j.a).await?;
        let b = to_ref(nats, &j.b).await?;
        state.insert(
            j.id.clone(),
            JobState {
                spec: JobSpec::Matmul { a, b },
                assignments: vec![None; r],
                results: BTreeMap::new(),
                excluded: HashSet::new(),
                decided: None,
                dispatched: None,
            },
        );
    }

    // Resume: the durable plan of an earlier run of this batch. Each key is
    // one bundle; for a replica, the entry with the highest attempt wins.
    // Only this batch's keys are listed (from the bucket's stream info), so a
    // new batch costs no scan of older batches' plans.
    let kv_stream = format!("KV_{ASSIGN_BUCKET}");
    let kv_prefix = format!("$KV.{ASSIGN_BUCKET}.");
    let mut subjects = nats
        .js
        .get_stream(&kv_stream)
        .await
        .context("reading assignments")?
        .info_with_subjects(format!("{kv_prefix}{batch}.>"))
        .await
        .context("reading assignments")?;
    let prefix = format!("{batch}.");
    let mut bundles: Vec<(String, Vec<PlanEntry>)> = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _) = subject.context("reading assignments")?;
        let Some(k) = subject.strip_prefix(&kv_prefix) else {
            continue;
        };
        let Some(bundle_id) = k.strip_prefix(&prefix) else {
            continue;
        };
        if let Ok(Some(v)) = nats.assign.get(k).await {
            if let Ok(entries) = serde_json::from_slice::<Vec<PlanEntry>>(&v) {
                bundles.push((bundle_id.to_string(), entries));
            }
        }
    }
    let mut restored = 0;
    for (_, entries) in &bundles {
        for e in entries {
            let Some(js) = state.get_mut(&e.job) else {
                continue;
            };
            let Some(slot) = js.assignments.get_mut(e.replica as usize) else {
                continue;
            };
            js.excluded.extend(e.assignment.abandoned.iter().cloned());
            if slot
                .as_ref()
                .is_none_or(|a| a.attempt < e.assignment.attempt)
            {
                *slot = Some(e.assignment.clone());
                restored += 1;
            }
        }
    }
    if restored > 0 {
        tracing::info!(restored, "resuming an earlier run of this batch");
        // Re-publish each recorded bundle under its original message id (the
        // stream drops it if it was already stored), holding only the entries
        // that are still current.
        for (bundle_id, entries) in &bundles {
            let current: Vec<JobMessage> = entries
                .iter()
                .filter(|e| {
                    state
                        .get(&e.job)
                        .and_then(|js| js.assignments.get(e.replica as usize))
                        .and_then(|a| a.as_ref())
                        .is_some_and(|a| {
                            a.attempt == e.assignment.attempt && a.worker == e.assignment.worker
                        })
                })
                .map(|e| {
                    job_message(
                        &batch,
                        &e.job,
                        e.replica,
                        opts.redundancy,
                        &state[&e.job].spec,
                        &e.assignment,
                    )
                })
                .collect();
            if let Some(first) = current.first() {
                let worker = first.worker.clone();
                publish_bundle(nats, &batch, bundle_id, &worker, current).await?;
            }
        }
        for js in state.values_mut() {
            js.dispatched = Some(Instant::now());
        }
    }

    // Every result of this batch, from the beginning (a restart replays them).
    let results_consumer = nats
        .results
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: result_subject(&batch),
            deliver_policy: consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("cannot read results")?;
    let mut results = results_consumer
        .messages()
        .await
        .context("cannot read results")?;

    let bar = progress_bar(opts.progress, state.len() as u64);
    let cpu = std::sync::Arc::new(lockstep_kernels::cpu::CpuBackend::new(opts.threads)?);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut live: Vec<WorkerRecord> = Vec::new();
    let mut live_at = Instant::now() - Duration::from_secs(60);
    let mut faults: Vec<FaultRecord> = Vec::new();
    let mut waiting_note = false;
    // Kept as counters: a batch may hold many thousands of jobs, and these are
    // needed after every result.
    let mut undecided = state.len();
    let mut verdicts = [0usize; 4];

    while undecided > 0 {
        if opts.deadline.is_some_and(|d| t_start.elapsed() > d) {
            tracing::warn!("deadline reached; undecided jobs are left unresolved");
            break;
        }
        tokio::select! {
            m = results.next() => {
                let Some(m) = m else { anyhow::bail!("the results stream ended") };
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        tracing::warn!("reading results: {e}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let answers: Vec<ResultMessage> = if let Ok(b) = serde_json::from_slice::<ResultBundle>(&m.payload) {
                    b.results
                } else if let Ok(r) = serde_json::from_slice::<ResultMessage>(&m.payload) {
                    vec![r]
                } else {
                    tracing::warn!("ignoring a malformed result message");
                    continue;
                };
                for res in answers {
                    let Some(js) = state.get_mut(&res.job) else { continue };
                    if js.decided.is_some() || js.results.contains_key(&res.worker) {
                        continue; // at most one result per job and worker
                    }
                    if let Outcome::Error { code, message } = &res.outcome {
                        if !code.is_job_fault() {
                            tracing::warn!(job = %res.job, worker = %res.worker, "worker error ({message}); reassigning");
                            js.excluded.insert(res.worker.clone());
                        }
                    }
                    js.results.insert(res.worker.clone(), res.clone());
                    let id = res.job.clone();
                    if let Some(report) = evaluate(nats, &batch, &id, js, r, &cpu, &mut faults).await? {
                        bar.inc(1);
                        undecided -= 1;
                        verdicts[report.verdict as usize] += 1;
                        state.get_mut(&id).unwrap().decided = Some(report);
                        bar.set_message(summary_line(&verdicts));
                    }
                }
            }
            _ = tick.tick() => {
                if live_at.elapsed() > Duration::from_millis(500) {
                    match live_workers(nats, opts.worker_timeout).await {
                        Ok(l) => live = l,
                        Err(e) => tracing::warn!("cannot read the worker registry: {e}"),
                    }
                    live_at = Instant::now();
                }
                let assigned = match schedule(nats, &batch, &mut state, &live, opts).await {
                    Ok(n) => n,
                    Err(e) => {
                        tracing::warn!("dispatch failed, will retry: {e:#}");
                        0
                    }
                };
                let stuck = state.values().any(|j| j.decided.is_none() && j.assignments.iter().any(|a| a.is_none()));
                if stuck && !waiting_note {
                    bar.set_message(format!("waiting for workers ({} live)", live.len()));
                    waiting_note = true;
                } else if assigned > 0 {
                    waiting_note = false;
                    bar.set_message(summary_line(&verdicts));
                }
            }
        }
    }
    bar.finish_and_clear();

    let mut reports = Vec::new();
    for id in &order {
        let js = state.remove(id).unwrap();
        let JobSpec::Matmul { a, b } = &js.spec;
        reports.push(js.decided.clone().unwrap_or_else(|| JobReport {
            job: id.clone(),
            verdict: Verdict::Unresolved,
            digest: None,
            shape: vec![a.shape[0], b.shape[1]],
            results: replica_reports(&js),
            faulty_workers: vec![],
            reassigned_from: reassigned_from(&js),
            reason: Some("no decision before the deadline".into()),
            latency_ms: 0.0,
        }));
        if let (Some(dir), Some(rep)) = (&opts.out_dir, &js.decided) {
            write_output(nats, dir, &js, rep).await?;
        }
    }
    let count = |v: Verdict| reports.iter().filter(|j| j.verdict == v).count();
    let report = Report {
        protocol: PROTOCOL_VERSION,
        contract_version: CONTRACT_VERSION,
        batch,
        redundancy: opts.redundancy,
        verified: count(Verdict::Verified),
        resolved: count(Verdict::Resolved),
        failed: count(Verdict::Failed),
        unresolved: count(Verdict::Unresolved),
        jobs: reports,
        faults,
        elapsed_s: t_start.elapsed().as_secs_f64(),
    };
    if let Some(dir) = &opts.out_dir {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(report)
}

/// Progress text from verdict counts (indexed by `Verdict as usize`).
fn summary_line(verdicts: &[usize; 4]) -> String {
    format!(
        "verified {} · resolved {} · failed {}",
        verdicts[Verdict::Verified as usize],
        verdicts[Verdict::Resolved as usize],
        verdicts[Verdict::Failed as usize]
    )
}

fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} jobs  {msg}",
        )
        .expect("valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

async fn to_ref(nats: &Nats, t: &Tensor) -> Result<TensorRef> {
    Ok(match t {
        Tensor::Object { shape, digest } => {
            nats.blobs
                .info(digest.to_hex())
                .await
                .with_context(|| format!("object {digest} is not in the object store"))?;
            TensorRef::object(shape.clone(), *digest)
        }
        Tensor::Data { shape, data } if data.len() * 4 <= INLINE_MAX_BYTES => {
            TensorRef::inline(shape.clone(), data)
        }
        Tensor::Data { shape, data } => {
            let digest = tensor_digest_f32(shape, data);
            crate::nats::put_blob(nats, &digest, data).await?;
            TensorRef::object(shape.clone(), digest)
        }
    })
}

/// Gives every unassigned or abandoned replica a live worker that holds no
/// other replica of the job; returns how many were assigned.
async fn schedule(
    nats: &Nats,
    batch: &str,
    state: &mut BTreeMap<String, JobState>,
    live: &[WorkerRecord],
    opts: &SubmitOptions,
) -> Result<usize> {
    let live_ids: HashSet<&str> = live.iter().map(|w| w.id.as_str()).collect();
    // Load: outstanding replicas per worker in this batch.
    let mut load: HashMap<String, usize> = HashMap::new();
    for js in state.values().filter(|j| j.decided.is_none()) {
        for a in js.assignments.iter().flatten() {
            if !js.results.contains_key(&a.worker) {
                *load.entry(a.worker.clone()).or_default() += 1;
            }
        }
    }
    let now = now_ms();
    let mut assigned = 0;
    let mut to_send = Vec::new();
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::from_os_rng();
    for (id, js) in state.iter_mut().filter(|(_, j)| j.decided.is_none()) {
        for replica in 0..js.assignments.len() {
            let needs = match &js.assignments[replica] {
                None => true,
                Some(a) => {
                    let answered_ok = matches!(js.results.get(&a.worker), Some(r) if matches!(r.outcome, Outcome::Ok { .. }));
                    let errored = js.results.contains_key(&a.worker) && !answered_ok;
                    let dead = !live_ids.contains(a.worker.as_str())
                        && now.saturating_sub(a.assigned_ms)
                            > opts.worker_timeout.as_millis() as u64;
                    let late =
                        now.saturating_sub(a.assigned_ms) > opts.job_timeout.as_millis() as u64;
                    !answered_ok && (errored || dead || late)
                }
            };
            if !needs {
                continue;
            }
            // Candidates: live, never excluded for this job, holding no replica of it, no result yet.
            let holding: HashSet<&str> = js
                .assignments
                .iter()
                .flatten()
                .map(|a| a.worker.as_str())
                .collect();
            let candidates: Vec<&WorkerRecord> = live
                .iter()
                .filter(|w| {
                    !js.excluded.contains(&w.id)
                        && !holding.contains(w.id.as_str())
                        && !js.results.contains_key(&w.id)
                })
                .collect();
            let min_load = candidates
                .iter()
                .map(|w| load.get(&w.id).copied().unwrap_or(0))
                .min();
            let least: Vec<&&WorkerRecord> = candidates
                .iter()
                .filter(|w| Some(load.get(&w.id).copied().unwrap_or(0)) == min_load)
                .collect();
            let Some(w) = least.choose(&mut rng) else {
                continue;
            };
            let previous = js.assignments[replica].take();
            let mut abandoned = previous
                .as_ref()
                .map(|a| a.abandoned.clone())
                .unwrap_or_default();
            if let Some(p) = &previous {
                tracing::info!(job = %id, replica, from = %p.worker, to = %w.id, "reassigning");
                abandoned.push(p.worker.clone());
                js.excluded.insert(p.worker.clone());
            }
            let a = Assignment {
                worker: w.id.clone(),
                attempt: previous.map_or(0, |p| p.attempt + 1),
                assigned_ms: now,
                abandoned,
            };
            *load.entry(w.id.clone()).or_default() += 1;
            to_send.push((
                id.clone(),
                replica,
                js.assignments.len() as u32,
                js.spec.clone(),
                a.clone(),
            ));
            js.assignments[replica] = Some(a);
            js.dispatched.get_or_insert_with(Instant::now);
            assigned += 1;
        }
    }
    // Replicas for the same worker travel in bundles. Per bundle: the plan
    // entries first (one KV write), then the message. A bundle that did not
    // reach the server has its replicas rolled back and dispatched again at
    // the next tick.
    let mut by_worker: BTreeMap<String, Vec<NewReplica>> = BTreeMap::new();
    for (id, replica, redundancy, spec, a) in to_send {
        by_worker
            .entry(a.worker.clone())
            .or_default()
            .push((id, replica, redundancy, spec, a));
    }
    let mut sends: Vec<Vec<NewReplica>> = Vec::new();
    for (_, replicas) in by_worker {
        let mut cur: Vec<NewReplica> = Vec::new();
        let mut bytes = 0;
        for nr in replicas {
            let size = 512 + spec_bytes(&nr.3);
            if !cur.is_empty() && (cur.len() >= BUNDLE_MAX_JOBS || bytes + size > BUNDLE_MAX_BYTES)
            {
                sends.push(std::mem::take(&mut cur));
                bytes = 0;
            }
            bytes += size;
            cur.push(nr);
        }
        if !cur.is_empty() {
            sends.push(cur);
        }
    }
    let outcomes: Vec<(Vec<ReplicaKey>, Result<()>)> = futures::stream::iter(sends)
        .map(|bundle| async move {
            let keys: Vec<ReplicaKey> = bundle.iter().map(|b| (b.0.clone(), b.1)).collect();
            let r = send_bundle(nats, batch, bundle).await;
            (keys, r)
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let mut first_err = None;
    for (keys, r) in outcomes {
        if let Err(e) = r {
            for (id, replica) in &keys {
                if let Some(js) = state.get_mut(id) {
                    js.assignments[*replica] = None;
                }
            }
            assigned -= keys.len();
            first_err.get_or_insert(e);
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    Ok(assigned)
}

/// Largest bundle: replicas per message, and estimated bytes per message
/// (NATS's default maximum payload is 1 MiB).
const BUNDLE_MAX_JOBS: usize = 64;
const BUNDLE_MAX_BYTES: usize = 512 * 1024;

fn spec_bytes(spec: &JobSpec) -> usize {
    let JobSpec::Matmul { a, b } = spec;
    [a, b]
        .iter()
        .map(|t| t.inline.as_ref().map_or(128, |s| s.len()))
        .sum()
}

fn job_message(
    batch: &str,
    job: &str,
    replica: u32,
    redundancy: u32,
    spec: &JobSpec,
    a: &Assignment,
) -> JobMessage {
    JobMessage {
        protocol: PROTOCOL_VERSION,
        batch: batch.into(),
        job: job.into(),
        replica,
        attempt: a.attempt,
        redundancy,
        contract_version: CONTRACT_VERSION,
        worker: a.worker.clone(),
        spec: spec.clone(),
    }
}

/// Records the plan of one bundle, then publishes it.
async fn send_bundle(nats: &Nats, batch: &str, replicas: Vec<NewReplica>) -> Result<()> {
    use sha3::Digest as _;
    let worker = replicas[0].4.worker.clone();
    let mut h = sha3::Sha3_256::new();
    for (id, replica, _, _, a) in &replicas {
        h.update(format!("{id}.{replica}.{}.{}\n", a.attempt, a.worker).as_bytes());
    }
    let bundle_id = hex::encode(&h.finalize()[..8]);
    let entries: Vec<PlanEntry> = replicas
        .iter()
        .map(|(id, replica, _, _, a)| PlanEntry {
            job: id.clone(),
            replica: *replica as u32,
            assignment: a.clone(),
        })
        .collect();
    nats.assign
        .put(
            format!("{batch}.{bundle_id}"),
            serde_json::to_vec(&entries)?.into(),
        )
        .await
        .context("cannot record an assignment")?;
    let jobs = replicas
        .iter()
        .map(|(id, replica, redundancy, spec, a)| {
            job_message(batch, id, *replica as u32, *redundancy, spec, a)
        })
        .collect();
    publish_bundle(nats, batch, &bundle_id, &worker, jobs).await
}

async fn publish_bundle(
    nats: &Nats,
    batch: &str,
    bundle_id: &str,
    worker: &str,
    jobs: Vec<JobMessage>,
) -> Result<()> {
    let bundle = JobBundle {
        protocol: PROTOCOL_VERSION,
        batch: batch.into(),
        id: bundle_id.into(),
        worker: worker.into(),
        jobs,
    };
    nats.js
        .send_publish(
            job_subject(worker),
            jetstream::message::PublishMessage::build()
                .payload(serde_json::to_vec(&bundle)?.into())
                .message_id(format!("{batch}.{bundle_id}")),
        )
        .await
        .context("cannot publish jobs")?
        .await
        .context("the server did not store jobs")?;
    Ok(())
}

fn reassigned_from(js: &JobState) -> Vec<String> {
    let mut v: Vec<String> = js
        .assignments
        .iter()
        .flatten()
        .flat_map(|a| a.abandoned.iter().cloned())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn replica_reports(js: &JobState) -> Vec<ReplicaReport> {
    js.results
        .values()
        .map(|r| ReplicaReport {
            worker: r.worker.clone(),
            replica: r.replica,
            attempt: r.attempt,
            backend: r.backend.clone(),
            device: r.device.clone(),
            path: r.path.clone(),
            digest: match &r.outcome {
                Outcome::Ok { digest, .. } => Some(*digest),
                _ => None,
            },
            error: match &r.outcome {
                Outcome::Error { code, message } => Some(format!("{code:?}: {message}")),
                _ => None,
            },
            compute_ms: r.timings.compute_ms,
        })
        .collect()
}

/// Decides a job once it has enough results; `None` while it needs more.
async fn evaluate(
    nats: &Nats,
    batch: &str,
    id: &str,
    js: &mut JobState,
    r: usize,
    cpu: &std::sync::Arc<lockstep_kernels::cpu::CpuBackend>,
    faults: &mut Vec<FaultRecord>,
) -> Result<Option<JobReport>> {
    let JobSpec::Matmul { a, b } = &js.spec;
    let shape = vec![a.shape[0], b.shape[1]];
    let latency_ms = js
        .dispatched
        .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3);
    let mut report = JobReport {
        job: id.into(),
        verdict: Verdict::Failed,
        digest: None,
        shape: shape.clone(),
        results: replica_reports(js),
        faulty_workers: vec![],
        reassigned_from: reassigned_from(js),
        reason: None,
        latency_ms,
    };
    // A job-level error means the job itself is bad.
    if let Some((code, message)) = js.results.values().find_map(|res| match &res.outcome {
        Outcome::Error { code, message } if code.is_job_fault() => Some((*code, message.clone())),
        _ => None,
    }) {
        report.reason = Some(format!("{code:?}: {message}"));
        return Ok(Some(report));
    }
    let oks: Vec<(&String, Digest)> = js
        .results
        .iter()
        .filter_map(|(w, res)| match &res.outcome {
            Outcome::Ok {
                digest, shape: s, ..
            } if *s == shape => Some((w, *digest)),
            _ => None,
        })
        .collect();
    if oks.len() < r {
        return Ok(None);
    }
    let first = oks[0].1;
    if oks.iter().all(|(_, d)| *d == first) {
        report.verdict = Verdict::Verified;
        report.digest = Some(first);
        return Ok(Some(report));
    }
    // Dispute: recompute with the coordinator's own CPU backend.
    let reference = reference_digest(nats, &js.spec, cpu).await?;
    report.verdict = Verdict::Resolved;
    report.digest = Some(reference);
    for (w, d) in &oks {
        if *d != reference {
            let f = FaultRecord {
                worker: (*w).clone(),
                batch: batch.into(),
                job: id.into(),
                reported: *d,
                correct: reference,
                resolved_by: "coordinator CPU reference".into(),
                at_ms: now_ms(),
            };
            tracing::warn!(job = %id, worker = %w, "worker returned wrong bits");
            nats.faults
                .put(format!("{w}.{batch}.{id}"), serde_json::to_vec(&f)?.into())
                .await
                .context("cannot record a fault")?;
            report.faulty_workers.push((*w).clone());
            faults.push(f);
        }
    }
    report.reason = Some(format!(
        "digests disagreed; recomputed by the coordinator; {} faulty",
        report.faulty_workers.len()
    ));
    Ok(Some(report))
}

async fn load_tensor(nats: &Nats, t: &TensorRef) -> Result<Vec<f32>> {
    if let Some(b64) = &t.inline {
        return decode_f32(b64).map_err(anyhow::Error::msg);
    }
    let digest = t
        .object
        .context("tensor has neither inline data nor an object")?;
    let bytes = crate::nats::get_blob(nats, &digest).await?;
    decode_blob(&t.shape, &digest, &bytes).map_err(anyhow::Error::msg)
}

async fn reference_digest(
    nats: &Nats,
    spec: &JobSpec,
    cpu: &std::sync::Arc<lockstep_kernels::cpu::CpuBackend>,
) -> Result<Digest> {
    let JobSpec::Matmul { a, b } = spec;
    let av = load_tensor(nats, a).await?;
    let bv = load_tensor(nats, b).await?;
    let dims = MatmulDims::new(a.shape[0], a.shape[1], b.shape[1]);
    let cpu = cpu.clone();
    let c = tokio::task::spawn_blocking(move || cpu.matmul(&av, &bv, dims)).await??;
    Ok(tensor_digest_f32(&[dims.m, dims.n], &c))
}

/// Writes an accepted output to `dir/outputs/<job>.safetensors`, taken from a
/// worker whose digest matches (re-checked); if none matches (a resolved job
/// where every worker was wrong), nothing is written and a warning is logged.
async fn write_output(
    nats: &Nats,
    dir: &std::path::Path,
    js: &JobState,
    rep: &JobReport,
) -> Result<()> {
    let Some(want) = rep.digest else {
        return Ok(());
    };
    let out = dir.join("outputs");
    std::fs::create_dir_all(&out)?;
    for res in js.results.values() {
        if let Outcome::Ok {
            digest,
            output,
            shape,
        } = &res.outcome
        {
            if *digest == want {
                if let Ok(data) = load_tensor(nats, output).await {
                    if tensor_digest_f32(shape, &data) == want {
                        crate::tensors::write_f32(
                            &out.join(format!("{}.safetensors", rep.job)),
                            &[("c", shape, &data)],
                        )?;
                        return Ok(());
                    }
                }
            }
        }
    }
    tracing::warn!(job = %rep.job, "no worker output matched the accepted digest; not written");
    Ok(())
}
