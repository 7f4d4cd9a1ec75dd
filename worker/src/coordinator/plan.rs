//! The durable plan: which worker computes each replica, written to KV
//! (`lockstep_assign`) before the replica is published, and read back by a
//! restarted coordinator to resume a batch. Also how inputs reach the wire.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use async_nats::jetstream;
use futures::StreamExt;
use lockstep_kernels::{tensor_digest_f32, CONTRACT_VERSION};

use super::JobState;
use crate::batch::{BatchJob, Tensor};
use crate::nats::Nats;
use crate::protocol::*;

/// A replica to publish: a job's replica, what it computes, and to whom.
pub(super) struct NewReplica {
    pub job: String,
    pub replica: usize,
    pub redundancy: u32,
    pub spec: JobSpec,
    pub assignment: Assignment,
    /// Expected size of its result in a result bundle.
    pub result_bytes: usize,
}

/// The batch id derived from the jobs' content: each job's id, its op with
/// every parameter, and its inputs' digests, each part length-prefixed.
/// A new batch id: `b-<8 hex of the content hash>-<16 hex of randomness>`.
/// The nonce makes ids unpredictable, so nobody can publish results for a
/// batch before it exists; resuming a batch names its id.
pub fn new_batch_id(jobs: &[BatchJob]) -> String {
    use rand::Rng as _;
    let content = batch_id_for(jobs);
    let nonce: u64 = rand::rng().random();
    format!("{}-{nonce:016x}", &content[..10])
}

/// The content hash of a batch: `b-<16 hex>`, the same for the same jobs.
pub fn batch_id_for(jobs: &[BatchJob]) -> String {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    let part = |h: &mut sha3::Sha3_256, bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    for j in jobs {
        part(&mut h, j.id.as_bytes());
        part(&mut h, &serde_json::to_vec(&j.op).expect("serialisable"));
        h.update((j.inputs.len() as u64).to_le_bytes());
        for t in &j.inputs {
            match t {
                Tensor::Data { shape, data } => h.update(tensor_digest_f32(shape, data).0),
                Tensor::Object { digest, .. } => h.update(digest.0),
            }
        }
    }
    format!("b-{}", &hex::encode(h.finalize())[..16])
}

/// Restores the plan of an earlier run of `batch` into `state` and
/// re-publishes every bundle that is still current (the stream drops those
/// it already holds, by message id). Returns how many replicas it restored.
pub(super) async fn resume(
    nats: &Nats,
    batch: &str,
    redundancy: u32,
    state: &mut BTreeMap<String, JobState>,
) -> Result<usize> {
    // Resume: the durable plan of an earlier run of this batch. Each key is
    // one bundle; for a replica, the entry with the highest attempt wins.
    // Only this batch's keys are listed (from the bucket's stream info), so a
    // new batch costs no scan of older batches' plans.
    let kv_prefix = format!("$KV.{ASSIGN_BUCKET}.");
    let mut subjects = nats
        .assign
        .stream
        .clone()
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
        // stream drops it if it still holds it), holding only the entries
        // that are still current and whose worker has not answered: a
        // bundle already taken and acked is gone from the work queue, and
        // a restarted server has forgotten its id, so the id alone would
        // not keep finished work from being computed again.
        let answered = answered(nats, batch).await?;
        for (bundle_id, entries) in &bundles {
            let current: Vec<JobMessage> = entries
                .iter()
                .filter(|e| !answered.contains(&(e.job.clone(), e.assignment.worker.clone())))
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
                        batch,
                        &e.job,
                        e.replica,
                        redundancy,
                        &state[&e.job].spec,
                        &e.assignment,
                    )
                })
                .collect();
            if let Some(first) = current.first() {
                let worker = first.worker.clone();
                publish_bundle(nats, batch, bundle_id, &worker, current).await?;
            }
        }
    }

    Ok(restored)
}

/// Every (job, worker) of `batch` with a result in the results stream,
/// read once from the start (only a worker can publish on its own subject,
/// so a result there naming it is its own).
async fn answered(nats: &Nats, batch: &str) -> Result<std::collections::HashSet<(String, String)>> {
    let mut consumer = nats
        .results
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: results_filter(batch),
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("cannot read results")?;
    let mut pending = consumer.info().await?.num_pending;
    let mut messages = consumer.messages().await.context("cannot read results")?;
    let mut out = std::collections::HashSet::new();
    while pending > 0 {
        let Ok(Some(Ok(m))) =
            tokio::time::timeout(std::time::Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        pending -= 1;
        let sender = m.subject.rsplit('.').next().unwrap_or_default();
        for r in parse_results(&m.payload).unwrap_or_default() {
            if r.worker == sender {
                out.insert((r.job, r.worker));
            }
        }
    }
    Ok(out)
}

/// An input as it travels: inline, or an object this batch now references
/// (the reference is recorded before the object is stored or checked).
pub(super) async fn to_ref(nats: &Nats, batch: &str, t: &Tensor) -> Result<TensorRef> {
    Ok(match t {
        Tensor::Object { shape, digest } => {
            crate::store::add_ref(nats, digest, batch).await?;
            anyhow::ensure!(
                crate::nats::blob_exists(nats, digest).await,
                "object {digest} is not in the object store"
            );
            TensorRef::object(shape.clone(), *digest)
        }
        Tensor::Data { shape, data } if data.len() * 4 <= inline_limit(nats.max_payload()) => {
            TensorRef::inline(shape.clone(), data)
        }
        Tensor::Data { shape, data } => {
            let digest = tensor_digest_f32(shape, data);
            crate::store::add_ref(nats, &digest, batch).await?;
            crate::nats::put_blob(nats, &digest, data).await?;
            TensorRef::object(shape.clone(), digest)
        }
    })
}

pub(super) fn job_message(
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
pub(super) async fn send_bundle(nats: &Nats, batch: &str, replicas: Vec<NewReplica>) -> Result<()> {
    use sha3::Digest as _;
    let worker = replicas[0].assignment.worker.clone();
    let mut h = sha3::Sha3_256::new();
    // The assignment time makes the id new for every run: a batch submitted
    // again after it was purged must not collide with its earlier bundles in
    // the jobs stream's duplicate window.
    for r in &replicas {
        let a = &r.assignment;
        h.update(
            format!(
                "{}.{}.{}.{}.{}\n",
                r.job, r.replica, a.attempt, a.worker, a.assigned_ms
            )
            .as_bytes(),
        );
    }
    let bundle_id = hex::encode(&h.finalize()[..8]);
    let entries: Vec<PlanEntry> = replicas
        .iter()
        .map(|r| PlanEntry {
            job: r.job.clone(),
            replica: r.replica as u32,
            assignment: r.assignment.clone(),
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
        .map(|r| {
            job_message(
                batch,
                &r.job,
                r.replica as u32,
                r.redundancy,
                &r.spec,
                &r.assignment,
            )
        })
        .collect();
    publish_bundle(nats, batch, &bundle_id, &worker, jobs).await
}

pub(super) async fn publish_bundle(
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
            job_subject(worker, batch),
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
