//! The wire protocol: every subject, stream, bucket and message (see
//! docs/PROTOCOL.md for the prose). Messages are JSON so a coordinator or
//! worker in any language can speak it.

use base64::Engine as _;
use lockstep_kernels::{tensor_digest_f32, BackendInfo, Digest, Matmul, Op};
use serde::{Deserialize, Serialize};

/// Version of these messages; bumped on any incompatible change.
/// 2: jobs carry `op`, `params` and a list of `inputs`; results a list of
/// `outputs`; digests are `"sha3-256:<hex>"` strings.
pub const PROTOCOL_VERSION: u32 = 2;

/// Stream of job replicas, one subject per worker and batch:
/// `lockstep.job.<worker>.<batch>` (a worker consumes `lockstep.job.<worker>.>`;
/// a finished batch's leftovers are purged by `lockstep.job.*.<batch>`).
pub const JOBS_STREAM: &str = "LOCKSTEP_JOBS";
pub const JOB_SUBJECT_PREFIX: &str = "lockstep.job";
/// Stream of results, one subject per batch: `lockstep.result.<batch>`.
pub const RESULTS_STREAM: &str = "LOCKSTEP_RESULTS";
pub const RESULT_SUBJECT_PREFIX: &str = "lockstep.result";
/// Where results go for messages whose batch cannot be read.
pub const UNROUTABLE_RESULT_SUBJECT: &str = "lockstep.result._unroutable";
/// KV: worker id → [`WorkerRecord`] (registry and heartbeats).
pub const WORKERS_BUCKET: &str = "lockstep_workers";
/// KV: `<batch>.<bundle>` → `[PlanEntry]` (the coordinator's durable plan; the
/// entry with the highest attempt wins for a replica).
pub const ASSIGN_BUCKET: &str = "lockstep_assign";
/// KV: `<worker>.<batch>.<job>` → [`FaultRecord`] (workers caught computing wrong bits).
pub const FAULTS_BUCKET: &str = "lockstep_faults";
/// Object store: tensors named by the hex of their contract digest.
pub const BLOBS_BUCKET: &str = "lockstep_blobs";
/// KV: `<digest hex>.<batch>` → empty: a batch still uses that blob. A
/// finished batch deletes its references, and a blob nobody references.
pub const BLOB_REFS_BUCKET: &str = "lockstep_blob_refs";

/// Where a replica of `batch` for `worker` is published.
pub fn job_subject(worker: &str, batch: &str) -> String {
    format!("{JOB_SUBJECT_PREFIX}.{worker}.{batch}")
}

/// What a worker's consumer takes: every batch's replicas for it.
pub fn worker_filter(worker: &str) -> String {
    format!("{JOB_SUBJECT_PREFIX}.{worker}.>")
}

pub fn result_subject(batch: &str) -> String {
    format!("{RESULT_SUBJECT_PREFIX}.{batch}")
}

/// Worker names, batch ids and job ids become subject tokens and KV keys:
/// 1–64 of `[A-Za-z0-9_-]`.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Quotes a value taken from input for an error message: in backticks, at
/// most 48 characters (then `…` and the full length), control characters
/// escaped. Error lines stay short whatever a batch or a message holds.
pub fn quote(s: &str) -> String {
    const MAX: usize = 48;
    let n = s.chars().count();
    let shown: String = s.chars().take(MAX).flat_map(char::escape_debug).collect();
    if n > MAX {
        format!("`{shown}…` ({n} characters)")
    } else {
        format!("`{shown}`")
    }
}

/// A message from a parser or library, cut to `max` characters: they may
/// quote their input at any length.
pub fn shorten(text: &str, max: usize) -> String {
    if text.chars().count() > max {
        format!("{}…", text.chars().take(max).collect::<String>())
    } else {
        text.to_string()
    }
}

/// A message id from parts taken from messages: the parts joined by `.`
/// when each is a valid token, else a hash of them (a header must never
/// carry what a sender put in a field).
pub fn message_id(parts: &[&str]) -> String {
    if parts.iter().all(|p| valid_token(p)) {
        parts.join(".")
    } else {
        use sha3::Digest as _;
        let mut h = sha3::Sha3_256::new();
        for p in parts {
            h.update((p.len() as u64).to_le_bytes());
            h.update(p.as_bytes());
        }
        format!("h-{}", hex::encode(&h.finalize()[..16]))
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// An f32 tensor in a message: inline (base64 of little-endian f32) for small
/// ones, or an object in [`BLOBS_BUCKET`] named by its contract digest.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TensorRef {
    pub shape: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub object: Option<Digest>,
}

/// Tensors up to this many bytes travel inline; larger ones as objects.
/// On a server with a small `max_payload` the limit is lower: see
/// [`inline_limit`].
pub const INLINE_MAX_BYTES: usize = 64 * 1024;

/// Bytes of a message kept free for headers (the message id) and the
/// envelope around what was measured.
pub const PAYLOAD_HEADROOM: usize = 4096;

/// The largest tensor (raw bytes) that travels inline on a connection whose
/// server accepts messages of `max_payload` bytes: [`INLINE_MAX_BYTES`], or
/// an eighth of the payload limit if that is less, so a message holding a
/// few inline tensors (base64 adds a third) still fits.
pub fn inline_limit(max_payload: usize) -> usize {
    INLINE_MAX_BYTES.min(max_payload / 8)
}

/// The most bytes one message may carry on a connection whose server accepts
/// `max_payload`, leaving [`PAYLOAD_HEADROOM`].
pub fn message_limit(max_payload: usize) -> usize {
    max_payload.saturating_sub(PAYLOAD_HEADROOM).max(1024)
}

pub fn encode_f32(data: &[f32]) -> String {
    base64::engine::general_purpose::STANDARD.encode(f32_bytes(data))
}

pub fn decode_f32(b64: &str) -> Result<Vec<f32>, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|e| format!("inline tensor is not valid base64: {e}"))?;
    if bytes.len() % 4 != 0 {
        return Err(format!(
            "inline tensor has {} bytes, not a multiple of 4",
            bytes.len()
        ));
    }
    Ok(f32_from_le_bytes(&bytes))
}

/// Little-endian f32 bytes to values (bytewise, so unaligned input is fine);
/// a trailing partial value is ignored (callers check lengths).
pub fn f32_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

pub fn f32_bytes(data: &[f32]) -> Vec<u8> {
    data.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Decodes an object's bytes and checks them against the name they were
/// stored under: the right length for `shape`, and the contract digest.
pub fn decode_blob(shape: &[usize], digest: &Digest, bytes: &[u8]) -> Result<Vec<f32>, String> {
    let n = lockstep_kernels::contract::elements(shape)
        .ok()
        .and_then(|n| n.checked_mul(4));
    if Some(bytes.len()) != n {
        return Err(format!(
            "object {digest} has {} bytes, which shape {} does not fit",
            bytes.len(),
            lockstep_kernels::contract::short_shape(shape)
        ));
    }
    let data = f32_from_le_bytes(bytes);
    let actual = tensor_digest_f32(shape, &data);
    if actual != *digest {
        return Err(format!("object {digest} hashes to {actual}: rejected"));
    }
    Ok(data)
}

impl TensorRef {
    pub fn inline(shape: Vec<usize>, data: &[f32]) -> Self {
        Self {
            shape,
            inline: Some(encode_f32(data)),
            object: None,
        }
    }

    pub fn object(shape: Vec<usize>, digest: Digest) -> Self {
        Self {
            shape,
            inline: None,
            object: Some(digest),
        }
    }

    /// Elements of the tensor, `None` when the count overflows.
    pub fn elements(&self) -> Option<usize> {
        lockstep_kernels::contract::elements(&self.shape).ok()
    }

    pub fn digest_of(shape: &[usize], data: &[f32]) -> Digest {
        tensor_digest_f32(shape, data)
    }
}

/// What a job computes: an op with its parameters (`"op"`, `"params"`, see
/// [`Op`]) and its inputs, in the op's order.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    #[serde(flatten)]
    pub op: Op,
    pub inputs: Vec<TensorRef>,
}

impl JobSpec {
    /// `c = a·b` under the contract: `a` [M,K], `b` [K,N].
    pub fn matmul(a: TensorRef, b: TensorRef) -> Self {
        Self {
            op: Op::Matmul(Matmul {}),
            inputs: vec![a, b],
        }
    }

    /// The inputs' shapes, for [`Op::plan`].
    pub fn shapes(&self) -> Vec<&[usize]> {
        self.inputs.iter().map(|t| t.shape.as_slice()).collect()
    }

    /// Bytes the inputs take inline in a message (objects count as small).
    pub fn inline_bytes(&self) -> usize {
        self.inputs
            .iter()
            .map(|t| t.inline.as_ref().map_or(128, |s| s.len()))
            .sum()
    }
}

/// One replica of a job, sent to one worker on `lockstep.job.<worker>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobMessage {
    pub protocol: u32,
    pub batch: String,
    pub job: String,
    /// 0..redundancy: which replica this is.
    pub replica: u32,
    /// Increases when the coordinator reassigns the replica (dead worker,
    /// timeout); results of older attempts still count if they arrive.
    pub attempt: u32,
    pub redundancy: u32,
    pub contract_version: u32,
    /// The worker this replica is for (also in the subject).
    pub worker: String,
    #[serde(flatten)]
    pub spec: JobSpec,
}

/// Several replicas for one worker in one message (same batch), so that a
/// batch of small jobs costs a few messages instead of a few per job.
/// Workers also accept a bare [`JobMessage`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobBundle {
    pub protocol: u32,
    pub batch: String,
    /// Unique within the batch; the message id is `<batch>.<id>`.
    pub id: String,
    pub worker: String,
    pub jobs: Vec<JobMessage>,
}

/// The results of one [`JobBundle`], published as one message.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultBundle {
    pub protocol: u32,
    pub batch: String,
    pub worker: String,
    pub results: Vec<ResultMessage>,
}

/// One replica's entry in the dispatch plan (KV `lockstep_assign`, key
/// `<batch>.<bundle id>` → the entries of that bundle).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PlanEntry {
    pub job: String,
    pub replica: u32,
    pub assignment: Assignment,
}

/// Why a job failed on a worker. `Bad*` codes are the job's fault and will
/// fail on every worker; the others are the worker's or the network's.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a valid job message (JSON, fields, protocol version).
    BadMessage,
    /// An op this worker does not know.
    UnknownOp,
    /// Shapes inconsistent, or data not matching its shape.
    BadShape,
    /// Over this worker's configured limits.
    TooLarge,
    /// A contract version this worker does not implement.
    WrongContract,
    /// An input object is missing from the object store.
    MissingBlob,
    /// An input object's bytes do not hash to its name.
    TamperedBlob,
    /// The backend failed (device error, out of memory...).
    Backend,
    /// Delivered too many times without completing (the worker kept dying).
    Redelivered,
    /// The result could not be stored (e.g. it exceeds the server's payload
    /// limit even after splitting); a failure of the system, not the worker.
    Unpublishable,
}

impl ErrorCode {
    /// A failure of the system rather than of the job or the worker
    /// (redelivery exhausted, a message the server will not take): it is
    /// retried, on any worker, up to a limit, and never counted against the
    /// worker that reported it.
    pub fn is_system_fault(self) -> bool {
        matches!(self, ErrorCode::Redelivered | ErrorCode::Unpublishable)
    }

    /// Would any honest worker fail the same way?
    pub fn is_job_fault(self) -> bool {
        matches!(
            self,
            ErrorCode::BadMessage
                | ErrorCode::UnknownOp
                | ErrorCode::BadShape
                | ErrorCode::TooLarge
                | ErrorCode::WrongContract
                | ErrorCode::MissingBlob
                | ErrorCode::TamperedBlob
        )
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    Ok {
        /// [`lockstep_kernels::outputs_digest`] of the outputs: the value
        /// replicas are compared by (for one output, its tensor digest).
        digest: Digest,
        /// The op's outputs, in order, with their shapes.
        outputs: Vec<TensorRef>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// Fetching and checking inputs.
    pub fetch_ms: f64,
    pub compute_ms: f64,
    /// From receipt of the message to publishing the result.
    pub total_ms: f64,
}

/// A worker's answer for one replica, on `lockstep.result.<batch>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ResultMessage {
    pub protocol: u32,
    /// Empty when the job message could not be read.
    pub batch: String,
    pub job: String,
    pub replica: u32,
    pub attempt: u32,
    pub worker: String,
    pub backend: String,
    pub device: String,
    pub path: String,
    pub contract_version: u32,
    pub outcome: Outcome,
    pub timings: Timings,
}

/// A worker's entry in the registry, refreshed at every heartbeat.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub protocol: u32,
    pub id: String,
    /// Backends that passed the self-test at start, with their findings.
    pub backends: Vec<BackendInfo>,
    pub contract_version: u32,
    pub concurrency: usize,
    pub started_ms: u64,
    pub heartbeat_ms: u64,
    pub state: WorkerState,
    pub jobs_done: u64,
    pub jobs_failed: u64,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Up,
    /// Shutting down: finishing in-flight jobs, taking no new ones.
    Draining,
    Stopped,
}

/// The coordinator's durable record of who computes a replica.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Assignment {
    pub worker: String,
    pub attempt: u32,
    pub assigned_ms: u64,
    /// Workers this replica was taken away from (dead, timed out).
    #[serde(default)]
    pub abandoned: Vec<String>,
}

/// Evidence that a worker returned wrong bits.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    pub worker: String,
    pub batch: String,
    pub job: String,
    pub reported: Digest,
    pub correct: Digest,
    /// How the correct digest was established.
    pub resolved_by: String,
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_op_name_is_a_wire_name() {
        for name in Op::NAMES {
            let r = serde_json::from_value::<Op>(serde_json::json!({"op": name, "params": {}}));
            match r {
                Ok(op) => assert_eq!(op.name(), *name),
                // An op whose params are required: known, but `{}` is not enough.
                Err(e) => assert!(!e.to_string().contains("unknown variant"), "{name}: {e}"),
            }
        }
        assert!(
            serde_json::from_value::<Op>(serde_json::json!({"op": "nope", "params": {}})).is_err()
        );
    }

    #[test]
    fn quoting_keeps_messages_short() {
        assert_eq!(quote("job-1"), "`job-1`");
        let q = quote(&"x".repeat(100_000));
        assert!(q.len() < 80 && q.contains("100000 characters"), "{q}");
        assert_eq!(quote("a\nb"), "`a\\nb`");
    }

    #[test]
    fn jobs_carry_op_params_and_inputs_and_digests_are_strings() {
        let a = TensorRef::inline(vec![1, 1], &[2.0]);
        let d = tensor_digest_f32(&[1, 1], &[2.0]);
        let b = TensorRef::object(vec![1, 1], d);
        let spec = JobSpec::matmul(a, b);
        let v = serde_json::to_value(&spec).unwrap();
        assert_eq!(v["op"], "matmul");
        assert_eq!(v["params"], serde_json::json!({}));
        assert_eq!(v["inputs"].as_array().unwrap().len(), 2);
        assert_eq!(v["inputs"][1]["object"], d.to_string());
        assert!(d.to_string().starts_with("sha3-256:") && d.to_string().len() == 73);
        let back: JobSpec = serde_json::from_value(v).unwrap();
        assert_eq!(back, spec);
        // Version 1's array-of-integers digests are rejected, not misread.
        let old = serde_json::json!({"shape": [1, 1], "object": d.0.to_vec()});
        assert!(serde_json::from_value::<TensorRef>(old).is_err());
        let outcome = Outcome::Ok {
            digest: d,
            outputs: vec![],
        };
        let v = serde_json::to_value(&outcome).unwrap();
        assert_eq!(v["digest"], d.to_string());
    }
}
