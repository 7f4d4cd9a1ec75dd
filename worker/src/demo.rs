//! `lockstep demo`: the whole system on one machine. A local nats-server,
//! three worker processes (two CPU, one WGSL where a device is present), a
//! batch of matmul jobs with redundancy 2, and a table of verdicts.

use std::io::Write as _;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};
use rand::{Rng, SeedableRng};

use crate::coordinator::{submit, Report, SubmitOptions, Verdict};
use crate::protocol::encode_f32;
use crate::server::NatsServer;

/// `lockstep worker` processes (the demo's, and the tests'): when dropped,
/// each gets SIGTERM (it drains and exits), then SIGKILL after 5 s.
pub struct WorkerProcs {
    /// The `lockstep` executable to run.
    exe: std::path::PathBuf,
    procs: Vec<(String, Child)>,
}

impl WorkerProcs {
    pub fn new(exe: impl Into<std::path::PathBuf>) -> Self {
        Self {
            exe: exe.into(),
            procs: Vec::new(),
        }
    }

    /// Starts `lockstep worker --nats URL --name NAME --backend BACKEND
    /// --threads 1 ARGS…` with extra environment.
    pub fn spawn(
        &mut self,
        url: &str,
        name: &str,
        backend: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<()> {
        let child = Command::new(&self.exe)
            .args([
                "worker",
                "--nats",
                url,
                "--name",
                name,
                "--backend",
                backend,
                "--threads",
                "1",
            ])
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start worker {name}"))?;
        self.procs.push((name.to_string(), child));
        Ok(())
    }

    fn child(&mut self, name: &str) -> &mut Child {
        &mut self
            .procs
            .iter_mut()
            .find(|(n, _)| n == name)
            .expect("a worker of that name")
            .1
    }

    /// SIGTERM: the worker drains and exits by itself.
    pub fn terminate(&mut self, name: &str) {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child(name).id() as i32, libc::SIGTERM) };
    }

    /// SIGKILL, and wait for the process: no chance to drain.
    pub fn kill(&mut self, name: &str) {
        let c = self.child(name);
        let _ = c.kill();
        let _ = c.wait();
    }

    pub fn is_running(&mut self, name: &str) -> bool {
        self.child(name).try_wait().ok().flatten().is_none()
    }

    /// Waits up to `timeout` for a worker to exit; its status if it did.
    pub fn wait_exit(&mut self, name: &str, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child(name);
        let t = std::time::Instant::now();
        while t.elapsed() < timeout {
            if let Some(s) = c.try_wait().ok().flatten() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for WorkerProcs {
    fn drop(&mut self) {
        let names: Vec<String> = self.procs.iter().map(|(n, _)| n.clone()).collect();
        for n in &names {
            self.terminate(n);
        }
        for n in &names {
            self.wait_exit(n, Duration::from_secs(5));
            self.kill(n);
        }
    }
}

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
            "kind": "matmul",
            "a": {"shape": [m, k], "inline": encode_f32(&a)},
            "b": {"shape": [k, nn], "inline": encode_f32(&b)},
        });
        writeln!(f, "{line}")?;
    }
    Ok(())
}

pub fn run(nats_url: Option<String>, n_jobs: usize) -> Result<()> {
    let server = match &nats_url {
        Some(_) => None,
        None => Some(NatsServer::start().context("cannot start a local nats-server")?),
    };
    let url = nats_url.unwrap_or_else(|| server.as_ref().unwrap().url());
    println!(
        "NATS: {url}{}",
        if server.is_some() {
            " (local nats-server, JetStream, temporary store)"
        } else {
            ""
        }
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
        workers.spawn(&url, name, backend, &[], &[])?;
    }

    let dir = tempfile::Builder::new()
        .prefix("lockstep-demo-")
        .tempdir()?;
    let batch_path = dir.path().join("batch.jsonl");
    let seed = rand::rng().random();
    write_demo_batch(&batch_path, n_jobs, seed)?;
    let jobs = crate::batch::parse_batch(&batch_path)?;
    println!("batch: {n_jobs} matmul jobs, redundancy 2 (each job on 2 distinct workers)\n");

    let opts = SubmitOptions {
        redundancy: 2,
        out_dir: Some(dir.path().join("out")),
        deadline: Some(Duration::from_secs(600)),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let nats = crate::nats::connect(&url).await?;
        // Let every worker finish its self-test and register, so the batch
        // is spread over all of them (CPU and WGSL mixed).
        let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
        wait_for_workers(&nats, &names, Duration::from_secs(120)).await?;
        submit(&nats, jobs, &opts).await
    })?;
    print_report(&report);
    drop(workers);
    anyhow::ensure!(
        report.all_accepted(),
        "{} job(s) failed, {} unresolved",
        report.failed,
        report.unresolved
    );
    Ok(())
}

/// Waits until every named worker has registered and is heartbeating.
pub async fn wait_for_workers(
    nats: &crate::nats::Nats,
    names: &[&str],
    timeout: Duration,
) -> Result<()> {
    let t = std::time::Instant::now();
    loop {
        let live = crate::nats::live_workers(nats, Duration::from_secs(5)).await?;
        if names.iter().all(|n| live.iter().any(|w| w.id == *n)) {
            return Ok(());
        }
        if t.elapsed() > timeout {
            anyhow::bail!(
                "workers {names:?} did not all register within {timeout:?} (see their logs)"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The verdict table printed by `submit` and `demo`.
pub fn print_report(report: &Report) {
    println!(
        "{:<10} {:<11} {:<42} {:<10} digest",
        "job", "shape", "workers (backend)", "verdict"
    );
    for j in &report.jobs {
        let workers: Vec<String> = j
            .results
            .iter()
            .map(|r| {
                let bad = if j.faulty_workers.contains(&r.worker) {
                    "✗"
                } else {
                    ""
                };
                format!("{}({}){bad}", r.worker, r.backend)
            })
            .collect();
        let verdict = match j.verdict {
            Verdict::Verified => "verified",
            Verdict::Resolved => "resolved",
            Verdict::Failed => "FAILED",
            Verdict::Unresolved => "UNRESOLVED",
        };
        let digest = j
            .digest
            .map(|d| format!("{}…", &d.to_string()[..21]))
            .unwrap_or_else(|| j.reason.clone().unwrap_or_default());
        println!(
            "{:<10} {:<11} {:<42} {:<10} {digest}",
            j.job,
            format!("{}x{}", j.shape[0], j.shape[1]),
            workers.join(" "),
            verdict
        );
    }
    println!(
        "\n{} jobs in {:.1} s: {} verified, {} resolved (disputes settled), {} failed, {} unresolved; contract v{}",
        report.jobs.len(),
        report.elapsed_s,
        report.verified,
        report.resolved,
        report.failed,
        report.unresolved,
        report.contract_version
    );
    for f in &report.faults {
        println!(
            "FAULT: worker {} returned {} for {}; correct is {}",
            f.worker, f.reported, f.job, f.correct
        );
    }
}
