//! A malicious worker, for the trust tests: an enrolled worker (its own key,
//! its own permissions) that speaks docs/PROTOCOL.md but lies.
//!
//! - [`run`]: a worker loop (binary `lockstep-adversary --mode …`) that
//!   takes the replicas assigned to it and answers each one wrongly in the
//!   way the mode says;
//! - [`Adversary`]: one-shot attacks on the bus with the worker's
//!   credentials (forbidden reads and writes, forged and unassigned
//!   results), each returning whether the server or the protocol refused.

use std::time::Duration;

use anyhow::{Context, Result};
use async_nats::jetstream;
use futures::StreamExt;
use lockstep::auth::{ConnectConfig, Identity};
use lockstep::nats::Nats;
use lockstep::protocol::*;

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
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "wrong-shape" => Mode::WrongShape,
            "false-error" => Mode::FalseError,
            "wrong" => Mode::Wrong,
            "bad-signature" => Mode::BadSignature,
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
        Mode::Wrong | Mode::BadSignature => {
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

/// The worker loop: registers and heartbeats like a worker, and answers
/// every replica assigned to it the way `mode` says.
pub async fn run(mode: Mode, cfg: ConnectConfig, name: String) -> Result<()> {
    let key = cfg.identity()?.context("the adversary needs its key")?;
    let nats = lockstep::nats::connect_worker(&cfg).await?;
    let durable = worker_consumer(&name);
    let config = jetstream::consumer::pull::Config {
        durable_name: Some(durable.clone()),
        filter_subject: worker_filter(&name),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ..Default::default()
    };
    // (Retried: a server reloading its configuration answers nothing for a
    // moment.)
    let mut tries = 0;
    let consumer = loop {
        match nats
            .jobs
            .get_or_create_consumer(&durable, config.clone())
            .await
        {
            Ok(c) => break c,
            Err(_) if tries < 60 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e).context("consumer"),
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
                };
                let _ = nats
                    .workers
                    .put(&name, serde_json::to_vec(&rec).unwrap().into())
                    .await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
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

/// Publishes a result on the results subject of its batch and `r.worker`.
pub async fn publish(nats: &Nats, r: &ResultMessage) -> Result<()> {
    publish_on(nats, &result_subject(&r.batch, &r.worker), r).await
}

/// Publishes a result on `subject` and waits for the stream to store it.
pub async fn publish_on(nats: &Nats, subject: &str, r: &ResultMessage) -> Result<()> {
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
