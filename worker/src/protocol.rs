//! The wire protocol: every subject, stream, bucket and message (see
//! docs/PROTOCOL.md for the prose). Messages are JSON so a coordinator or
//! worker in any language can speak it.

use base64::Engine as _;
use lockstep_kernels::{tensor_digest_f32, BackendInfo, Digest, Matmul, Op};
use serde::{Deserialize, Serialize};

/// Version of these messages; bumped on any incompatible change.
/// 2: jobs carry `op`, `params` and a list of `inputs`; results a list of
/// `outputs`; digests are `"sha3-256:<hex>"` strings.
/// 3: results are signed by their worker and published under its name
/// (`lockstep.result.<batch>.<worker>`); large outputs go to the outputs
/// stream under the worker's name; workers are enrolled.
pub const PROTOCOL_VERSION: u32 = 3;

/// Stream of job replicas, one subject per worker and batch:
/// `lockstep.job.<worker>.<batch>` (a worker consumes `lockstep.job.<worker>.>`;
/// a finished batch's leftovers are purged by `lockstep.job.*.<batch>`).
pub const JOBS_STREAM: &str = "LOCKSTEP_JOBS";
pub const JOB_SUBJECT_PREFIX: &str = "lockstep.job";
/// Stream of every worker's results, one subject per batch and worker:
/// `lockstep.result.<batch>.<worker>`. It has no subjects of its own: it
/// sources each worker's own results stream ([`worker_results_stream`]),
/// where the worker's publishes land within its quota.
pub const RESULTS_STREAM: &str = "LOCKSTEP_RESULTS";
pub const RESULT_SUBJECT_PREFIX: &str = "lockstep.result";
/// The batch token of results for messages whose batch cannot be read.
pub const UNROUTABLE_BATCH: &str = "_unroutable";
/// The stream of outputs of versions before per-worker quotas (one shared
/// stream, oldest dropped first): removed when a coordinator connects.
pub const OLD_OUTPUTS_STREAM: &str = "LOCKSTEP_OUTPUTS";
pub const OUTPUT_SUBJECT_PREFIX: &str = "lockstep.out";

/// A worker's own results stream (subjects `lockstep.result.*.<worker>`),
/// bounded by its results quota: a flood fills only its own share.
pub fn worker_results_stream(worker: &str) -> String {
    format!("LOCKSTEP_RESULTS_{worker}")
}

/// A worker's own outputs stream: outputs too large for a result message,
/// `lockstep.out.<worker>.<batch>.<digest hex>.<chunk>` (one message per
/// subject; the reader re-hashes), bounded by its outputs quota.
pub fn worker_outputs_stream(worker: &str) -> String {
    format!("LOCKSTEP_OUTPUTS_{worker}")
}
/// KV: worker id → [`WorkerRecord`] (heartbeats; each worker writes only
/// its own key).
pub const WORKERS_BUCKET: &str = "lockstep_workers";
/// KV: worker id → [`Enrollment`] (public key, operator, quarantine),
/// written by coordinators and `lockstep enroll` only.
pub const ENROLLED_BUCKET: &str = "lockstep_enrolled";
/// KV: `<batch>.<bundle>` → `[PlanEntry]` (the coordinator's durable plan; the
/// entry with the highest attempt wins for a replica).
pub const ASSIGN_BUCKET: &str = "lockstep_assign";
/// KV: `<worker>.<batch>.<job>` → [`FaultRecord`] (workers caught computing wrong bits).
pub const FAULTS_BUCKET: &str = "lockstep_faults";
/// Object store: tensors named by the hex of their contract digest.
pub const BLOBS_BUCKET: &str = "lockstep_blobs";
/// Object store: model files (GGUF, llama2.c) named by the hex of their
/// model digest ([`lockstep_kernels::model::Model::digest`]); written by
/// coordinators and admins only (`lockstep model push`), read by workers
/// through direct gets. A worker loads a file and checks that it hashes to
/// the name before computing with it.
pub const MODELS_BUCKET: &str = "lockstep_models";
/// KV: `<digest hex>.<batch>` → empty: a batch still uses that blob. A
/// finished batch deletes its references, and a blob nobody references.
pub const BLOB_REFS_BUCKET: &str = "lockstep_blob_refs";

/// Where a worker's account sees the JetStream API of the account that
/// holds the streams (its own account has no JetStream): `JSL.API.<x>` is
/// imported from `$JS.API.<x>`, for the few `<x>` a worker may use.
pub const WORKER_API_PREFIX: &str = "JSL.API";

/// Where a replica of `batch` for `worker` is published.
pub fn job_subject(worker: &str, batch: &str) -> String {
    format!("{JOB_SUBJECT_PREFIX}.{worker}.{batch}")
}

/// What a worker's consumer takes: every batch's replicas for it.
pub fn worker_filter(worker: &str) -> String {
    format!("{JOB_SUBJECT_PREFIX}.{worker}.>")
}

/// Where `worker` publishes its results for `batch`.
pub fn result_subject(batch: &str, worker: &str) -> String {
    format!("{RESULT_SUBJECT_PREFIX}.{batch}.{worker}")
}

/// Every worker's results for `batch`.
pub fn results_filter(batch: &str) -> String {
    format!("{RESULT_SUBJECT_PREFIX}.{batch}.*")
}

/// The durable consumer a worker pulls its replicas from.
pub fn worker_consumer(worker: &str) -> String {
    format!("w-{worker}")
}

/// Chunk `chunk` of an output `worker` stored for `batch`.
pub fn output_subject(worker: &str, batch: &str, digest: &Digest, chunk: usize) -> String {
    format!(
        "{OUTPUT_SUBJECT_PREFIX}.{worker}.{batch}.{}.{chunk}",
        digest.to_hex()
    )
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

/// A JSON value with every object's keys in sorted order.
pub fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut entries: Vec<(String, serde_json::Value)> = m.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        other => other,
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

/// The smallest server payload limit (`max_payload`) lockstep works with:
/// a signed result with its Merkle path and a job message with its
/// headers fit in what is left after [`PAYLOAD_HEADROOM`], with room to
/// spare. Below it, `lockstep deploy init` refuses the setting and every
/// lockstep process stops at connect with one line that names it.
pub const MIN_MAX_PAYLOAD: usize = 16 << 10;

/// A server whose payload limit is below [`MIN_MAX_PAYLOAD`].
#[derive(Debug, thiserror::Error)]
#[error("the server's max_payload is {0} bytes; lockstep needs at least {MIN_MAX_PAYLOAD} (raise max_payload in the server's configuration, or give `lockstep deploy init --max-payload` a larger value)")]
pub struct PayloadTooSmall(pub usize);

/// The one-line error for a server whose payload limit is too small.
pub fn check_max_payload(max_payload: usize) -> Result<(), PayloadTooSmall> {
    if max_payload < MIN_MAX_PAYLOAD {
        return Err(PayloadTooSmall(max_payload));
    }
    Ok(())
}

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

    /// The contract digest of the tensor's content: of its inline data (which
    /// must fit its shape), else its object's name. `None` when the inline
    /// data is not valid or it has neither.
    pub fn content_digest(&self) -> Option<Digest> {
        match (&self.inline, &self.object) {
            (Some(b64), _) => {
                let data = decode_f32(b64).ok()?;
                (Some(data.len()) == self.elements()).then(|| tensor_digest_f32(&self.shape, &data))
            }
            (None, Some(d)) => Some(*d),
            (None, None) => None,
        }
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

    /// What the job asks of a worker (`None` if its op refuses the shapes):
    /// its largest input or output tensor and its multiply-adds.
    pub fn size(&self) -> Option<JobSize> {
        let plan = self.op.plan(&self.shapes()).ok()?;
        let elements = |s: &[usize]| s.iter().map(|&d| d as u64).product::<u64>();
        let max_elements = self
            .inputs
            .iter()
            .map(|t| elements(&t.shape))
            .chain(plan.output_shapes().iter().map(|s| elements(s)))
            .max()
            .unwrap_or(0);
        Some(JobSize {
            max_elements,
            work: plan.work(),
        })
    }

    /// What a job is, as one digest: SHA3-256 of the JSON
    /// `{"op":…,"params":…,"inputs":[{"shape":[…],"digest":"sha3-256:…"}]}`
    /// (params with sorted keys; inline inputs by the digest of their data,
    /// objects by their name). `None` if an inline input is not valid base64.
    pub fn job_digest(&self) -> Option<Digest> {
        let mut inputs = Vec::with_capacity(self.inputs.len());
        for t in &self.inputs {
            let digest = t.content_digest()?;
            inputs.push(serde_json::json!({"shape": t.shape, "digest": digest.to_string()}));
        }
        let op = serde_json::to_value(&self.op).ok()?;
        let canonical = serde_json::json!({
            "op": op.get("op")?,
            "params": sorted(op.get("params").cloned().unwrap_or(serde_json::Value::Null)),
            "inputs": inputs,
        });
        use sha3::Digest as _;
        let bytes = serde_json::to_vec(&canonical).ok()?;
        Some(Digest(sha3::Sha3_256::digest(&bytes).into()))
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
    /// Set by a coordinator, never sent by a worker: the result was
    /// rejected (signature, binding to the assignment, output shapes, or a
    /// job-level error the coordinator found false). The worker's fault.
    Rejected,
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
    /// [`JobSpec::job_digest`] of the job the worker computed (absent when
    /// the message could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_digest: Option<Digest>,
    /// The worker's ed25519 signature (base64) of the root of the results it
    /// signed at once ([`sign_results`]: one signature per message);
    /// coordinators drop results whose signature does not verify against the
    /// enrolled key of the assigned worker.
    #[serde(default)]
    pub signature: String,
    /// Where this result's statement sits in that tree (absent: alone).
    #[serde(default, skip_serializing_if = "MerklePath::is_alone")]
    pub merkle: MerklePath,
}

/// A result's place among the results signed together: its index, their
/// count, and the sibling hashes from the leaf up (a last node without a
/// sibling at a level moves up unchanged).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MerklePath {
    pub index: u32,
    pub count: u32,
    pub siblings: Vec<Digest>,
}

impl MerklePath {
    pub fn is_alone(&self) -> bool {
        self.count <= 1 && self.siblings.is_empty()
    }
}

fn tagged_hash(tag: &[u8], parts: &[&[u8]]) -> Digest {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    h.update(tag);
    for p in parts {
        h.update(p);
    }
    Digest(h.finalize().into())
}

/// The leaf of a result: SHA3-256 of `"lockstep.result.leaf\0"` and its
/// [`result_signing_bytes`].
pub fn result_leaf(r: &ResultMessage) -> Digest {
    tagged_hash(b"lockstep.result.leaf\0", &[&result_signing_bytes(r)])
}

fn merkle_node(l: &Digest, r: &Digest) -> Digest {
    tagged_hash(b"lockstep.result.node\0", &[&l.0, &r.0])
}

/// The bytes a worker signs for results signed together:
/// `"lockstep.results.root\0"` and the root.
pub fn root_signing_bytes(root: &Digest) -> Vec<u8> {
    [b"lockstep.results.root\0".as_slice(), &root.0].concat()
}

/// The root a leaf and its path lead to (`None`: a malformed path).
pub fn merkle_root(leaf: Digest, path: &MerklePath) -> Option<Digest> {
    let (mut i, mut n) = (path.index, path.count.max(1));
    if i >= n || n > 1 << 20 || path.siblings.len() > 32 {
        return None;
    }
    let mut siblings = path.siblings.iter();
    let mut h = leaf;
    while n > 1 {
        if i % 2 == 1 {
            h = merkle_node(siblings.next()?, &h);
        } else if i + 1 < n {
            h = merkle_node(&h, siblings.next()?);
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    siblings.next().is_none().then_some(h)
}

/// Signs results together: one ed25519 signature of the root of their
/// leaves' tree, and each result's path to it. A message's results cost one
/// signature, and each can still be checked (and put in a receipt) alone.
pub fn sign_results(key: &crate::auth::Identity, results: &mut [ResultMessage]) {
    let mut level: Vec<Digest> = results.iter().map(result_leaf).collect();
    let count = level.len() as u32;
    let mut paths: Vec<MerklePath> = (0..count)
        .map(|index| MerklePath {
            index,
            count,
            siblings: Vec::new(),
        })
        .collect();
    // Position of each leaf's ancestor in the current level.
    let mut pos: Vec<usize> = (0..level.len()).collect();
    while level.len() > 1 {
        for (leaf, p) in pos.iter_mut().enumerate() {
            let sibling = *p ^ 1;
            if sibling < level.len() {
                paths[leaf].siblings.push(level[sibling]);
            }
            *p /= 2;
        }
        level = level
            .chunks(2)
            .map(|c| {
                if c.len() == 2 {
                    merkle_node(&c[0], &c[1])
                } else {
                    c[0]
                }
            })
            .collect();
    }
    let Some(root) = level.first() else { return };
    let signature = key.sign(&root_signing_bytes(root));
    for (r, path) in results.iter_mut().zip(paths) {
        r.signature = signature.clone();
        r.merkle = path;
    }
}

/// Checks a result's signature against `public_key`: its leaf, its path,
/// and the signature of the root.
pub fn verify_result(public_key: &str, r: &ResultMessage) -> anyhow::Result<()> {
    let root = merkle_root(result_leaf(r), &r.merkle)
        .ok_or_else(|| anyhow::anyhow!("its signature path is malformed"))?;
    crate::auth::verify(public_key, &root_signing_bytes(&root), &r.signature)
}

/// What a worker signs of a result: every field that decides what the
/// result asserts (not timings nor where outputs are stored, which the
/// reader re-hashes against the signed digest). The bytes are the JSON of
/// [`SignedResult`], in its field order, with no whitespace.
pub fn result_signing_bytes(r: &ResultMessage) -> Vec<u8> {
    let outcome = match &r.outcome {
        Outcome::Ok { digest, .. } => format!("ok {digest}"),
        Outcome::Error { code, .. } => format!(
            "error {}",
            serde_json::to_value(code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default()
        ),
    };
    serde_json::to_vec(&SignedResult {
        lockstep: "result",
        protocol: r.protocol,
        contract_version: r.contract_version,
        batch: &r.batch,
        job: &r.job,
        replica: r.replica,
        attempt: r.attempt,
        worker: &r.worker,
        job_digest: r.job_digest.map(|d| d.to_string()).unwrap_or_default(),
        outcome,
    })
    .expect("serialisable")
}

/// The signed statement of a result (see [`result_signing_bytes`]).
#[derive(Serialize)]
pub struct SignedResult<'a> {
    pub lockstep: &'static str,
    pub protocol: u32,
    pub contract_version: u32,
    pub batch: &'a str,
    pub job: &'a str,
    pub replica: u32,
    pub attempt: u32,
    pub worker: &'a str,
    pub job_digest: String,
    /// `ok sha3-256:<hex>` or `error <code>`.
    pub outcome: String,
}

/// The results in a result message: a [`ResultBundle`] or a single
/// [`ResultMessage`]; a short reason when it is neither.
pub fn parse_results(payload: &[u8]) -> Result<Vec<ResultMessage>, String> {
    if let Ok(b) = serde_json::from_slice::<ResultBundle>(payload) {
        return Ok(b.results);
    }
    serde_json::from_slice::<ResultMessage>(payload)
        .map(|r| vec![r])
        .map_err(|e| format!("not a result message: {}", shorten(&e.to_string(), 160)))
}

/// A worker as enrolled by an operator of the deployment (KV
/// `lockstep_enrolled`); never written by the worker itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Enrollment {
    pub name: String,
    pub operator: String,
    /// ed25519 public key (nkey `U…`) its results are signed with.
    pub public_key: String,
    pub state: EnrollmentState,
    pub enrolled_ms: u64,
    /// Why it is quarantined (the fault that caught it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EnrollmentState {
    Active,
    /// Caught returning wrong bits: gets no assignments until an admin
    /// clears it (`lockstep workers clear`).
    Quarantined,
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
    /// What this worker takes: a coordinator offers it no job over these,
    /// and a `too_large` claim for a job within them is a lie (a fault).
    /// Absent in a record: the worker states no limits, and its
    /// `too_large` only takes it off that job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<WorkerLimits>,
    /// Models this worker holds: loaded in memory, and files on disk
    /// (model digests), and the largest model file it takes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<WorkerModels>,
}

/// The models a worker holds, as its record advertises them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerModels {
    pub loaded: Vec<Digest>,
    pub on_disk: Vec<Digest>,
    pub max_model_bytes: u64,
}

/// A worker's capacity, as its record advertises it.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerLimits {
    /// Most elements of any one input or output tensor.
    pub max_elements: u64,
    /// Most multiply-adds (the op's `work`) of one job.
    pub max_macs: u64,
}

impl WorkerLimits {
    /// Whether a job of this size is within these limits.
    pub fn admit(&self, size: &JobSize) -> bool {
        size.max_elements <= self.max_elements && size.work <= self.max_macs
    }
}

/// What a job asks of a worker, in the terms of [`WorkerLimits`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobSize {
    pub max_elements: u64,
    pub work: u64,
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

/// Evidence that a worker answered wrongly: wrong bits, or a result no
/// honest worker sends (bad signature, outputs of the wrong shape, a false
/// claim that the job is bad).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FaultRecord {
    pub worker: String,
    pub batch: String,
    pub job: String,
    /// The digest it reported, if it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Digest>,
    /// The accepted digest, where one was established.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correct: Option<Digest>,
    /// What was wrong, and how it was established.
    pub reason: String,
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
    fn results_signed_together_verify_one_by_one() {
        let key = crate::auth::Identity::generate();
        let other = crate::auth::Identity::generate();
        for n in 1..=9u32 {
            let mut rs: Vec<ResultMessage> = (0..n)
                .map(|i| ResultMessage {
                    protocol: PROTOCOL_VERSION,
                    batch: "b".into(),
                    job: format!("j{i}"),
                    replica: 0,
                    attempt: 0,
                    worker: "w".into(),
                    backend: String::new(),
                    device: String::new(),
                    path: String::new(),
                    contract_version: 1,
                    outcome: Outcome::Error {
                        code: ErrorCode::Backend,
                        message: String::new(),
                    },
                    timings: Timings::default(),
                    job_digest: None,
                    signature: String::new(),
                    merkle: MerklePath::default(),
                })
                .collect();
            sign_results(&key, &mut rs);
            let sig = rs[0].signature.clone();
            for r in &rs {
                assert_eq!(r.signature, sig, "one signature per message");
                verify_result(&key.public_key(), r).unwrap();
                assert!(verify_result(&other.public_key(), r).is_err());
                // Any field changed, or the path, breaks it.
                let mut t = r.clone();
                t.attempt = 1;
                assert!(verify_result(&key.public_key(), &t).is_err());
                if n > 1 {
                    let mut t = r.clone();
                    t.merkle.index = (t.merkle.index + 1) % n;
                    assert!(verify_result(&key.public_key(), &t).is_err());
                    let mut t = r.clone();
                    t.merkle.siblings.push(Digest([0; 32]));
                    assert!(verify_result(&key.public_key(), &t).is_err());
                }
                let mut t = r.clone();
                t.merkle.index = n;
                assert!(verify_result(&key.public_key(), &t).is_err());
            }
        }
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

#[cfg(test)]
mod payload_tests {
    use super::*;

    #[test]
    fn a_payload_limit_below_the_protocol_s_needs_is_one_clear_line() {
        assert!(check_max_payload(MIN_MAX_PAYLOAD).is_ok());
        let e = check_max_payload(6144).unwrap_err().to_string();
        assert!(
            e.contains("max_payload is 6144") && e.contains("16384"),
            "{e}"
        );
        assert!(!e.contains('\n'));
    }
}
