//! `lockstep bench matmul`: GFLOP/s of lockstep and, in the same run, of the
//! baseline a user would otherwise reach for. Runs are interleaved (lockstep,
//! then each baseline, repeated) and each side's median is reported, so a
//! noisy machine slows both sides alike and the ratio stays meaningful.

pub mod generate;
pub mod generate_device;
pub mod llm;
pub mod serve;
pub mod soak;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use lockstep_kernels::cpu::CpuBackend;
use lockstep_kernels::{Backend, BackendKind, MatmulDims};
use rand::{Rng, SeedableRng};

/// One benchmark's outcome; `--json` prints it as one object.
#[derive(Debug, serde::Serialize)]
pub struct MatmulReport {
    pub backend: String,
    pub device: String,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub threads: usize,
    pub reps: usize,
    pub lockstep_gflops: f64,
    /// The fastest baseline of this run.
    pub baseline: String,
    pub baseline_gflops: f64,
    /// lockstep / baseline: above 1 means lockstep was faster.
    pub ratio: f64,
    /// Every baseline measured, with its GFLOP/s.
    pub baselines: Vec<(String, f64)>,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn random_matrix(len: usize, seed: u64) -> Vec<f32> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| r.random_range(-1.0f32..1.0)).collect()
}

/// A named way of computing C = A·B for timing.
type Runner<'a> = (String, Box<dyn FnMut() + 'a>);

fn time_interleaved(mut runners: Vec<Runner<'_>>, reps: usize, flops: f64) -> Vec<(String, f64)> {
    // One untimed warm-up each (page faults, packing buffers, JIT, caches).
    for (_, f) in runners.iter_mut() {
        f();
    }
    let mut times = vec![Vec::with_capacity(reps); runners.len()];
    for _ in 0..reps {
        for (i, (_, f)) in runners.iter_mut().enumerate() {
            let t = Instant::now();
            f();
            times[i].push(t.elapsed().as_secs_f64());
        }
    }
    runners
        .iter()
        .zip(times.iter_mut())
        .map(|((name, _), t)| (name.clone(), flops / median(t) / 1e9))
        .collect()
}

/// CPU: lockstep against faer and matrixmultiply with the same thread count.
/// matrixmultiply reads its thread count once per process from
/// `MATMUL_NUM_THREADS`; the CLI sets it before anything else runs.
pub fn bench_cpu(dims: MatmulDims, threads: usize, reps: usize) -> Result<MatmulReport> {
    let cpu = CpuBackend::new(threads)?;
    let threads = cpu.threads();
    let MatmulDims { m, k, n } = dims;
    let a = random_matrix(m * k, 1);
    let b = random_matrix(k * n, 2);
    let mut c_faer = vec![0.0f32; m * n];
    let mut c_mm = vec![0.0f32; m * n];
    let cpu_ref = &cpu;
    let (a_ref, b_ref) = (&a, &b);
    let runners: Vec<Runner<'_>> = vec![
        (
            "lockstep".into(),
            Box::new(move || {
                std::hint::black_box(
                    lockstep_kernels::backend::matmul(cpu_ref, a_ref, b_ref, dims)
                        .expect("valid operands"),
                );
            }),
        ),
        (
            "faer".into(),
            Box::new(|| {
                let par = if threads == 1 {
                    faer::Par::Seq
                } else {
                    faer::Par::rayon(threads)
                };
                let lhs = faer::MatRef::from_row_major_slice(&a, m, k);
                let rhs = faer::MatRef::from_row_major_slice(&b, k, n);
                let dst = faer::MatMut::from_row_major_slice_mut(&mut c_faer, m, n);
                // Same pool as lockstep, so both get exactly `threads` threads.
                cpu_ref.install(|| {
                    faer::linalg::matmul::matmul(dst, faer::Accum::Replace, lhs, rhs, 1.0f32, par)
                });
                std::hint::black_box(&c_faer);
            }),
        ),
        (
            "matrixmultiply".into(),
            Box::new(|| {
                // SAFETY: slices hold m*k, k*n and m*n values with the given strides.
                unsafe {
                    matrixmultiply::sgemm(
                        m,
                        k,
                        n,
                        1.0,
                        a.as_ptr(),
                        k as isize,
                        1,
                        b.as_ptr(),
                        n as isize,
                        1,
                        0.0,
                        c_mm.as_mut_ptr(),
                        n as isize,
                        1,
                    );
                }
                std::hint::black_box(&c_mm);
            }),
        ),
    ];
    let results = time_interleaved(runners, reps, dims.flops());
    Ok(report(
        BackendKind::Cpu,
        cpu.info().device,
        dims,
        threads,
        reps,
        results,
    ))
}

fn report(
    kind: BackendKind,
    device: String,
    dims: MatmulDims,
    threads: usize,
    reps: usize,
    results: Vec<(String, f64)>,
) -> MatmulReport {
    let lockstep_gflops = results[0].1;
    let baselines: Vec<(String, f64)> = results[1..].to_vec();
    let (baseline, baseline_gflops) = baselines
        .iter()
        .max_by(|x, y| x.1.total_cmp(&y.1))
        .cloned()
        .unwrap_or(("none".into(), f64::NAN));
    MatmulReport {
        backend: kind.to_string(),
        device,
        m: dims.m,
        n: dims.n,
        k: dims.k,
        threads,
        reps,
        lockstep_gflops,
        ratio: lockstep_gflops / baseline_gflops,
        baseline,
        baseline_gflops,
        baselines,
    }
}

/// WGSL: lockstep's shader end to end (upload, dispatch, read back). The
/// baseline is the CPU backend (what a worker without a usable GPU runs).
pub fn bench_wgpu(dims: MatmulDims, reps: usize) -> Result<MatmulReport> {
    let gpu = lockstep_kernels::open(BackendKind::Wgpu)?;
    let cpu = CpuBackend::new(0)?;
    let a = random_matrix(dims.m * dims.k, 1);
    let b = random_matrix(dims.k * dims.n, 2);
    let runners: Vec<Runner<'_>> = vec![
        (
            "lockstep-wgpu".into(),
            Box::new(|| {
                std::hint::black_box(
                    lockstep_kernels::backend::matmul(&*gpu, &a, &b, dims).expect("valid operands"),
                );
            }),
        ),
        (
            "lockstep-cpu".into(),
            Box::new(|| {
                std::hint::black_box(
                    lockstep_kernels::backend::matmul(&cpu, &a, &b, dims).expect("valid operands"),
                );
            }),
        ),
    ];
    let results = time_interleaved(runners, reps, dims.flops());
    let info = gpu.info();
    Ok(report(
        BackendKind::Wgpu,
        format!("{} [{}]", info.device, info.path),
        dims,
        0,
        reps,
        results,
    ))
}

/// CUDA: lockstep's kernels against cuBLAS SGEMM on the same device-resident
/// operands, timed with stream synchronisation around each run.
pub fn bench_cuda(dims: MatmulDims, reps: usize) -> Result<MatmulReport> {
    let cuda = lockstep_kernels::cuda::CudaBackend::new(0)?;
    let a = cuda.upload(&random_matrix(dims.m * dims.k, 1))?;
    let b = cuda.upload(&random_matrix(dims.k * dims.n, 2))?;
    let mut c1 = cuda.alloc(dims.m * dims.n)?;
    let mut c2 = cuda.alloc(dims.m * dims.n)?;
    let blas =
        cudarc::cublas::CudaBlas::new(cuda.stream().clone()).context("cuBLAS is not available")?;
    let cuda_ref = &cuda;
    let runners: Vec<Runner<'_>> = vec![
        (
            "lockstep-cuda".into(),
            Box::new(|| {
                cuda_ref
                    .matmul_device(&a, &b, &mut c1, dims)
                    .expect("launch");
                cuda_ref.synchronize().expect("sync");
            }),
        ),
        (
            "cublas-sgemm".into(),
            Box::new(|| {
                cuda_ref
                    .cublas_sgemm(&blas, &a, &b, &mut c2, dims)
                    .expect("cublas");
                cuda_ref.synchronize().expect("sync");
            }),
        ),
    ];
    let results = time_interleaved(runners, reps, dims.flops());
    Ok(report(
        BackendKind::Cuda,
        cuda.info().device,
        dims,
        0,
        reps,
        results,
    ))
}

pub fn bench_matmul(
    kind: BackendKind,
    dims: MatmulDims,
    threads: usize,
    reps: usize,
) -> Result<MatmulReport> {
    if reps == 0 {
        bail!("--reps must be at least 1");
    }
    match kind {
        BackendKind::Cpu => bench_cpu(dims, threads, reps),
        BackendKind::Wgpu => bench_wgpu(dims, reps),
        BackendKind::Cuda => bench_cuda(dims, reps),
    }
}

/// `lockstep bench dispatch` results.
#[derive(Debug, serde::Serialize)]
pub struct DispatchReport {
    pub jobs: usize,
    pub verified_per_s: f64,
    /// Dispatch-to-verdict latency of jobs in the batch (queueing included).
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Raw JetStream: publish (awaiting the PubAck), pull, double-ack.
    pub raw_per_s: f64,
    pub raw_p50_ms: f64,
    pub raw_p99_ms: f64,
    /// verified jobs/s over raw round trips/s.
    pub ratio: f64,
    /// Extra time per job at full throughput: 1/verified − 1/raw.
    pub throughput_overhead_ms: f64,
    /// One job at a time (a one-job batch with r = 2): median latency from
    /// dispatch to verdict.
    pub single_p50_ms: f64,
    /// The same, end to end: the coordinator's per-batch set-up included
    /// (results consumer, registry and plan reads).
    pub single_e2e_p50_ms: f64,
    /// One raw round trip at a time: median latency.
    pub raw_single_p50_ms: f64,
    /// single_p50_ms − raw_single_p50_ms: what lockstep adds to one job.
    pub p50_overhead_ms: f64,
}

/// A 2×2 matmul job: the dispatch benchmark measures the system, not arithmetic.
fn tiny_job(id: String, i: usize) -> crate::batch::BatchJob {
    let t = |data: Vec<f32>| crate::batch::Tensor::Data {
        shape: vec![2, 2],
        data,
    };
    crate::batch::BatchJob::matmul(
        id,
        t(vec![i as f32, 1.0, 2.0, 3.0]),
        t(vec![1.0, 0.5, 0.25, 2.0]),
    )
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub async fn bench_dispatch(n: usize) -> Result<DispatchReport> {
    use async_nats::jetstream::{consumer::pull, stream};
    use futures::StreamExt;
    use std::time::Duration;
    anyhow::ensure!(n >= 10, "--jobs must be at least 10");
    // A local server with authorization on: every party logs in with its
    // key, workers sign results, the coordinator checks them and signs
    // receipts.
    let server = crate::harness::NatsServer::start()?;
    let nats = server.connect().await?;
    let signer = server
        .coordinator()
        .identity()?
        .context("coordinator key")?;

    // Raw JetStream round trips, up to 64 in flight.
    let raw_stream = nats
        .js
        .get_or_create_stream(stream::Config {
            name: "LOCKSTEP_BENCH_RAW".into(),
            subjects: vec!["lockstep_bench.raw".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let durable = |name: &str| pull::Config {
        durable_name: Some(name.into()),
        ..Default::default()
    };
    let consumer = raw_stream
        .get_or_create_consumer("raw", durable("raw"))
        .await?;
    let t0 = Instant::now();
    let receiver = tokio::spawn(async move {
        let mut msgs = consumer.messages().await?;
        let mut lat = Vec::with_capacity(n);
        while lat.len() < n {
            let m = msgs.next().await.context("raw stream ended")??;
            let sent = f64::from_le_bytes(m.payload[..8].try_into()?);
            m.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
            lat.push((t0.elapsed().as_secs_f64() - sent) * 1e3);
        }
        anyhow::Ok(lat)
    });
    let start = Instant::now();
    let js = nats.js.clone();
    futures::stream::iter(0..n)
        .map(|_| {
            let js = js.clone();
            async move {
                let sent = t0.elapsed().as_secs_f64();
                js.publish("lockstep_bench.raw", sent.to_le_bytes().to_vec().into())
                    .await?
                    .await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let mut raw_lat = receiver.await??;
    let raw_secs = start.elapsed().as_secs_f64();
    // One raw round trip at a time (a work queue allows one unfiltered consumer).
    raw_stream.delete_consumer("raw").await?;
    let single = raw_stream
        .get_or_create_consumer("raw1", durable("raw1"))
        .await?;
    let mut single_msgs = single.messages().await?;
    let mut raw_single = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        nats.js
            .publish("lockstep_bench.raw", vec![0u8; 8].into())
            .await?
            .await?;
        let m = single_msgs.next().await.context("raw stream ended")??;
        m.double_ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
        raw_single.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(single_msgs);
    nats.js.delete_stream("LOCKSTEP_BENCH_RAW").await.ok();

    // lockstep: three in-process CPU workers, n tiny jobs with r = 2.
    let (stop_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut handles = Vec::new();
    for i in 0..3 {
        let name = format!("bench-w{i}-{}", std::process::id());
        let cfg = server.enroll(&name, &format!("op-{i}"))?;
        let mut o = crate::worker::WorkerOptions::new(cfg, &name);
        o.backend = crate::worker::BackendChoice::Only(BackendKind::Cpu);
        o.threads = 1;
        o.concurrency = 8;
        let mut rx = stop_tx.subscribe();
        handles.push(tokio::spawn(crate::worker::run(o, async move {
            let _ = rx.recv().await;
        })));
    }
    while crate::nats::live_workers(&nats, Duration::from_secs(5))
        .await?
        .iter()
        .filter(|w| w.id.starts_with("bench-w"))
        .count()
        < 3
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let jobs: Vec<crate::batch::BatchJob> = (0..n).map(|i| tiny_job(format!("t{i}"), i)).collect();
    let opts = crate::coordinator::SubmitOptions {
        batch_id: Some(format!(
            "bench-{}-{}",
            std::process::id(),
            crate::protocol::now_ms()
        )),
        progress: false,
        deadline: Some(Duration::from_secs(300)),
        threads: 1,
        signer: Some(std::sync::Arc::new(signer)),
        ..Default::default()
    };
    let report = crate::coordinator::submit(&nats, jobs, &opts).await?;
    // One job at a time, end to end.
    let mut single_lat = Vec::new();
    let mut single_e2e = Vec::new();
    for i in 0..20 {
        let job = tiny_job(format!("s{i}"), i);
        let o = crate::coordinator::SubmitOptions {
            batch_id: Some(format!(
                "bench1-{}-{}-{i}",
                std::process::id(),
                crate::protocol::now_ms()
            )),
            ..opts.clone()
        };
        let t = Instant::now();
        let r = crate::coordinator::submit(&nats, vec![job], &o).await?;
        anyhow::ensure!(r.verified == 1, "a single job was not verified");
        single_e2e.push(t.elapsed().as_secs_f64() * 1e3);
        single_lat.push(r.jobs[0].latency_ms);
    }
    let _ = stop_tx.send(());
    for h in handles {
        h.await??;
    }
    anyhow::ensure!(
        report.verified == n,
        "only {} of {n} jobs verified",
        report.verified
    );
    let mut lat: Vec<f64> = report.jobs.iter().map(|j| j.latency_ms).collect();
    let verified_per_s = n as f64 / report.elapsed_s;
    let raw_per_s = n as f64 / raw_secs;
    Ok(DispatchReport {
        jobs: n,
        verified_per_s,
        p50_ms: percentile(&mut lat, 0.5),
        p99_ms: percentile(&mut lat, 0.99),
        raw_per_s,
        raw_p50_ms: percentile(&mut raw_lat, 0.5),
        raw_p99_ms: percentile(&mut raw_lat, 0.99),
        ratio: verified_per_s / raw_per_s,
        throughput_overhead_ms: (1.0 / verified_per_s - 1.0 / raw_per_s) * 1e3,
        single_p50_ms: percentile(&mut single_lat.clone(), 0.5),
        single_e2e_p50_ms: percentile(&mut single_e2e, 0.5),
        raw_single_p50_ms: percentile(&mut raw_single.clone(), 0.5),
        p50_overhead_ms: percentile(&mut single_lat, 0.5) - percentile(&mut raw_single, 0.5),
    })
}
