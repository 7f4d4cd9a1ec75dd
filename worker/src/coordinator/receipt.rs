//! Receipts: for each accepted job, a self-contained statement anyone can
//! check offline (`lockstep verify`): what was computed (op, params, input
//! digests), the accepted output digest, the versions, each agreeing
//! worker's public key, operator and signature, and the coordinator's
//! signature over the whole.

use std::collections::BTreeSet;

use anyhow::{bail, ensure, Context, Result};
use lockstep_kernels::Digest;
use serde::{Deserialize, Serialize};

use super::report::Verdict;
use super::JobState;
use crate::auth::{verify, Identity};
use crate::deploy::{Deployment, Role};
use crate::protocol::*;

pub const RECEIPT_VERSION: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReceiptInput {
    pub shape: Vec<usize>,
    pub digest: Digest,
}

/// One worker's signed result, as it counts towards the receipt.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ReceiptSignature {
    pub worker: String,
    pub operator: String,
    pub public_key: String,
    pub replica: u32,
    pub attempt: u32,
    /// The worker's signature of the root of the results it signed with
    /// this one, and this result's path to it ([`verify_result`]).
    pub signature: String,
    #[serde(default, skip_serializing_if = "MerklePath::is_alone")]
    pub merkle: MerklePath,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CoordinatorSignature {
    pub public_key: String,
    /// Over [`Receipt::signing_bytes`]: the receipt's JSON with this field
    /// empty.
    pub signature: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Receipt {
    pub receipt: u32,
    pub protocol: u32,
    pub contract_version: u32,
    pub batch: String,
    pub job: String,
    /// `{"op": name, "params": {…}}`, as on the wire.
    pub op: serde_json::Value,
    pub inputs: Vec<ReceiptInput>,
    /// [`JobSpec::job_digest`] of op, params and inputs.
    pub job_digest: Digest,
    /// `verified` (r workers of distinct operators agreed) or `resolved`
    /// (they disagreed; the coordinator recomputed the job).
    pub verdict: Verdict,
    pub redundancy: u32,
    pub output_digest: Digest,
    pub output_shapes: Vec<Vec<usize>>,
    /// Every worker whose signed result gave `output_digest`.
    pub workers: Vec<ReceiptSignature>,
    /// A generate job's prompt ids, generated ids and trace root: `verify`
    /// checks that they hash to the prompt's input digest and to
    /// `output_digest` (the model, tokenizer and sampling are in `op`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<super::report::GenerationReport>,
    pub coordinator: CoordinatorSignature,
}

impl Receipt {
    /// The bytes the coordinator signs: the receipt's JSON (fields in
    /// declaration order, no whitespace) with `coordinator.signature` empty.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut unsigned = self.clone();
        unsigned.coordinator.signature.clear();
        serde_json::to_vec(&unsigned).expect("serialisable")
    }

    /// The result a worker signed, as this receipt states it.
    fn worker_result(&self, w: &ReceiptSignature) -> ResultMessage {
        ResultMessage {
            protocol: self.protocol,
            batch: self.batch.clone(),
            job: self.job.clone(),
            replica: w.replica,
            attempt: w.attempt,
            worker: w.worker.clone(),
            backend: String::new(),
            device: String::new(),
            path: String::new(),
            contract_version: self.contract_version,
            outcome: Outcome::Ok {
                digest: self.output_digest,
                outputs: Vec::new(),
            },
            timings: Timings::default(),
            job_digest: Some(self.job_digest),
            signature: w.signature.clone(),
            merkle: w.merkle.clone(),
        }
    }
}

/// The receipt of an accepted job, signed by `signer`; `None` for a job
/// that was not accepted.
pub(super) fn build(
    batch: &str,
    id: &str,
    js: &JobState,
    redundancy: u32,
    enrolled: &std::collections::BTreeMap<String, Enrollment>,
    signer: &Identity,
) -> Option<Receipt> {
    let decided = js.decided.as_ref()?;
    let digest = decided.digest?;
    if !matches!(decided.verdict, Verdict::Verified | Verdict::Resolved) {
        return None;
    }
    let inputs = js
        .spec
        .inputs
        .iter()
        .map(|t| {
            Some(ReceiptInput {
                shape: t.shape.clone(),
                digest: t.content_digest()?,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    let workers = js
        .results
        .values()
        .filter(|r| matches!(&r.outcome, Outcome::Ok { digest: d, .. } if *d == digest))
        .filter_map(|r| {
            let e = enrolled.get(&r.worker)?;
            Some(ReceiptSignature {
                worker: r.worker.clone(),
                operator: e.operator.clone(),
                public_key: e.public_key.clone(),
                replica: r.replica,
                attempt: r.attempt,
                signature: r.signature.clone(),
                merkle: r.merkle.clone(),
            })
        })
        .collect();
    let mut receipt = Receipt {
        receipt: RECEIPT_VERSION,
        protocol: PROTOCOL_VERSION,
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        batch: batch.into(),
        job: id.into(),
        op: serde_json::to_value(&js.spec.op).ok()?,
        inputs,
        job_digest: js.job_digest,
        verdict: decided.verdict,
        redundancy,
        output_digest: digest,
        output_shapes: js.shapes.clone(),
        workers,
        generation: decided.generation.clone(),
        coordinator: CoordinatorSignature {
            public_key: signer.public_key(),
            signature: String::new(),
        },
    };
    receipt.coordinator.signature = signer.sign(&receipt.signing_bytes());
    Some(receipt)
}

/// Checks a receipt offline: the job digest matches its op and inputs, every
/// worker signature verifies, a verified job has `redundancy` workers of
/// distinct operators, and the coordinator's signature verifies. With a
/// deployment, also that the coordinator and every worker key are enrolled
/// there (workers under the operator the receipt names).
pub fn verify_receipt(r: &Receipt, trust: Option<&Deployment>) -> Result<()> {
    ensure!(
        r.receipt == RECEIPT_VERSION,
        "receipt version {} (this lockstep reads {RECEIPT_VERSION})",
        r.receipt
    );
    let op: lockstep_kernels::Op = serde_json::from_value(r.op.clone())
        .map_err(|e| anyhow::anyhow!("unknown op or params: {}", shorten(&e.to_string(), 160)))?;
    let spec = JobSpec {
        op,
        inputs: r
            .inputs
            .iter()
            .map(|i| TensorRef::object(i.shape.clone(), i.digest))
            .collect(),
    };
    ensure!(
        spec.job_digest() == Some(r.job_digest),
        "the job digest does not match the op, params and inputs"
    );
    let shapes = spec
        .op
        .plan(&spec.shapes())
        .map_err(|e| anyhow::anyhow!("the inputs do not fit the op: {e}"))?
        .output_shapes();
    ensure!(
        shapes == r.output_shapes,
        "output shapes {} are not what the contract gives ({})",
        shorten(&format!("{:?}", r.output_shapes), 100),
        shorten(&format!("{shapes:?}"), 100)
    );
    if let lockstep_kernels::Op::Generate(g) = &spec.op {
        check_generation(r, g)?;
    }
    let mut workers = BTreeSet::new();
    let mut operators = BTreeSet::new();
    for w in &r.workers {
        verify_result(&w.public_key, &r.worker_result(w))
            .with_context(|| format!("worker {}'s signature", quote(&w.worker)))?;
        ensure!(
            workers.insert(w.worker.clone()),
            "worker {} is listed twice",
            quote(&w.worker)
        );
        operators.insert(w.operator.clone());
        if let Some(d) = trust {
            match d.member(Role::Worker, &w.worker) {
                Some(m) if m.public_key == w.public_key && m.operator == w.operator => {}
                Some(_) => bail!(
                    "worker {}'s key or operator differs from its enrollment",
                    quote(&w.worker)
                ),
                None => bail!("worker {} is not enrolled", quote(&w.worker)),
            }
        }
    }
    match r.verdict {
        Verdict::Verified => ensure!(
            operators.len() as u32 >= r.redundancy && r.redundancy >= 1,
            "verified needs {} workers of distinct operators; the receipt has {} ({} operators)",
            r.redundancy,
            workers.len(),
            operators.len()
        ),
        Verdict::Resolved => {}
        v => bail!("a receipt cannot have verdict {v:?}"),
    }
    verify(
        &r.coordinator.public_key,
        &r.signing_bytes(),
        &r.coordinator.signature,
    )
    .context("the coordinator's signature")?;
    if let Some(d) = trust {
        ensure!(
            d.file
                .members
                .iter()
                .any(|m| m.role == Role::Coordinator && m.public_key == r.coordinator.public_key),
            "the coordinator's key {} is not enrolled in the deployment",
            quote(&r.coordinator.public_key)
        );
    }
    Ok(())
}

/// A generate receipt's ids: the prompt ids are the prompt input, the
/// generated ids and trace root are the accepted outputs.
fn check_generation(r: &Receipt, g: &lockstep_kernels::contract::Generate) -> Result<()> {
    use lockstep_kernels::contract::generate::{digest_values, tokens_output, TRACE_VALUES};
    use lockstep_kernels::tensor_digest_f32;
    let gen = r
        .generation
        .as_ref()
        .context("a generate receipt must state its prompt and output ids")?;
    let prompt: Vec<f32> = gen.prompt_ids.iter().map(|&t| t as f32).collect();
    ensure!(
        r.inputs.len() == 1
            && r.inputs[0].digest == tensor_digest_f32(&[prompt.len()], &prompt)
            && r.inputs[0].shape == [prompt.len()],
        "the prompt ids are not the job's prompt"
    );
    ensure!(
        gen.output_ids.len() <= g.max_tokens,
        "more output ids than max_tokens"
    );
    let outputs = [
        tensor_digest_f32(
            &[g.max_tokens],
            &tokens_output(&gen.output_ids, g.max_tokens),
        ),
        tensor_digest_f32(&[TRACE_VALUES], &digest_values(&gen.trace_root)),
    ];
    ensure!(
        lockstep_kernels::outputs_digest(&outputs) == r.output_digest,
        "the output ids and trace root do not hash to the output digest"
    );
    Ok(())
}

/// Reads receipts (one JSON object a line) from `text`.
pub fn parse_receipts(text: &str) -> Result<Vec<Receipt>> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                anyhow::anyhow!(
                    "line {}: not a receipt: {}",
                    i + 1,
                    shorten(&e.to_string(), 160)
                )
            })
        })
        .collect()
}
