//! `lockstep demo`: the whole system on one machine. A local nats-server
//! with authorization on, worker processes, and a batch with redundancy 2:
//! by default language-model prompts, one worker computing a wrong layer
//! (a test-only switch) and the dispute that pins it ([`run_llm`]);
//! with `--matmul`, matmul jobs on CPU and WGSL workers ([`run`]).

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

/// The matmul demo: three workers (two CPU, one WGSL where a device is
/// present), `n_jobs` products, a table of verdicts.
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

/// The prompts of the LLM demo (a chat for an instruct model).
const PROMPTS: [(&str, &str); 4] = [
    ("capital", "The capital of France is"),
    ("recipe", "A simple recipe for bread:"),
    ("poem", "Write one line about the sea."),
    ("count", "One, two, three,"),
];

/// The LLM demo: `model` (a name or file) on three CPU workers, one of
/// which flips a bit of one layer's output at one position in every
/// generation; redundancy 2; the text, the verdicts and the dispute.
pub fn run_llm(model: &str, max_tokens: usize) -> Result<()> {
    let local = crate::llm::distribute::LocalModel::load(model)?;
    let c = &local.model.config;
    let fault = (5usize, c.n_layers / 2);
    let server = NatsServer::start().context("cannot start a local nats-server")?;
    println!(
        "NATS: {} (local nats-server, JetStream, authorization on)",
        server.url()
    );
    println!(
        "model: {} ({} layers, {:.0} MiB of weights), model digest {}",
        local.path.file_name().unwrap_or_default().to_string_lossy(),
        c.n_layers,
        local.model.weight_bytes() as f64 / (1 << 20) as f64,
        local.model.digest
    );
    let fault_env = format!("{}:{}", fault.0, fault.1);
    let specs: [(&str, Vec<(&str, &str)>); 3] = [
        ("demo-cpu-1", vec![]),
        ("demo-cpu-2", vec![]),
        (
            "demo-faulty",
            vec![("LOCKSTEP_FAULT_INJECT_LAYER", fault_env.as_str())],
        ),
    ];
    println!(
        "workers: demo-cpu-1 (cpu), demo-cpu-2 (cpu), demo-faulty (cpu; TEST SWITCH: flips one bit of layer {}'s output at position {} in every generation)",
        fault.1, fault.0
    );
    println!("(no WGSL worker: the model's ops run on the CPU backend only for now; `lockstep demo --matmul` mixes CPU and WGSL)");
    let mut workers = WorkerProcs::new(std::env::current_exe()?);
    for (name, env) in &specs {
        workers.spawn(&server, name, "cpu", &[], env)?;
    }
    let dir = tempfile::Builder::new()
        .prefix("lockstep-demo-")
        .tempdir()?;
    let batch_path = dir.path().join("batch.jsonl");
    let chat = local
        .tokenizer
        .as_ref()
        .is_some_and(|t| t.chat_template.is_some());
    {
        let mut f = std::fs::File::create(&batch_path)?;
        for (i, (id, text)) in PROMPTS.iter().enumerate() {
            let mut line = serde_json::json!({
                "id": id, "op": "generate", "model": local.path.display().to_string(),
                "max_tokens": max_tokens,
            });
            match (&local.tokenizer, chat && i == 2) {
                (None, _) => {
                    line["prompt_ids"] = serde_json::json!([1, 403 + i as u32, 407, 261, 378, 300])
                }
                (Some(_), true) => {
                    line["messages"] = serde_json::json!([{"role": "user", "content": text}])
                }
                (Some(_), false) => line["prompt"] = serde_json::json!(text),
            }
            if i == 3 {
                // One sampled generation: reproducible from its seed.
                line["temperature"] = serde_json::json!(0.8);
                line["top_p"] = serde_json::json!(0.95);
                line["seed"] = serde_json::json!(42);
            }
            writeln!(f, "{line}")?;
        }
    }
    let jobs = crate::batch::parse_batch(&batch_path)?;
    println!(
        "batch: {} generate jobs (up to {max_tokens} tokens each), redundancy 2: each on 2 workers of distinct operators\n",
        jobs.len()
    );
    let signer = server
        .coordinator()
        .identity()?
        .context("the coordinator's key")?;
    let opts = SubmitOptions {
        signer: Some(std::sync::Arc::new(signer)),
        redundancy: 2,
        out_dir: Some(dir.path().join("out")),
        deadline: Some(Duration::from_secs(900)),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new()?;
    let report = rt.block_on(async {
        let nats = server.connect().await?;
        let names: Vec<&str> = specs.iter().map(|(n, _)| *n).collect();
        crate::nats::wait_for_workers(&nats, &names, Duration::from_secs(120)).await?;
        submit(&nats, jobs.clone(), &opts).await
    })?;
    drop(workers);
    let decode = |ids: &[u32]| match &local.tokenizer {
        Some(t) => t.decode(ids).unwrap_or_default(),
        None => format!("{ids:?}"),
    };
    for (j, (_, text)) in report.jobs.iter().zip(PROMPTS) {
        let workers: Vec<String> = j
            .results
            .iter()
            .map(|r| {
                let bad = if j.faulty_workers.contains(&r.worker) {
                    " ✗"
                } else {
                    ""
                };
                format!("{}{bad}", r.worker)
            })
            .collect();
        let verdict = format!("{:?}", j.verdict).to_lowercase();
        println!("[{}] {verdict} by {}", j.job, workers.join(", "));
        let prompt = if local.tokenizer.is_some() {
            text.to_string()
        } else {
            "(token ids)".into()
        };
        match &j.generation {
            Some(g) => println!(
                "  prompt: {prompt}\n  text:   {}\n",
                decode(&g.output_ids).trim().replace('\n', " ")
            ),
            None => println!("  {}\n", j.reason.clone().unwrap_or_default()),
        }
    }
    let disputes: Vec<_> = report
        .jobs
        .iter()
        .filter_map(|j| j.dispute.as_ref().map(|d| (j, d)))
        .collect();
    if disputes.is_empty() {
        println!("no dispute: the faulty worker was given no job this time");
    }
    for (j, d) in disputes {
        println!(
            "dispute on [{}]: {} differed first at position {}, {}; the coordinator checked that layer's inputs at {} positions against the agreed digests and recomputed {} alone by the scalar spec in {:.0} ms (the generation took {:.0} ms; whole dispute {:.0} ms). Faulty: {}",
            j.job,
            j.faulty_workers.join(", "),
            d.position,
            d.layer.map_or("after the last layer".to_string(), |l| format!("layer {l}")),
            d.positions_replayed,
            d.layer.map_or("the final step".to_string(), |l| format!("layer {l}")),
            d.replay_ms,
            d.generation_ms,
            d.total_ms,
            j.faulty_workers.join(", ")
        );
    }
    println!(
        "\n{} verified, {} resolved, {} failed; faults recorded: {}",
        report.verified,
        report.resolved,
        report.failed,
        report.faults.len()
    );
    let receipts = dir.path().join("out").join("receipts.jsonl");
    println!("\nreceipts (prompt ids, output ids, model, tokenizer, sampling), checked offline (lockstep verify):");
    crate::admin::verify(&receipts, Some(&server.dir()), None, false)?;
    anyhow::ensure!(
        report.all_accepted(),
        "{} job(s) failed, {} unresolved",
        report.failed,
        report.unresolved
    );
    Ok(())
}
