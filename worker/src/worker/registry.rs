//! The worker's registry record: written at start, at every heartbeat and
//! on each state change (draining, stopped).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use lockstep_kernels::{BackendInfo, CONTRACT_VERSION};

use super::Ctx;
use crate::protocol::*;

/// Writes this worker's registry record (a heartbeat).
pub(super) async fn publish_record(
    ctx: Arc<Ctx>,
    backends: Vec<BackendInfo>,
    started_ms: u64,
    state: WorkerState,
) {
    let rec = WorkerRecord {
        protocol: PROTOCOL_VERSION,
        id: ctx.opts.name.clone(),
        backends,
        contract_version: CONTRACT_VERSION,
        concurrency: ctx.opts.concurrency,
        started_ms,
        heartbeat_ms: now_ms(),
        state,
        jobs_done: ctx.done.load(Ordering::Relaxed),
        jobs_failed: ctx.failed.load(Ordering::Relaxed),
        limits: Some(WorkerLimits {
            max_elements: ctx.opts.max_elements as u64,
            max_macs: ctx.opts.max_macs,
        }),
        models: Some(WorkerModels {
            loaded: ctx.models.loaded(),
            on_disk: ctx.models.on_disk(),
            max_model_bytes: ctx.models.max_model_bytes(),
        }),
    };
    let value = serde_json::to_vec(&rec).expect("serialisable");
    if let Err(e) = ctx.nats.put_heartbeat(&rec.id, &value).await {
        tracing::warn!("heartbeat failed: {e}");
    }
}
