//! Scheduling: every replica without a live, timely worker gets one that
//! holds no other replica of the job and whose operator runs none of the
//! job's other replicas (least loaded first, ties at random), and new
//! assignments travel to each worker in bundles.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use anyhow::Result;
use futures::StreamExt;
use rand::seq::IndexedRandom;

use super::plan::{send_bundle, NewReplica};
use super::{JobState, SubmitOptions};
use crate::nats::{LiveWorker, Nats};
use crate::protocol::*;

/// A replica of a job: (job id, replica index).
type ReplicaKey = (String, usize);

/// Most replicas in one bundle. Its bytes are bounded too: both the job
/// bundle and the result bundle a worker will answer with must fit the
/// server's `max_payload` (see [`result_bytes`]).
const BUNDLE_MAX_JOBS: usize = 64;

/// How far a worker is from running a generate job at once, as replicas:
/// 0 with the model loaded, 1 with its file on disk, 2 without it (its
/// record says which); 0 for other ops.
fn coldness(w: &LiveWorker, spec: &JobSpec) -> usize {
    let lockstep_kernels::Op::Generate(g) = &spec.op else {
        return 0;
    };
    match &w.record.models {
        Some(m) if m.loaded.contains(&g.model) => 0,
        Some(m) if m.on_disk.contains(&g.model) => 1,
        _ => 2,
    }
}

/// Bytes a replica's job message takes in a bundle (inline inputs as base64).
fn job_bytes(spec: &JobSpec) -> usize {
    512 + spec.inline_bytes()
}

/// Bytes a replica's result is expected to take in a result bundle: outputs
/// up to the inline limit travel as base64, larger ones as object names.
fn result_bytes(shapes: &[Vec<usize>], inline: usize) -> usize {
    600 + shapes
        .iter()
        .map(|s| {
            let bytes = s.iter().product::<usize>().saturating_mul(4);
            if bytes <= inline {
                bytes.div_ceil(3) * 4 + 64
            } else {
                200
            }
        })
        .sum::<usize>()
}

/// What the schedule knows of the workers.
#[derive(Clone, Copy)]
pub(super) struct Workers<'a> {
    /// Live, enrolled, active workers.
    pub live: &'a [LiveWorker],
    pub enrolled: &'a BTreeMap<String, Enrollment>,
    /// Sizes each worker refused as too large in this batch.
    pub refused: &'a HashMap<String, Vec<JobSize>>,
    /// When each worker last answered anything of this batch (ms).
    pub heard: &'a HashMap<String, u64>,
}

/// The slowest rate a worker is allowed before it counts as stalled:
/// multiply-adds per second (the exact WGSL path on lavapipe does better).
pub const STALL_MACS_PER_S: u128 = 10_000_000;

/// Whether worker `w` takes a job of this size: within the limits its
/// record advertises, and no larger than a job it refused in this batch.
fn takes(w: &LiveWorker, size: &JobSize, refused: Option<&Vec<JobSize>>) -> bool {
    w.record.limits.is_none_or(|l| l.admit(size))
        && refused.is_none_or(|r| {
            !r.iter()
                .any(|s| s.work <= size.work && s.max_elements <= size.max_elements)
        })
}

/// Gives every unassigned or abandoned replica a live worker that holds no
/// other replica of the job; returns how many were assigned.
pub(super) async fn schedule(
    nats: &Nats,
    batch: &str,
    state: &mut BTreeMap<String, JobState>,
    workers: Workers<'_>,
    opts: &SubmitOptions,
) -> Result<usize> {
    let Workers {
        live,
        enrolled,
        refused,
        heard,
    } = workers;
    let live_ids: HashSet<&str> = live.iter().map(|w| w.id.as_str()).collect();
    // Load: outstanding replicas (and their multiply-adds) per worker in
    // this batch.
    let mut load: HashMap<String, usize> = HashMap::new();
    // (work, when its oldest unanswered replica was assigned)
    let mut held: HashMap<&str, (u64, u64)> = HashMap::new();
    for js in state.values().filter(|j| j.decided.is_none()) {
        for a in js.assignments.iter().flatten() {
            if !js.results.contains_key(&a.worker) {
                *load.entry(a.worker.clone()).or_default() += 1;
                let h = held.entry(a.worker.as_str()).or_insert((0, u64::MAX));
                h.0 += js.size.work;
                h.1 = h.1.min(a.assigned_ms);
            }
        }
    }
    let now = now_ms();
    // A worker stalls when it has held a replica, and answered nothing of
    // this batch, for longer than it could take to compute all it holds.
    let stalled: HashSet<String> = held
        .iter()
        .filter(|(w, (work, oldest))| {
            let allowance =
                opts.stall_timeout
                    .as_millis()
                    .max(u128::from(*work) * 1000 / STALL_MACS_PER_S) as u64;
            let heard_ago = now.saturating_sub(heard.get(**w).copied().unwrap_or(0));
            heard_ago > allowance && now.saturating_sub(*oldest) > allowance
        })
        .map(|(w, _)| w.to_string())
        .collect();
    for w in &stalled {
        tracing::warn!(worker = %w, "holds replicas and has answered nothing for too long; reassigning them");
    }
    let limit = message_limit(nats.max_payload());
    let inline = inline_limit(nats.max_payload());
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
                    let late = now.saturating_sub(a.assigned_ms)
                        > opts.job_timeout.as_millis() as u64
                        || stalled.contains(&a.worker);
                    // Taken off this job (a quarantined worker's results
                    // no longer count).
                    let revoked = js.excluded.contains(&a.worker);
                    !answered_ok
                        && (errored || dead || late || revoked || js.retry.contains(&replica))
                }
            };
            if !needs {
                continue;
            }
            // A replica the system failed (not its worker) may go back to
            // the same worker; any other reassignment takes it off that worker.
            let system_retry = js.retry.contains(&replica);
            // Candidates: live, never excluded for this job, holding no other
            // replica of it (nor this one, unless a system retry), no result yet.
            let holding: HashSet<&str> = js
                .assignments
                .iter()
                .enumerate()
                .filter(|(i, _)| !(system_retry && *i == replica))
                .filter_map(|(_, a)| a.as_ref())
                .map(|a| a.worker.as_str())
                .collect();
            // Replicas of one job go to distinct operators: one operator's
            // sybils cannot verify each other.
            // (Also those it was taken away from: they may still answer.)
            // The worker this replica is taken from is not among them: it
            // may still answer, but two of one operator never count as two
            // (`verdict::evaluate`), and with two operators its own
            // operator's other workers may be the only ones left.
            let from = js.assignments[replica].as_ref().map(|a| a.worker.as_str());
            let operators: HashSet<&str> = holding
                .iter()
                .copied()
                .filter(|w| Some(*w) != from)
                .chain(
                    js.results
                        .iter()
                        .filter(|(_, r)| matches!(r.outcome, Outcome::Ok { .. }))
                        .map(|(w, _)| w.as_str()),
                )
                .chain(
                    js.assignments
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i != replica)
                        .filter_map(|(_, a)| a.as_ref())
                        .flat_map(|a| a.abandoned.iter().map(String::as_str)),
                )
                .filter_map(|w| enrolled.get(w).map(|e| e.operator.as_str()))
                .collect();
            let mut candidates: Vec<&LiveWorker> = live
                .iter()
                .filter(|w| {
                    !js.excluded.contains(&w.id)
                        && !holding.contains(w.id.as_str())
                        && !js.results.contains_key(&w.id)
                        && !operators.contains(w.operator.as_str())
                        && takes(w, &js.size, refused.get(&w.id))
                })
                .collect();
            // A system retry goes to another worker when there is one (the
            // previous one is not excluded: it is not at fault).
            if system_retry {
                let previous = js.assignments[replica].as_ref().map(|a| a.worker.clone());
                if candidates.iter().any(|w| Some(&w.id) != previous.as_ref()) {
                    candidates.retain(|w| Some(&w.id) != previous.as_ref());
                }
            }
            // For a generate job, a worker that must first fetch or load
            // the model counts as if it held that many replicas more.
            let cost =
                |w: &LiveWorker| load.get(&w.id).copied().unwrap_or(0) + coldness(w, &js.spec);
            let min_load = candidates.iter().map(|w| cost(w)).min();
            let least: Vec<&&LiveWorker> = candidates
                .iter()
                .filter(|w| Some(cost(w)) == min_load)
                .collect();
            let Some(w) = least.choose(&mut rng) else {
                continue;
            };
            let previous = js.assignments[replica].take();
            let mut abandoned = previous
                .as_ref()
                .map(|a| a.abandoned.clone())
                .unwrap_or_default();
            if let Some(p) = previous.as_ref().filter(|_| !system_retry) {
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
            js.retry.remove(&replica);
            to_send.push(NewReplica {
                job: id.clone(),
                replica,
                redundancy: js.assignments.len() as u32,
                spec: js.spec.clone(),
                assignment: a.clone(),
                result_bytes: result_bytes(&js.shapes, inline),
            });
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
    for nr in to_send {
        by_worker
            .entry(nr.assignment.worker.clone())
            .or_default()
            .push(nr);
    }
    let mut sends: Vec<Vec<NewReplica>> = Vec::new();
    for (_, replicas) in by_worker {
        let mut cur: Vec<NewReplica> = Vec::new();
        let (mut jobs, mut results) = (0, 0);
        for nr in replicas {
            let (j, r) = (job_bytes(&nr.spec), nr.result_bytes);
            if !cur.is_empty()
                && (cur.len() >= BUNDLE_MAX_JOBS || jobs + j > limit || results + r > limit)
            {
                sends.push(std::mem::take(&mut cur));
                (jobs, results) = (0, 0);
            }
            (jobs, results) = (jobs + j, results + r);
            cur.push(nr);
        }
        if !cur.is_empty() {
            sends.push(cur);
        }
    }
    let outcomes: Vec<(Vec<ReplicaKey>, Result<()>)> = futures::stream::iter(sends)
        .map(|bundle| async move {
            let keys: Vec<ReplicaKey> = bundle.iter().map(|b| (b.job.clone(), b.replica)).collect();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_holding_the_model_is_warmer() {
        let model = lockstep_kernels::Digest([3; 32]);
        let spec = JobSpec {
            op: lockstep_kernels::Op::Generate(lockstep_kernels::contract::Generate::greedy(
                model, 4,
            )),
            inputs: vec![TensorRef::inline(vec![1], &[1.0])],
        };
        let worker = |models: Option<WorkerModels>| LiveWorker {
            id: "w".into(),
            operator: "o".into(),
            record: WorkerRecord {
                protocol: PROTOCOL_VERSION,
                id: "w".into(),
                backends: vec![],
                contract_version: lockstep_kernels::CONTRACT_VERSION,
                concurrency: 1,
                started_ms: 0,
                heartbeat_ms: 0,
                state: WorkerState::Up,
                jobs_done: 0,
                jobs_failed: 0,
                limits: None,
                models,
            },
        };
        let held = |loaded: Vec<_>, on_disk: Vec<_>| {
            Some(WorkerModels {
                loaded,
                on_disk,
                max_model_bytes: 1 << 30,
            })
        };
        assert_eq!(coldness(&worker(held(vec![model], vec![model])), &spec), 0);
        assert_eq!(coldness(&worker(held(vec![], vec![model])), &spec), 1);
        assert_eq!(coldness(&worker(held(vec![], vec![])), &spec), 2);
        assert_eq!(coldness(&worker(None), &spec), 2);
        let matmul = JobSpec::matmul(
            TensorRef::inline(vec![1, 1], &[1.0]),
            TensorRef::inline(vec![1, 1], &[1.0]),
        );
        assert_eq!(coldness(&worker(None), &matmul), 0);
    }
}
