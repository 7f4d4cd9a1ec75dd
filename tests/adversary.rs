//! A malicious worker, for the trust tests: an enrolled worker (its own key,
//! its own permissions) that speaks docs/PROTOCOL.md but lies.
//!
//! - [`run`]: a worker loop (binary `lockstep-adversary --mode …`) that
//!   takes the replicas assigned to it and answers each one wrongly in the
//!   way the mode says;
//! - [`Adversary`]: one-shot attacks on the bus with the worker's
//!   credentials (forbidden reads and writes, forged and unassigned
//!   results), each returning whether the server or the protocol refused.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use futures::StreamExt;
use lockstep::auth::{ConnectConfig, Identity};
use lockstep::coordinator::{Report, SubmitOptions, Verdict};
use lockstep::harness::NatsServer;
use lockstep::protocol::*;
use lockstep::worker::bus::WorkerNats;
use lockstep_kernels::{Backend, Digest};

/// How the worker loop answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `ok` with outputs of the wrong shape (a 1×1 tensor), correctly
    /// signed and self-consistent.
    WrongShape,
    /// A job-level error, `tampered_blob`, for jobs whose inputs are fine.
    FalseError,
    /// `ok` with a made-up digest of the right shape, correctly signed.
    Wrong,
    /// A correct-looking result signed with a key that is not its own.
    BadSignature,
    /// A lazy worker: `ok` with the correct digest (as if learned from
    /// another worker) naming outputs it never stored.
    Copy,
    /// `too_large` for every job, with no limits in its record ("not me").
    TooLarge,
    /// `too_large` for every job, though its record advertises limits that
    /// admit it (a lie).
    LyingTooLarge,
    /// Takes its jobs and never answers (it heartbeats all the while).
    Silent,
    /// Fills everything it may publish to (results of made-up batches, and
    /// outputs, under its own name) until the server refuses more, then
    /// answers like [`Mode::Wrong`].
    Flood,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "wrong-shape" => Mode::WrongShape,
            "false-error" => Mode::FalseError,
            "wrong" => Mode::Wrong,
            "bad-signature" => Mode::BadSignature,
            "copy" => Mode::Copy,
            "too-large" => Mode::TooLarge,
            "lying-too-large" => Mode::LyingTooLarge,
            "flood" => Mode::Flood,
            "silent" => Mode::Silent,
            _ => return Err(format!("unknown mode {s}")),
        })
    }
}

/// A result for `job` from `worker`, signed by `key`.
pub fn signed_result(
    key: &Identity,
    worker: &str,
    job: &JobMessage,
    outcome: Outcome,
) -> ResultMessage {
    let mut r = ResultMessage {
        protocol: PROTOCOL_VERSION,
        batch: job.batch.clone(),
        job: job.job.clone(),
        replica: job.replica,
        attempt: job.attempt,
        worker: worker.into(),
        backend: "cpu".into(),
        device: "adversary".into(),
        path: "lies".into(),
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        outcome,
        timings: Timings::default(),
        job_digest: job.spec.job_digest(),
        signature: String::new(),
        merkle: Default::default(),
    };
    sign_results(key, std::slice::from_mut(&mut r));
    r
}

/// The wrong answer `mode` gives to `job`.
fn answer(mode: Mode, key: &Identity, worker: &str, job: &JobMessage) -> ResultMessage {
    let shapes = job
        .spec
        .op
        .plan(&job.spec.shapes())
        .map(|p| p.output_shapes())
        .unwrap_or_default();
    let outcome = match mode {
        Mode::WrongShape => {
            let t = TensorRef::inline(vec![1, 1], &[42.0]);
            let d = TensorRef::digest_of(&[1, 1], &[42.0]);
            Outcome::Ok {
                digest: lockstep_kernels::outputs_digest(&[d]),
                outputs: vec![t],
            }
        }
        Mode::FalseError => Outcome::Error {
            code: ErrorCode::TamperedBlob,
            message: "input hashes wrong (a lie)".into(),
        },
        Mode::TooLarge | Mode::LyingTooLarge => Outcome::Error {
            code: ErrorCode::TooLarge,
            message: "over this worker's limits (maybe a lie)".into(),
        },
        Mode::Copy => {
            // The right digest (here computed, standing for one learned
            // from another worker), every output named as an object that
            // was never stored.
            use lockstep_kernels::Backend;
            let data: Vec<Vec<f32>> = job
                .spec
                .inputs
                .iter()
                .map(|t| decode_f32(t.inline.as_deref().unwrap_or_default()).unwrap_or_default())
                .collect();
            let shapes_in: Vec<Vec<usize>> =
                job.spec.inputs.iter().map(|t| t.shape.clone()).collect();
            let out = match &job.spec.op {
                // A generation: the right tokens and trace root, from the
                // model (one of the shared ones) run here.
                lockstep_kernels::contract::Op::Generate(g) => {
                    generation(g, data.first().map(Vec::as_slice).unwrap_or_default())
                }
                op => lockstep_kernels::cpu::CpuBackend::new(1)
                    .and_then(|cpu| {
                        cpu.run(op, &lockstep_kernels::contract::views(&shapes_in, &data))
                    })
                    .unwrap_or_default(),
            };
            let digests: Vec<_> = out.iter().map(|t| t.digest()).collect();
            Outcome::Ok {
                digest: lockstep_kernels::outputs_digest(&digests),
                outputs: out
                    .iter()
                    .zip(&digests)
                    .map(|(t, d)| TensorRef::object(t.shape.clone(), *d))
                    .collect(),
            }
        }
        Mode::Wrong | Mode::BadSignature | Mode::Flood | Mode::Silent => {
            let outputs: Vec<TensorRef> = shapes
                .iter()
                .map(|s| {
                    let n: usize = s.iter().product();
                    TensorRef::inline(s.clone(), &vec![7.0; n])
                })
                .collect();
            let digests: Vec<_> = shapes
                .iter()
                .map(|s| TensorRef::digest_of(s, &vec![7.0; s.iter().product()]))
                .collect();
            Outcome::Ok {
                digest: lockstep_kernels::outputs_digest(&digests),
                outputs,
            }
        }
    };
    if mode == Mode::BadSignature {
        signed_result(&Identity::generate(), worker, job, outcome)
    } else {
        signed_result(key, worker, job, outcome)
    }
}

/// A generate job's correct outputs (`tokens`, `trace`), computed with the
/// shared model whose digest the job names; none when it names another.
fn generation(
    g: &lockstep_kernels::contract::Generate,
    prompt: &[f32],
) -> Vec<lockstep_kernels::Tensor> {
    use lockstep_kernels::model::{generate::generate_all, Engine, Model};
    let Ok(ids) = lockstep_kernels::contract::generate::prompt_ids(prompt) else {
        return Vec::new();
    };
    for name in ["stories260K", "aidreams260K"] {
        let Ok(path) = lockstep::llm::models::resolve(name) else {
            continue;
        };
        let Ok(model) = Model::load(&path) else {
            continue;
        };
        if model.digest != g.model {
            continue;
        }
        let Ok(engine) = Engine::new(&model, 1, lockstep_kernels::cpu::Isa::detect()) else {
            return Vec::new();
        };
        return generate_all(&engine, &[(ids, g.clone())])
            .map(|mut v| v.remove(0).outputs())
            .unwrap_or_default();
    }
    Vec::new()
}

/// The worker loop: registers and heartbeats like a worker, and answers
/// every replica assigned to it the way `mode` says.
pub async fn run(mode: Mode, cfg: ConnectConfig, name: String) -> Result<()> {
    let key = cfg.identity()?.context("the adversary needs its key")?;
    let nats = lockstep::nats::connect_worker(&cfg, &name).await?;
    // Its queue, made at enrollment. (Retried: a server reloading its
    // configuration answers nothing for a moment.)
    let mut tries = 0;
    let consumer = loop {
        match nats.queue(&name).await {
            Ok(c) => break c,
            Err(_) if tries < 60 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("queue"),
        }
    };
    // Heartbeats for as long as the process lives.
    let _beat = {
        let (nats, name) = (nats.clone(), name.clone());
        tokio::spawn(async move {
            loop {
                let rec = WorkerRecord {
                    protocol: PROTOCOL_VERSION,
                    id: name.clone(),
                    backends: vec![],
                    contract_version: lockstep_kernels::CONTRACT_VERSION,
                    concurrency: 1,
                    started_ms: 0,
                    heartbeat_ms: now_ms(),
                    state: WorkerState::Up,
                    jobs_done: 0,
                    jobs_failed: 0,
                    limits: (mode == Mode::LyingTooLarge).then_some(WorkerLimits {
                        max_elements: 1 << 26,
                        max_macs: 1 << 36,
                    }),
                    models: None,
                };
                let _ = nats
                    .put_heartbeat(&name, &serde_json::to_vec(&rec).unwrap())
                    .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    if mode == Mode::Flood {
        let (results, outputs) = flood(&nats, &name).await;
        eprintln!("flooded: {results} bytes of results, {outputs} bytes of outputs");
    }
    let mut messages = consumer.messages().await?;
    loop {
        let msg = match messages.next().await {
            Some(Ok(m)) => m,
            Some(Err(_)) => continue,
            None => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                messages = consumer.messages().await?;
                continue;
            }
        };
        if mode == Mode::Silent {
            // Held, never answered, never acked.
            continue;
        }
        let jobs: Vec<JobMessage> = match serde_json::from_slice::<JobBundle>(&msg.payload) {
            Ok(b) => b.jobs,
            Err(_) => serde_json::from_slice::<JobMessage>(&msg.payload)
                .map(|j| vec![j])
                .unwrap_or_default(),
        };
        for job in &jobs {
            let r = answer(mode, &key, &name, job);
            publish(&nats, &r).await?;
        }
        let _ = msg.ack().await;
    }
}

/// Publishes 256 KiB messages of junk on results subjects of made-up
/// batches, then on output subjects, all under `name`, until the server
/// refuses one of each; the bytes stored of each.
pub async fn flood(nats: &WorkerNats, name: &str) -> (usize, usize) {
    let junk = bytes::Bytes::from(vec![0x5a; 256 << 10]);
    let mut stored = [0usize; 2];
    for (i, kind) in ["results", "outputs"].iter().enumerate() {
        for n in 0.. {
            let subject = if *kind == "results" {
                result_subject(&format!("b-flood-{n}"), name)
            } else {
                format!("{OUTPUT_SUBJECT_PREFIX}.{name}.b-flood.{n:064x}.0")
            };
            let acked = match nats.js.publish(subject, junk.clone()).await {
                Ok(ack) => matches!(
                    tokio::time::timeout(Duration::from_secs(5), ack).await,
                    Ok(Ok(_))
                ),
                Err(_) => false,
            };
            if !acked || n > 100_000 {
                break;
            }
            stored[i] += junk.len();
        }
    }
    (stored[0], stored[1])
}

/// Publishes a result on the results subject of its batch and `r.worker`.
pub async fn publish(nats: &WorkerNats, r: &ResultMessage) -> Result<()> {
    publish_on(nats, &result_subject(&r.batch, &r.worker), r).await
}

/// Publishes a result on `subject` and waits for the stream to store it.
pub async fn publish_on(nats: &WorkerNats, subject: &str, r: &ResultMessage) -> Result<()> {
    let ack = nats
        .js
        .publish(subject.to_string(), serde_json::to_vec(r)?.into())
        .await?;
    tokio::time::timeout(Duration::from_secs(3), ack)
        .await
        .context("no ack")??;
    Ok(())
}

/// One-shot attacks with an enrolled worker's credentials.
pub struct Adversary {
    pub name: String,
    pub key: Identity,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
}

impl Adversary {
    /// Connects with the worker's key (no stores opened: some attacks are on
    /// the opening itself).
    pub async fn connect(cfg: &ConnectConfig, name: &str) -> Result<Self> {
        let client = cfg.options().await?.connect(cfg.urls()).await?;
        Ok(Self {
            name: name.into(),
            key: cfg.identity()?.context("key")?,
            js: jetstream::with_prefix(client.clone(), WORKER_API_PREFIX),
            client,
        })
    }

    /// Whether a JetStream publish to `subject` was stored (false: refused or
    /// no answer within 2 s).
    pub async fn can_publish(&self, subject: &str, payload: &[u8]) -> bool {
        match self
            .js
            .publish(subject.to_string(), payload.to_vec().into())
            .await
        {
            Ok(ack) => matches!(
                tokio::time::timeout(Duration::from_secs(1), ack).await,
                Ok(Ok(_))
            ),
            Err(_) => false,
        }
    }

    /// Whether a core subscription to `subject` receives a message
    /// published there by `other` (false: the server did not deliver it).
    pub async fn can_read(&self, subject: &str, other: &async_nats::Client) -> bool {
        let Ok(mut sub) = self.client.subscribe(subject.to_string()).await else {
            return false;
        };
        let _ = self.client.flush().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let probe = subject.replace(['>', '*'], "probe");
        let _ = other.publish(probe, "x".into()).await;
        let _ = other.flush().await;
        matches!(
            tokio::time::timeout(Duration::from_millis(500), sub.next()).await,
            Ok(Some(_))
        )
    }

    /// Whether the JetStream API answers a request on `api` (after
    /// `$JS.API.`) without an error.
    pub async fn api_ok(&self, api: &str, body: serde_json::Value) -> bool {
        let request = self
            .js
            .request::<_, _, serde_json::Value>(api.to_string(), &body);
        match tokio::time::timeout(Duration::from_secs(1), request).await {
            Ok(Ok(v)) => v.get("error").is_none(),
            _ => false,
        }
    }
}

// Shared by the trust tests: options, the reference, the checks.

pub fn opts(server: &NatsServer, batch: &str, out: Option<&std::path::Path>) -> SubmitOptions {
    SubmitOptions {
        redundancy: 2,
        batch_id: Some(batch.into()),
        worker_timeout: Duration::from_secs(2),
        job_timeout: Duration::from_secs(60),
        deadline: Some(Duration::from_secs(240)),
        progress: false,
        threads: 1,
        out_dir: out.map(Into::into),
        signer: Some(std::sync::Arc::new(
            server.coordinator().identity().unwrap().unwrap(),
        )),
        ..Default::default()
    }
}

/// The correct digest of every job, computed here on the CPU backend.
pub fn reference(jobs: &[lockstep::batch::BatchJob]) -> BTreeMap<String, Digest> {
    let cpu = lockstep_kernels::cpu::CpuBackend::new(1).unwrap();
    jobs.iter()
        .map(|j| {
            let (shapes, data): (Vec<Vec<usize>>, Vec<Vec<f32>>) = j
                .inputs
                .iter()
                .map(|t| match t {
                    lockstep::batch::Tensor::Data { shape, data } => (shape.clone(), data.clone()),
                    _ => panic!("inline jobs only"),
                })
                .unzip();
            let out = cpu
                .run(&j.op, &lockstep_kernels::contract::views(&shapes, &data))
                .unwrap();
            let digests: Vec<Digest> = out.iter().map(|t| t.digest()).collect();
            (j.id.clone(), lockstep_kernels::outputs_digest(&digests))
        })
        .collect()
}

/// Every job accepted, with the correct digest, and no honest worker named.
pub fn assert_all_correct(report: &Report, want: &BTreeMap<String, Digest>, honest: &[&str]) {
    assert_eq!(report.failed + report.unresolved, 0, "{report:#?}");
    for j in &report.jobs {
        assert!(
            matches!(j.verdict, Verdict::Verified | Verdict::Resolved),
            "{j:#?}"
        );
        assert_eq!(
            j.digest,
            Some(want[&j.job]),
            "{}: wrong output accepted",
            j.job
        );
        for w in honest {
            assert!(
                !j.faulty_workers.iter().any(|f| f == w),
                "{w} blamed: {j:#?}"
            );
        }
    }
    for f in &report.faults {
        assert!(!honest.contains(&f.worker.as_str()), "honest {f:?}");
    }
}

pub async fn enrollment(nats: &lockstep::nats::Nats, name: &str) -> Enrollment {
    lockstep::nats::enrollments(nats).await.unwrap()[name].clone()
}

/// A `lockstep-adversary` process, killed on drop.
pub struct AdversaryProc(std::process::Child);

impl AdversaryProc {
    pub fn start(server: &NatsServer, name: &str, operator: &str, mode: &str) -> Self {
        let cfg = server.enroll(name, operator).unwrap();
        let bin = crate::lockstep_bin().with_file_name("lockstep-adversary");
        let child = std::process::Command::new(bin)
            .args(["--mode", mode, "--nats", &cfg.url, "--name", name, "--nkey"])
            .arg(cfg.nkey.unwrap())
            .spawn()
            .expect("start the adversary");
        Self(child)
    }
}

impl Drop for AdversaryProc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
