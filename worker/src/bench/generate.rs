//! `lockstep bench generate`: prefill and decode tokens/s of the exact
//! engine, its peak resident memory against the model and KV cache, and the
//! weight bandwidth decode achieves against this machine's bandwidth
//! measured in the same run.
//!
//! With `--baselines`, llama.cpp and candle (`benches/llm-baselines`, a
//! separate crate built with `-C target-cpu=native` that CI does not build)
//! run the same prompt and greedy decode on the same GGUF, one run of each
//! engine after each of lockstep's, each in its own process; the ratios are
//! of medians measured in this one run.

use std::time::Instant;

use anyhow::Result;
use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::Engine;

#[derive(Debug, serde::Serialize)]
pub struct GenerateBench {
    pub model: String,
    pub model_digest: String,
    pub isa: &'static str,
    pub threads: usize,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub runs: usize,
    /// Medians over the runs.
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prefill_runs_tok_s: Vec<f64>,
    pub decode_runs_tok_s: Vec<f64>,
    pub model_file_bytes: u64,
    pub weight_bytes: usize,
    pub kv_bytes: usize,
    pub peak_rss_bytes: u64,
    /// Model file + KV cache + 64 MiB: the goal for peak RSS.
    pub rss_budget_bytes: u64,
    /// Weight bytes read per decoded token × decode tokens/s.
    pub decode_weight_gb_s: f64,
    /// Reading a 512 MiB buffer with the same threads, same run.
    pub machine_read_gb_s: f64,
    pub bandwidth_fraction: f64,
    /// Greedy tokens of the last run (identical in every run).
    pub tokens_digest: String,
    /// The other engines, measured interleaved with lockstep.
    pub baselines: Vec<Baseline>,
}

/// Another engine on the same model, prompt and decode, same run.
#[derive(Debug, serde::Serialize)]
pub struct Baseline {
    pub engine: String,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    pub prefill_runs_tok_s: Vec<f64>,
    pub decode_runs_tok_s: Vec<f64>,
    pub peak_rss_bytes: u64,
    /// lockstep ÷ this engine.
    pub prefill_ratio: f64,
    pub decode_ratio: f64,
}

/// The baselines' binary: `$LOCKSTEP_BASELINES_BIN`, or where
/// `benches/llm-baselines` builds it (`target/baselines/release/`).
fn baselines_bin() -> Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("LOCKSTEP_BASELINES_BIN") {
        return Ok(p.into());
    }
    let mut tried = Vec::new();
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1) {
        let p = dir.join("baselines/release/llm-baselines");
        if p.is_file() {
            return Ok(p);
        }
        tried.push(p);
        let p = dir.join("target/baselines/release/llm-baselines");
        if p.is_file() {
            return Ok(p);
        }
    }
    anyhow::bail!(
        "--baselines: no llm-baselines binary; build it once with \
         `cd benches/llm-baselines && cargo build --release` (needs cmake and libclang: \
         apt-get install cmake libclang-dev; about 15 minutes on 2 cores), or set LOCKSTEP_BASELINES_BIN"
    )
}

/// One run of `engine` in its own process: (prefill, decode, peak RSS).
fn baseline_run(
    bin: &std::path::Path,
    engine: &str,
    model: &std::path::Path,
    threads: usize,
    prompt: usize,
    tokens: usize,
) -> Result<(f64, f64, u64)> {
    let out = std::process::Command::new(bin)
        .args(["--engine", engine, "--model"])
        .arg(model)
        .args([
            "--threads",
            &threads.to_string(),
            "--prompt-tokens",
            &prompt.to_string(),
        ])
        .args(["--tokens", &tokens.to_string(), "--runs", "1"])
        .stderr(std::process::Stdio::null())
        .output()?;
    if !out.status.success() {
        anyhow::bail!("{} failed ({})", engine, out.status);
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let f = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| anyhow::anyhow!("{engine}: no {k} in its output"))
    };
    Ok((
        f("prefill_tok_s")?,
        f("decode_tok_s")?,
        v["peak_rss_bytes"].as_u64().unwrap_or(0),
    ))
}

/// Peak resident set size of this process (VmHWM), in bytes.
pub fn peak_rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map_or(0, |k| k * 1024)
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// GB/s reading a large buffer (summing it as integers) on `threads`.
fn read_bandwidth(threads: usize) -> f64 {
    let words = (512usize << 20) / 8;
    let buf: Vec<u64> = (0..words as u64).collect();
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("threads");
    let mut best = 0f64;
    for _ in 0..5 {
        let t = Instant::now();
        let sum: u64 = pool.install(|| {
            use rayon::prelude::*;
            buf.par_chunks(words / threads.max(1) + 1)
                .map(|c| c.iter().fold(0u64, |a, &b| a.wrapping_add(b)))
                .reduce(|| 0, u64::wrapping_add)
        });
        std::hint::black_box(sum);
        best = best.max((words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9);
    }
    best
}

pub fn bench_generate(
    model: &str,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    baselines: bool,
    mut progress: impl FnMut(&str),
) -> Result<GenerateBench> {
    let path = crate::llm::models::resolve(model)?;
    let engines: &[&str] = if baselines {
        &["llama.cpp", "candle"]
    } else {
        &[]
    };
    let bin = if baselines {
        Some(baselines_bin()?)
    } else {
        None
    };
    let mut others: Vec<(Vec<f64>, Vec<f64>, u64)> =
        vec![(Vec::new(), Vec::new(), 0); engines.len()];
    // A Hugging Face folder: its weight files (safetensors shards).
    let file_bytes = if path.is_dir() {
        std::fs::read_dir(&path)?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum()
    } else {
        std::fs::metadata(&path)?.len()
    };
    let (model, _) = crate::llm::generate::load(model)?;
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let engine = Engine::new(&model, threads, Isa::detect())?;
    if prompt_tokens == 0 || decode_tokens == 0 {
        anyhow::bail!("--prompt-tokens and --tokens must be at least 1");
    }
    let vocab = model.config.vocab_size as u64;
    if vocab <= 400 {
        anyhow::bail!("the benchmark's prompt needs a vocabulary of more than 400 tokens");
    }
    // A fixed pseudo-text prompt of ordinary tokens (the same as benches/llm-baselines').
    let prompt: Vec<u32> = (0..prompt_tokens as u64)
        .map(|i| (200 + (i * 7919) % (vocab - 400)) as u32)
        .collect();
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    let mut kv_bytes = 0;
    let mut digest = String::new();
    for run in 0..runs.max(1) {
        let mut seq = engine.sequence(prompt_tokens + decode_tokens + 1, false)?;
        kv_bytes = seq.kv_bytes();
        let t = Instant::now();
        let mut logits = engine
            .forward(&mut [&mut seq], &[&prompt])?
            .pop()
            .flatten()
            .expect("logits");
        pre.push(prompt_tokens as f64 / t.elapsed().as_secs_f64());
        let t = Instant::now();
        let mut out = Vec::with_capacity(decode_tokens);
        for _ in 0..decode_tokens {
            let tok = argmax_spec(&logits).expect("vocabulary") as u32;
            out.push(tok);
            logits = engine
                .forward(&mut [&mut seq], &[&[tok]])?
                .pop()
                .flatten()
                .expect("logits");
        }
        dec.push(decode_tokens as f64 / t.elapsed().as_secs_f64());
        progress(&format!(
            "run {}: lockstep prefill {:.1} decode {:.1} tok/s",
            run + 1,
            pre[run],
            dec[run]
        ));
        drop(seq);
        for (e, engine) in engines.iter().enumerate() {
            let (p, d, rss) = baseline_run(
                bin.as_ref().unwrap(),
                engine,
                &path,
                threads,
                prompt_tokens,
                decode_tokens,
            )?;
            progress(&format!(
                "run {}: {engine} prefill {p:.1} decode {d:.1} tok/s",
                run + 1
            ));
            others[e].0.push(p);
            others[e].1.push(d);
            others[e].2 = others[e].2.max(rss);
        }
        let d = crate::llm::generate::token_digest(&prompt, &out).to_string();
        if run > 0 && d != digest {
            anyhow::bail!(
                "run {run} decoded other tokens than run 0: the engine is not deterministic"
            );
        }
        digest = d;
    }
    let peak = peak_rss();
    let (prefill, decode) = (median(&pre), median(&dec));
    let weight_gb_s = model.weight_bytes() as f64 * decode / 1e9;
    let machine = read_bandwidth(threads);
    Ok(GenerateBench {
        model: model.source.clone(),
        model_digest: model.digest.to_string(),
        isa: engine.isa().name(),
        threads,
        prompt_tokens,
        decode_tokens,
        runs: runs.max(1),
        prefill_tok_s: prefill,
        decode_tok_s: decode,
        prefill_runs_tok_s: pre,
        decode_runs_tok_s: dec,
        model_file_bytes: file_bytes,
        weight_bytes: model.weight_bytes(),
        kv_bytes,
        peak_rss_bytes: peak,
        rss_budget_bytes: file_bytes + kv_bytes as u64 + (64 << 20),
        decode_weight_gb_s: weight_gb_s,
        machine_read_gb_s: machine,
        bandwidth_fraction: weight_gb_s / machine,
        tokens_digest: digest,
        baselines: engines
            .iter()
            .zip(others)
            .map(|(e, (p, d, rss))| {
                let (pm, dm) = (median(&p), median(&d));
                Baseline {
                    engine: e.to_string(),
                    prefill_tok_s: pm,
                    decode_tok_s: dm,
                    prefill_runs_tok_s: p,
                    decode_runs_tok_s: d,
                    peak_rss_bytes: rss,
                    prefill_ratio: prefill / pm,
                    decode_ratio: decode / dm,
                }
            })
            .collect(),
    })
}
