//! Shared helpers of lockstep's end-to-end tests: every backend variant
//! present on this machine, and input generators that cover the awkward
//! corners of f32 (subnormals, ±0, ±inf, NaN, mixed magnitudes).
//!
//! Tests are written once as functions taking a [`Target`]; the
//! [`backend_tests!`] macro stamps each one out per target, and a target
//! whose device is absent prints why and passes as skipped.

pub mod adversary;
pub mod device_ops;
pub mod models;

use lockstep_kernels::contract::quant::Format;
use lockstep_kernels::cpu::{CpuBackend, Isa};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuOptions, WgpuPath};
use lockstep_kernels::{Backend, ErrorKind};
pub use rand;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One way of computing the contract that a test should cover.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The CPU with a forced ISA and thread count.
    Cpu(Isa, usize),
    /// WGSL on the first adapter, with the path the conformance probe picks.
    WgpuProbed,
    /// WGSL on the first adapter, with the exact soft-float path forced.
    WgpuExact,
    /// CUDA device 0.
    Cuda,
}

/// `Some(value)`, or `None` after saying why when the device is absent; any
/// other failure is a test failure.
pub fn present<T>(what: impl std::fmt::Debug, r: lockstep_kernels::Result<T>) -> Option<T> {
    match r {
        Ok(b) => Some(b),
        Err(e) if e.kind == ErrorKind::Unavailable => {
            eprintln!("SKIPPED {what:?}: {e}");
            None
        }
        Err(e) => panic!("{what:?} failed to open: {e}"),
    }
}

/// With `LOCKSTEP_REQUIRE_CUDA=1` (the GPU check script sets it), a CUDA
/// target that cannot open its device fails the test instead of skipping.
pub fn cuda_required() -> bool {
    std::env::var_os("LOCKSTEP_REQUIRE_CUDA").is_some_and(|v| v != "0" && !v.is_empty())
}

/// `C = A·B` on a backend through the op interface.
pub fn matmul(
    backend: &dyn Backend,
    a: &[f32],
    b: &[f32],
    dims: lockstep_kernels::MatmulDims,
) -> lockstep_kernels::Result<Vec<f32>> {
    lockstep_kernels::backend::matmul(backend, a, b, dims)
}

/// A WGSL backend with the given options, or `None` where there is no device.
pub fn open_wgpu(options: WgpuOptions) -> Option<WgpuBackend> {
    present(&options, WgpuBackend::new(options.clone()))
}

/// Opens the target, or returns `None` (after saying why) when this machine
/// lacks it. Any other failure is a test failure.
pub fn open(target: Target) -> Option<Box<dyn Backend>> {
    let r: lockstep_kernels::Result<Box<dyn Backend>> = match target {
        Target::Cpu(isa, threads) => {
            CpuBackend::with_isa(threads, isa).map(|b| Box::new(b) as Box<dyn Backend>)
        }
        Target::WgpuProbed => WgpuBackend::new(WgpuOptions::default()).map(|b| Box::new(b) as _),
        Target::WgpuExact => WgpuBackend::new(WgpuOptions {
            force_path: Some(WgpuPath::Exact),
            ..Default::default()
        })
        .map(|b| Box::new(b) as _),
        Target::Cuda => {
            let r = lockstep_kernels::cuda::CudaBackend::new(0).map(|b| Box::new(b) as _);
            if let Err(e) = &r {
                assert!(
                    !cuda_required(),
                    "LOCKSTEP_REQUIRE_CUDA is set, but CUDA cannot be opened: {e}"
                );
            }
            r
        }
    };
    present(target, r)
}

/// Stamps out `mod $target { #[test] fn $test() }` for each test body and
/// each target, so `cargo test wgpu_exact` or `cargo test cpu_avx2` selects
/// one backend.
#[macro_export]
macro_rules! backend_tests {
    ($($body:ident),* $(,)?) => {
        $crate::backend_tests!(@target cpu_avx512, $crate::Target::Cpu(lockstep_kernels::cpu::Isa::Avx512, 2); $($body),*);
        $crate::backend_tests!(@target cpu_avx2, $crate::Target::Cpu(lockstep_kernels::cpu::Isa::Avx2, 2); $($body),*);
        $crate::backend_tests!(@target cpu_neon, $crate::Target::Cpu(lockstep_kernels::cpu::Isa::Neon, 2); $($body),*);
        $crate::backend_tests!(@target cpu_portable, $crate::Target::Cpu(lockstep_kernels::cpu::Isa::Portable, 3); $($body),*);
        $crate::backend_tests!(@target wgpu_probed, $crate::Target::WgpuProbed; $($body),*);
        $crate::backend_tests!(@target wgpu_exact, $crate::Target::WgpuExact; $($body),*);
        $crate::backend_tests!(@target cuda, $crate::Target::Cuda; $($body),*);
    };
    (@target $modname:ident, $target:expr; $($body:ident),*) => {
        mod $modname {
            $(
                #[test]
                fn $body() {
                    if let Some(backend) = $crate::open($target) {
                        super::$body(&*backend, $target);
                    }
                }
            )*
        }
    };
}

/// A WGSL backend on `path`, or `None` (after saying why) without a device.
pub fn open_wgsl(path: Option<WgpuPath>) -> Option<WgpuBackend> {
    open_wgpu(WgpuOptions {
        force_path: path,
        ..Default::default()
    })
}

/// Stamps out `mod wgpu_probed` and `mod wgpu_exact`, each with one
/// `#[test]` per body taking a `&WgpuBackend` on that path: for the WGSL
/// model ops and engine, which go beyond the `Backend` op interface.
#[macro_export]
macro_rules! wgsl_tests {
    ($($body:ident),* $(,)?) => {
        $crate::wgsl_tests!(@path wgpu_probed, None; $($body),*);
        $crate::wgsl_tests!(@path wgpu_exact, Some(lockstep_kernels::wgpu::WgpuPath::Exact); $($body),*);
    };
    (@path $modname:ident, $path:expr; $($body:ident),*) => {
        mod $modname {
            $(
                #[test]
                fn $body() {
                    if let Some(gpu) = $crate::open_wgsl($path) {
                        super::$body(&gpu);
                    }
                }
            )*
        }
    };
}

/// CUDA device 0, or `None` (after saying why) without a driver or device;
/// with `LOCKSTEP_REQUIRE_CUDA=1` ([`cuda_required`]) that fails instead.
/// `CudaBackend::new` checks for the driver library before touching it, so
/// this never panics on a machine without a GPU.
pub fn open_cuda() -> Option<lockstep_kernels::cuda::CudaBackend> {
    let r = lockstep_kernels::cuda::CudaBackend::new(0);
    if let Err(e) = &r {
        assert!(
            !cuda_required(),
            "LOCKSTEP_REQUIRE_CUDA is set, but CUDA cannot be opened: {e}"
        );
    }
    present(Target::Cuda, r)
}

/// Stamps out `mod cuda` with one `#[test]` per body taking a
/// `&CudaBackend` on device 0 (skipped without one): the CUDA twin of
/// [`wgsl_tests!`], for the model ops and engine.
#[macro_export]
macro_rules! cuda_tests {
    ($($body:ident),* $(,)?) => {
        mod cuda {
            $(
                #[test]
                fn $body() {
                    if let Some(gpu) = $crate::open_cuda() {
                        super::$body(&gpu);
                    }
                }
            )*
        }
    };
}

/// What a generated value should look like.
#[derive(Clone, Copy, Debug)]
pub enum Values {
    /// Uniform in [-1, 1).
    Plain,
    /// Random sign and exponent over the whole range, subnormals included.
    MixedMagnitudes,
    /// Mostly plain, sprinkled with ±0, ±inf, NaN, subnormals and extremes.
    Specials,
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random_values(rng: &mut ChaCha8Rng, len: usize, kind: Values) -> Vec<f32> {
    (0..len)
        .map(|_| match kind {
            Values::Plain => rng.random_range(-1.0f32..1.0),
            Values::MixedMagnitudes => {
                // Exponents clustered so products neither always overflow nor
                // always vanish: biased exponent in [60, 190], sometimes 0.
                let sign = (rng.random::<u32>() & 1) << 31;
                let exp = if rng.random_ratio(1, 16) {
                    0
                } else {
                    rng.random_range(60u32..190)
                };
                let mant = rng.random::<u32>() & 0x7F_FFFF;
                f32::from_bits(sign | (exp << 23) | mant)
            }
            Values::Specials => {
                if rng.random_ratio(1, 8) {
                    const SPECIALS: [u32; 12] = lockstep_kernels::conformance::SPECIAL_VALUES;
                    f32::from_bits(SPECIALS[rng.random_range(0..SPECIALS.len())])
                } else {
                    rng.random_range(-1.0f32..1.0)
                }
            }
        })
        .collect()
}

/// Asserts two f32 slices are identical bit for bit, naming the first
/// differing element.
pub fn assert_bits_eq(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(i) = got
        .iter()
        .zip(want)
        .position(|(g, w)| g.to_bits() != w.to_bits())
    {
        panic!(
            "{what}: element {i} differs: got {:e} ({:#010x}), spec {:e} ({:#010x}); {} of {} differ",
            got[i],
            got[i].to_bits(),
            want[i],
            want[i].to_bits(),
            got.iter().zip(want).filter(|(g, w)| g.to_bits() != w.to_bits()).count(),
            got.len()
        );
    }
}

/// Path of the `lockstep` CLI under test: the `lockstep-e2e` binary of this
/// crate (same source as `lockstep`), which cargo builds next to the test
/// executables before running integration tests.
pub fn lockstep_bin() -> std::path::PathBuf {
    // target/<profile>/deps/<test-exe> -> target/<profile>/lockstep-e2e
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join("lockstep-e2e");
    assert!(
        bin.exists(),
        "{} is missing: run the tests through cargo test",
        bin.display()
    );
    bin
}

/// A real nats-server for a test, or `None` (after saying why) when none is
/// installed. `./dev test` sets `LOCKSTEP_REQUIRE_NATS=1`, so in CI a
/// missing server fails the test instead of skipping it.
pub fn nats_server() -> Option<lockstep::harness::NatsServer> {
    started(lockstep::harness::NatsServer::start())
}

/// A real 3-node JetStream cluster, or `None` as [`nats_server`] says.
pub fn nats_cluster() -> Option<lockstep::harness::NatsServer> {
    started(lockstep::harness::NatsServer::start_cluster(3))
}

/// The server `r` started, or `None` (after saying why) when it could not
/// start; with `LOCKSTEP_REQUIRE_NATS` set, that fails the test instead.
pub fn started(
    r: anyhow::Result<lockstep::harness::NatsServer>,
) -> Option<lockstep::harness::NatsServer> {
    match r {
        Ok(s) => Some(s),
        Err(e) => {
            assert!(
                std::env::var_os("LOCKSTEP_REQUIRE_NATS").is_none(),
                "LOCKSTEP_REQUIRE_NATS is set: {e:#}"
            );
            eprintln!("SKIPPED: {e:#}");
            None
        }
    }
}

/// Waits (up to 2 minutes) until every named worker has registered.
pub async fn wait_workers(nats: &lockstep::nats::Nats, names: &[&str]) {
    lockstep::nats::wait_for_workers(nats, names, std::time::Duration::from_secs(120))
        .await
        .expect("workers register");
}

/// Worker processes of the `lockstep` binary under test (SIGTERM, then
/// SIGKILL, when dropped); `kill`, `terminate`, `is_running` and `wait_exit`
/// come from [`lockstep::harness::WorkerProcs`].
pub struct Procs(lockstep::harness::WorkerProcs);

impl Default for Procs {
    fn default() -> Self {
        Procs(lockstep::harness::WorkerProcs::new(lockstep_bin()))
    }
}

impl Procs {
    /// Enrolls and starts a worker (its own operator, `op-<name>`) with fast
    /// heartbeats and a test cache, plus extra environment (e.g. the
    /// test-only fault and delay switches).
    pub fn worker(
        &mut self,
        server: &lockstep::harness::NatsServer,
        name: &str,
        backend: &str,
        env: &[(&str, &str)],
    ) {
        self.worker_as(server, name, &format!("op-{name}"), backend, env)
    }

    /// [`Procs::worker`] with extra command-line arguments.
    pub fn worker_args(
        &mut self,
        server: &lockstep::harness::NatsServer,
        name: &str,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) {
        self.spawn_full(server, name, &format!("op-{name}"), backend, args, env)
    }

    /// [`Procs::worker`], enrolled under `operator`.
    pub fn worker_as(
        &mut self,
        server: &lockstep::harness::NatsServer,
        name: &str,
        operator: &str,
        backend: &str,
        env: &[(&str, &str)],
    ) {
        self.spawn_full(server, name, operator, backend, &[], env)
    }

    fn spawn_full(
        &mut self,
        server: &lockstep::harness::NatsServer,
        name: &str,
        operator: &str,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) {
        let tmp = std::env::temp_dir();
        let cache = tmp.join("lockstep-test-cache");
        let (tmp, cache) = (tmp.to_str().unwrap(), cache.to_str().unwrap());
        let mut env = env.to_vec();
        env.extend([
            ("XDG_RUNTIME_DIR", tmp),
            ("XDG_CACHE_HOME", cache),
            ("RUST_LOG", "warn"),
        ]);
        self.0
            .spawn_as(
                server,
                name,
                operator,
                backend,
                &[&["--heartbeat-ms", "250"][..], args].concat(),
                &env,
            )
            .expect("start worker");
    }
}

impl std::ops::Deref for Procs {
    type Target = lockstep::harness::WorkerProcs;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Procs {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

/// A job message for `worker` as a coordinator would send it: replica 0,
/// attempt 0, redundancy 1, this protocol and contract.
pub fn direct_job(
    worker: &str,
    batch: &str,
    id: &str,
    spec: lockstep::protocol::JobSpec,
) -> lockstep::protocol::JobMessage {
    lockstep::protocol::JobMessage {
        protocol: lockstep::protocol::PROTOCOL_VERSION,
        batch: batch.into(),
        job: id.into(),
        replica: 0,
        attempt: 0,
        redundancy: 1,
        contract_version: lockstep_kernels::CONTRACT_VERSION,
        worker: worker.into(),
        spec,
    }
}

/// Publishes a raw payload on `worker`'s job subject for `batch` and waits
/// for the stream to store it.
pub async fn send_to_worker(
    nats: &lockstep::nats::Nats,
    worker: &str,
    batch: &str,
    payload: Vec<u8>,
) {
    nats.js
        .publish(
            lockstep::protocol::job_subject(worker, batch),
            payload.into(),
        )
        .await
        .expect("publish")
        .await
        .expect("stored");
}

/// Every result message published on `filter` from now on (an ordered
/// consumer on the results stream), for tests that talk to workers directly.
pub async fn watch_results(
    nats: &lockstep::nats::Nats,
    filter: &str,
) -> async_nats::jetstream::consumer::pull::Ordered {
    nats.results
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: filter.into(),
            ..Default::default()
        })
        .await
        .expect("a results consumer")
        .messages()
        .await
        .expect("results")
}

/// A worker the plan of `batch` gives replicas to.
pub async fn holder_of_replicas(nats: &lockstep::nats::Nats, batch: &str) -> String {
    use futures::StreamExt;
    let mut keys = nats.assign.keys().await.unwrap();
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        if !k.starts_with(&format!("{batch}.")) {
            continue;
        }
        if let Ok(Some(v)) = nats.assign.get(&k).await {
            let entries: Vec<lockstep::protocol::PlanEntry> = serde_json::from_slice(&v).unwrap();
            if let Some(e) = entries.first() {
                return e.assignment.worker.clone();
            }
        }
    }
    panic!("no plan entries for batch {batch}");
}

/// `lockstep submit` of `batch` as batch `batch_id` into `out`, quiet, with a
/// 3 s worker timeout and a 240 s deadline: run it again to resume.
pub fn resumable_submit(
    server: &lockstep::harness::NatsServer,
    batch_id: &str,
    out: &std::path::Path,
    batch: &std::path::Path,
    extra: &[&str],
) -> std::process::Command {
    let mut c = std::process::Command::new(lockstep_bin());
    c.args([
        "submit",
        "--deployment",
        server.dir().to_str().unwrap(),
        "--batch-id",
        batch_id,
        "--quiet",
        "--worker-timeout",
        "3",
        "--deadline",
        "240",
    ])
    .args(extra)
    .arg("--out")
    .arg(out)
    .arg(batch)
    .env("RUST_LOG", "warn");
    c
}

/// `n` matmul jobs `a` [m,k] · `b` [k,nn] of random mixed-magnitude values.
pub fn matmul_jobs(
    n: usize,
    seed: u64,
    (m, k, nn): (usize, usize, usize),
) -> Vec<lockstep::batch::BatchJob> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| {
            let mut t = |shape: Vec<usize>| lockstep::batch::Tensor::Data {
                data: random_values(&mut r, shape.iter().product(), Values::MixedMagnitudes),
                shape,
            };
            let a = t(vec![m, k]);
            lockstep::batch::BatchJob::matmul(format!("job-{i:03}"), a, t(vec![k, nn]))
        })
        .collect()
}

/// `n` small matmul jobs of varied shapes (K across the 256 boundary).
pub fn small_jobs(n: usize, seed: u64) -> Vec<lockstep::batch::BatchJob> {
    let mut r = rng(seed);
    (0..n)
        .map(|i| {
            let (m, k, nn) = (
                r.random_range(1..24),
                r.random_range(1..300),
                r.random_range(1..24),
            );
            lockstep::batch::BatchJob::matmul(
                format!("job-{i:03}"),
                lockstep::batch::Tensor::Data {
                    shape: vec![m, k],
                    data: random_values(&mut r, m * k, Values::MixedMagnitudes),
                },
                lockstep::batch::Tensor::Data {
                    shape: vec![k, nn],
                    data: random_values(&mut r, k * nn, Values::MixedMagnitudes),
                },
            )
        })
        .collect()
}

/// The in-test coordinator's log (`RUST_LOG`, default warn) in the test's
/// captured output: shown when it fails or with `--nocapture`.
pub fn test_log() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_test_writer()
        .try_init();
}

/// Random stored weights: block scales from a mix of ordinary, subnormal,
/// zero, huge, inf and NaN f16 values; quants uniformly random.
pub fn random_weights(
    rng: &mut ChaCha8Rng,
    format: Format,
    rows: usize,
    cols: usize,
    specials: bool,
) -> Vec<u8> {
    let rb = format.row_bytes(cols).unwrap();
    let mut raw: Vec<u8> = (0..rows * rb).map(|_| rng.random()).collect();
    let f16 = |rng: &mut ChaCha8Rng| -> u16 {
        if specials && rng.random_ratio(1, 6) {
            [
                0x0000, 0x8000, 0x0001, 0x03FF, 0x7BFF, 0x7C00, 0xFC00, 0x7E00,
            ][rng.random_range(0..8)]
        } else {
            // |v| in about [2^-8, 1)
            (rng.random_range(0x1C00u16..0x3C00)) | if rng.random() { 0x8000 } else { 0 }
        }
    };
    match format {
        Format::Q4_1 => {
            for blk in raw.chunks_exact_mut(20) {
                blk[0..2].copy_from_slice(&f16(rng).to_le_bytes());
                blk[2..4].copy_from_slice(&f16(rng).to_le_bytes());
            }
        }
        Format::Q8_0 => {
            for blk in raw.chunks_exact_mut(34) {
                blk[0..2].copy_from_slice(&f16(rng).to_le_bytes());
            }
        }
        Format::F16 => {
            for h in raw.chunks_exact_mut(2) {
                h.copy_from_slice(&f16(rng).to_le_bytes());
            }
        }
        Format::BF16 | Format::F32 => {
            let n = rows * cols;
            let vals = random_values(
                rng,
                n,
                if specials {
                    Values::Specials
                } else {
                    Values::Plain
                },
            );
            raw = match format {
                Format::F32 => vals.iter().flat_map(|v| v.to_le_bytes()).collect(),
                _ => vals
                    .iter()
                    .flat_map(|v| ((v.to_bits() >> 16) as u16).to_le_bytes())
                    .collect(),
            };
        }
    }
    raw
}
