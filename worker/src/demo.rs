//! `lockstep demo`: the whole system on one machine. A local nats-server,
//! three worker processes (two CPU, one WGSL where a device is present), a
//! batch of matmul jobs with redundancy 2, and a table of verdicts.

use std::io::Write as _;
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use crate::coordinator::{print_report, submit, SubmitOptions};
use crate::harness::{NatsServer, WorkerProcs};
use crate::protocol::encode_f32;

/// Writes a demo batch: `n` products of varied, awkward shapes (K around the
/// 256-chunk boundaries, odd M and N, one matrix-vector product, one large
/// enough to travel through the object store).
pub fn write_demo_batch(path: &std::path::Path, n: usize, seed: u64) -> Result<()> {
    let mut r = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let shapes = [
        (1, 513, 64),
        (33, 256, 17),
        (64, 257, 48),
        (100, 255, 31),
        (7, 1000, 9),
        (128, 300, 96),
        (200, 300, 70),
    ];
    let mut f = std::fs::File::create(path)?;
    for i in 0..n {
        let (m, k, nn) = shapes[i % shapes.len()];
        let a: Vec<f32> = (0..m * k).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let b: Vec<f32> = (0..k * nn).map(|_| r.random_range(-1.0f32..1.0)).collect();
        let line = serde_json::json!({
            "id": format!("job-{i:03}"),
            "op": "matmul",
            "inputs": [
                {"shape": [m, k], "inline": encode_f32(&a)},
                {"shape": [k, nn], "inline": encode_f32(&b)},
            ],
        });
        writeln!(f, "{line}")?;
    }
    Ok(())
}

pub fn run(n_jobs: usize) -> Result<()> {
    let server = NatsServer::start().context("cannot start a local nats-server")?;
    println!(
        "NATS: {} (local nats-server, JetStream, authorization on; deployment and keys in {})",
        server.url(),
        server.dir().display()
    );

    let wgpu = lockstep_kernels::wgpu::WgpuBackend::new(Default::default());
    let third = match &wgpu {
        Ok(_) => ("demo-wgpu", "wgpu"),
        Err(e) => {
            println!("no WGSL device ({e}); the third worker uses the CPU");
            ("demo-cpu-3", "cpu")
        }
    };
    drop(wgpu);
    let specs = [("demo-cpu-1", "cpu"), ("demo-cpu-2", "cpu"), third];
    println!(
        "workers: {}",
        specs
            .iter()
            .map(|(n, b)| format!("{n} ({b})"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut workers = WorkerProcs::new(std::env::current_exe()?);
    for (name, backend) in specs {
        workers.spawn(&server, name, backend, &[], &[])?;
    }

    let dir = tempfile::Builder::new()
        .prefix("lockstep-demo-")
        .tempdir()?;
    let batch_path = dir.path().join("batch.jsonl");
    let seed = rand::rng().random();
    write_demo_batch(&batch_path, n_jobs, seed)?;
    let jobs = crate::batch::parse_batch(&batch_path)?;
    println!("batch: {n_jobs} matmul jobs, redundancy 2 (each job on 2 distinct workers)\n");

    let signer = server
        .coordinator()
        .identity()?
        .context("the coordinator's key")?;
    let opts = SubmitOptions {
        signer: Some(std::sync::Arc::new(signer)),
        redundancy: 2,
        out_dir: Some(dir.path().join("out")),
        deadline: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let nats = server.connect().await?;
        // Let every worker finish its self-test and register, so the batch
        // is spread over all of them (CPU and WGSL mixed).
        let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
        crate::nats::wait_for_workers(&nats, &names, Duration::from_secs(120)).await?;
        submit(&nats, jobs, &opts).await
    })?;
    print_report(&report);
    drop(workers);
    let receipts = dir.path().join("out").join("receipts.jsonl");
    println!("\nreceipts, checked offline (lockstep verify):");
    crate::admin::verify(&receipts, Some(&server.dir()), None, false)?;
    anyhow::ensure!(
        report.all_accepted(),
        "{} job(s) failed, {} unresolved",
        report.failed,
        report.unresolved
    );
    Ok(())
}
