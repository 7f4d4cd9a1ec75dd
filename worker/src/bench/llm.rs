//! Benchmarks of verified language-model inference, each against its
//! baseline measured in the same run:
//! - `verified-generate`: tokens/s of a batch of generate jobs with r = 2
//!   against the same workers generating it with r = 1;
//! - `dispute`: a dispute's one-layer replay against re-executing the whole
//!   generation;
//! - `batch-decode`: sequences decoded as one batch against one at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lockstep_kernels::contract::Generate;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::generate::{generate_all, replay, TestFault};
use lockstep_kernels::model::{spec, Engine};
use serde::Serialize;

use crate::coordinator::{submit, SubmitOptions};
use crate::llm::distribute::LocalModel;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Prompts of the benchmarks (ids for models without a tokenizer). Each
/// is generated greedily with no stop ids ([`Generate::greedy`]), so every
/// sequence runs to max tokens and runs compare.
/// The benchmarks' text prompts (also `bench serve`'s).
pub(crate) const TEXTS: [&str; 8] = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "A simple recipe for bread:",
    "The three laws of motion are",
    "Write a short note to a friend:",
    "The best way to learn a language is",
    "In the year 2050, cities will",
    "The ocean is home to",
];

fn prompts(local: &LocalModel, n: usize) -> Result<Vec<Vec<u32>>> {
    (0..n)
        .map(|i| match &local.tokenizer {
            Some(t) => t.encode(TEXTS[i % TEXTS.len()]),
            None => Ok(vec![1, 300 + i as u32, 407, 261]),
        })
        .collect()
}

#[derive(Serialize)]
pub struct VerifiedGenerateReport {
    pub model: String,
    pub jobs: usize,
    pub max_tokens: usize,
    pub workers: usize,
    /// Generated tokens/s (each job's tokens counted once), r = 1, per run.
    pub unverified_tok_s: Vec<f64>,
    /// The same with r = 2, per run.
    pub verified_tok_s: Vec<f64>,
    /// verified / unverified, per run (0.5 is the ideal for r = 2).
    pub ratios: Vec<f64>,
    pub median_ratio: f64,
}

/// A batch of `jobs` generate jobs on two local CPU workers of distinct
/// operators (`threads` each, `concurrency` jobs in hand each), r = 1 then
/// r = 2, `runs` times.
pub fn verified_generate(
    model: &str,
    jobs: usize,
    max_tokens: usize,
    runs: usize,
    threads: usize,
    concurrency: usize,
) -> Result<VerifiedGenerateReport> {
    let local = LocalModel::load(model)?;
    let server = crate::harness::NatsServer::start().context("cannot start a local nats-server")?;
    let mut procs = crate::harness::WorkerProcs::new(std::env::current_exe()?);
    let names = ["bench-gen-1", "bench-gen-2"];
    let (threads_arg, conc_arg) = (threads.to_string(), concurrency.to_string());
    for n in names {
        procs.spawn(
            &server,
            n,
            "cpu",
            &["--threads", &threads_arg, "--concurrency", &conc_arg],
            &[],
        )?;
    }
    let ps = prompts(&local, jobs)?;
    let batch: Vec<crate::batch::BatchJob> = ps
        .iter()
        .enumerate()
        .map(|(i, p)| crate::batch::BatchJob {
            id: format!("gen-{i:03}"),
            op: lockstep_kernels::Op::Generate(Generate::greedy(local.model.digest, max_tokens)),
            inputs: vec![crate::batch::Tensor::Data {
                shape: vec![p.len()],
                data: p.iter().map(|&t| t as f32).collect(),
            }],
            model_file: Some(local.path.clone()),
        })
        .collect();
    let rt = tokio::runtime::Runtime::new()?;
    let nats = rt.block_on(async {
        let nats = server.connect().await?;
        crate::nats::wait_for_workers(&nats, &names, Duration::from_secs(120)).await?;
        anyhow::Ok(nats)
    })?;
    let run = |r: u32, id: String| -> Result<f64> {
        let opts = SubmitOptions {
            redundancy: r,
            batch_id: Some(id),
            progress: false,
            deadline: Some(Duration::from_secs(1800)),
            ..Default::default()
        };
        let t = Instant::now();
        let report = rt.block_on(submit(&nats, batch.clone(), &opts))?;
        let secs = t.elapsed().as_secs_f64();
        anyhow::ensure!(report.all_accepted(), "a job failed: {report:?}");
        let tokens: usize = report
            .jobs
            .iter()
            .filter_map(|j| j.generation.as_ref())
            .map(|g| g.output_ids.len())
            .sum();
        Ok(tokens as f64 / secs)
    };
    // A warm-up: the workers fetch and load the model.
    run(1, "bench-gen-warm".into())?;
    let (mut unverified, mut verified, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        let u = run(1, format!("bench-gen-r1-{i}"))?;
        let v = run(2, format!("bench-gen-r2-{i}"))?;
        eprintln!(
            "run {i}: r = 1 {u:.1} tok/s, r = 2 {v:.1} tok/s, ratio {:.3}",
            v / u
        );
        unverified.push(u);
        verified.push(v);
        ratios.push(v / u);
    }
    Ok(VerifiedGenerateReport {
        model: local.path.display().to_string(),
        jobs,
        max_tokens,
        workers: names.len(),
        unverified_tok_s: unverified,
        verified_tok_s: verified,
        median_ratio: median(ratios.clone()),
        ratios,
    })
}

#[derive(Serialize)]
pub struct DisputeCostReport {
    pub model: String,
    pub tokens: usize,
    pub position: usize,
    pub layer: usize,
    pub threads: usize,
    /// Re-executing the whole generation (the engine, the coordinator's
    /// fallback), ms per run.
    pub full_ms: Vec<f64>,
    /// The dispute's replay of one layer over positions 0..=p (the engine's
    /// kernels, batched), ms per run.
    pub layer_ms: Vec<f64>,
    /// The same layer by the plain scalar spec, one position at a time
    /// (`lockstep replay-layer`), ms (one run).
    pub layer_spec_ms: f64,
    pub median_ratio: f64,
    pub spec_ratio: f64,
}

/// A `tokens`-token greedy generation, then a dispute at its last position
/// in the middle layer: the one-layer replay against the whole generation.
pub fn dispute_cost(
    model: &str,
    tokens: usize,
    runs: usize,
    threads: usize,
) -> Result<DisputeCostReport> {
    let local = LocalModel::load(model)?;
    let m = &local.model;
    let engine = Engine::new(m, threads, Isa::detect())?;
    let prompt = prompts(&local, 1)?.remove(0);
    let g = Generate::greedy(m.digest, tokens);
    let layer = m.config.n_layers / 2;
    let (mut full, mut one) = (Vec::new(), Vec::new());
    let mut inputs = Vec::new();
    let mut position = 0;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let out = generate_all(&engine, &[(prompt.clone(), g.clone())])?;
        full.push(t.elapsed().as_secs_f64() * 1e3);
        let mut fed = prompt.clone();
        fed.extend_from_slice(&out[0].tokens[..out[0].tokens.len() - 1]);
        position = fed.len() - 1;
        inputs = replay(&engine, &fed, Some(layer), TestFault::default())?
            .inputs
            .unwrap_or_default();
        let t = Instant::now();
        let _ = engine.layer_alone(layer, &inputs)?;
        one.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let t = Instant::now();
    let mut cache = spec::LayerCache::default();
    for (pos, row) in inputs.chunks_exact(m.config.dim).enumerate() {
        let mut x = row.to_vec();
        spec::layer_spec(m, layer, &mut x, pos, &mut cache);
    }
    let layer_spec_ms = t.elapsed().as_secs_f64() * 1e3;
    let (f, o) = (median(full.clone()), median(one.clone()));
    Ok(DisputeCostReport {
        model: local.path.display().to_string(),
        tokens,
        position,
        layer,
        threads: engine.threads(),
        full_ms: full,
        layer_ms: one,
        layer_spec_ms,
        median_ratio: f / o,
        spec_ratio: f / layer_spec_ms,
    })
}

#[derive(Serialize)]
pub struct BatchDecodeReport {
    pub model: String,
    pub sequences: usize,
    pub tokens: usize,
    pub threads: usize,
    /// Aggregate tokens/s decoding all sequences as one batch, per run.
    pub batched_tok_s: Vec<f64>,
    /// Tokens/s decoding them one after another, per run.
    pub sequential_tok_s: Vec<f64>,
    pub median_ratio: f64,
}

/// `sequences` generations of `tokens` tokens as one continuous batch
/// against one at a time, same engine, interleaved `runs` times.
pub fn batch_decode(
    model: &str,
    sequences: usize,
    tokens: usize,
    runs: usize,
    threads: usize,
) -> Result<BatchDecodeReport> {
    let local = LocalModel::load(model)?;
    let engine = Engine::new(&local.model, threads, Isa::detect())?;
    let requests: Vec<(Vec<u32>, Generate)> = prompts(&local, sequences)?
        .into_iter()
        .map(|p| (p, Generate::greedy(local.model.digest, tokens)))
        .collect();
    let total = (sequences * tokens) as f64;
    let (mut batched, mut sequential, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        let together = generate_all(&engine, &requests)?;
        let b = total / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut alone = Vec::new();
        for r in &requests {
            alone.extend(generate_all(&engine, std::slice::from_ref(r))?);
        }
        let s = total / t.elapsed().as_secs_f64();
        anyhow::ensure!(
            together == alone,
            "a sequence's tokens depend on the batch: the engine is not batch invariant"
        );
        batched.push(b);
        sequential.push(s);
        ratios.push(b / s);
    }
    Ok(BatchDecodeReport {
        model: local.path.display().to_string(),
        sequences,
        tokens,
        threads: engine.threads(),
        batched_tok_s: batched,
        sequential_tok_s: sequential,
        median_ratio: median(ratios),
    })
}
