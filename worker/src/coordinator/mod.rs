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

pub mod dispute;
mod feed;
mod models;
mod plan;
pub mod receipt;
pub mod report;
mod schedule;
pub(crate) mod verdict;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

pub use plan::{batch_id_for, new_batch_id};
pub use report::{print_report, JobReport, ReplicaReport, Report, Verdict};

use crate::batch::BatchJob;
use crate::nats::{enrollments, live_workers_of, LiveWorker, Nats};
use crate::protocol::*;

#[derive(Clone, Debug)]
pub struct SubmitOptions {
    pub redundancy: u32,
    /// Batch id; by default a new one ([`new_batch_id`]); name an earlier
    /// batch's id to resume it.
    pub batch_id: Option<String>,
    /// Where report.json and outputs/ go (None: nothing written).
    pub out_dir: Option<PathBuf>,
    /// A worker whose heartbeat is older than this is considered dead.
    pub worker_timeout: Duration,
    /// A replica without a result after this long is reassigned.
    pub job_timeout: Duration,
    /// A worker that holds replicas and has answered none of this batch's
    /// for this long (stretched for large jobs, see
    /// [`schedule::STALL_MACS_PER_S`]) has them reassigned: heartbeats
    /// alone are not progress.
    pub stall_timeout: Duration,
    /// Give up (jobs left unresolved) after this long; None: wait for ever.
    pub deadline: Option<Duration>,
    pub progress: bool,
    /// CPU threads for dispute resolution.
    pub threads: usize,
    /// Keep the batch's results, plan and blobs on the server after its
    /// report is written (by default they are purged once every job is
    /// decided; a batch left unresolved is always kept, to be resumed).
    pub keep_batch: bool,
    /// Set these limits on every store before starting (None: leave them).
    pub store_limits: Option<crate::store::StoreLimits>,
    /// The coordinator's key: it signs the receipts (None: no receipts).
    pub signer: Option<Arc<crate::auth::Identity>>,
    /// Fraction (0 to 1) of the jobs whose workers agree that the
    /// coordinator recomputes anyway; a mismatch is a fault of every worker
    /// that agreed.
    pub audit_rate: f64,
    /// How long a worker has to answer a dispute query about a generation
    /// it signed; no answer in time is its fault.
    pub dispute_timeout: Duration,
}

impl Default for SubmitOptions {
    fn default() -> Self {
        Self {
            redundancy: 2,
            batch_id: None,
            out_dir: None,
            worker_timeout: Duration::from_secs(5),
            job_timeout: Duration::from_secs(300),
            stall_timeout: Duration::from_secs(30),
            deadline: None,
            progress: true,
            threads: 0,
            keep_batch: false,
            store_limits: None,
            signer: None,
            audit_rate: 0.0,
            dispute_timeout: Duration::from_secs(120),
        }
    }
}

/// What the coordinator knows of one job while the batch runs.
struct JobState {
    spec: JobSpec,
    /// [`JobSpec::job_digest`]: what every result must have computed.
    job_digest: lockstep_kernels::Digest,
    /// Output shapes, from the op's contract module.
    shapes: Vec<Vec<usize>>,
    /// What it asks of a worker (largest tensor, multiply-adds).
    size: JobSize,
    /// Per replica: who computes it now.
    assignments: Vec<Option<Assignment>>,
    /// At most one result per worker.
    results: BTreeMap<String, ResultMessage>,
    /// Workers that must not get this job again (dead, errored, timed out).
    excluded: HashSet<String>,
    /// Replicas the system failed (see [`ErrorCode::is_system_fault`]), to
    /// be sent again, to any worker.
    retry: HashSet<usize>,
    /// What the system failures were, in order.
    system_failures: Vec<String>,
    /// Operators whose workers reported them: a job fails only when
    /// [`MAX_SYSTEM_FAILURES`] distinct operators did (one operator's word
    /// cannot fail a job).
    system_failure_operators: std::collections::BTreeSet<String>,
    /// Inputs this batch put in the object store itself (its clean-up may
    /// delete them; objects the batch file named are only dereferenced).
    uploaded: Vec<lockstep_kernels::Digest>,
    decided: Option<JobReport>,
    dispatched: Option<Instant>,
    /// The coordinator is recomputing it (a dispute or an audit).
    disputing: bool,
}

/// System failures of one job before it fails (each is retried first).
pub const MAX_SYSTEM_FAILURES: usize = 3;

/// Runs a batch to completion (or to the deadline) and returns the report.
pub async fn submit(nats: &Nats, jobs: Vec<BatchJob>, opts: &SubmitOptions) -> Result<Report> {
    anyhow::ensure!(opts.redundancy >= 1, "--redundancy must be at least 1");
    anyhow::ensure!(
        (0.0..=1.0).contains(&opts.audit_rate),
        "--audit-rate must be between 0 and 1"
    );
    let t_start = Instant::now();
    let batch = opts
        .batch_id
        .clone()
        .unwrap_or_else(|| plan::new_batch_id(&jobs));
    anyhow::ensure!(
        valid_token(&batch),
        "batch id `{batch}` must be 1-64 of [A-Za-z0-9_-]"
    );
    tracing::info!(%batch, jobs = jobs.len(), redundancy = opts.redundancy, "submitting");
    if let Some(limits) = &opts.store_limits {
        crate::store::apply_limits(nats, limits).await?;
    }
    models::ensure_models(nats, &jobs).await?;
    let order: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let mut state = load_jobs(nats, &batch, jobs, opts.redundancy as usize).await?;

    // Resume: the durable plan of an earlier run of this batch.
    if plan::resume(nats, &batch, opts.redundancy, &mut state).await? > 0 {
        for js in state.values_mut() {
            js.dispatched = Some(Instant::now());
        }
    }

    // Every result of this batch, from the beginning (a restart replays them).
    let mut results = feed::Feed::open(nats, &batch).await?;

    let (disputes_tx, mut disputes) = tokio::sync::mpsc::unbounded_channel();
    let mut run = Run {
        nats,
        opts,
        undecided: state.len(),
        bar: report::progress_bar(opts.progress, state.len() as u64),
        batch,
        state,
        cpu: Arc::new(lockstep_kernels::cpu::CpuBackend::new(opts.threads)?),
        faults: Vec::new(),
        verdicts: [0; 4],
        live: Vec::new(),
        enrolled: BTreeMap::new(),
        live_at: Instant::now() - Duration::from_secs(60),
        waiting_note: false,
        full_at: Instant::now(),
        last_result: Instant::now(),
        abort: None,
        revoked: HashSet::new(),
        refused: HashMap::new(),
        reevaluate: Vec::new(),
        heard: HashMap::new(),
        disputes: disputes_tx,
        dispute_lane: Arc::new(tokio::sync::Semaphore::new(1)),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    while run.undecided > 0 && run.abort.is_none() {
        if opts.deadline.is_some_and(|d| t_start.elapsed() > d) {
            tracing::warn!("deadline reached; undecided jobs are left unresolved");
            break;
        }
        tokio::select! {
            m = results.next() => match m {
                None => anyhow::bail!("the results stream ended"),
                Some(Err(e)) => {
                    tracing::warn!("reading results: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(Ok(m)) => {
                    run.last_result = Instant::now();
                    run.on_results(&m.subject, &m.payload).await?
                }
            },
            Some(done) = disputes.recv() => run.on_reference(done).await?,
            _ = tick.tick() => {
                run.on_tick().await?;
                let found = results.refresh_if_quiet(|| run.owing()).await;
                // Results found only in the workers' own streams: a full
                // results stream is no leader change, and must stop the
                // batch clearly rather than be read around.
                if !found.is_empty() {
                    run.check_room_now().await;
                }
                if run.abort.is_none() {
                    for m in found {
                        run.on_results(&m.subject, &m.payload).await?;
                    }
                }
            }
        }
    }
    run.bar.finish_and_clear();
    if let Some(why) = &run.abort {
        tracing::error!("{why}");
    }
    report::finish(
        nats,
        opts,
        report::Finish {
            batch: run.batch,
            order: &order,
            state: run.state,
            faults: run.faults,
            abort: run.abort,
            t_start,
            enrolled: &run.enrolled,
        },
    )
    .await
}

/// Puts each job's inputs on the wire (small ones inline, large ones as
/// objects named by digest) and derives its output shapes from its op.
async fn load_jobs(
    nats: &Nats,
    batch: &str,
    jobs: Vec<BatchJob>,
    redundancy: usize,
) -> Result<BTreeMap<String, JobState>> {
    let mut state = BTreeMap::new();
    for j in jobs {
        let mut inputs = Vec::with_capacity(j.inputs.len());
        let mut uploaded = Vec::new();
        for t in &j.inputs {
            let r = plan::to_ref(nats, batch, t).await?;
            if let (crate::batch::Tensor::Data { .. }, Some(d)) = (t, r.object) {
                uploaded.push(d);
            }
            inputs.push(r);
        }
        let spec = JobSpec { op: j.op, inputs };
        let job_digest = spec
            .job_digest()
            .with_context(|| format!("job `{}`: inputs cannot be digested", j.id))?;
        let shapes = spec
            .op
            .plan(&spec.shapes())
            .with_context(|| format!("job `{}`", j.id))?
            .output_shapes();
        let size = spec.size().unwrap_or_default();
        state.insert(
            j.id,
            JobState {
                spec,
                job_digest,
                shapes,
                size,
                assignments: vec![None; redundancy],
                results: BTreeMap::new(),
                excluded: HashSet::new(),
                retry: HashSet::new(),
                system_failures: Vec::new(),
                system_failure_operators: Default::default(),
                uploaded,
                decided: None,
                dispatched: None,
                disputing: false,
            },
        );
    }
    Ok(state)
}

/// How long one refresh of the registry may take before the last view is
/// kept for another round.
const REGISTRY_READ_TIMEOUT: Duration = Duration::from_secs(2);

/// A batch in progress: the jobs, the live workers, and the tallies.
struct Run<'a> {
    nats: &'a Nats,
    opts: &'a SubmitOptions,
    batch: String,
    state: BTreeMap<String, JobState>,
    /// The coordinator's own backend, for disputes.
    cpu: Arc<lockstep_kernels::cpu::CpuBackend>,
    faults: Vec<FaultRecord>,
    /// Kept as counters: a batch may hold many thousands of jobs, and these
    /// are needed after every result.
    undecided: usize,
    verdicts: [usize; 4],
    bar: indicatif::ProgressBar,
    live: Vec<LiveWorker>,
    /// Enrollments (public keys, operators, quarantine), refreshed with
    /// `live`.
    enrolled: BTreeMap<String, Enrollment>,
    live_at: Instant,
    waiting_note: bool,
    /// When the stores were last checked for room.
    full_at: Instant,
    /// When the last result message arrived.
    last_result: Instant,
    /// Why the batch cannot go on (a store is full): its undecided jobs fail
    /// with this reason.
    abort: Option<String>,
    /// Quarantined workers whose results this run no longer counts (see
    /// [`Run::revoke`]).
    revoked: HashSet<String>,
    /// Jobs each worker refused as `too_large`: it is offered none as large
    /// again in this batch.
    refused: HashMap<String, Vec<JobSize>>,
    /// Jobs reopened by [`Run::revoke`], to be decided again on what is
    /// left (or given new replicas).
    reevaluate: Vec<String>,
    /// When each worker last answered anything of this batch (ms).
    heard: HashMap<String, u64>,
    /// Recomputations done off the result loop ([`Run::recompute`]).
    disputes: tokio::sync::mpsc::UnboundedSender<Reference>,
    /// One recomputation at a time (the CPU backend uses every thread).
    dispute_lane: Arc<tokio::sync::Semaphore>,
}

/// The coordinator's own outputs of a job it recomputed.
struct Reference {
    job: String,
    audit: bool,
    outputs: Result<(lockstep_kernels::Digest, Vec<Vec<f32>>)>,
    /// A generation's dispute: the workers it found at fault (with why),
    /// and, when it settled the job itself (`outputs` is then the side
    /// found right), where and at what cost.
    dispute: Option<DisputeFindings>,
}

/// Workers a generation's dispute found at fault (with why), its report,
/// and whether it settled the job itself.
type DisputeFindings = (Vec<(String, String)>, Option<dispute::DisputeReport>, bool);

impl Run<'_> {
    /// One message from the results stream (`lockstep.result.<batch>.<worker>`,
    /// where the server lets only that worker publish): a result bundle or a
    /// single result. At most one result per job and worker counts, and only
    /// one that the worker signed for an assignment it holds or held; a
    /// result that fails [`verdict::check`] is that worker's fault.
    async fn on_results(&mut self, subject: &str, payload: &[u8]) -> Result<()> {
        let sender = subject.rsplit('.').next().unwrap_or_default().to_string();
        let answers = match parse_results(payload) {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!(worker = %quote(&sender), "ignoring a malformed result message: {why}");
                return Ok(());
            }
        };
        let r = self.opts.redundancy as usize;
        if !self.enrolled.contains_key(&sender) {
            if let Ok(e) = enrollments(self.nats).await {
                self.enrolled = e;
            }
        }
        let Some(key) = self.enrolled.get(&sender).map(|e| e.public_key.clone()) else {
            tracing::warn!(worker = %quote(&sender), "ignoring results from a worker that is not enrolled");
            return Ok(());
        };
        self.heard.insert(sender.clone(), now_ms());
        // A quarantined worker's word counts for nothing, whatever it holds.
        if self.revoked.contains(&sender)
            || self.enrolled.get(&sender).map(|e| e.state) == Some(EnrollmentState::Quarantined)
        {
            tracing::debug!(worker = %quote(&sender), "ignoring results from a quarantined worker");
            return Ok(());
        }
        let limits = self
            .live
            .iter()
            .find(|w| w.id == sender)
            .and_then(|w| w.record.limits);
        for mut res in answers {
            if res.worker != sender {
                tracing::warn!(worker = %quote(&sender), "ignoring a result naming another worker");
                continue;
            }
            if self.revoked.contains(&sender) {
                break;
            }
            let Some(js) = self.state.get_mut(&res.job) else {
                continue;
            };
            if js.decided.is_some() || js.results.contains_key(&res.worker) {
                continue;
            }
            // Bound to an assignment: the worker holds this (replica,
            // attempt), or held it before it was taken away.
            let holds = js
                .assignments
                .get(res.replica as usize)
                .and_then(|a| a.as_ref())
                .is_some_and(|a| {
                    (a.worker == res.worker && a.attempt == res.attempt)
                        || (a.abandoned.contains(&res.worker) && res.attempt < a.attempt)
                });
            if !holds {
                tracing::warn!(job = %res.job, worker = %res.worker, "ignoring a result for an assignment the worker does not hold");
                continue;
            }
            let checked = if res.batch != self.batch {
                verdict::Checked::Rejected("it signed a result for another batch".to_string())
            } else {
                verdict::check(self.nats, &self.batch, &key, &res, js, limits).await
            };
            let mut data = None;
            let mut unavailable = false;
            match checked {
                verdict::Checked::Fine(d) => data = d,
                verdict::Checked::Rejected(why) => {
                    let f = FaultRecord {
                        worker: res.worker.clone(),
                        batch: self.batch.clone(),
                        job: res.job.clone(),
                        reported: match &res.outcome {
                            Outcome::Ok { digest, .. } => Some(*digest),
                            Outcome::Error { .. } => None,
                        },
                        correct: None,
                        reason: format!("result rejected: {why}"),
                        at_ms: now_ms(),
                    };
                    if let Err(e) =
                        verdict::record_fault(self.nats, &mut self.enrolled, f, &mut self.faults)
                            .await
                    {
                        tracing::error!("{e:#}");
                    }
                    res.outcome = Outcome::Error {
                        code: ErrorCode::Rejected,
                        message: format!("rejected by the coordinator: {why}"),
                    };
                }
                verdict::Checked::Unavailable(why) => {
                    // Its output is not where it says (never stored, or
                    // no longer there): the result cannot count, nobody is
                    // blamed, and the replica goes to another worker.
                    unavailable = true;
                    res.outcome = Outcome::Error {
                        code: ErrorCode::Unpublishable,
                        message: format!("its stored output cannot be read back: {why}"),
                    };
                }
            }
            let js = self.state.get_mut(&res.job).expect("looked up above");
            if let Outcome::Error { code, message } = &res.outcome {
                if code.is_system_fault() && !unavailable {
                    // Not the worker's fault: retry the replica (the same
                    // worker may take it), and fail the job only if the
                    // system keeps failing it.
                    // Only a failure of a current assignment counts (an
                    // older attempt's was already dealt with).
                    let Some(i) = js.assignments.iter().position(|a| {
                        a.as_ref()
                            .is_some_and(|a| a.worker == res.worker && a.attempt == res.attempt)
                    }) else {
                        continue;
                    };
                    tracing::warn!(job = %res.job, worker = %res.worker, "system failure ({message}); retrying");
                    js.system_failures.push(format!(
                        "{code:?} on {}: {}",
                        res.worker,
                        shorten(message, 200)
                    ));
                    js.retry.insert(i);
                    let operator = verdict::operator_of(&self.enrolled, &res.worker);
                    js.system_failure_operators.insert(operator);
                    if js.system_failure_operators.len() >= MAX_SYSTEM_FAILURES {
                        let report = verdict::system_failed(&res.job, js);
                        self.decide(&res.job, report, None)?;
                    }
                    continue;
                }
                if *code == ErrorCode::TooLarge {
                    // "Not me": this worker is offered nothing as large again
                    // in this batch.
                    self.refused
                        .entry(res.worker.clone())
                        .or_default()
                        .push(js.size);
                }
                if !code.is_job_fault() || *code == ErrorCode::TooLarge {
                    tracing::warn!(job = %res.job, worker = %res.worker, "worker error ({message}); reassigning");
                    js.excluded.insert(res.worker.clone());
                }
            }
            let id = res.job.clone();
            let digest = match &res.outcome {
                Outcome::Ok { digest, .. } => Some(*digest),
                Outcome::Error { .. } => None,
            };
            js.results.insert(res.worker.clone(), res);
            match verdict::evaluate(&id, js, r, &self.enrolled, self.opts.audit_rate) {
                verdict::Eval::Wait => {}
                verdict::Eval::Decided(d) => {
                    // The outputs to write: this result's own, checked above
                    // (a verified job is decided by the result that
                    // completes it).
                    let data = match (d.report.digest, digest) {
                        (Some(want), Some(got)) if want == got => data,
                        _ => None,
                    };
                    self.decide(&id, d.report, data)?;
                }
                verdict::Eval::Recompute { audit } => self.recompute(&id, audit),
            }
            self.sweep_quarantined();
        }
        self.sweep_quarantined();
        Ok(())
    }

    /// Recomputes a job on the coordinator's own CPU backend, off the result
    /// loop (one job at a time): results of other jobs keep being counted
    /// meanwhile, so a worker that returns many wrong digests slows only
    /// the jobs it answered. [`Run::on_reference`] settles it.
    fn recompute(&mut self, id: &str, audit: bool) {
        let Some(js) = self.state.get_mut(id) else {
            return;
        };
        js.disputing = true;
        let (nats, spec, cpu) = (self.nats.clone(), js.spec.clone(), self.cpu.clone());
        let (tx, lane, id) = (
            self.disputes.clone(),
            self.dispute_lane.clone(),
            id.to_string(),
        );
        let generation =
            (matches!(spec.op, lockstep_kernels::Op::Generate(_)) && !audit).then(|| {
                let keys: BTreeMap<String, String> = self
                    .enrolled
                    .iter()
                    .map(|(w, e)| (w.clone(), e.public_key.clone()))
                    .collect();
                (
                    js.results.clone(),
                    keys,
                    self.batch.clone(),
                    self.opts.dispute_timeout,
                    self.opts.threads,
                )
            });
        tokio::spawn(async move {
            let _turn = lane.acquire_owned().await;
            let mut found = None;
            if let Some((results, keys, batch, timeout, threads)) = generation {
                // A generation: settled by replaying one step if it can be.
                let s = dispute::settle_generation(
                    &nats, &batch, &id, &spec, &results, &keys, timeout, threads,
                )
                .await;
                if let Some(accepted) = s.accepted {
                    let _ = tx.send(Reference {
                        job: id,
                        audit,
                        outputs: Ok(accepted),
                        dispute: Some((s.faults, s.report, true)),
                    });
                    return;
                }
                found = Some((s.faults, s.report, false));
            }
            let r = verdict::reference_outputs(&nats, &spec, &cpu).await;
            let _ = tx.send(Reference {
                job: id,
                audit,
                outputs: r,
                dispute: found,
            });
        });
    }

    /// A recomputation is done: the job is settled on it.
    async fn on_reference(&mut self, done: Reference) -> Result<()> {
        let Some(js) = self.state.get_mut(&done.job) else {
            return Ok(());
        };
        js.disputing = false;
        if js.decided.is_some() {
            return Ok(());
        }
        let d = match (done.outputs, done.dispute) {
            (Ok((digest, outputs)), Some((found, report, settled))) => {
                // A generation's dispute: its findings, plus every other
                // worker whose digest differs from the accepted one.
                let mut d = verdict::settle_dispute(
                    self.nats,
                    &self.batch,
                    &done.job,
                    js,
                    digest,
                    outputs,
                    found,
                    if settled { report } else { None },
                    &mut self.faults,
                    &mut self.enrolled,
                )
                .await;
                if !settled {
                    d.report.reason = Some(format!(
                        "digests disagreed; recomputed by the coordinator; {} faulty",
                        d.report.faulty_workers.len()
                    ));
                }
                d
            }
            (Ok((digest, outputs)), None) => {
                verdict::settle(
                    self.nats,
                    &self.batch,
                    &done.job,
                    js,
                    done.audit,
                    digest,
                    outputs,
                    &mut self.faults,
                    &mut self.enrolled,
                )
                .await
            }
            (Err(e), _) => {
                tracing::error!(job = %done.job, "the coordinator cannot recompute it: {e:#}");
                let mut report = JobReport::new(&done.job, js, Verdict::Failed);
                report.reason = Some(format!(
                    "the coordinator could not recompute it to settle a dispute: {}",
                    shorten(&format!("{e:#}"), 200)
                ));
                verdict::Decision {
                    report,
                    reference: None,
                }
            }
        };
        self.decide(&done.job, d.report, d.reference)?;
        self.sweep_quarantined();
        Ok(())
    }

    /// Every worker newly quarantined (by this coordinator, another one, or
    /// an admin) loses its standing in this batch: see [`Run::revoke`].
    fn sweep_quarantined(&mut self) {
        let caught: Vec<String> = self
            .enrolled
            .values()
            .filter(|e| e.state == EnrollmentState::Quarantined && !self.revoked.contains(&e.name))
            .map(|e| e.name.clone())
            .collect();
        for w in caught {
            self.revoke(&w);
        }
    }

    /// A caught worker's results stop counting: its results of undecided
    /// jobs are dropped and their replicas reassigned; every job it helped
    /// verify (its digest accepted without the coordinator's own
    /// recomputation) is decided again, its replica going to another
    /// worker, so a cheat it signed before or after being caught is
    /// re-checked before the batch is reported.
    fn revoke(&mut self, worker: &str) {
        self.revoked.insert(worker.to_string());
        self.live.retain(|w| w.id != worker);
        let mut reopened = 0;
        for js in self.state.values_mut() {
            let held = js.assignments.iter().flatten().any(|a| a.worker == worker);
            let answered = js.results.contains_key(worker);
            if !held && !answered {
                continue;
            }
            js.excluded.insert(worker.to_string());
            let Some(rep) = &js.decided else {
                // (A job being recomputed keeps it: the recomputation
                // settles who was wrong, and names it if it was.)
                if !js.disputing {
                    js.results.remove(worker);
                }
                continue;
            };
            let helped = rep.verdict == Verdict::Verified
                && !rep.audited
                && matches!(js.results.get(worker), Some(r) if matches!(&r.outcome, Outcome::Ok { digest, .. } if Some(*digest) == rep.digest));
            if helped {
                let (v, job) = (rep.verdict as usize, rep.job.clone());
                js.results.remove(worker);
                js.decided = None;
                self.verdicts[v] -= 1;
                self.undecided += 1;
                reopened += 1;
                self.reevaluate.push(job);
            }
        }
        if reopened > 0 {
            tracing::warn!(worker = %quote(worker), jobs = reopened, "quarantined: re-checking the jobs it helped verify");
            self.bar
                .set_position(self.bar.position().saturating_sub(reopened));
        }
    }

    /// Records a job's verdict, and writes its outputs (`data`, checked
    /// against the accepted digest) when the batch has an output folder.
    fn decide(
        &mut self,
        id: &str,
        mut report: JobReport,
        data: Option<Vec<Vec<f32>>>,
    ) -> Result<()> {
        let Some(js) = self.state.get_mut(id) else {
            return Ok(());
        };
        if let (Some(d), Some(want)) = (&data, report.digest) {
            if report::outputs_match(js, d, &want) {
                report.generation = report::GenerationReport::read(&js.spec, d);
            }
        }
        if let (Some(dir), Some(want)) = (&self.opts.out_dir, report.digest) {
            match data.filter(|d| report::outputs_match(js, d, &want)) {
                Some(d) => report::write_outputs(dir, id, js, &d)?,
                None => {
                    // Never reported as a success without its output.
                    tracing::error!(job = %id, "the accepted outputs are not at hand; the job fails");
                    report.verdict = Verdict::Failed;
                    report.reason = Some("the accepted outputs could not be read back".into());
                }
            }
        }
        self.bar.inc(1);
        self.undecided -= 1;
        self.verdicts[report.verdict as usize] += 1;
        js.decided = Some(report);
        self.bar.set_message(report::summary_line(&self.verdicts));
        Ok(())
    }

    /// Results can only arrive while their stream has room: when it is full
    /// and nothing has arrived for 5 s (every stored result read), the batch
    /// stops with a message that says so, rather than waiting for results
    /// the server would refuse.
    async fn check_room(&mut self) {
        if self.last_result.elapsed() < Duration::from_secs(5) {
            return;
        }
        self.check_room_now().await;
    }

    /// Stops the batch if the results stream is full.
    async fn check_room_now(&mut self) {
        // (Bounded: a stream without a leader answers nothing.)
        let full = tokio::time::timeout(
            REGISTRY_READ_TIMEOUT,
            crate::store::full(self.nats, &self.nats.results),
        )
        .await
        .ok()
        .flatten();
        if let Some((bytes, max)) = full {
            self.abort = Some(format!(
                "the results stream {RESULTS_STREAM} is full ({bytes} of {max} bytes): results cannot be stored; raise its limit (--store-limits results.bytes=…) or purge old batches"
            ));
        }
    }

    /// The workers holding replicas of undecided jobs they have not
    /// answered.
    fn owing(&self) -> Vec<String> {
        let mut out = std::collections::BTreeSet::new();
        for js in self.state.values().filter(|j| j.decided.is_none()) {
            for a in js.assignments.iter().flatten() {
                if !js.results.contains_key(&a.worker) {
                    out.insert(a.worker.clone());
                }
            }
        }
        out.into_iter().collect()
    }

    /// Every 100 ms: refresh the live workers (at most every 500 ms) and
    /// give every replica that needs one a worker.
    async fn on_tick(&mut self) -> Result<()> {
        for id in std::mem::take(&mut self.reevaluate) {
            let Some(js) = self.state.get(&id).filter(|j| j.decided.is_none()) else {
                continue;
            };
            let r = self.opts.redundancy as usize;
            match verdict::evaluate(&id, js, r, &self.enrolled, self.opts.audit_rate) {
                verdict::Eval::Wait => {}
                verdict::Eval::Decided(d) => {
                    // Outputs from a worker that agreed, read back again.
                    let data =
                        report::read_agreeing(self.nats, &self.batch, js, d.report.digest).await;
                    self.decide(&id, d.report, data)?;
                }
                verdict::Eval::Recompute { audit } => self.recompute(&id, audit),
            }
        }
        if self.live_at.elapsed() > Duration::from_millis(500) {
            // Bounded: while the registry's bucket has no leader (a
            // cluster node died) its reads hang, and this loop must go on
            // reading results meanwhile; the last view stands.
            let read = tokio::time::timeout(REGISTRY_READ_TIMEOUT, async {
                let enrolled = enrollments(self.nats).await?;
                let live = live_workers_of(self.nats, &enrolled, self.opts.worker_timeout).await?;
                anyhow::Ok((enrolled, live))
            })
            .await;
            match read {
                Ok(Ok((enrolled, live))) => (self.enrolled, self.live) = (enrolled, live),
                Ok(Err(e)) => tracing::warn!("cannot read the worker registry: {e}"),
                Err(_) => tracing::warn!(
                    "cannot read the worker registry: no answer in {REGISTRY_READ_TIMEOUT:?}; keeping the last view"
                ),
            }
            self.live_at = Instant::now();
            self.sweep_quarantined();
        }
        let assigned = schedule::schedule(
            self.nats,
            &self.batch,
            &mut self.state,
            schedule::Workers {
                live: &self.live,
                enrolled: &self.enrolled,
                refused: &self.refused,
                heard: &self.heard,
            },
            self.opts,
        )
        .await
        .unwrap_or_else(|e| {
            let text = format!("{e:#}");
            if crate::store::is_store_full(&text) && text.contains("assignment") {
                self.abort = Some(format!(
                    "cannot dispatch: the plan store is full ({}); raise its limit (--store-limits plans.bytes=…) or purge old batches",
                    shorten(&text, 160)
                ));
            } else if crate::store::is_store_full(&text) {
                // The jobs stream is full: replicas wait there for their
                // workers, and make room as workers take them.
                tracing::debug!("the jobs stream is full; dispatch waits for room");
                self.bar
                    .set_message("jobs stream full: waiting for workers to make room");
            } else {
                tracing::warn!("dispatch failed, will retry: {text}");
            }
            0
        });
        if self.full_at.elapsed() > Duration::from_secs(2) {
            self.full_at = Instant::now();
            self.check_room().await;
        }
        let stuck = self
            .state
            .values()
            .any(|j| j.decided.is_none() && j.assignments.iter().any(|a| a.is_none()));
        if stuck && !self.waiting_note {
            self.bar
                .set_message(format!("waiting for workers ({} live)", self.live.len()));
            self.waiting_note = true;
        } else if assigned > 0 {
            self.waiting_note = false;
            self.bar.set_message(report::summary_line(&self.verdicts));
        }
        Ok(())
    }
}
