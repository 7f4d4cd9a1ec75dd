//! The `lockstep` command-line tool (the binary is a one-line call of [`main`]).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{bench, tensors};
use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockstep_kernels::{
    outputs_digest, tensor_digest_f32, BackendKind, Matmul, MatmulDims, Op, TensorView,
    CONTRACT_VERSION,
};

/// Verifiable inference: every backend computes the same bits.
///
/// lockstep's kernels (CPU, WGSL, CUDA) follow one published arithmetic
/// contract (CONTRACT.md) that fixes the order and rounding of every step, so
/// the same job gives the same SHA3-256 digest on any hardware.
#[derive(Parser)]
#[command(name = "lockstep", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the backends on this machine, their devices and conformance findings.
    Backends {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Multiply two matrices from a safetensors file: C = A·B.
    ///
    /// IN must hold F32 tensors `a` [M,K] and `b` [K,N]; OUT gets `c` [M,N].
    /// The last line printed is the contract digest of c, `sha3-256:<hex>`,
    /// which is the same on every backend.
    ///
    /// Example: lockstep matmul --backend cpu --input ab.safetensors --output c.safetensors
    Matmul {
        /// Which backend computes: cpu, wgpu or cuda.
        #[arg(long, env = "LOCKSTEP_BACKEND", default_value = "cpu")]
        backend: BackendKind,
        #[arg(long, short)]
        input: PathBuf,
        #[arg(long, short)]
        output: PathBuf,
        /// CPU threads (0 = one per core).
        #[arg(long, env = "LOCKSTEP_THREADS", default_value_t = 0)]
        threads: usize,
    },
    /// Generate text with a language model under the contract: the same
    /// prompt and parameters give the same tokens, bit for bit, on any
    /// machine, thread count or batch. Streams the text, then prints the
    /// token digest (and with --trace the trace root) and the model digest.
    ///
    /// Example: lockstep generate --model smollm2 --prompt "The capital of France is"
    Generate(crate::llm::generate::GenerateArgs),
    /// A model's tokenizer alone: text → ids (with --chat or --messages
    /// through the model's chat template), or --ids → text, and the
    /// tokenizer digest a generate job made from text names.
    ///
    /// Example: lockstep tokenize --model smollm2 --chat --text "Hello"
    Tokenize(crate::llm::tokenize::TokenizeArgs),
    /// Serve verified completions over an OpenAI-compatible HTTP API: each
    /// request becomes generate jobs on the deployment's workers, and the
    /// answer is sent only once --redundancy workers of distinct operators
    /// agreed bit for bit (or a dispute settled it), with its receipts.
    ///
    /// Example: lockstep serve --deployment ./dep --listen 127.0.0.1:8080 --model smollm2
    Serve(crate::serve::ServeArgs),
    /// API keys of `lockstep serve` (stored hashed in the deployment).
    Keys {
        #[command(subcommand)]
        action: crate::serve::keys::KeysCommand,
    },
    /// Recompute one layer of a model alone, by the scalar spec, from that
    /// layer's inputs (written by `generate --dump-layer L --dump FILE`), and
    /// print its output digest: what a referee checks against a trace.
    ///
    /// Example: lockstep replay-layer --model smollm2 --layer 7 --inputs layer7.safetensors
    ReplayLayer(crate::llm::generate::ReplayArgs),
    /// Models by digest: `push` stores a model file in the deployment's model
    /// store under its model digest (coordinators and admins only), so
    /// workers can fetch it for generate jobs; `list` shows what is there.
    ///
    /// Example: lockstep model push smollm2 --deployment ./lockstep-deployment
    Model {
        #[command(subcommand)]
        action: crate::llm::distribute::ModelCommand,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Benchmarks against the baselines users would otherwise use, in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Run a worker: self-test the backends, register, and compute the jobs
    /// coordinators assign to it until SIGINT/SIGTERM (then finish in-flight
    /// jobs and exit).
    ///
    /// Example: lockstep worker --nats nats://127.0.0.1:4222 --backend auto --name gpu-box-1
    Worker(WorkerArgs),
    /// Dispatch a batch of jobs (JSON Lines, see docs/PROTOCOL.md) to R distinct
    /// workers each, verify that their digests agree, resolve disputes, and
    /// write report.json and the outputs. Exits non-zero if any job is left
    /// failed or unresolved. Running the same batch again resumes it.
    ///
    /// Example: lockstep submit --nats nats://127.0.0.1:4222 --redundancy 2 jobs.jsonl
    Submit(SubmitArgs),
    /// Set up a deployment: a folder with the NATS server's configuration
    /// (authorization on: every party logs in with its own key and gets only
    /// its role's permissions) and the first coordinator's key.
    ///
    /// Example: lockstep deploy init ./lockstep-deployment --port 4222
    #[command(subcommand)]
    Deploy(DeployCommand),
    /// Enroll a worker in a deployment: writes its key, lets the server know
    /// it (rewrites the configuration and reloads a server running from the
    /// deployment), and records its public key and operator in the registry.
    /// Run it again to re-register; it is idempotent.
    ///
    /// Example: lockstep enroll worker gpu-box-1 --operator acme --deployment ./lockstep-deployment
    Enroll {
        /// What to enroll (only `worker`).
        role: EnrollRole,
        /// The worker's name (A-Z a-z 0-9 _ -).
        name: String,
        /// Who runs it: replicas of a job always go to workers of distinct
        /// operators.
        #[arg(long)]
        operator: String,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// The enrolled workers: state (active, quarantined), operator, whether
    /// they are live, and their faults. `clear NAME` lifts a quarantine.
    Workers {
        #[command(subcommand)]
        action: Option<WorkersAction>,
        /// Print JSON instead of a table.
        #[arg(long, global = true)]
        json: bool,
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Check receipts (receipts.jsonl from `lockstep submit`) offline: every
    /// worker's and the coordinator's signature, the job digest, and that a
    /// verified job had r workers of distinct operators. Exits non-zero on
    /// any mismatch.
    ///
    /// A receipt is only as good as the keys it is checked against: give a
    /// trust anchor, --deployment (every key must be enrolled there, workers
    /// under the operator named) or --coordinator-key (the coordinator you
    /// trust). Without one, anyone can make receipts that pass (worker keys
    /// are free to generate), so `verify` says so and exits non-zero unless
    /// --self-consistent-only asks for exactly that.
    ///
    /// Example: lockstep verify lockstep-out/b-1234/receipts.jsonl --deployment ./lockstep-deployment
    Verify {
        receipts: PathBuf,
        /// A deployment folder whose enrolled keys the receipts must use.
        #[arg(long)]
        deployment: Option<PathBuf>,
        /// The public key (U…) of the coordinator whose receipts you trust.
        #[arg(long, value_name = "KEY")]
        coordinator_key: Option<String>,
        /// Check only that each receipt is consistent in itself (no trust
        /// anchor): exits 0 when they are.
        #[arg(long, conflicts_with_all = ["deployment", "coordinator_key"])]
        self_consistent_only: bool,
    },
    /// The whole system on this machine: a local nats-server with
    /// authorization on (keys made in a temporary folder), three enrolled
    /// CPU workers, one of which computes one layer wrong (a test-only
    /// switch), and a batch of language-model prompts with r = 2: the text,
    /// the verdicts, the dispute that pins the wrong worker by replaying one
    /// layer, and the receipts checked. `--matmul`: matmul jobs on CPU and
    /// WGSL workers instead.
    Demo {
        /// Number of jobs in the matmul demo's batch.
        #[arg(long, default_value_t = 12)]
        jobs: usize,
        /// Skip NATS: run one matmul on every backend here and compare digests.
        #[arg(long)]
        local: bool,
        /// The matmul demo (CPU and WGSL workers) instead of the LLM one.
        #[arg(long)]
        matmul: bool,
        /// The LLM demo's model: smollm2 (fetched by `./dev setup`),
        /// stories260K, aidreams260K, or a file.
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// Tokens each prompt generates at most.
        #[arg(long, default_value_t = 24)]
        max_tokens: usize,
    },
}

#[derive(clap::ValueEnum, Clone, Copy)]
enum EnrollRole {
    Worker,
}

#[derive(Subcommand)]
enum DeployCommand {
    /// Create a deployment folder.
    Init {
        dir: PathBuf,
        /// Address the server listens on.
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 4222)]
        port: u16,
        /// Largest message the server accepts (its default: 1 MiB).
        #[arg(long)]
        max_payload: Option<usize>,
        /// TLS for clients: the server's certificate (PEM)...
        #[arg(long, requires_all = ["tls_key", "tls_ca"])]
        tls_cert: Option<PathBuf>,
        /// ...its key (PEM)...
        #[arg(long)]
        tls_key: Option<PathBuf>,
        /// ...and the CA clients' certificates must chain to.
        #[arg(long)]
        tls_ca: Option<PathBuf>,
        /// Require every client to present a certificate from --tls-ca.
        #[arg(long, requires = "tls_cert")]
        verify_clients: bool,
        /// A JetStream cluster of N servers (3 to 9) instead of one: node i
        /// (n1..nN) listens for clients on --port + i - 1 and for its peers
        /// on --route-port + i - 1; every store keeps 3 copies, so the
        /// deployment survives losing a node. One configuration file per
        /// node (nats-server-nI.conf).
        #[arg(long, value_name = "N")]
        cluster: Option<usize>,
        /// First route port of a cluster.
        #[arg(long, default_value_t = 6222, requires = "cluster")]
        route_port: u16,
        /// The nodes' addresses when they run on different machines
        /// (comma-separated, one per node; default: --host for all).
        #[arg(long, value_delimiter = ',', requires = "cluster")]
        node_hosts: Vec<String>,
    },
}

#[derive(Subcommand)]
enum WorkersAction {
    /// Lift a worker's quarantine (it gets assignments again).
    Clear { name: String },
}

/// Where the NATS server is and who this party is.
#[derive(clap::Args, Clone, Default)]
pub struct ConnectArgs {
    /// NATS server URL (default: the deployment's, else nats://127.0.0.1:4222).
    #[arg(long, global = true, env = "LOCKSTEP_NATS")]
    pub(crate) nats: Option<String>,
    /// This party's key: an nkey seed file, as `lockstep enroll` and
    /// `lockstep deploy init` write them (default: from --deployment).
    #[arg(long, global = true, env = "LOCKSTEP_NKEY")]
    pub(crate) nkey: Option<PathBuf>,
    /// A NATS credentials file (JWT and seed), for servers in operator mode.
    #[arg(long, global = true, env = "LOCKSTEP_CREDS")]
    pub(crate) creds: Option<PathBuf>,
    /// CA certificate (PEM) to trust for the server's TLS; requires TLS.
    #[arg(long, global = true, env = "LOCKSTEP_TLS_CA")]
    pub(crate) tls_ca: Option<PathBuf>,
    /// Client certificate (PEM), for servers that verify clients.
    #[arg(long, global = true, env = "LOCKSTEP_TLS_CERT", requires = "tls_key")]
    pub(crate) tls_cert: Option<PathBuf>,
    /// Client certificate's key (PEM).
    #[arg(long, global = true, env = "LOCKSTEP_TLS_KEY", requires = "tls_cert")]
    pub(crate) tls_key: Option<PathBuf>,
    /// A deployment folder (`lockstep deploy init`): the server address and
    /// this party's key are taken from it unless given.
    #[arg(long, global = true, env = "LOCKSTEP_DEPLOYMENT")]
    pub(crate) deployment: Option<PathBuf>,
}

impl ConnectArgs {
    /// The connection of `name` in `role` (its key from the deployment
    /// when --nkey/--creds are not given).
    pub fn config(
        &self,
        role: crate::deploy::Role,
        name: &str,
    ) -> Result<crate::auth::ConnectConfig> {
        let d = self
            .deployment
            .as_deref()
            .map(crate::deploy::Deployment::open)
            .transpose()?;
        let url = self
            .nats
            .clone()
            .or_else(|| d.as_ref().map(|d| d.url()))
            .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
        let nkey = match (&self.nkey, &self.creds, &d) {
            (Some(k), _, _) => Some(k.clone()),
            (None, None, Some(d)) => {
                let path = d.key_path(role, name);
                anyhow::ensure!(
                    path.exists(),
                    "no key for {} in {} (enroll it first: lockstep enroll worker {name} --operator …)",
                    crate::protocol::quote(name),
                    d.dir.display()
                );
                Some(path)
            }
            _ => None,
        };
        // TLS from the flags, else the deployment's own settings.
        let from_deployment = d.as_ref().map(|d| d.connect_as(role, name));
        let pick = |flag: &Option<PathBuf>,
                    dep: fn(&crate::auth::ConnectConfig) -> Option<PathBuf>| {
            flag.clone()
                .or_else(|| from_deployment.as_ref().and_then(dep))
        };
        Ok(crate::auth::ConnectConfig {
            url,
            nkey,
            creds: self.creds.clone(),
            tls_ca: pick(&self.tls_ca, |c| c.tls_ca.clone()),
            tls_cert: pick(&self.tls_cert, |c| c.tls_cert.clone()),
            tls_key: pick(&self.tls_key, |c| c.tls_key.clone()),
        })
    }

    /// The coordinator's connection.
    pub fn coordinator(&self) -> Result<crate::auth::ConnectConfig> {
        self.config(crate::deploy::Role::Coordinator, "coordinator")
    }
}

#[derive(clap::Args)]
struct WorkerArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// auto (fastest backend that passes the self-test), cpu, wgpu or cuda.
    #[arg(long, env = "LOCKSTEP_BACKEND", default_value = "auto")]
    backend: crate::worker::BackendChoice,
    /// Unique worker name (A-Z a-z 0-9 _ -); default: host name and pid.
    /// Restarting with the same name picks up jobs left unacked.
    #[arg(long, env = "LOCKSTEP_WORKER_NAME")]
    name: Option<String>,
    /// Jobs computed at once.
    #[arg(long, env = "LOCKSTEP_CONCURRENCY", default_value_t = 1)]
    concurrency: usize,
    /// CPU threads of the CPU backend (0 = all cores).
    #[arg(long, env = "LOCKSTEP_THREADS", default_value_t = 0)]
    threads: usize,
    /// Largest tensor a job may name, in elements.
    #[arg(long, env = "LOCKSTEP_MAX_ELEMENTS", default_value_t = 1 << 26)]
    max_elements: usize,
    /// Largest job accepted, in multiply-adds or comparable steps (M·K·N for matmul).
    #[arg(long, default_value_t = 1 << 36)]
    max_macs: u64,
    /// Folder for cached input blobs (default: $XDG_CACHE_HOME/lockstep/blobs).
    /// Every entry is re-hashed when read; a damaged one is fetched again.
    #[arg(long, env = "LOCKSTEP_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Most MiB the blob cache may hold; the least recently used entries go
    /// first.
    #[arg(long, env = "LOCKSTEP_CACHE_MIB", default_value_t = 1024)]
    cache_mib: u64,
    /// Most MiB of model files kept on disk (in the cache folder's
    /// `models/`); the least recently used go first.
    #[arg(long, env = "LOCKSTEP_MODEL_CACHE_MIB", default_value_t = 16384)]
    model_cache_mib: u64,
    /// The largest model file (MiB) this worker takes; a generate job for a
    /// larger one is answered `too_large` and goes to another worker.
    #[arg(long, env = "LOCKSTEP_MAX_MODEL_MIB", default_value_t = 8192)]
    max_model_mib: u64,
    /// Models kept loaded in memory at once (least recently used unloaded
    /// first). Each runs every generate job for it as one batch.
    #[arg(long, default_value_t = 2)]
    max_models: usize,
    /// Heartbeat interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Serve Prometheus metrics at http://ADDR/metrics (jobs and tokens by
    /// op and outcome, job latency, loaded models, backend, memory).
    #[arg(long, env = "LOCKSTEP_METRICS", value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// TEST ONLY: corrupt one output bit of every job whose id hashes into 1
    /// of N buckets, to prove that coordinators catch it.
    #[arg(long, env = "LOCKSTEP_FAULT_INJECT_EVERY", hide = true)]
    fault_inject_every: Option<u64>,
    /// TEST ONLY: sleep this many milliseconds before computing each job.
    #[arg(long, env = "LOCKSTEP_TEST_DELAY_MS", hide = true, default_value_t = 0)]
    test_delay_ms: u64,
    /// TEST ONLY: in every generation, flip one bit of layer L's output at
    /// position P (`P:L`), as a broken device would.
    #[arg(long, env = "LOCKSTEP_FAULT_INJECT_LAYER", hide = true, value_parser = parse_pos_layer)]
    fault_inject_layer: Option<(usize, usize)>,
    /// TEST ONLY: in every generation, replace generated token I by the
    /// next id (a wrong classifier or sampler).
    #[arg(long, env = "LOCKSTEP_FAULT_INJECT_TOKEN", hide = true)]
    fault_inject_token: Option<usize>,
    /// TEST ONLY: answer dispute queries with a trace that is not the one
    /// signed (`lie`), or not at all (`silent`).
    #[arg(long, env = "LOCKSTEP_TEST_DISPUTE", hide = true)]
    test_dispute: Option<crate::worker::DisputeBehaviour>,
}

fn parse_pos_layer(s: &str) -> Result<(usize, usize), String> {
    let (p, l) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not POSITION:LAYER"))?;
    Ok((
        p.trim()
            .parse()
            .map_err(|_| format!("{p:?} is not a position"))?,
        l.trim()
            .parse()
            .map_err(|_| format!("{l:?} is not a layer"))?,
    ))
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// The batch: JSON Lines, one job per line.
    batch: PathBuf,
    #[command(flatten)]
    connect: ConnectArgs,
    /// Distinct workers per job.
    #[arg(long, short, default_value_t = 2)]
    redundancy: u32,
    /// Output folder for report.json and outputs/ (default: lockstep-out/<batch id>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Batch id, to resume an interrupted batch (default: a new id, the
    /// batch's content hash and a random nonce, printed at the start).
    #[arg(long)]
    batch_id: Option<String>,
    /// Seconds without a heartbeat before a worker is considered dead.
    #[arg(long, default_value_t = 5.0)]
    worker_timeout: f64,
    /// Seconds before an unanswered replica is given to another worker,
    /// however busy its worker seems.
    #[arg(long, default_value_t = 300.0)]
    job_timeout: f64,
    /// Seconds a worker may hold replicas without answering any of this
    /// batch's before they go to other workers (heartbeats alone are not
    /// progress). Stretched for large jobs: the worker's outstanding
    /// multiply-adds at 10^7 per second, a rate even the exact WGSL path
    /// beats.
    #[arg(long, default_value_t = 30.0)]
    stall_timeout: f64,
    /// Give up after this many seconds, leaving undecided jobs unresolved.
    #[arg(long)]
    deadline: Option<f64>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Keep the batch's results, plan and blobs on the server afterwards
    /// (by default they are purged once every job is decided).
    #[arg(long)]
    keep_batch: bool,
    /// Limits of the server-side stores, set before the batch starts, e.g.
    /// `results.bytes=2G,blobs.age=1d` (stores: jobs, results, plans, faults,
    /// workers, blobs, refs; sizes K/M/G, ages s/m/h/d; see docs/PROTOCOL.md).
    #[arg(long, env = "LOCKSTEP_STORE_LIMITS")]
    store_limits: Option<String>,
    /// Fraction (0 to 1) of the jobs whose workers agree that the
    /// coordinator recomputes itself anyway: workers that agree on wrong
    /// bits are caught with this probability on every job they cheat on
    /// (see docs/PROTOCOL.md, "Threat model").
    #[arg(long, default_value_t = 0.0)]
    audit_rate: f64,
    /// Seconds a worker has to answer a dispute query about a generation it
    /// signed (its trace, a layer's inputs); no answer in time is its fault.
    #[arg(long, default_value_t = 120.0)]
    dispute_timeout: f64,
}

#[derive(Subcommand)]
enum BenchCommand {
    /// lockstep serve under load: completions/s, tokens/s, p50/p99 latency
    /// and time to first verified token at each number of concurrent
    /// clients, r = 2 against the same two local workers with r = 1 in the
    /// same run; and what the HTTP layer adds to a request's median latency.
    ///
    /// Example: lockstep bench serve --model smollm2 --clients 1,8,32 --requests 4 --max-tokens 16
    Serve {
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// Concurrent clients (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
        clients: Vec<usize>,
        /// Requests each client sends, one after the other.
        #[arg(long, default_value_t = 4)]
        requests: usize,
        #[arg(long, default_value_t = 16)]
        max_tokens: usize,
        /// CPU threads per worker.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Prefill and decode tokens/s of the exact engine (median of runs),
    /// peak resident memory against model file + KV cache + 64 MiB, and the
    /// weight bandwidth decode achieves against this machine's read
    /// bandwidth measured in the same run.
    ///
    /// Example: lockstep bench generate --model smollm2 --backend cpu --threads 1
    Generate {
        #[arg(long, default_value = "smollm2")]
        model: String,
        /// cpu, or wgpu / cuda: the model on that device at each --batch
        /// size, against the CPU engine on the same prompts in the same run.
        #[arg(long, default_value = "cpu")]
        backend: BackendKind,
        /// With a GPU backend: sequences decoded together (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "1,32")]
        batch: Vec<usize>,
        /// CPU threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Prompt tokens prefilled in one pass.
        #[arg(long, default_value_t = 128)]
        prompt_tokens: usize,
        /// Greedy tokens decoded one at a time.
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        /// Runs (medians are reported).
        #[arg(long, default_value_t = 9)]
        runs: usize,
        /// Also run llama.cpp and candle (benches/llm-baselines, built
        /// separately) on the same model, one run each after each of
        /// lockstep's, and print the ratios.
        #[arg(long)]
        baselines: bool,
        #[arg(long)]
        json: bool,
    },
    /// GFLOP/s of lockstep's matmul against faer/matrixmultiply (CPU), the CPU
    /// backend (WGSL) or cuBLAS SGEMM (CUDA), timed interleaved in one run.
    ///
    /// Example: lockstep bench matmul --backend cpu --m 1024 --n 1024 --k 1024 --threads 2 --json
    Matmul {
        #[arg(long, default_value = "cpu")]
        backend: BackendKind,
        #[arg(long, default_value_t = 1024)]
        m: usize,
        #[arg(long, default_value_t = 1024)]
        n: usize,
        #[arg(long, default_value_t = 1024)]
        k: usize,
        /// CPU threads for lockstep and the baselines (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Timed repetitions of each side (the median is reported).
        #[arg(long, default_value_t = 7)]
        reps: usize,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Verified LLM throughput: generated tokens/s of a batch of generate
    /// jobs with r = 2 against the same two local workers with r = 1, in
    /// the same run (0.5 is the ideal ratio).
    ///
    /// Example: lockstep bench verified-generate --model smollm2 --jobs 8 --max-tokens 32
    VerifiedGenerate {
        #[arg(long, default_value = "smollm2")]
        model: String,
        #[arg(long, default_value_t = 8)]
        jobs: usize,
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Rounds of (r = 1, r = 2).
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// CPU threads of each worker.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Jobs each worker decodes at once (as one batch).
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long)]
        json: bool,
    },
    /// What a dispute costs: replaying one layer at the last position of a
    /// generation against re-executing the whole generation, same run.
    ///
    /// Example: lockstep bench dispute --model smollm2 --tokens 128
    Dispute {
        #[arg(long, default_value = "smollm2")]
        model: String,
        #[arg(long, default_value_t = 128)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// CPU threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Continuous batching: aggregate tokens/s of N sequences decoded as one
    /// batch against the same N decoded one after another, same run (and a
    /// check that every sequence's bits are the same either way).
    ///
    /// Example: lockstep bench batch-decode --model smollm2 --sequences 8 --threads 2
    BatchDecode {
        #[arg(long, default_value = "smollm2")]
        model: String,
        #[arg(long, default_value_t = 8)]
        sequences: usize,
        #[arg(long, default_value_t = 32)]
        tokens: usize,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// CPU threads (0 = one per core).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        #[arg(long)]
        json: bool,
    },
    /// Verified jobs per second and latency of tiny r = 2 jobs on three local
    /// workers, next to raw JetStream publish-and-ack round trips measured in
    /// the same run.
    Dispatch {
        /// Jobs (and raw messages) to send.
        #[arg(long, default_value_t = 500)]
        jobs: usize,
        #[arg(long)]
        json: bool,
    },
    /// Fuzz everything lockstep reads from outside (job and result
    /// messages, batch lines, safetensors files, key files, receipts) with
    /// mutated valid inputs: no input may panic, and every error must be a
    /// clear line. Exits non-zero on any failure.
    ///
    /// Example: lockstep bench fuzz --inputs 200000
    Fuzz {
        /// Inputs per target (7 targets).
        #[arg(long, default_value_t = 100_000)]
        inputs: u64,
        /// Random seed (default: from the clock; printed).
        #[arg(long)]
        seed: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Many batches in a row through a local nats-server and three worker
    /// processes: verified jobs/s, resident memory of coordinator, workers
    /// and server, and bytes held by the stores, batch after batch. They
    /// must stay flat after the first batches (finished batches are purged).
    ///
    /// Example: lockstep bench soak --jobs 100000 --batch 2000
    Soak {
        /// Jobs in all.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Jobs per batch (r = 2; every 50th job large enough to use the
        /// object store).
        #[arg(long, default_value_t = 2000)]
        batch: usize,
        /// One JSON object at the end instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses the command line, runs the command, and returns the exit code.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Backends { json } => backends(json),
        Command::Matmul {
            backend,
            input,
            output,
            threads,
        } => matmul(backend, &input, &output, threads),
        Command::Bench(BenchCommand::Matmul {
            backend,
            m,
            n,
            k,
            threads,
            reps,
            json,
        }) => {
            if backend == BackendKind::Cpu && threads > 0 {
                // matrixmultiply reads its thread count once, at first use.
                std::env::set_var("MATMUL_NUM_THREADS", threads.to_string());
            }
            let r = bench::bench_matmul(backend, MatmulDims::new(m, k, n), threads, reps)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} on {} — {m}x{k} · {k}x{n}, {} threads, median of {} runs",
                    r.backend, r.device, r.threads, r.reps
                );
                println!("  {:<16} {:>9.1} GFLOP/s", "lockstep", r.lockstep_gflops);
                for (name, g) in &r.baselines {
                    println!("  {name:<16} {g:>9.1} GFLOP/s");
                }
                println!("  ratio lockstep / {} = {:.3}", r.baseline, r.ratio);
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Soak { jobs, batch, json }) => {
            let rt = tokio::runtime::Runtime::new()?;
            if !json {
                println!(
                    "{:>6} {:>9} {:>10} {:>12} {:>12} {:>11} {:>12}",
                    "batch",
                    "jobs",
                    "verified/s",
                    "coord MiB",
                    "workers MiB",
                    "server MiB",
                    "store bytes"
                );
            }
            let r = rt.block_on(bench::soak::bench_soak(jobs, batch, |s| {
                if !json {
                    println!(
                        "{:>6} {:>9} {:>10.0} {:>12.1} {:>12.1} {:>11} {:>12}",
                        s.batch,
                        s.jobs_done,
                        s.verified_per_s,
                        s.coordinator_rss_mib,
                        s.workers_rss_mib,
                        s.server_rss_mib.map_or("-".into(), |m| format!("{m:.1}")),
                        s.store_bytes
                    );
                }
            }))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "growth from batch 3 to the last: coordinator {:.2}x, workers {:.2}x, server {}; store bytes last {} (max {})",
                    r.coordinator_rss_growth,
                    r.workers_rss_growth,
                    r.server_rss_growth.map_or("-".into(), |g| format!("{g:.2}x")),
                    r.store_bytes_last,
                    r.store_bytes_max
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Fuzz { inputs, seed, json }) => {
            let seed = seed.unwrap_or_else(crate::protocol::now_ms);
            if !json {
                println!("fuzzing {inputs} inputs per target, seed {seed}");
            }
            let r = crate::fuzz::run(inputs, seed, |t| {
                if !json {
                    println!(
                        "  {:<18} {:>9} inputs  {:>9} accepted  {:>9} clear errors  {} panics  {} unclear errors",
                        t.name, t.inputs, t.accepted, t.rejected - t.unclear_errors, t.panics, t.unclear_errors
                    );
                    if let Some(f) = &t.first_failure {
                        let path = std::env::temp_dir().join(format!(
                            "lockstep-fuzz-{}-{seed}.hex",
                            t.name.replace(' ', "-")
                        ));
                        let _ = std::fs::write(&path, f);
                        println!("    first failing input (hex) in {}", path.display());
                    }
                }
            });
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{} inputs in {:.1} s, {} failures",
                    r.inputs,
                    r.seconds,
                    r.failures()
                );
            }
            anyhow::ensure!(r.failures() == 0, "{} inputs failed", r.failures());
            Ok(())
        }
        Command::Bench(BenchCommand::Serve {
            model,
            clients,
            requests,
            max_tokens,
            threads,
            json,
        }) => {
            let r = crate::bench::serve::bench_serve(
                &model,
                &clients,
                requests,
                max_tokens,
                threads,
                |line| eprintln!("  {line}"),
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
                return Ok(());
            }
            println!("serve: {} ({} tokens a request)", r.model, r.max_tokens);
            for p in &r.points {
                println!(
                    "  {:>3} client(s) r={}: {:>6.2} completions/s {:>7.1} tok/s  p50 {:>6.0} ms  p99 {:>6.0} ms  ttft p50 {:>6.0} ms",
                    p.clients, p.redundancy, p.completions_per_s, p.completion_tok_s, p.p50_ms, p.p99_ms, p.ttft_p50_ms
                );
            }
            for (c, ratio) in &r.ratios {
                println!("  {c:>3} client(s): verified ÷ unverified completions/s = {ratio:.2} (goal at 32: ≥ 0.45)");
            }
            println!(
                "  HTTP layer: p50 {:.2} ms over HTTP vs {:.2} ms direct: adds {:.2} ms (goal ≤ 1 ms)",
                r.http_p50_ms, r.direct_p50_ms, r.http_overhead_p50_ms
            );
            Ok(())
        }
        Command::Bench(BenchCommand::VerifiedGenerate {
            model,
            jobs,
            max_tokens,
            runs,
            threads,
            concurrency,
            json,
        }) => {
            let r = bench::llm::verified_generate(
                &model,
                jobs,
                max_tokens,
                runs,
                threads,
                concurrency,
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "verified-generate: {} jobs x {} tokens of {}, {} CPU workers",
                    r.jobs, r.max_tokens, r.model, r.workers
                );
                for (i, ((u, v), q)) in r
                    .unverified_tok_s
                    .iter()
                    .zip(&r.verified_tok_s)
                    .zip(&r.ratios)
                    .enumerate()
                {
                    println!("  run {i}: unverified (r = 1) {u:>8.1} tok/s   verified (r = 2) {v:>8.1} tok/s   ratio {q:.3}");
                }
                println!(
                    "  median ratio {:.3} (goal >= 0.45; 0.5 is ideal for r = 2)",
                    r.median_ratio
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Dispute {
            model,
            tokens,
            runs,
            threads,
            json,
        }) => {
            let r = bench::llm::dispute_cost(&model, tokens, runs, threads)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "dispute: {} tokens of {}, dispute at position {} layer {}, {} threads",
                    r.tokens, r.model, r.position, r.layer, r.threads
                );
                for (i, (f, l)) in r.full_ms.iter().zip(&r.layer_ms).enumerate() {
                    println!("  run {i}: whole generation {f:>9.1} ms   one-layer replay {l:>7.2} ms   ratio {:.1}", f / l);
                }
                println!(
                    "  median ratio {:.1} (goal >= 20); the same layer by the plain scalar spec: {:.1} ms (ratio {:.1})",
                    r.median_ratio, r.layer_spec_ms, r.spec_ratio
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::BatchDecode {
            model,
            sequences,
            tokens,
            runs,
            threads,
            json,
        }) => {
            let r = bench::llm::batch_decode(&model, sequences, tokens, runs, threads)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "batch-decode: {} sequences x {} tokens of {}, {} threads",
                    r.sequences, r.tokens, r.model, r.threads
                );
                for (i, (b, s)) in r.batched_tok_s.iter().zip(&r.sequential_tok_s).enumerate() {
                    println!("  run {i}: as one batch {b:>8.1} tok/s   one at a time {s:>8.1} tok/s   ratio {:.2}", b / s);
                }
                println!("  median ratio {:.2} (goal >= 2); every sequence's tokens and trace equal either way", r.median_ratio);
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Dispatch { jobs, json }) => {
            let rt = tokio::runtime::Runtime::new()?;
            let r = rt.block_on(bench::bench_dispatch(jobs))?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "dispatch: {} tiny matmul jobs, r = 2, 3 local CPU workers",
                    r.jobs
                );
                println!(
                    "  lockstep verified jobs/s   {:>9.1}   latency p50 {:.2} ms  p99 {:.2} ms",
                    r.verified_per_s, r.p50_ms, r.p99_ms
                );
                println!(
                    "  raw JetStream round trips/s {:>8.1}   latency p50 {:.2} ms  p99 {:.2} ms",
                    r.raw_per_s, r.raw_p50_ms, r.raw_p99_ms
                );
                println!(
                    "  ratio {:.3}   (extra time per job at full throughput {:.3} ms)",
                    r.ratio, r.throughput_overhead_ms
                );
                println!(
                    "  one job at a time: p50 {:.2} ms dispatch to verdict vs {:.2} ms per raw round trip: p50 overhead per job {:.2} ms\n  (a one-job batch end to end, with the coordinator's set-up: p50 {:.2} ms)",
                    r.single_p50_ms, r.raw_single_p50_ms, r.p50_overhead_ms, r.single_e2e_p50_ms
                );
            }
            Ok(())
        }
        Command::Bench(BenchCommand::Generate {
            model,
            backend,
            batch,
            threads,
            prompt_tokens,
            tokens,
            runs,
            baselines,
            json,
        }) => {
            if backend != BackendKind::Cpu {
                return bench_generate_device(
                    &model,
                    backend,
                    threads,
                    prompt_tokens,
                    tokens,
                    &batch,
                    json,
                );
            }
            let r = crate::bench::generate::bench_generate(
                &model,
                threads,
                prompt_tokens,
                tokens,
                runs,
                baselines,
                |line| eprintln!("  {line}"),
            )?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
                println!(
                    "generate: {} ({}), {} thread(s), {}",
                    r.model, r.model_digest, r.threads, r.isa
                );
                println!(
                    "  prefill {:>7.1} tok/s   ({} tokens in one pass, median of {})",
                    r.prefill_tok_s, r.prompt_tokens, r.runs
                );
                println!(
                    "  decode  {:>7.1} tok/s   ({} greedy tokens; runs {:?})",
                    r.decode_tok_s,
                    r.decode_tokens,
                    r.decode_runs_tok_s
                        .iter()
                        .map(|v| (v * 10.0).round() / 10.0)
                        .collect::<Vec<_>>()
                );
                println!(
                    "  peak RSS {:.1} MiB (budget: file {:.1} + KV {:.1} + 64 = {:.1} MiB)",
                    mib(r.peak_rss_bytes),
                    mib(r.model_file_bytes),
                    mib(r.kv_bytes as u64),
                    mib(r.rss_budget_bytes)
                );
                println!(
                    "  decode reads {:.2} GB/s of weights; this machine reads {:.2} GB/s on {} thread(s): {:.0}%",
                    r.decode_weight_gb_s,
                    r.machine_read_gb_s,
                    r.threads,
                    r.bandwidth_fraction * 100.0
                );
                println!("  tokens {}", r.tokens_digest);
                for b in &r.baselines {
                    println!(
                        "  {:<10} prefill {:>7.1} tok/s (lockstep ÷ it {:.2})   decode {:>7.1} tok/s (lockstep ÷ it {:.2})   peak RSS {:.1} MiB",
                        b.engine,
                        b.prefill_tok_s,
                        b.prefill_ratio,
                        b.decode_tok_s,
                        b.decode_ratio,
                        mib(b.peak_rss_bytes)
                    );
                }
            }
            Ok(())
        }
        Command::Generate(args) => crate::llm::generate::run(args),
        Command::Tokenize(args) => crate::llm::tokenize::run(args),
        Command::Serve(args) => crate::serve::run(args),
        Command::Keys { action } => crate::serve::keys::run(action),
        Command::ReplayLayer(args) => crate::llm::generate::replay(args),
        Command::Worker(args) => run_worker(args),
        Command::Model { action, connect } => {
            let cfg = connect.coordinator()?;
            tokio::runtime::Runtime::new()?.block_on(crate::llm::distribute::run(&cfg, action))
        }
        Command::Submit(args) => run_submit(args),
        Command::Demo { local: true, .. } => demo_local(256),
        Command::Demo {
            jobs, matmul: true, ..
        } => crate::demo::run(jobs),
        Command::Demo {
            model, max_tokens, ..
        } => crate::demo::run_llm(&model, max_tokens),
        Command::Deploy(DeployCommand::Init {
            dir,
            host,
            port,
            max_payload,
            tls_cert,
            tls_key,
            tls_ca,
            verify_clients,
            cluster,
            route_port,
            node_hosts,
        }) => {
            let tls = match (tls_cert, tls_key, tls_ca) {
                (Some(cert), Some(key), Some(ca)) => Some(crate::deploy::ServerTls {
                    cert,
                    key,
                    ca,
                    verify_clients,
                    client_cert: None,
                    client_key: None,
                }),
                _ => None,
            };
            let nodes = cluster
                .map(|n| crate::deploy::ClusterNode::spread(n, port, route_port, &node_hosts))
                .transpose()?;
            crate::admin::deploy_init(&dir, &host, port, max_payload, tls, nodes)
        }
        Command::Enroll {
            role: EnrollRole::Worker,
            name,
            operator,
            connect,
        } => crate::admin::enroll_worker(&connect, &name, &operator),
        Command::Workers {
            action,
            json,
            connect,
        } => match action {
            None => crate::admin::list_workers(&connect.coordinator()?, json),
            Some(WorkersAction::Clear { name }) => {
                crate::admin::clear_worker(&connect.coordinator()?, &name)
            }
        },
        Command::Verify {
            receipts,
            deployment,
            coordinator_key,
            self_consistent_only,
        } => crate::admin::verify(
            &receipts,
            deployment.as_deref(),
            coordinator_key.as_deref(),
            self_consistent_only,
        ),
    }
}

fn open(kind: BackendKind, threads: usize) -> Result<Box<dyn lockstep_kernels::Backend>> {
    lockstep_kernels::open_with_threads(kind, threads)
        .with_context(|| format!("backend {kind} is not usable here"))
}

fn backends(json: bool) -> Result<()> {
    let mut all = Vec::new();
    for (kind, r) in lockstep_kernels::detect_all() {
        match r {
            Ok(b) => {
                let info = b.info();
                if !json {
                    println!("{kind}: {}\n  path: {}", info.device, info.path);
                    for f in &info.findings {
                        println!("  {f}");
                    }
                }
                all.push(serde_json::json!({"backend": kind, "present": true, "info": info}));
            }
            Err(e) => {
                if !json {
                    println!("{kind}: absent ({e})");
                }
                all.push(
                    serde_json::json!({"backend": kind, "present": false, "reason": e.to_string()}),
                );
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"contract_version": CONTRACT_VERSION, "backends": all})
        );
    } else {
        println!("contract version {CONTRACT_VERSION}");
    }
    Ok(())
}

fn matmul(
    kind: BackendKind,
    input: &std::path::Path,
    output: &std::path::Path,
    threads: usize,
) -> Result<()> {
    let op = Op::Matmul(Matmul {});
    let tensors = tensors::read_f32_tensors(input, op.input_names())?;
    let views: Vec<TensorView<'_>> = tensors.iter().map(|(s, d)| TensorView::new(s, d)).collect();
    let plan = op
        .check(&views)
        .with_context(|| format!("in {}", input.display()))?;
    let backend = open(kind, threads)?;
    let t = std::time::Instant::now();
    let outputs = backend.run(&op, &views)?;
    let secs = t.elapsed().as_secs_f64();
    let named: Vec<(&str, &[usize], &[f32])> = op
        .output_names()
        .iter()
        .zip(&outputs)
        .map(|(n, t)| (*n, t.shape.as_slice(), t.data.as_slice()))
        .collect();
    tensors::write_f32(output, &named)?;
    let info = backend.info();
    println!("backend: {kind} ({}, {})", info.device, info.path);
    let c = &outputs[0];
    println!(
        "c: {:?} in {:.3} s ({:.1} GFLOP/s), contract v{CONTRACT_VERSION}",
        c.shape,
        secs,
        2.0 * plan.work() as f64 / secs / 1e9
    );
    let digests: Vec<_> = outputs.iter().map(|t| t.digest()).collect();
    println!("{}", outputs_digest(&digests));
    Ok(())
}

fn demo_local(size: usize) -> Result<()> {
    let dims = MatmulDims::new(size, size + 44, size.saturating_sub(56).max(1));
    println!(
        "lockstep demo: C = A·B with A {}x{}, B {}x{}, random values, contract v{CONTRACT_VERSION}",
        dims.m, dims.k, dims.k, dims.n
    );
    let a = bench::random_matrix(dims.m * dims.k, 11);
    let b = bench::random_matrix(dims.k * dims.n, 12);
    let spec = lockstep_kernels::matmul_spec(&a, &b, dims);
    let want = tensor_digest_f32(&[dims.m, dims.n], &spec);
    println!("{:<6} {:<60} digest of C", "who", "device / path");
    println!(
        "{:<6} {:<60} {}",
        "spec", "scalar reference (the contract, executable)", want
    );
    let mut agree = 0;
    let mut ran = 0;
    for (kind, r) in lockstep_kernels::detect_all() {
        match r {
            Ok(backend) => {
                let info = backend.info();
                let c = lockstep_kernels::backend::matmul(&*backend, &a, &b, dims)?;
                let d = tensor_digest_f32(&[dims.m, dims.n], &c);
                ran += 1;
                agree += (d == want) as usize;
                let mark = if d == want { "✓" } else { "✗ DIFFERS" };
                println!(
                    "{:<6} {:<60} {d} {mark}",
                    kind.name(),
                    format!("{} [{}]", truncate(&info.device, 40), info.path)
                );
            }
            Err(e) => println!("{:<6} absent: {e}", kind.name()),
        }
    }
    println!("{agree} of {ran} backends agree with the spec bit for bit");
    anyhow::ensure!(agree == ran, "a backend disagrees with the contract");
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n - 1).collect::<String>())
    }
}

pub(crate) async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("signal received: draining");
}

fn run_worker(args: WorkerArgs) -> Result<()> {
    let name = args.name.unwrap_or_else(crate::worker::default_name);
    let mut o = crate::worker::WorkerOptions::new(
        args.connect.config(crate::deploy::Role::Worker, &name)?,
        &name,
    );
    o.backend = args.backend;
    o.concurrency = args.concurrency.max(1);
    o.threads = args.threads;
    o.max_elements = args.max_elements;
    o.max_macs = args.max_macs;
    o.cache_dir = args.cache_dir;
    o.cache_bytes = args.cache_mib.saturating_mul(1 << 20);
    o.model_cache_bytes = args.model_cache_mib.saturating_mul(1 << 20);
    o.max_model_bytes = args.max_model_mib.saturating_mul(1 << 20);
    o.max_models = args.max_models;
    o.metrics = args.metrics;
    o.heartbeat = std::time::Duration::from_millis(args.heartbeat_ms.max(50));
    o.test = crate::worker::TestSwitches {
        fault: args
            .fault_inject_every
            .map(|every| crate::worker::FaultInjection { every }),
        delay: std::time::Duration::from_millis(args.test_delay_ms),
        generation: lockstep_kernels::model::generate::TestFault {
            layer: args.fault_inject_layer,
            token: args.fault_inject_token,
        },
        dispute: args.test_dispute,
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(crate::worker::run(o, shutdown_signal()))
}

fn run_submit(args: SubmitArgs) -> Result<()> {
    use std::time::Duration;
    let jobs = crate::batch::parse_batch(&args.batch)?;
    let batch_id = match args.batch_id.clone() {
        Some(id) => id,
        None => {
            let id = crate::coordinator::new_batch_id(&jobs);
            eprintln!("batch {id} (to resume it if interrupted: --batch-id {id})");
            id
        }
    };
    let cfg = args.connect.coordinator()?;
    let signer = cfg.identity()?.context(
        "a coordinator signs its receipts: give it its key (--nkey FILE or --deployment DIR)",
    )?;
    let opts = crate::coordinator::SubmitOptions {
        redundancy: args.redundancy,
        batch_id: Some(batch_id.clone()),
        out_dir: Some(
            args.out
                .unwrap_or_else(|| PathBuf::from("lockstep-out").join(&batch_id)),
        ),
        worker_timeout: Duration::from_secs_f64(args.worker_timeout),
        job_timeout: Duration::from_secs_f64(args.job_timeout),
        stall_timeout: Duration::from_secs_f64(args.stall_timeout),
        deadline: args.deadline.map(Duration::from_secs_f64),
        progress: !args.quiet,
        threads: 0,
        keep_batch: args.keep_batch,
        signer: Some(std::sync::Arc::new(signer)),
        audit_rate: args.audit_rate,
        dispute_timeout: Duration::from_secs_f64(args.dispute_timeout),
        store_limits: args
            .store_limits
            .as_deref()
            .map(crate::store::StoreLimits::parse)
            .transpose()?,
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let nats = crate::nats::connect(&cfg).await?;
        crate::coordinator::submit(&nats, jobs, &opts).await
    })?;
    crate::coordinator::print_report(&report);
    println!(
        "report: {}",
        opts.out_dir.as_ref().unwrap().join("report.json").display()
    );
    anyhow::ensure!(
        report.all_accepted(),
        "{} job(s) failed and {} unresolved",
        report.failed,
        report.unresolved
    );
    Ok(())
}

/// `bench generate --backend wgpu|cuda`: runs and prints (or `--json`).
fn bench_generate_device(
    model: &str,
    backend: BackendKind,
    threads: usize,
    prompt_tokens: usize,
    tokens: usize,
    batch: &[usize],
    json: bool,
) -> Result<()> {
    let r = crate::bench::generate_device::bench_generate_device(
        model,
        backend,
        threads,
        prompt_tokens,
        tokens,
        batch,
        |line| eprintln!("  {line}"),
    )?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    println!(
        "generate on {} {} ({}): {} ({})",
        r.backend, r.device, r.path, r.model, r.model_digest
    );
    println!(
        "  {} prompt tokens, {} greedy tokens per sequence; every engine generated the same tokens",
        r.prompt_tokens, r.decode_tokens
    );
    for (d, c) in r.device_points.iter().zip(&r.cpu_points) {
        println!(
            "  batch {:>3}: {} prefill {:>8.1} decode {:>8.1} tok/s | {} prefill {:>8.1} decode {:>8.1} tok/s | decode ratio {:.3}",
            d.batch,
            r.backend,
            d.prefill_tok_s,
            d.decode_tok_s,
            c.engine,
            c.prefill_tok_s,
            c.decode_tok_s,
            d.decode_tok_s / c.decode_tok_s
        );
    }
    for p in r.device_points.iter().chain(&r.cpu_points) {
        if let Some(cost) = p.trace_cost {
            println!(
                "  trace cost on {}: decode {:.2}x slower with per-layer digests",
                p.engine, cost
            );
        }
    }
    println!(
        "  batch-1 decode reads {:.3} GB/s of weights; a device copy moves {:.2} GB/s: {:.1}%",
        r.decode_weight_gb_s,
        r.copy_gb_s,
        r.bandwidth_fraction * 100.0
    );
    Ok(())
}
