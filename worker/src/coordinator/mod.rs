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
//!
//! - `plan`: the durable plan, resume, bundles on the wire;
//! - `schedule`: who computes each replica, reassignment;
//! - `verdict`: verdicts and disputes;
//! - [`report`]: the report, the verdict table, the outputs.

mod plan;
pub mod report;
mod schedule;
mod verdict;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::consumer;
use futures::StreamExt;
use lockstep_kernels::CONTRACT_VERSION;

pub use plan::batch_id_for;
pub use report::{print_report, JobReport, ReplicaReport, Report, Verdict};

use crate::batch::BatchJob;
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

/// What the coordinator knows of one job while the batch runs.
struct JobState {
    spec: JobSpec,
    /// Output shapes, from the op's contract module.
    shapes: Vec<Vec<usize>>,
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
    let batch = opts
        .batch_id
        .clone()
        .unwrap_or_else(|| plan::batch_id_for(&jobs));
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
        let mut inputs = Vec::with_capacity(j.inputs.len());
        for t in &j.inputs {
            inputs.push(plan::to_ref(nats, t).await?);
        }
        let spec = JobSpec { op: j.op, inputs };
        let shapes = spec
            .op
            .plan(&spec.shapes())
            .with_context(|| format!("job `{}`", j.id))?
            .output_shapes();
        state.insert(
            j.id.clone(),
            JobState {
                spec,
                shapes,
                assignments: vec![None; r],
                results: BTreeMap::new(),
                excluded: HashSet::new(),
                decided: None,
                dispatched: None,
            },
        );
    }

    // Resume: the durable plan of an earlier run of this batch.
    if plan::resume(nats, &batch, opts.redundancy, &mut state).await? > 0 {
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

    let bar = report::progress_bar(opts.progress, state.len() as u64);
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
                    if let Some(report) = verdict::evaluate(nats, &batch, &id, js, r, &cpu, &mut faults).await? {
                        bar.inc(1);
                        undecided -= 1;
                        verdicts[report.verdict as usize] += 1;
                        state.get_mut(&id).unwrap().decided = Some(report);
                        bar.set_message(report::summary_line(&verdicts));
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
                let assigned = match schedule::schedule(nats, &batch, &mut state, &live, opts).await {
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
                    bar.set_message(report::summary_line(&verdicts));
                }
            }
        }
    }
    bar.finish_and_clear();

    let mut reports = Vec::new();
    for id in &order {
        let js = state.remove(id).unwrap();
        reports.push(js.decided.clone().unwrap_or_else(|| JobReport {
            job: id.clone(),
            op: js.spec.op.name().into(),
            verdict: Verdict::Unresolved,
            digest: None,
            shapes: js.shapes.clone(),
            results: report::replica_reports(&js),
            faulty_workers: vec![],
            reassigned_from: report::reassigned_from(&js),
            reason: Some("no decision before the deadline".into()),
            latency_ms: 0.0,
        }));
        if let (Some(dir), Some(rep)) = (&opts.out_dir, &js.decided) {
            report::write_output(nats, dir, &js, rep).await?;
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
