//! Fuzzing on stable Rust: a mutational fuzzer over everything lockstep
//! reads from outside (`lockstep bench fuzz`, and a short run in the tests).
//!
//! Each target starts from valid seeds of its format and feeds the code
//! that reads it inputs made by stacking 1–4 random mutations: bit flips,
//! interesting bytes, deletions, duplications, insertions, truncation,
//! splices of two seeds, and JSON-aware ones (a number replaced by an
//! extreme value, a string by a long or odd one). An input passes when the
//! code returns, and every error it returns is a clear line: not empty, at
//! most [`MAX_ERROR_CHARS`] characters. A panic is a failure; the input is
//! kept to reproduce it.
//!
//! Targets: job messages (as a worker reads and computes them, on the CPU
//! backend with small limits), result messages (as a coordinator checks
//! them), batch lines, safetensors files, Hugging Face model safetensors
//! headers, key files, GGUF model headers, receipts.

use std::panic::AssertUnwindSafe;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::auth::Identity;
use crate::protocol::*;

/// The longest error message an input may produce.
pub const MAX_ERROR_CHARS: usize = 2000;

/// Reads one input; the errors it produced (none: accepted).
type Reader = Box<dyn Fn(&[u8]) -> Vec<String>>;

/// A small Hugging Face weights file: F32, BF16 and F16 tensors, the
/// metadata map, data covered exactly.
fn model_st_seed() -> Vec<u8> {
    let header = r#"{"__metadata__":{"format":"pt"},"model.norm.weight":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"model.embed_tokens.weight":{"dtype":"BF16","shape":[2,2],"data_offsets":[8,16]},"lm_head.weight":{"dtype":"F16","shape":[2,2],"data_offsets":[16,24]}}"#;
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend([0x3Fu8; 24]);
    b
}

/// A small valid GGUF header: every metadata kind, an array of strings,
/// two tensor infos.
fn gguf_seed() -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(2u64.to_le_bytes()); // tensors
    b.extend(5u64.to_le_bytes()); // metadata
    let s = |b: &mut Vec<u8>, t: &str| {
        b.extend((t.len() as u64).to_le_bytes());
        b.extend(t.as_bytes());
    };
    s(&mut b, "general.architecture");
    b.extend(8u32.to_le_bytes());
    s(&mut b, "llama");
    s(&mut b, "llama.block_count");
    b.extend(4u32.to_le_bytes());
    b.extend(2u32.to_le_bytes());
    s(&mut b, "llama.rope.freq_base");
    b.extend(6u32.to_le_bytes());
    b.extend(10000f32.to_le_bytes());
    s(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend(3u64.to_le_bytes());
    for t in ["<s>", "a", "Ġb"] {
        s(&mut b, t);
    }
    s(&mut b, "general.alignment");
    b.extend(4u32.to_le_bytes());
    b.extend(32u32.to_le_bytes());
    for (name, ty) in [("token_embd.weight", 8u32), ("output_norm.weight", 0)] {
        s(&mut b, name);
        b.extend(2u32.to_le_bytes());
        b.extend(32u64.to_le_bytes());
        b.extend(3u64.to_le_bytes());
        b.extend(ty.to_le_bytes());
        b.extend(0u64.to_le_bytes());
    }
    b
}

/// One input format and the code that reads it.
pub struct Target {
    pub name: &'static str,
    seeds: Vec<Vec<u8>>,
    run: Reader,
}

/// What one target did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TargetReport {
    pub name: &'static str,
    pub inputs: u64,
    /// Inputs read without any error.
    pub accepted: u64,
    /// Inputs that produced at least one error (each a clear line).
    pub rejected: u64,
    pub panics: u64,
    /// Errors that were empty or longer than [`MAX_ERROR_CHARS`].
    pub unclear_errors: u64,
    /// The first failing input, hex, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_failure: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FuzzReport {
    pub seed: u64,
    pub inputs: u64,
    pub seconds: f64,
    pub targets: Vec<TargetReport>,
}

impl FuzzReport {
    pub fn failures(&self) -> u64 {
        self.targets
            .iter()
            .map(|t| t.panics + t.unclear_errors)
            .sum()
    }
}

fn errs<E: std::fmt::Display>(r: Result<impl Sized, E>) -> Vec<String> {
    match r {
        Ok(_) => vec![],
        Err(e) => vec![format!("{e:#}")],
    }
}

fn anyhow_errs<T>(r: anyhow::Result<T>) -> Vec<String> {
    match r {
        Ok(_) => vec![],
        Err(e) => vec![format!("{e:#}")],
    }
}

/// Every target, with its seeds.
pub fn targets() -> Vec<Target> {
    let key = Identity::generate();
    let public = key.public_key();
    let cpu = std::sync::Arc::new(
        lockstep_kernels::cpu::CpuBackend::new(1).expect("the CPU backend opens"),
    );
    let a = TensorRef::inline(vec![2, 3], &[1.0, -2.0, 3.5, 0.0, f32::MIN_POSITIVE, 7.0]);
    let b = TensorRef::inline(vec![3, 2], &[0.5, 1.0, -1.0, 2.0, 1e30, -0.0]);
    let job = JobMessage {
        protocol: PROTOCOL_VERSION,
        batch: "b-1".into(),
        job: "j-1".into(),
        replica: 0,
        attempt: 0,
        redundancy: 2,
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        worker: "w".into(),
        spec: JobSpec::matmul(a.clone(), b.clone()),
    };
    let object_job = JobMessage {
        spec: JobSpec::matmul(
            a.clone(),
            TensorRef::object(vec![3, 2], TensorRef::digest_of(&[1, 1], &[1.0])),
        ),
        ..job.clone()
    };
    let bundle = JobBundle {
        protocol: PROTOCOL_VERSION,
        batch: "b-1".into(),
        id: "x".into(),
        worker: "w".into(),
        jobs: vec![job.clone(), object_job.clone()],
    };
    let generate_job = JobMessage {
        spec: JobSpec {
            op: lockstep_kernels::Op::Generate(lockstep_kernels::contract::Generate {
                model: TensorRef::digest_of(&[1], &[1.0]),
                tokenizer: None,
                max_tokens: 8,
                stop: vec![2],
                temperature: 0.7,
                top_k: 4,
                top_p: 0.9,
                seed: 5,
            }),
            inputs: vec![TensorRef::inline(vec![3], &[1.0, 403.0, 407.0])],
        },
        ..job.clone()
    };
    let json = |v: &dyn erased::Ser| v.bytes();
    let job_seeds = vec![
        json(&job),
        json(&object_job),
        json(&bundle),
        json(&generate_job),
    ];

    let shapes = vec![vec![2usize, 2]];
    let out = TensorRef::inline(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let d = TensorRef::digest_of(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let mut result = ResultMessage {
        protocol: PROTOCOL_VERSION,
        batch: "b-1".into(),
        job: "j-1".into(),
        replica: 1,
        attempt: 0,
        worker: "w".into(),
        backend: "cpu".into(),
        device: "d".into(),
        path: "p".into(),
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        outcome: Outcome::Ok {
            digest: lockstep_kernels::outputs_digest(&[d]),
            outputs: vec![out],
        },
        timings: Timings::default(),
        job_digest: job.spec.job_digest(),
        signature: String::new(),
        merkle: Default::default(),
    };
    sign_results(&key, std::slice::from_mut(&mut result));
    let job_digest = job.spec.job_digest().expect("valid");
    let mut pair = vec![
        result.clone(),
        ResultMessage {
            replica: 0,
            ..result.clone()
        },
        result.clone(),
    ];
    sign_results(&key, &mut pair);
    let result_bundle = ResultBundle {
        protocol: PROTOCOL_VERSION,
        batch: "b-1".into(),
        worker: "w".into(),
        results: pair,
    };
    let result_seeds = vec![json(&result), json(&result_bundle)];

    let batch_seeds = vec![
        br#"{"id":"j1","op":"matmul","params":{},"inputs":[{"shape":[2,2],"data":[1,2,3,4]},{"shape":[2,1],"data":[0.5,-1e-40]}]}"#.to_vec(),
        format!(
            "{{\"id\":\"j2\",\"kind\":\"matmul\",\"a\":{{\"shape\":[1,2],\"inline\":\"{}\"}},\"b\":{{\"shape\":[2,1],\"object\":\"{}\"}}}}\n# comment\n",
            encode_f32(&[1.0, 2.0]),
            d
        )
        .into_bytes(),
        format!(
            "{{\"id\":\"g1\",\"op\":\"generate\",\"params\":{{\"model\":\"{d}\",\"max_tokens\":4,\"temperature\":0.5}},\"inputs\":[{{\"shape\":[2],\"data\":[1,403]}}]}}"
        )
        .into_bytes(),
    ];

    let tensors = {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("t.safetensors");
        crate::tensors::write_f32(
            &path,
            &[
                ("a", &[2, 2], &[1.0, 2.0, 3.0, 4.0]),
                ("b", &[2], &[5.0, 6.0]),
            ],
        )
        .expect("writes");
        std::fs::read(&path).expect("reads")
    };

    let key_seeds = vec![
        format!("# a comment\n{}\n", key.seed()).into_bytes(),
        format!(
            "-----BEGIN NATS USER JWT-----\neyJ0eXAi.e30.sig\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            key.seed()
        )
        .into_bytes(),
    ];

    let receipt_seed = {
        let input = |t: &TensorRef| crate::coordinator::receipt::ReceiptInput {
            shape: t.shape.clone(),
            digest: t.content_digest().expect("a valid inline tensor"),
        };
        let mut r = crate::coordinator::receipt::Receipt {
            receipt: crate::coordinator::receipt::RECEIPT_VERSION,
            protocol: PROTOCOL_VERSION,
            contract_version: lockstep_kernels::CONTRACT_VERSION,
            batch: "b-1".into(),
            job: "j-1".into(),
            op: serde_json::json!({"op": "matmul", "params": {}}),
            inputs: vec![input(&a), input(&b)],
            job_digest,
            verdict: crate::coordinator::Verdict::Resolved,
            redundancy: 1,
            output_digest: d,
            output_shapes: vec![vec![2, 2]],
            workers: vec![],
            generation: None,
            coordinator: crate::coordinator::receipt::CoordinatorSignature {
                public_key: public.clone(),
                signature: String::new(),
            },
        };
        r.coordinator.signature = key.sign(&r.signing_bytes());
        serde_json::to_vec(&r).expect("serialisable")
    };

    let base = std::env::temp_dir().join("lockstep-fuzz-no-files");
    vec![
        Target {
            name: "job message",
            seeds: job_seeds,
            run: Box::new(move |bytes| {
                crate::worker::handler::inspect_message(bytes, 4096, 1 << 16, &*cpu)
                    .into_iter()
                    .filter_map(Result::err)
                    .collect()
            }),
        },
        Target {
            name: "result message",
            seeds: result_seeds,
            run: Box::new(move |bytes| {
                let results = match parse_results(bytes) {
                    Ok(r) => r,
                    Err(e) => return vec![e],
                };
                results
                    .iter()
                    .filter_map(|r| {
                        crate::coordinator::verdict::check_statement(
                            &public,
                            r,
                            &job_digest,
                            &shapes,
                        )
                    })
                    .collect()
            }),
        },
        Target {
            name: "batch line",
            seeds: batch_seeds,
            run: Box::new(move |bytes| {
                anyhow_errs(crate::batch::parse_batch_str(
                    &String::from_utf8_lossy(bytes),
                    &base,
                ))
            }),
        },
        Target {
            name: "safetensors file",
            seeds: vec![tensors],
            run: Box::new(|bytes| {
                errs(crate::tensors::read_f32_tensors_from(
                    bytes,
                    "input.safetensors",
                    &["a", "b"],
                ))
            }),
        },
        Target {
            name: "model safetensors",
            seeds: vec![model_st_seed()],
            run: Box::new(|bytes| {
                let path = std::path::Path::new("model.safetensors");
                match lockstep_kernels::model::st::StFile::from_prefix(
                    path,
                    bytes.len() as u64,
                    bytes,
                ) {
                    Ok(_) => vec![],
                    Err(e) => vec![e.to_string()],
                }
            }),
        },
        Target {
            name: "key file",
            seeds: key_seeds,
            run: Box::new(|bytes| {
                anyhow_errs(Identity::parse(&String::from_utf8_lossy(bytes)).map(|id| {
                    let sig = id.sign(b"x");
                    crate::auth::verify(&id.public_key(), b"x", &sig)
                }))
            }),
        },
        Target {
            name: "gguf header",
            seeds: vec![gguf_seed()],
            run: Box::new(|bytes| {
                match lockstep_kernels::model::gguf::Gguf::parse(bytes, bytes.len() as u64 + 64) {
                    Ok(_) => vec![],
                    Err(e) => vec![e.to_string()],
                }
            }),
        },
        Target {
            name: "receipt",
            seeds: vec![receipt_seed],
            run: Box::new(|bytes| {
                match crate::coordinator::receipt::parse_receipts(&String::from_utf8_lossy(bytes)) {
                    Ok(rs) => rs
                        .iter()
                        .filter_map(|r| {
                            crate::coordinator::receipt::verify_receipt(r, None)
                                .err()
                                .map(|e| format!("{e:#}"))
                        })
                        .collect(),
                    Err(e) => vec![format!("{e:#}")],
                }
            }),
        },
    ]
}

/// Serialising seeds of any type.
mod erased {
    pub trait Ser {
        fn bytes(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn bytes(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("serialisable")
        }
    }
}

const INTERESTING_BYTES: &[u8] = b"\x00\xff\x7f\x80\"{}[],:-+.eE0919\\\n";
const EXTREME_NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1e309",
    "-1e309",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "9223372036854775807",
    "1e-46",
    "3.4028236e38",
    "NaN",
    "null",
    "65536",
    "67108864",
];

/// One random mutation of `input` (`seeds` for splicing).
fn mutate(rng: &mut ChaCha8Rng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    let len = input.len();
    let pos = |rng: &mut ChaCha8Rng, len: usize| {
        if len == 0 {
            0
        } else {
            rng.random_range(0..len)
        }
    };
    match rng.random_range(0..10) {
        0 if len > 0 => {
            let i = pos(rng, len);
            input[i] ^= 1 << rng.random_range(0..8);
        }
        1 if len > 0 => {
            let i = pos(rng, len);
            input[i] = INTERESTING_BYTES[rng.random_range(0..INTERESTING_BYTES.len())];
        }
        2 if len > 0 => {
            let i = pos(rng, len);
            let n = rng.random_range(1..=(len - i).min(32));
            input.drain(i..i + n);
        }
        3 if len > 0 => {
            let i = pos(rng, len);
            let n = rng.random_range(1..=(len - i).min(64));
            let part: Vec<u8> = input[i..i + n].to_vec();
            let at = pos(rng, len);
            input.splice(at..at, part);
        }
        4 => {
            let at = pos(rng, len);
            let n = rng.random_range(1..8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            input.splice(at..at, bytes);
        }
        5 if len > 0 => input.truncate(pos(rng, len)),
        6 => {
            let other = &seeds[rng.random_range(0..seeds.len())];
            if !other.is_empty() {
                let cut = pos(rng, len);
                let from = rng.random_range(0..other.len());
                input.truncate(cut);
                input.extend_from_slice(&other[from..]);
            }
        }
        7 | 8 => {
            // A number token replaced by an extreme value.
            let starts: Vec<usize> = (0..len)
                .filter(|&i| {
                    input[i].is_ascii_digit() && (i == 0 || !input[i - 1].is_ascii_alphanumeric())
                })
                .collect();
            if let Some(&s) = starts.get(pos(rng, starts.len())) {
                let mut e = s;
                while e < len && (input[e].is_ascii_digit() || b".eE+-".contains(&input[e])) {
                    e += 1;
                }
                let v = EXTREME_NUMBERS[rng.random_range(0..EXTREME_NUMBERS.len())];
                input.splice(s..e, v.bytes());
            }
        }
        _ => {
            // A string's contents replaced by a long or odd one.
            let quotes: Vec<usize> = (0..len).filter(|&i| input[i] == b'"').collect();
            if quotes.len() >= 2 {
                let k = rng.random_range(0..quotes.len() - 1);
                let (s, e) = (quotes[k] + 1, quotes[k + 1]);
                let v: Vec<u8> = match rng.random_range(0..4) {
                    0 => vec![b'x'; rng.random_range(65..5000)],
                    1 => "a.b>*\u{0}\u{1b}é".as_bytes().to_vec(),
                    2 => Vec::new(),
                    _ => b"matmul".to_vec(),
                };
                input.splice(s..e, v);
            }
        }
    }
}

/// Runs every target on `inputs` inputs each (from `seed`), calling
/// `progress` after each target.
pub fn run(inputs: u64, seed: u64, mut progress: impl FnMut(&TargetReport)) -> FuzzReport {
    let t0 = std::time::Instant::now();
    let mut reports = Vec::new();
    // A panic is caught and counted; its message would go to stderr.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for (ti, target) in targets().into_iter().enumerate() {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (ti as u64 + 1).wrapping_mul(0x9e37_79b9));
        let mut r = TargetReport {
            name: target.name,
            ..Default::default()
        };
        for i in 0..inputs {
            let mut input = target.seeds[(i as usize) % target.seeds.len()].clone();
            // Every 64th input is a seed as it is: the valid path is run too.
            if i % 64 != 0 {
                for _ in 0..rng.random_range(1..=4) {
                    mutate(&mut rng, &mut input, &target.seeds);
                }
            }
            r.inputs += 1;
            match std::panic::catch_unwind(AssertUnwindSafe(|| (target.run)(&input))) {
                Ok(errors) if errors.is_empty() => r.accepted += 1,
                Ok(errors) => {
                    r.rejected += 1;
                    if errors
                        .iter()
                        .any(|e| e.trim().is_empty() || e.chars().count() > MAX_ERROR_CHARS)
                    {
                        r.unclear_errors += 1;
                        r.first_failure.get_or_insert_with(|| hex::encode(&input));
                    }
                }
                Err(_) => {
                    r.panics += 1;
                    r.first_failure.get_or_insert_with(|| hex::encode(&input));
                }
            }
        }
        progress(&r);
        reports.push(r);
    }
    std::panic::set_hook(hook);
    FuzzReport {
        seed,
        inputs: reports.iter().map(|r| r.inputs).sum(),
        seconds: t0.elapsed().as_secs_f64(),
        targets: reports,
    }
}
