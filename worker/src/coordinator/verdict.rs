//! Verdicts: a job is verified when r workers agree on its digest;
//! otherwise the coordinator recomputes it on its own CPU backend, accepts
//! the reference digest, and records a fault against every worker that
//! differs.

use anyhow::{Context, Result};
use lockstep_kernels::contract::views;
use lockstep_kernels::{outputs_digest, Backend, Digest};

use super::report::{JobReport, Verdict};
use super::JobState;
use crate::nats::Nats;
use crate::protocol::*;

/// Decides a job once it has enough results; `None` while it needs more.
pub(super) async fn evaluate(
    nats: &Nats,
    batch: &str,
    id: &str,
    js: &mut JobState,
    r: usize,
    cpu: &std::sync::Arc<lockstep_kernels::cpu::CpuBackend>,
    faults: &mut Vec<FaultRecord>,
) -> Result<Option<JobReport>> {
    let mut report = JobReport::new(id, js, Verdict::Failed);
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
            Outcome::Ok { digest, outputs }
                if outputs.len() == js.shapes.len()
                    && outputs.iter().zip(&js.shapes).all(|(t, s)| t.shape == *s) =>
            {
                Some((w, *digest))
            }
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

/// The job's outputs digest, recomputed on the coordinator's own CPU
/// backend (tested bit for bit against every op's spec).
async fn reference_digest(
    nats: &Nats,
    spec: &JobSpec,
    cpu: &std::sync::Arc<lockstep_kernels::cpu::CpuBackend>,
) -> Result<Digest> {
    let mut data = Vec::with_capacity(spec.inputs.len());
    for t in &spec.inputs {
        data.push(load_tensor(nats, t).await?);
    }
    let shapes: Vec<Vec<usize>> = spec.inputs.iter().map(|t| t.shape.clone()).collect();
    let (cpu, op) = (cpu.clone(), spec.op.clone());
    let outputs =
        tokio::task::spawn_blocking(move || cpu.run(&op, &views(&shapes, &data))).await??;
    let digests: Vec<Digest> = outputs.iter().map(|t| t.digest()).collect();
    Ok(outputs_digest(&digests))
}
