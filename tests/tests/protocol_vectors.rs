//! The test vectors of docs/PROTOCOL.md ("Test vectors",
//! `docs/test-vectors.json`): a job, its job digest, three signed result
//! statements with their Merkle tree and one signature, made with a
//! published test key, and a receipt signed by a published coordinator key.
//!
//! Each value is checked twice: by the recipe the document gives, computed
//! here by hand (SHA3-256 over the bytes it names, ed25519 over the root),
//! so the document is true; and against the implementation, so lockstep
//! speaks what the document says. `LOCKSTEP_WRITE_VECTORS=1` writes the
//! file anew (new keys, the same recipe).

use lockstep::auth::{verify, Identity};
use lockstep::coordinator::receipt::{
    verify_receipt, CoordinatorSignature, Receipt, ReceiptInput, ReceiptSignature, RECEIPT_VERSION,
};
use lockstep::coordinator::Verdict;
use lockstep::protocol::*;
use lockstep_kernels::{Digest, Op, CONTRACT_VERSION};
use serde_json::{json, Value};
use sha3::Digest as _;

const PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/test-vectors.json");

fn sha3(parts: &[&[u8]]) -> Digest {
    let mut h = sha3::Sha3_256::new();
    for p in parts {
        h.update(p);
    }
    Digest(h.finalize().into())
}

fn digest(v: &Value) -> Digest {
    serde_json::from_value(v.clone()).unwrap()
}

/// The vectors, made by the implementation from the keys given.
fn make(worker: &Identity, coordinator: &Identity) -> Value {
    let a = TensorRef::inline(vec![2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let b = TensorRef::inline(vec![3, 2], &[0.5, -1.0, 0.25, 2.0, -0.125, 4.0]);
    let spec = JobSpec::matmul(a.clone(), b.clone());
    let job_digest = spec.job_digest().unwrap();
    // c = a·b under the contract (one 256-chunk: a plain fma chain; every
    // value here is exact).
    let c = [0.625f32, 15.0, 2.5, 30.0];
    {
        use lockstep_kernels::Backend;
        let cpu = lockstep_kernels::cpu::CpuBackend::new(1).unwrap();
        let data: Vec<Vec<f32>> = spec
            .inputs
            .iter()
            .map(|t| decode_f32(t.inline.as_deref().unwrap()).unwrap())
            .collect();
        let shapes: Vec<Vec<usize>> = spec.inputs.iter().map(|t| t.shape.clone()).collect();
        let out = cpu
            .run(&spec.op, &lockstep_kernels::contract::views(&shapes, &data))
            .unwrap();
        assert_eq!(out[0].data, c);
    }
    let c_digest = TensorRef::digest_of(&[2, 2], &c);
    let outputs_digest = lockstep_kernels::outputs_digest(&[c_digest]);
    // Three results signed together (one message): replicas 0..3 of
    // jobs job-1, job-2, job-3 of one batch.
    let mut results: Vec<ResultMessage> = (1..=3)
        .map(|i| ResultMessage {
            protocol: PROTOCOL_VERSION,
            batch: "b-00000000-0000000000000000".into(),
            job: format!("job-{i}"),
            replica: 0,
            attempt: 0,
            worker: "test-worker".into(),
            backend: "cpu".into(),
            device: "test".into(),
            path: "test".into(),
            contract_version: CONTRACT_VERSION,
            outcome: Outcome::Ok {
                digest: outputs_digest,
                outputs: vec![TensorRef::inline(vec![2, 2], &c)],
            },
            timings: Timings::default(),
            job_digest: Some(job_digest),
            signature: String::new(),
            merkle: Default::default(),
        })
        .collect();
    sign_results(worker, &mut results);
    let statements: Vec<String> = results
        .iter()
        .map(|r| String::from_utf8(result_signing_bytes(r)).unwrap())
        .collect();
    let leaves: Vec<String> = results.iter().map(|r| result_leaf(r).to_string()).collect();
    let root = merkle_root(result_leaf(&results[0]), &results[0].merkle).unwrap();
    let mut receipt = Receipt {
        receipt: RECEIPT_VERSION,
        protocol: PROTOCOL_VERSION,
        contract_version: CONTRACT_VERSION,
        batch: results[1].batch.clone(),
        job: results[1].job.clone(),
        op: serde_json::to_value(&spec.op).unwrap(),
        inputs: spec
            .inputs
            .iter()
            .map(|t| ReceiptInput {
                shape: t.shape.clone(),
                digest: t.content_digest().unwrap(),
            })
            .collect(),
        job_digest,
        verdict: Verdict::Resolved,
        redundancy: 2,
        output_digest: outputs_digest,
        output_shapes: vec![vec![2, 2]],
        workers: vec![ReceiptSignature {
            worker: "test-worker".into(),
            operator: "test-operator".into(),
            public_key: worker.public_key(),
            replica: 0,
            attempt: 0,
            signature: results[1].signature.clone(),
            merkle: results[1].merkle.clone(),
        }],
        generation: None,
        coordinator: CoordinatorSignature {
            public_key: coordinator.public_key(),
            signature: String::new(),
        },
    };
    receipt.coordinator.signature = coordinator.sign(&receipt.signing_bytes());
    json!({
        "about": "lockstep protocol 3 test vectors (docs/PROTOCOL.md, Test vectors); the keys are published test keys, never to be enrolled",
        "protocol": PROTOCOL_VERSION,
        "contract_version": CONTRACT_VERSION,
        "inputs": [
            {"name": "a", "shape": a.shape, "data": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "inline": a.inline, "digest": a.content_digest().unwrap().to_string()},
            {"name": "b", "shape": b.shape, "data": [0.5, -1.0, 0.25, 2.0, -0.125, 4.0], "inline": b.inline, "digest": b.content_digest().unwrap().to_string()},
        ],
        "job": {"op": "matmul", "params": {}},
        "job_digest_json": format!(
            "{{\"inputs\":[{{\"digest\":\"{}\",\"shape\":[2,3]}},{{\"digest\":\"{}\",\"shape\":[3,2]}}],\"op\":\"matmul\",\"params\":{{}}}}",
            a.content_digest().unwrap(),
            b.content_digest().unwrap()
        ),
        "job_digest": job_digest.to_string(),
        "output": {"name": "c", "shape": [2, 2], "data": c, "digest": c_digest.to_string()},
        "outputs_digest": outputs_digest.to_string(),
        "worker_seed": worker.seed(),
        "worker_public_key": worker.public_key(),
        "statements": statements,
        "leaves": leaves,
        "root": root.to_string(),
        "signature": results[0].signature,
        "merkle": results.iter().map(|r| serde_json::to_value(&r.merkle).unwrap()).collect::<Vec<_>>(),
        "coordinator_seed": coordinator.seed(),
        "coordinator_public_key": coordinator.public_key(),
        "receipt": serde_json::to_value(&receipt).unwrap(),
    })
}

#[test]
fn the_published_test_vectors_hold() {
    if std::env::var_os("LOCKSTEP_WRITE_VECTORS").is_some() {
        let v = make(&Identity::generate(), &Identity::generate());
        std::fs::write(PATH, serde_json::to_string_pretty(&v).unwrap() + "\n").unwrap();
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let worker = Identity::parse(v["worker_seed"].as_str().unwrap()).unwrap();
    let coordinator = Identity::parse(v["coordinator_seed"].as_str().unwrap()).unwrap();
    assert_eq!(worker.public_key(), v["worker_public_key"]);
    assert_eq!(coordinator.public_key(), v["coordinator_public_key"]);

    // By the document's recipe, by hand.
    // Tensor digests (CONTRACT.md §5): tag, dtype, rank, dims, data.
    for t in v["inputs"].as_array().unwrap() {
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap();
        let data: Vec<f32> = serde_json::from_value(t["data"].clone()).unwrap();
        assert_eq!(
            lockstep_kernels::tensor_digest_f32(&shape, &data),
            digest(&t["digest"])
        );
        assert_eq!(
            decode_f32(t["inline"].as_str().unwrap()).unwrap(),
            data,
            "inline is base64 of little-endian f32"
        );
    }
    // The job digest: SHA3-256 of the key-sorted JSON, no whitespace.
    let text = v["job_digest_json"].as_str().unwrap();
    assert_eq!(sha3(&[text.as_bytes()]), digest(&v["job_digest"]));
    let parsed: Value = serde_json::from_str(text).unwrap();
    assert_eq!(parsed["op"], "matmul");
    assert_eq!(parsed["inputs"][0]["digest"], v["inputs"][0]["digest"]);
    assert_eq!(parsed["inputs"][1]["shape"], json!([3, 2]));
    // The outputs digest of one output is that output's tensor digest.
    assert_eq!(
        lockstep_kernels::outputs_digest(&[digest(&v["output"]["digest"])]),
        digest(&v["outputs_digest"])
    );
    // Statements: key order as documented, no whitespace; leaves; the
    // tree (a last node without a sibling moves up); one signature.
    let statements: Vec<&str> = v["statements"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    for (i, s) in statements.iter().enumerate() {
        let expected = format!(
            "{{\"lockstep\":\"result\",\"protocol\":{},\"contract_version\":{},\"batch\":\"b-00000000-0000000000000000\",\"job\":\"job-{}\",\"replica\":0,\"attempt\":0,\"worker\":\"test-worker\",\"job_digest\":\"{}\",\"outcome\":\"ok {}\"}}",
            v["protocol"],
            v["contract_version"],
            i + 1,
            v["job_digest"].as_str().unwrap(),
            v["outputs_digest"].as_str().unwrap()
        );
        assert_eq!(*s, expected);
        assert_eq!(
            sha3(&[b"lockstep.result.leaf\0", s.as_bytes()]),
            digest(&v["leaves"][i])
        );
    }
    let leaf = |i: usize| digest(&v["leaves"][i]).0;
    let node = |l: &[u8], r: &[u8]| sha3(&[b"lockstep.result.node\0", l, r]).0;
    let root = node(&node(&leaf(0), &leaf(1)), &leaf(2));
    assert_eq!(Digest(root), digest(&v["root"]));
    let signed = [b"lockstep.results.root\0".as_slice(), &root].concat();
    verify(
        v["worker_public_key"].as_str().unwrap(),
        &signed,
        v["signature"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        v["merkle"][2]["siblings"],
        json!([Digest(node(&leaf(0), &leaf(1))).to_string()])
    );

    // The implementation gives the same, from the same keys.
    let ours = make(&worker, &coordinator);
    for key in [
        "inputs",
        "job_digest_json",
        "job_digest",
        "outputs_digest",
        "statements",
        "leaves",
        "root",
        "signature",
        "merkle",
        "receipt",
    ] {
        assert_eq!(ours[key], v[key], "{key}: the implementation differs");
    }
    // The receipt verifies offline, and names the published keys.
    let receipt: Receipt = serde_json::from_value(v["receipt"].clone()).unwrap();
    verify_receipt(&receipt, None).unwrap();
    assert_eq!(receipt.coordinator.public_key, coordinator.public_key());
    // A job message built from the vector gives its digest.
    let op: Op = serde_json::from_value(v["job"].clone()).unwrap();
    let spec = JobSpec {
        op,
        inputs: v["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                TensorRef::object(
                    serde_json::from_value(t["shape"].clone()).unwrap(),
                    digest(&t["digest"]),
                )
            })
            .collect(),
    };
    assert_eq!(spec.job_digest(), Some(digest(&v["job_digest"])));
}
