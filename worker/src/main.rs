//! The `lockstep` command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use lockstep::{bench, tensors};
use lockstep_kernels::{tensor_digest_f32, BackendKind, MatmulDims, CONTRACT_VERSION};

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
    /// Benchmarks against the baselines users would otherwise use, in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Show the contract in action: one matmul on every backend present, digests compared.
    Demo {
        /// Size of the square-ish demo product (M = size, K = size + 44, N = size - 56).
        #[arg(long, default_value_t = 256)]
        size: usize,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
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
}

fn main() -> ExitCode {
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
        Command::Demo { size } => demo(size),
    }
}

fn open(kind: BackendKind, threads: usize) -> Result<Box<dyn lockstep_kernels::Backend>> {
    Ok(match kind {
        BackendKind::Cpu => Box::new(lockstep_kernels::cpu::CpuBackend::new(threads)?),
        other => lockstep_kernels::open(other)
            .with_context(|| format!("backend {other} is not usable here"))?,
    })
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
    let (a, b, dims) = tensors::read_operands(input)?;
    let backend = open(kind, threads)?;
    let t = std::time::Instant::now();
    let c = backend.matmul(&a.data, &b.data, dims)?;
    let secs = t.elapsed().as_secs_f64();
    tensors::write_f32(output, &[("c", &[dims.m, dims.n], &c)])?;
    let info = backend.info();
    println!("backend: {kind} ({}, {})", info.device, info.path);
    println!(
        "c: [{}, {}] in {:.3} s ({:.1} GFLOP/s), contract v{CONTRACT_VERSION}",
        dims.m,
        dims.n,
        secs,
        dims.flops() / secs / 1e9
    );
    println!("{}", tensor_digest_f32(&[dims.m, dims.n], &c));
    Ok(())
}

fn demo(size: usize) -> Result<()> {
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
                let c = backend.matmul(&a, &b, dims)?;
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
