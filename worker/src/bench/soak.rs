//! `lockstep bench soak`: many batches through a real nats-server and three
//! worker processes, one after another, watching what grows: verified jobs
//! per second, the resident memory of the coordinator, the workers and the
//! server, and the bytes every store holds. After the first batches all of
//! them must stay flat (each finished batch is purged from the server).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::Serialize;

use crate::batch::{BatchJob, Tensor};
use crate::coordinator::{submit, SubmitOptions};
use crate::harness::{NatsServer, WorkerProcs};

/// One batch of the soak.
#[derive(Clone, Debug, Serialize)]
pub struct SoakSample {
    pub batch: usize,
    /// Jobs submitted so far, this batch included.
    pub jobs_done: usize,
    pub verified_per_s: f64,
    pub coordinator_rss_mib: f64,
    pub workers_rss_mib: f64,
    /// `None` when the server is not a child of this process (`--nats`).
    pub server_rss_mib: Option<f64>,
    /// Bytes held by all stores (streams, buckets, object store).
    pub store_bytes: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct SoakReport {
    pub jobs: usize,
    pub batch_size: usize,
    pub samples: Vec<SoakSample>,
    /// Last sample over the sample after warm-up (the 3rd batch, or the
    /// first when there are fewer): 1.0 means flat.
    pub coordinator_rss_growth: f64,
    pub workers_rss_growth: f64,
    pub server_rss_growth: Option<f64>,
    /// Store bytes after the last batch (each batch is purged when done).
    pub store_bytes_last: u64,
    pub store_bytes_max: u64,
}

/// Resident memory of a process, in MiB, from `/proc` (0 where unreadable).
fn rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// A batch of `n` small jobs: most 2×2 products, every 50th one large
/// enough (130×140·140×130) that its inputs and output travel as objects.
fn soak_batch(batch: usize, n: usize) -> Vec<BatchJob> {
    (0..n)
        .map(|i| {
            let seed = (batch * n + i) as f32;
            let t = |shape: Vec<usize>, fill: f32| {
                let len = shape.iter().product::<usize>();
                Tensor::Data {
                    data: (0..len).map(|k| fill + k as f32 * 1e-3).collect(),
                    shape,
                }
            };
            if i % 50 == 49 {
                BatchJob::matmul(
                    format!("j{i}"),
                    t(vec![130, 140], seed),
                    t(vec![140, 130], 0.5),
                )
            } else {
                BatchJob::matmul(format!("j{i}"), t(vec![2, 2], seed), t(vec![2, 2], 0.25))
            }
        })
        .collect()
}

/// Runs `jobs` jobs in batches of `batch_size`, r = 2, on three local CPU
/// worker processes; `progress` is called after every batch.
pub async fn bench_soak(
    jobs: usize,
    batch_size: usize,
    mut progress: impl FnMut(&SoakSample),
) -> Result<SoakReport> {
    anyhow::ensure!(
        batch_size > 0 && jobs > 0,
        "--jobs and --batch must be positive"
    );
    let server = NatsServer::start()?;
    let nats = server.connect().await?;
    let tag = std::process::id();
    let mut workers = WorkerProcs::new(std::env::current_exe()?);
    let names: Vec<String> = (0..3).map(|i| format!("soak-{tag}-{i}")).collect();
    for n in &names {
        workers.spawn(&server, n, "cpu", &["--concurrency", "4"], &[])?;
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    crate::nats::wait_for_workers(&nats, &refs, Duration::from_secs(120)).await?;
    let mut samples = Vec::new();
    let batches = jobs.div_ceil(batch_size);
    let mut done = 0;
    for b in 0..batches {
        let n = batch_size.min(jobs - done);
        let opts = SubmitOptions {
            batch_id: Some(format!("soak-{tag}-{b}")),
            progress: false,
            deadline: Some(Duration::from_secs(600)),
            threads: 1,
            ..Default::default()
        };
        let t = Instant::now();
        let report = submit(&nats, soak_batch(b, n), &opts)
            .await
            .with_context(|| format!("batch {b}"))?;
        anyhow::ensure!(
            report.verified == n,
            "batch {b}: only {} of {n} jobs verified",
            report.verified
        );
        done += n;
        let store_bytes = crate::store::usage(&nats)
            .await?
            .iter()
            .map(|(_, b)| b)
            .sum();
        let sample = SoakSample {
            batch: b,
            jobs_done: done,
            verified_per_s: n as f64 / t.elapsed().as_secs_f64(),
            coordinator_rss_mib: rss_mib(std::process::id()),
            workers_rss_mib: workers.pids().into_iter().map(rss_mib).sum(),
            server_rss_mib: server.pid().map(rss_mib),
            store_bytes,
        };
        progress(&sample);
        samples.push(sample);
    }
    let warm = samples
        .get(2)
        .or(samples.first())
        .expect("one batch at least")
        .clone();
    let last = samples.last().expect("one batch at least").clone();
    let growth = |a: f64, b: f64| if a > 0.0 { b / a } else { 1.0 };
    Ok(SoakReport {
        jobs,
        batch_size,
        coordinator_rss_growth: growth(warm.coordinator_rss_mib, last.coordinator_rss_mib),
        workers_rss_growth: growth(warm.workers_rss_mib, last.workers_rss_mib),
        server_rss_growth: warm
            .server_rss_mib
            .zip(last.server_rss_mib)
            .map(|(a, b)| growth(a, b)),
        store_bytes_last: last.store_bytes,
        store_bytes_max: samples.iter().map(|s| s.store_bytes).max().unwrap_or(0),
        samples,
    })
}
