//! Getting results onto the results stream: sized against the server's
//! `max_payload` (read from the connection, not assumed), split into as many
//! messages as needed, publish errors classified, and the job message acked
//! only once every part is stored.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind};

use super::cache::put_output;
use super::Ctx;
use crate::protocol::*;

/// How storing one message went.
enum Stored {
    Yes,
    /// Will not heal by retrying (payload too large, permission denied).
    Permanent(String),
    /// Still failing after the retries (the server may be restarting).
    Transient(String),
}

/// Publishes `payload` under `id`, retrying transient errors for 10 s.
async fn store(ctx: &Ctx, subject: &str, payload: bytes::Bytes, id: &str) -> Stored {
    let mut last = String::new();
    let mut id = id.to_string();
    for attempt in 0..40 {
        let publish = ctx.nats.js.send_publish(
            subject.to_string(),
            jetstream::message::PublishMessage::build()
                .payload(payload.clone())
                .message_id(id.as_str()),
        );
        let result = match publish.await {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match result {
            Ok(ack) if ack.duplicate && attempt == 0 => {
                // Message ids are predictable and the duplicate window is
                // the stream's: someone may have used this one first. Store
                // it again under an id nobody can guess (a second copy of
                // one's own result is harmless: one per worker counts).
                use rand::Rng as _;
                id = format!("{id}.r{:016x}", rand::rng().random::<u64>());
            }
            Ok(_) => return Stored::Yes,
            Err(e) => {
                let text = e.to_string();
                if e.kind() == PublishErrorKind::MaxPayloadExceeded
                    || text.to_ascii_lowercase().contains("permission")
                {
                    return Stored::Permanent(text);
                }
                if attempt % 8 == 0 {
                    tracing::warn!(attempt, "result not stored yet: {text}");
                }
                last = text;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
    Stored::Transient(last)
}

/// The result as an error of the system: it could not be published.
fn unpublishable(result: &mut ResultMessage, why: String) {
    tracing::error!(job = %result.job, "result cannot be published: {why}");
    result.outcome = Outcome::Error {
        code: ErrorCode::Unpublishable,
        message: why,
    };
}

fn encoded_len<T: serde::Serialize>(v: &T) -> usize {
    serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
}

/// Makes one result fit a message of `limit` bytes: first its inline outputs
/// move to the object store; if it is still too large, it becomes an
/// `unpublishable` error.
async fn fit(ctx: &Ctx, result: &mut ResultMessage, limit: usize) {
    if encoded_len(result) <= limit {
        return;
    }
    if let Outcome::Ok { outputs, .. } = &mut result.outcome {
        for t in outputs.iter_mut() {
            let Some(b64) = &t.inline else { continue };
            let Ok(data) = decode_f32(b64) else { continue };
            let digest = TensorRef::digest_of(&t.shape, &data);
            if let Err(super::handler::JobError(_, e)) =
                put_output(ctx, &result.batch, &digest, &data).await
            {
                tracing::warn!("cannot move an output to the object store: {e}");
                continue;
            }
            *t = TensorRef::object(t.shape.clone(), digest);
        }
    }
    let len = encoded_len(result);
    if len > limit {
        let why = format!(
            "the result is {len} bytes, over the {limit} bytes a message may carry on this server"
        );
        unpublishable(result, why);
    }
}

/// Splits results into groups whose bundles fit `limit` bytes, in order.
/// Bytes signing adds to a result once it is measured: the signature
/// (88 base64 characters) and its Merkle path (up to 8 siblings of 73
/// characters for the 64 results a bundle may hold, and the field names).
const SIGNING_BYTES: usize = 1024;

fn split(results: Vec<ResultMessage>, limit: usize) -> Vec<Vec<ResultMessage>> {
    const ENVELOPE: usize = 512;
    let mut parts: Vec<Vec<ResultMessage>> = Vec::new();
    let mut cur: Vec<ResultMessage> = Vec::new();
    let mut bytes = ENVELOPE;
    for r in results {
        let size = encoded_len(&r) + 1 + SIGNING_BYTES;
        if !cur.is_empty() && bytes + size > limit {
            parts.push(std::mem::take(&mut cur));
            bytes = ENVELOPE;
        }
        bytes += size;
        cur.push(r);
    }
    if !cur.is_empty() {
        parts.push(cur);
    }
    parts
}

/// Where a job message's answer goes, and under which message id.
pub(super) struct Answer {
    pub subject: String,
    pub batch: String,
    /// Message id of the answer (parts get `.p<i>` appended).
    pub id: String,
    /// Answer with a result bundle (the job came in a bundle) or a bare
    /// result message.
    pub bundled: bool,
}

/// Publishes the results of one job message, in as many messages as the
/// server's payload limit needs, then acks the job. A permanent publish error
/// turns that part's results into `unpublishable` errors (published instead,
/// so the coordinator learns at once); a transient one that outlasts the
/// retries leaves the job unacked, to come back. Returns whether the job
/// message was answered (and acked).
pub(super) async fn publish_then_ack(
    ctx: &Ctx,
    msg: &jetstream::Message,
    answer: Answer,
    mut results: Vec<ResultMessage>,
) -> bool {
    let limit = message_limit(ctx.nats.max_payload());
    for r in &mut results {
        fit(ctx, r, limit.saturating_sub(512 + SIGNING_BYTES)).await;
    }
    let parts = if answer.bundled {
        split(results, limit)
    } else {
        results.into_iter().map(|r| vec![r]).collect()
    };
    let many = parts.len() > 1;
    // One signature per message: the root of its results' tree.
    let sign = |part: &mut Vec<ResultMessage>| sign_results(&ctx.identity, part);
    for mut part in parts {
        // A part is named by what it holds, so a redelivered bundle that
        // splits differently publishes new parts rather than duplicates.
        let id = if many {
            use sha3::Digest as _;
            let mut h = sha3::Sha3_256::new();
            for r in &part {
                h.update(format!("{}.{}.{}\n", r.job, r.replica, r.attempt).as_bytes());
            }
            format!("{}.p{}", answer.id, hex::encode(&h.finalize()[..8]))
        } else {
            answer.id.clone()
        };
        for round in 0..2 {
            sign(&mut part);
            let payload = if answer.bundled {
                serde_json::to_vec(&ResultBundle {
                    protocol: PROTOCOL_VERSION,
                    batch: answer.batch.clone(),
                    worker: ctx.opts.name.clone(),
                    results: part.clone(),
                })
            } else {
                serde_json::to_vec(&part[0])
            }
            .expect("serialisable");
            match store(ctx, &answer.subject, payload.into(), &id).await {
                Stored::Yes => break,
                Stored::Transient(e) => {
                    tracing::error!(%id, "could not store the result ({e}); the job stays unacked and will come back");
                    return false;
                }
                Stored::Permanent(e) if round == 0 => {
                    for r in &mut part {
                        unpublishable(r, format!("the server refused the result: {e}"));
                    }
                }
                Stored::Permanent(e) => {
                    // Not even the error could be stored: the coordinator
                    // reassigns the replicas when they time out.
                    tracing::error!(%id, "the server refuses this worker's results ({e}); dropping them");
                }
            }
        }
    }
    // A plain ack: if it is lost, the job is redelivered and its answer,
    // published again under the same ids, is deduplicated.
    if let Err(e) = msg.ack().await {
        tracing::warn!("ack failed (job may be redelivered; results are deduplicated): {e}");
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(job: &str, bytes: usize) -> ResultMessage {
        ResultMessage {
            protocol: PROTOCOL_VERSION,
            batch: "b".into(),
            job: job.into(),
            replica: 0,
            attempt: 0,
            worker: "w".into(),
            backend: "cpu".into(),
            device: "d".into(),
            path: "p".into(),
            contract_version: 1,
            outcome: Outcome::Error {
                code: ErrorCode::Backend,
                message: "x".repeat(bytes),
            },
            timings: Timings::default(),
            job_digest: None,
            signature: String::new(),
            merkle: Default::default(),
        }
    }

    #[test]
    fn split_keeps_order_and_fits_every_part() {
        let key = crate::auth::Identity::generate();
        // Many small results (a deep Merkle path each) and some larger ones.
        let results: Vec<ResultMessage> = (0..50)
            .map(|i| result(&format!("j{i}"), if i < 30 { 10 } else { 3000 }))
            .collect();
        let limit = 20_000;
        let parts = split(results, limit);
        assert!(parts.len() > 1);
        let mut seen = Vec::new();
        for p in &parts {
            // Measured as sent: signed, with their paths.
            let mut signed = p.clone();
            sign_results(&key, &mut signed);
            let bundle = ResultBundle {
                protocol: PROTOCOL_VERSION,
                batch: "b".into(),
                worker: "w".into(),
                results: signed,
            };
            assert!(encoded_len(&bundle) <= limit, "{}", encoded_len(&bundle));
            seen.extend(p.iter().map(|r| r.job.clone()));
        }
        let want: Vec<String> = (0..50).map(|i| format!("j{i}")).collect();
        assert_eq!(seen, want);
        // One result larger than the limit still gets a part of its own.
        let parts = split(
            vec![result("a", 10), result("big", 50_000), result("c", 10)],
            limit,
        );
        assert_eq!(parts.len(), 3);
    }
}
