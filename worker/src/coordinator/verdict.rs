//! Verdicts: a job is verified when r workers agree on its digest;
//! otherwise the coordinator recomputes it on its own CPU backend, accepts
//! the reference digest, and records a fault against every worker that
//! differs.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use lockstep_kernels::contract::views;
use lockstep_kernels::{outputs_digest, Backend, Digest};

use super::report::{JobReport, Verdict};
use super::JobState;
use crate::nats::Nats;
use crate::protocol::*;

/// What a job's results come to so far.
pub(super) enum Eval {
    /// Not enough results yet (or its dispute is being recomputed).
    Wait,
    Decided(Box<Decision>),
    /// The workers disagree, or agree and are audited: the coordinator
    /// must recompute the job ([`reference_outputs`], off the result loop)
    /// and then [`settle`] it.
    Recompute {
        audit: bool,
    },
}

/// Where a job stands once it has enough results. Every result here passed
/// [`check`].
pub(super) fn evaluate(
    id: &str,
    js: &JobState,
    r: usize,
    enrolled: &BTreeMap<String, Enrollment>,
    audit_rate: f64,
) -> Eval {
    if js.disputing {
        return Eval::Wait;
    }
    let mut report = JobReport::new(id, js, Verdict::Failed);
    // A job-level error the coordinator confirmed (an input really missing
    // or corrupt) means the job itself is bad. "Too large" is never a
    // verdict on the job: it is a worker saying "not me", whatever how many
    // workers say it, and the replica goes to another worker.
    let operator = |w: &str| operator_of(enrolled, w);
    if let Some((code, message)) = js.results.values().find_map(|res| match &res.outcome {
        Outcome::Error { code, message } if code.is_job_fault() && *code != ErrorCode::TooLarge => {
            Some((*code, message.clone()))
        }
        _ => None,
    }) {
        report.reason = Some(format!("{code:?}: {message}"));
        return Eval::Decided(Box::new(Decision {
            report,
            reference: None,
        }));
    }
    let oks = ok_digests(js);
    // r answers from r distinct operators (the schedule sends replicas to
    // distinct operators; a reassigned replica's old worker may still
    // answer, and two of one operator never count as two).
    let operators: std::collections::BTreeSet<String> =
        oks.iter().map(|(w, _)| operator(w)).collect();
    if oks.len() < r || operators.len() < r {
        return Eval::Wait;
    }
    let first = oks[0].1;
    let agree = oks.iter().all(|(_, d)| *d == first);
    // An audit: a random fraction of the jobs whose workers agree is
    // recomputed all the same, so colluders who agree on wrong bits are
    // caught with that probability on every job they cheat on.
    let audit = agree && audit_rate > 0.0 && rand::random::<f64>() < audit_rate;
    if agree && !audit {
        report.verdict = Verdict::Verified;
        report.digest = Some(first);
        return Eval::Decided(Box::new(Decision {
            report,
            reference: None,
        }));
    }
    Eval::Recompute { audit }
}

/// Each worker's `ok` digest.
fn ok_digests(js: &JobState) -> Vec<(String, Digest)> {
    js.results
        .iter()
        .filter_map(|(w, res)| match &res.outcome {
            Outcome::Ok { digest, .. } => Some((w.clone(), *digest)),
            _ => None,
        })
        .collect()
}

/// Decides a job the coordinator recomputed (`reference`, `outputs`): the
/// workers' digest when an audit finds it right, else the coordinator's,
/// with a fault against every worker whose digest differs.
#[allow(clippy::too_many_arguments)]
pub(super) async fn settle(
    nats: &Nats,
    batch: &str,
    id: &str,
    js: &JobState,
    audit: bool,
    reference: Digest,
    outputs: Vec<Vec<f32>>,
    faults: &mut Vec<FaultRecord>,
    enrolled: &mut BTreeMap<String, Enrollment>,
) -> Decision {
    let mut report = JobReport::new(id, js, Verdict::Resolved);
    let oks = ok_digests(js);
    report.audited = audit;
    report.digest = Some(reference);
    if audit && oks.iter().all(|(_, d)| *d == reference) {
        report.verdict = Verdict::Verified;
        return Decision {
            report,
            reference: Some(outputs),
        };
    }
    for (w, d) in oks.into_iter().filter(|(_, d)| *d != reference) {
        let f = FaultRecord {
            worker: w.clone(),
            batch: batch.into(),
            job: id.into(),
            reported: Some(d),
            correct: Some(reference),
            reason: format!(
                "returned {d}; the coordinator's CPU reference computes {reference}{}",
                if audit {
                    " (found by an audit: the workers agreed)"
                } else {
                    ""
                }
            ),
            at_ms: now_ms(),
        };
        if let Err(e) = record_fault(nats, enrolled, f, faults).await {
            tracing::error!("{e:#}");
        }
        report.faulty_workers.push(w);
    }
    report.reason = Some(format!(
        "digests disagreed; recomputed by the coordinator; {} faulty",
        report.faulty_workers.len()
    ));
    Decision {
        report,
        reference: Some(outputs),
    }
}

/// Decides a generate job a dispute settled: `accepted` is the side the
/// one-step replay found right; every worker the dispute found at fault,
/// and every other worker whose digest differs from the accepted one, gets
/// a fault.
#[allow(clippy::too_many_arguments)]
pub(super) async fn settle_dispute(
    nats: &Nats,
    batch: &str,
    id: &str,
    js: &JobState,
    accepted: Digest,
    outputs: Vec<Vec<f32>>,
    found: Vec<(String, String)>,
    dispute: Option<super::dispute::DisputeReport>,
    faults: &mut Vec<FaultRecord>,
    enrolled: &mut BTreeMap<String, Enrollment>,
) -> Decision {
    let mut report = JobReport::new(id, js, Verdict::Resolved);
    report.digest = Some(accepted);
    let oks = ok_digests(js);
    let mut blamed: Vec<(String, Option<Digest>, String)> = found
        .into_iter()
        .map(|(w, why)| {
            let d = oks.iter().find(|(o, _)| *o == w).map(|(_, d)| *d);
            (w, d, why)
        })
        .collect();
    for (w, d) in &oks {
        if *d != accepted && !blamed.iter().any(|(b, _, _)| b == w) {
            blamed.push((
                w.clone(),
                Some(*d),
                format!("returned {d}; the dispute accepted {accepted}"),
            ));
        }
    }
    for (w, d, why) in blamed {
        let f = FaultRecord {
            worker: w.clone(),
            batch: batch.into(),
            job: id.into(),
            reported: d,
            correct: Some(accepted),
            reason: why,
            at_ms: now_ms(),
        };
        if let Err(e) = record_fault(nats, enrolled, f, faults).await {
            tracing::error!("{e:#}");
        }
        if !report.faulty_workers.contains(&w) {
            report.faulty_workers.push(w);
        }
    }
    report.reason = Some(match &dispute {
        Some(d) => format!(
            "digests disagreed; settled by replaying {} at position {} ({:.1} ms against {:.0} ms for the generation); {} faulty",
            d.layer.map_or("the final norm, classifier and sampling".to_string(), |l| format!("layer {l}")),
            d.position,
            d.replay_ms,
            d.generation_ms,
            report.faulty_workers.len()
        ),
        None => format!(
            "digests disagreed; settled by the dispute; {} faulty",
            report.faulty_workers.len()
        ),
    });
    report.dispute = dispute;
    Decision {
        report,
        reference: Some(outputs),
    }
}

/// A job's verdict, with the coordinator's own outputs when it computed
/// them (a dispute or an audit).
pub(super) struct Decision {
    pub report: JobReport,
    pub reference: Option<Vec<Vec<f32>>>,
}

/// Who runs worker `w` (a worker not enrolled counts as its own operator).
pub(super) fn operator_of(enrolled: &BTreeMap<String, Enrollment>, w: &str) -> String {
    enrolled
        .get(w)
        .map_or_else(|| w.to_string(), |e| e.operator.clone())
}

/// Records a fault (KV `lockstep_faults`, the report) and quarantines the
/// worker: it gets no further assignments until an admin clears it.
pub(super) async fn record_fault(
    nats: &Nats,
    enrolled: &mut BTreeMap<String, Enrollment>,
    f: FaultRecord,
    faults: &mut Vec<FaultRecord>,
) -> Result<()> {
    tracing::warn!(job = %f.job, worker = %f.worker, "fault: {}", f.reason);
    nats.faults
        .put(
            format!("{}.{}.{}", f.worker, f.batch, f.job),
            serde_json::to_vec(&f)?.into(),
        )
        .await
        .context("cannot record a fault")?;
    if let Some(e) = enrolled.get_mut(&f.worker) {
        if e.state != EnrollmentState::Quarantined {
            e.state = EnrollmentState::Quarantined;
            e.reason = Some(format!("batch {} job {}: {}", f.batch, f.job, f.reason));
            crate::nats::put_enrollment(nats, e).await?;
            tracing::warn!(worker = %f.worker, "quarantined");
            // What it published counts for nothing now: gone, so whatever
            // it flooded its share with costs nobody anything.
            match crate::store::purge_worker(nats, &f.worker).await {
                Ok(n) => {
                    tracing::info!(worker = %f.worker, messages = n, "purged what the quarantined worker published")
                }
                Err(e) => {
                    tracing::warn!(worker = %f.worker, "could not purge what it published: {e:#}")
                }
            }
        }
    }
    faults.push(f);
    Ok(())
}

/// What the checks of one result found.
pub(super) enum Checked {
    /// It counts; for `ok`, the data of its outputs (inline ones decoded,
    /// stored ones read back from the signer's own copy and re-hashed).
    Fine(Option<Vec<Vec<f32>>>),
    /// It must be rejected, and it is its worker's fault.
    Rejected(String),
    /// It cannot count (an output it names is not in the outputs stream
    /// under its worker's name), but nothing shows whose fault that is.
    Unavailable(String),
}

/// Whether a result counts: it must verify against the worker's enrolled
/// key and be for this job, its outputs must have the right shapes, and
/// every output must hash to the digest it signed — stored ones as read
/// back from the copy under the signer's own name, so a worker that learns
/// another's digest gets nothing by naming it. A job-level claim must be
/// true: inputs that the coordinator finds intact, or a `too_large` for a
/// job within the limits the worker's own record advertises, are lies.
/// The caller has checked that the worker holds (or held) the assignment
/// the result names.
pub(super) async fn check(
    nats: &Nats,
    batch: &str,
    key: &str,
    res: &ResultMessage,
    js: &JobState,
    limits: Option<WorkerLimits>,
) -> Checked {
    if let Some(why) = check_statement(key, res, &js.job_digest, &js.shapes) {
        return Checked::Rejected(why);
    }
    match &res.outcome {
        Outcome::Ok { outputs, .. } => {
            let mut data = Vec::with_capacity(outputs.len());
            for t in outputs {
                let loaded = match (&t.inline, &t.object) {
                    (Some(b64), _) => decode_f32(b64).map_err(crate::nats::OutputError::Bad),
                    (None, Some(d)) => {
                        crate::nats::get_output(nats, &res.worker, batch, &t.shape, d).await
                    }
                    (None, None) => Err(crate::nats::OutputError::Bad("no data".into())),
                };
                match loaded {
                    Ok(d) => data.push(d),
                    Err(crate::nats::OutputError::Missing(why)) => {
                        return Checked::Unavailable(why)
                    }
                    Err(crate::nats::OutputError::Bad(why)) => {
                        return Checked::Rejected(format!(
                            "an output it stored under its own name is not what it signed: {why}"
                        ))
                    }
                }
            }
            Checked::Fine(Some(data))
        }
        // A model larger than a worker takes, or than its memory: nothing
        // the coordinator can check; it takes that worker off the job.
        Outcome::Error {
            code: ErrorCode::TooLarge,
            ..
        } if matches!(js.spec.op, lockstep_kernels::Op::Generate(_)) => Checked::Fine(None),
        Outcome::Error {
            code: ErrorCode::TooLarge,
            ..
        } => match limits {
            Some(l) if l.admit(&js.size) => Checked::Rejected(format!(
                "it claimed too_large for a job within the limits its record advertises ({} elements, {} multiply-adds)",
                l.max_elements, l.max_macs
            )),
            _ => Checked::Fine(None),
        },
        Outcome::Error {
            code: code @ (ErrorCode::TamperedBlob | ErrorCode::MissingBlob),
            ..
        } => {
            if let lockstep_kernels::Op::Generate(g) = &js.spec.op {
                // The model: a claim is true when it is missing or does not
                // load to its name.
                if super::models::model(nats, &g.model).await.is_err() {
                    return Checked::Fine(None);
                }
            }
            for t in &js.spec.inputs {
                if let Some(d) = &t.object {
                    let fine = match crate::nats::get_blob(nats, d).await {
                        Ok(bytes) => decode_blob(&t.shape, d, &bytes).is_ok(),
                        Err(_) => false,
                    };
                    if !fine {
                        return Checked::Fine(None);
                    }
                }
            }
            Checked::Rejected(format!(
                "it claimed {code:?}, but every input (and model) is in the store and hashes to its name"
            ))
        }
        _ => Checked::Fine(None),
    }
}

/// The part of [`check`] that needs nothing but the result: signature,
/// versions, job digest, output shapes and digests, codes no honest worker
/// sends.
pub fn check_statement(
    key: &str,
    res: &ResultMessage,
    job_digest: &Digest,
    shapes: &[Vec<usize>],
) -> Option<String> {
    if verify_result(key, res).is_err() {
        return Some("its signature does not verify against its enrolled key".into());
    }
    if res.protocol != PROTOCOL_VERSION
        || res.contract_version != lockstep_kernels::CONTRACT_VERSION
    {
        return Some(format!(
            "it speaks protocol {} / contract {}",
            res.protocol, res.contract_version
        ));
    }
    match &res.outcome {
        Outcome::Ok { digest, outputs } => {
            if res.job_digest != Some(*job_digest) {
                return Some("it signed another job's digest".into());
            }
            if outputs.len() != shapes.len()
                || outputs.iter().zip(shapes).any(|(t, s)| t.shape != *s)
            {
                return Some(format!(
                    "its outputs have shapes {}; the contract gives {}",
                    shorten(
                        &format!("{:?}", outputs.iter().map(|t| &t.shape).collect::<Vec<_>>()),
                        100
                    ),
                    shorten(&format!("{shapes:?}"), 100)
                ));
            }
            let mut digests = Vec::with_capacity(outputs.len());
            for t in outputs {
                match (&t.inline, &t.object) {
                    (Some(b64), None) => match decode_f32(b64) {
                        Ok(d) if Some(d.len()) == t.elements() => {
                            digests.push(TensorRef::digest_of(&t.shape, &d))
                        }
                        _ => return Some("an inline output does not fit its shape".into()),
                    },
                    (None, Some(d)) => digests.push(*d),
                    _ => return Some("an output is neither inline nor stored".into()),
                }
            }
            if outputs_digest(&digests) != *digest {
                return Some("its outputs do not hash to the digest it signed".into());
            }
            None
        }
        Outcome::Error { code, .. } => match code {
            ErrorCode::Rejected => Some("it sent a code only coordinators use".into()),
            ErrorCode::BadMessage
            | ErrorCode::UnknownOp
            | ErrorCode::BadShape
            | ErrorCode::WrongContract => Some(format!(
                "it claimed {code:?} for a job the coordinator checked against the contract"
            )),
            _ => None,
        },
    }
}

/// A job the system kept failing (redeliveries exhausted, results the server
/// would not store): failed, with every reason, and no worker blamed.
pub(super) fn system_failed(id: &str, js: &JobState) -> JobReport {
    let mut report = JobReport::new(id, js, Verdict::Failed);
    report.reason = Some(format!(
        "the system failed this job {} times (no worker is at fault): {}",
        js.system_failures.len(),
        js.system_failures.join("; ")
    ));
    report
}

/// An output of `worker`'s result: inline, or read back from its own
/// outputs stream (re-hashed against the digest it names).
pub(super) async fn load_output(
    nats: &Nats,
    batch: &str,
    worker: &str,
    t: &TensorRef,
) -> Result<Vec<f32>, crate::nats::OutputError> {
    match (&t.inline, &t.object) {
        (Some(b64), _) => {
            let d = decode_f32(b64).map_err(crate::nats::OutputError::Bad)?;
            if Some(d.len()) != t.elements() {
                return Err(crate::nats::OutputError::Bad(
                    "an inline output does not fit its shape".into(),
                ));
            }
            Ok(d)
        }
        (None, Some(d)) => crate::nats::get_output(nats, worker, batch, &t.shape, d).await,
        (None, None) => Err(crate::nats::OutputError::Bad("no data".into())),
    }
}

pub(super) async fn load_tensor(nats: &Nats, t: &TensorRef) -> Result<Vec<f32>> {
    if let Some(b64) = &t.inline {
        return decode_f32(b64).map_err(anyhow::Error::msg);
    }
    let digest = t
        .object
        .context("tensor has neither inline data nor an object")?;
    let bytes = crate::nats::get_blob(nats, &digest).await?;
    decode_blob(&t.shape, &digest, &bytes).map_err(anyhow::Error::msg)
}

/// The job's outputs and their digest, recomputed on the coordinator's own
/// CPU backend (tested bit for bit against every op's spec).
pub(super) async fn reference_outputs(
    nats: &Nats,
    spec: &JobSpec,
    cpu: &std::sync::Arc<lockstep_kernels::cpu::CpuBackend>,
) -> Result<(Digest, Vec<Vec<f32>>)> {
    let mut data = Vec::with_capacity(spec.inputs.len());
    for t in &spec.inputs {
        data.push(load_tensor(nats, t).await?);
    }
    if let lockstep_kernels::Op::Generate(g) = &spec.op {
        let outputs =
            super::models::reference_generation(nats, g, data.remove(0), cpu.threads()).await?;
        let digests: Vec<Digest> = outputs.iter().map(|t| t.digest()).collect();
        return Ok((
            outputs_digest(&digests),
            outputs.into_iter().map(|t| t.data).collect(),
        ));
    }
    let shapes: Vec<Vec<usize>> = spec.inputs.iter().map(|t| t.shape.clone()).collect();
    let (cpu, op) = (cpu.clone(), spec.op.clone());
    let outputs =
        tokio::task::spawn_blocking(move || cpu.run(&op, &views(&shapes, &data))).await??;
    let digests: Vec<Digest> = outputs.iter().map(|t| t.digest()).collect();
    Ok((
        outputs_digest(&digests),
        outputs.into_iter().map(|t| t.data).collect(),
    ))
}
