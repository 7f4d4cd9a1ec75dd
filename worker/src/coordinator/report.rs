//! What a batch comes to: the report (written as report.json), the verdict
//! table `submit` and `demo` print, and the accepted outputs.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Result;
use lockstep_kernels::{outputs_digest, tensor_digest_f32, Digest, CONTRACT_VERSION};
use serde::Serialize;

use super::{JobState, SubmitOptions};
use crate::nats::Nats;
use crate::protocol::*;

#[derive(Clone, Copy, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
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
    /// The op, as on the wire.
    pub op: String,
    /// The accepted digest of the outputs (verified or resolved jobs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub digest: Option<Digest>,
    /// The shape of each output.
    pub shapes: Vec<Vec<usize>>,
    pub results: Vec<ReplicaReport>,
    /// Workers whose digest differed from the accepted one.
    pub faulty_workers: Vec<String>,
    /// Workers a replica was taken away from (dead, timed out, failed).
    pub reassigned_from: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The coordinator recomputed the job although its workers agreed
    /// (`--audit-rate`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub audited: bool,
    /// Milliseconds from the job's dispatch to its verdict (this run).
    pub latency_ms: f64,
    /// A generate job's prompt and accepted tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationReport>,
    /// A generate job's dispute: where it was settled and what it cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dispute: Option<super::dispute::DisputeReport>,
}

/// What an accepted generation came to, read from its accepted outputs.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
pub struct GenerationReport {
    pub prompt_ids: Vec<u32>,
    pub output_ids: Vec<u32>,
    /// The root of every (position, layer) output digest.
    pub trace_root: Digest,
}

impl GenerationReport {
    /// From a generate job's prompt and accepted outputs (`None` if they
    /// are not a generation's).
    pub fn read(spec: &JobSpec, outputs: &[Vec<f32>]) -> Option<Self> {
        use lockstep_kernels::contract::generate::{generated_ids, prompt_ids, values_digest};
        if !matches!(spec.op, lockstep_kernels::Op::Generate(_)) {
            return None;
        }
        let prompt = decode_f32(spec.inputs.first()?.inline.as_ref()?).ok()?;
        Some(Self {
            prompt_ids: prompt_ids(&prompt).ok()?,
            output_ids: generated_ids(outputs.first()?)?,
            trace_root: values_digest(outputs.get(1)?)?,
        })
    }
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
    /// Why the batch stopped before every job was decided, if it did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// What was removed from the server once the batch was done (absent with
    /// `--keep-batch`, or while jobs are unresolved).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub purged: Option<crate::store::PurgeReport>,
    /// Receipts written to receipts.jsonl (one per accepted job, when the
    /// coordinator has a key).
    pub receipts: usize,
}

impl Report {
    /// All jobs have an accepted output.
    pub fn all_accepted(&self) -> bool {
        self.failed == 0 && self.unresolved == 0
    }
}

/// Where a batch ended.
pub(super) struct Finish<'a> {
    pub batch: String,
    pub order: &'a [String],
    pub state: BTreeMap<String, JobState>,
    pub faults: Vec<FaultRecord>,
    /// Why it stopped early, if it did (its undecided jobs fail with it).
    pub abort: Option<String>,
    pub t_start: Instant,
    pub enrolled: &'a BTreeMap<String, Enrollment>,
}

/// The report of a finished (or stopped) batch, in the batch's job order;
/// writes report.json and the accepted outputs when `opts.out_dir` is set;
/// then, once every job is decided, purges what the batch left on the
/// server (unless `opts.keep_batch`).
pub(super) async fn finish(nats: &Nats, opts: &SubmitOptions, f: Finish<'_>) -> Result<Report> {
    let Finish {
        batch,
        order,
        mut state,
        faults,
        abort,
        t_start,
        enrolled,
    } = f;
    let mut receipts = Vec::new();
    let mut reports = Vec::new();
    // Blobs the batch references, and those of them it may delete: inputs it
    // uploaded and outputs, never objects the batch file named.
    let (mut referenced, mut deletable) = (BTreeSet::new(), BTreeSet::new());
    for id in order {
        let js = state.remove(id).expect("every job has a state");
        referenced.extend(js.spec.inputs.iter().filter_map(|t| t.object));
        deletable.extend(js.uploaded.iter().copied());
        reports.push(js.decided.clone().unwrap_or_else(|| match &abort {
            Some(why) => {
                let mut r = JobReport::new(id, &js, Verdict::Failed);
                r.reason = Some(why.clone());
                r
            }
            None => {
                let mut r = JobReport::new(id, &js, Verdict::Unresolved);
                r.reason = Some("no decision before the deadline".into());
                r.latency_ms = 0.0;
                r
            }
        }));
        if let Some(signer) = &opts.signer {
            receipts.extend(super::receipt::build(
                &batch,
                id,
                &js,
                opts.redundancy,
                enrolled,
                signer,
            ));
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
        stopped: abort,
        purged: None,
        receipts: receipts.len(),
    };
    if let Some(dir) = &opts.out_dir {
        std::fs::create_dir_all(dir)?;
        let mut text = String::new();
        for r in &receipts {
            text += &serde_json::to_string(r)?;
            text.push('\n');
        }
        std::fs::write(dir.join("receipts.jsonl"), text)?;
    }
    let mut report = report;
    let write = |report: &Report| -> Result<()> {
        if let Some(dir) = &opts.out_dir {
            std::fs::create_dir_all(dir)?;
            std::fs::write(dir.join("report.json"), serde_json::to_vec_pretty(report)?)?;
        }
        Ok(())
    };
    write(&report)?;
    // Only a batch that is done is purged: not one left unresolved (to be
    // resumed) nor one stopped early (its results are kept, for a look and
    // for a resume once the store has room).
    if !opts.keep_batch && report.unresolved == 0 && report.stopped.is_none() {
        let workers: Vec<String> = enrolled.keys().cloned().collect();
        match crate::store::purge_batch(nats, &report.batch, &workers, &referenced, &deletable)
            .await
        {
            Ok(mut p) => {
                // And what arrived after earlier batches were purged.
                match crate::store::sweep_late(nats, &workers, &report.batch).await {
                    Ok(n) => p.late = n,
                    Err(e) => tracing::warn!("could not sweep late results: {e:#}"),
                }
                match crate::store::sweep_orphan_chunks(nats, crate::store::ORPHAN_CHUNK_AGE).await
                {
                    Ok(n) => p.orphan_chunks = n,
                    Err(e) => tracing::warn!("could not sweep orphan chunks: {e:#}"),
                }
                tracing::info!(
                    results = p.results,
                    plans = p.plans,
                    jobs = p.jobs,
                    blobs = p.blobs,
                    "purged the batch from the server"
                );
                report.purged = Some(p);
                write(&report)?;
            }
            Err(e) => tracing::warn!("could not purge the batch from the server: {e:#}"),
        }
    }
    Ok(report)
}

impl JobReport {
    /// A report of the job as it stands, with this verdict and no digest,
    /// faults or reason yet.
    pub(super) fn new(id: &str, js: &JobState, verdict: Verdict) -> Self {
        JobReport {
            job: id.into(),
            op: js.spec.op.name().into(),
            verdict,
            digest: None,
            shapes: js.shapes.clone(),
            results: replica_reports(js),
            faulty_workers: vec![],
            reassigned_from: reassigned_from(js),
            reason: None,
            audited: false,
            generation: None,
            dispute: None,
            latency_ms: js
                .dispatched
                .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1e3),
        }
    }
}

pub(super) fn reassigned_from(js: &JobState) -> Vec<String> {
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

pub(super) fn replica_reports(js: &JobState) -> Vec<ReplicaReport> {
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

/// The verdict table printed by `submit` and `demo`.
pub fn print_report(report: &Report) {
    println!(
        "{:<10} {:<11} {:<42} {:<10} digest",
        "job", "shape", "workers (backend)", "verdict"
    );
    for j in &report.jobs {
        let workers: Vec<String> = j
            .results
            .iter()
            .map(|r| {
                let bad = if j.faulty_workers.contains(&r.worker) {
                    "✗"
                } else {
                    ""
                };
                format!("{}({}){bad}", r.worker, r.backend)
            })
            .collect();
        let verdict = match j.verdict {
            Verdict::Verified => "verified",
            Verdict::Resolved => "resolved",
            Verdict::Failed => "FAILED",
            Verdict::Unresolved => "UNRESOLVED",
        };
        let digest = j
            .digest
            .map(|d| format!("{}…", &d.to_string()[..21]))
            .unwrap_or_else(|| j.reason.clone().unwrap_or_default());
        let shapes: Vec<String> = j
            .shapes
            .iter()
            .map(|s| {
                s.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join("x")
            })
            .collect();
        println!(
            "{:<10} {:<11} {:<42} {:<10} {digest}",
            j.job,
            shapes.join(","),
            workers.join(" "),
            verdict
        );
    }
    println!(
        "\n{} jobs in {:.1} s: {} verified, {} resolved (disputes settled), {} failed, {} unresolved; contract v{}",
        report.jobs.len(),
        report.elapsed_s,
        report.verified,
        report.resolved,
        report.failed,
        report.unresolved,
        report.contract_version
    );
    for f in &report.faults {
        println!("FAULT: worker {} on {}: {}", f.worker, f.job, f.reason);
    }
}

/// Progress text from verdict counts (indexed by `Verdict as usize`).
pub(super) fn summary_line(verdicts: &[usize; 4]) -> String {
    format!(
        "verified {} · resolved {} · failed {}",
        verdicts[Verdict::Verified as usize],
        verdicts[Verdict::Resolved as usize],
        verdicts[Verdict::Failed as usize]
    )
}

pub(super) fn progress_bar(show: bool, len: u64) -> indicatif::ProgressBar {
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

/// Writes an accepted job's outputs to `dir/outputs/<job>.safetensors` (one
/// tensor per output, named as the op names them). The data is what the
/// coordinator itself checked against the accepted digest when it decided
/// the job: a worker's outputs read back from that worker's own copy, or
/// its own recomputation.
pub(super) fn write_outputs(
    dir: &std::path::Path,
    job: &str,
    js: &JobState,
    data: &[Vec<f32>],
) -> Result<()> {
    let out = dir.join("outputs");
    std::fs::create_dir_all(&out)?;
    let names = js.spec.op.output_names();
    let tensors: Vec<(&str, &[usize], &[f32])> = js
        .shapes
        .iter()
        .zip(data)
        .enumerate()
        .map(|(i, (s, d))| {
            (
                names.get(i).copied().unwrap_or("out"),
                s.as_slice(),
                d.as_slice(),
            )
        })
        .collect();
    crate::tensors::write_f32(&out.join(format!("{job}.safetensors")), &tensors)?;
    Ok(())
}

/// Whether `data` is a set of outputs with the job's shapes that hashes
/// to `want`.
pub(super) fn outputs_match(js: &JobState, data: &[Vec<f32>], want: &Digest) -> bool {
    data.len() == js.shapes.len()
        && js
            .shapes
            .iter()
            .zip(data)
            .all(|(s, d)| Some(d.len()) == lockstep_kernels::contract::elements(s).ok())
        && outputs_digest(
            &js.shapes
                .iter()
                .zip(data)
                .map(|(s, d)| tensor_digest_f32(s, d))
                .collect::<Vec<_>>(),
        ) == *want
}

/// The outputs of a worker whose digest is `want`, read back from its own
/// copy and re-checked (`None` if no worker's copy is at hand).
pub(super) async fn read_agreeing(
    nats: &Nats,
    batch: &str,
    js: &JobState,
    want: Option<Digest>,
) -> Option<Vec<Vec<f32>>> {
    let want = want?;
    'results: for res in js.results.values() {
        let Outcome::Ok { digest, outputs } = &res.outcome else {
            continue;
        };
        if *digest != want {
            continue;
        }
        let mut data = Vec::with_capacity(outputs.len());
        for t in outputs {
            let loaded = match (&t.inline, &t.object) {
                (Some(b64), _) => decode_f32(b64).ok(),
                (None, Some(d)) => crate::nats::get_output(nats, &res.worker, batch, &t.shape, d)
                    .await
                    .ok(),
                (None, None) => None,
            };
            match loaded {
                Some(d) => data.push(d),
                None => continue 'results,
            }
        }
        if outputs_match(js, &data, &want) {
            return Some(data);
        }
    }
    None
}
