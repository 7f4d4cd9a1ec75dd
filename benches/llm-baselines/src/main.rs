//! `llm-baselines`: prefill and decode tokens/s of third-party LLM engines
//! (llama.cpp through `llama-cpp-2`, candle through `candle-transformers`)
//! on a GGUF model, with the same prompt and the same greedy decode loop as
//! `lockstep bench generate`, so the numbers can be compared in one run.
//!
//! stdout carries exactly one line of JSON; everything else goes to stderr.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EngineKind {
    #[value(name = "llama.cpp")]
    LlamaCpp,
    #[value(name = "candle")]
    Candle,
}

impl EngineKind {
    fn name(self) -> &'static str {
        match self {
            EngineKind::LlamaCpp => "llama.cpp",
            EngineKind::Candle => "candle",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "llm-baselines",
    about = "Prefill/decode tokens/s of llama.cpp and candle on a GGUF model"
)]
struct Args {
    /// Engine to measure.
    #[arg(long, value_enum)]
    engine: EngineKind,
    /// GGUF model file.
    #[arg(long)]
    model: PathBuf,
    /// CPU threads (both prefill and decode).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prompt length in tokens (prefilled in one batch).
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Greedy decode steps per run.
    #[arg(long, default_value_t = 128)]
    tokens: usize,
    /// Runs (each with a fresh KV cache); medians are reported.
    #[arg(long, default_value_t = 9)]
    runs: usize,
}

#[derive(Debug, serde::Serialize)]
struct Report {
    engine: &'static str,
    threads: usize,
    prompt_tokens: usize,
    decode_tokens: usize,
    runs: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    prefill_runs_tok_s: Vec<f64>,
    decode_runs_tok_s: Vec<f64>,
    peak_rss_bytes: u64,
    tokens: Vec<u32>,
}

/// What one run measured.
struct Run {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    tokens: Vec<u32>,
}

/// The prompt of `lockstep bench generate`: fixed ordinary token ids, no BOS.
fn prompt(n: usize) -> Vec<u32> {
    const VOCAB: u32 = 49152;
    (0..n as u32)
        .map(|i| 200 + (i * 7919) % (VOCAB - 400))
        .collect()
}

/// Index of the largest logit; the lowest index wins ties (NaNs never win).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best = i;
            best_v = v;
        }
    }
    best as u32
}

/// Same median as lockstep's bench: the upper middle element.
fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// Peak resident set size of this process (VmHWM), in bytes.
fn peak_rss() -> u64 {
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

mod llama {
    use super::*;
    use std::num::NonZeroU32;

    use llama_cpp_2::context::params::LlamaContextParams;
    use llama_cpp_2::llama_backend::LlamaBackend;
    use llama_cpp_2::llama_batch::LlamaBatch;
    use llama_cpp_2::model::params::LlamaModelParams;
    use llama_cpp_2::model::LlamaModel;
    use llama_cpp_2::token::LlamaToken;
    use llama_cpp_2::{send_logs_to_tracing, LogOptions};

    pub fn bench(
        path: &Path,
        threads: usize,
        prompt: &[u32],
        decode_tokens: usize,
        runs: usize,
    ) -> Result<Vec<Run>> {
        // Silence llama.cpp/ggml logging (no tracing subscriber is installed
        // either, so nothing reaches stdout or stderr).
        send_logs_to_tracing(LogOptions::default().with_logs_enabled(false));
        let backend = LlamaBackend::init().context("llama.cpp backend init")?;
        let t = Instant::now();
        let model = LlamaModel::load_from_file(&backend, path, &LlamaModelParams::default())
            .with_context(|| format!("llama.cpp: loading {}", path.display()))?;
        eprintln!(
            "llama.cpp: loaded {} in {:.2}s (n_vocab {})",
            path.display(),
            t.elapsed().as_secs_f64(),
            model.n_vocab()
        );
        let n = prompt.len();
        let n_ctx = (n + decode_tokens + 8) as u32;
        let n_batch = n.max(512) as u32;
        let threads = i32::try_from(threads).context("threads")?;
        let mut out = Vec::with_capacity(runs);
        for run in 0..runs {
            // A fresh context (and KV cache) every run, outside the timing.
            let params = LlamaContextParams::default()
                .with_n_ctx(NonZeroU32::new(n_ctx))
                .with_n_batch(n_batch)
                .with_n_ubatch(n_batch)
                .with_n_threads(threads)
                .with_n_threads_batch(threads);
            let mut ctx = model
                .new_context(&backend, params)
                .context("llama.cpp: new context")?;
            let mut batch = LlamaBatch::new(n_batch as usize, 1);
            let last = n - 1;
            for (i, &tok) in prompt.iter().enumerate() {
                batch.add(LlamaToken::new(tok as i32), i as i32, &[0], i == last)?;
            }

            let t = Instant::now();
            ctx.decode(&mut batch).context("llama.cpp: prefill")?;
            let mut logits = ctx.get_logits_ith(last as i32).to_vec();
            let prefill_s = t.elapsed().as_secs_f64();

            let mut step = LlamaBatch::new(1, 1);
            let mut tokens = Vec::with_capacity(decode_tokens);
            let t = Instant::now();
            for k in 0..decode_tokens {
                let tok = argmax(&logits);
                tokens.push(tok);
                step.clear();
                step.add(LlamaToken::new(tok as i32), (n + k) as i32, &[0], true)?;
                ctx.decode(&mut step).context("llama.cpp: decode")?;
                logits = ctx.get_logits_ith(0).to_vec();
            }
            let decode_s = t.elapsed().as_secs_f64();
            eprintln!(
                "llama.cpp run {run}: prefill {:.3}s, decode {:.3}s",
                prefill_s, decode_s
            );
            out.push(Run {
                prefill_tok_s: n as f64 / prefill_s,
                decode_tok_s: decode_tokens as f64 / decode_s,
                tokens,
            });
        }
        Ok(out)
    }
}

mod candle {
    use super::*;

    use candle_core::quantized::gguf_file;
    use candle_core::{Device, Tensor};
    use candle_transformers::models::quantized_llama::ModelWeights;

    fn last_logits(t: &Tensor) -> Result<Vec<f32>> {
        // forward returns [1, vocab] for the last position.
        Ok(t.squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1::<f32>()?)
    }

    pub fn bench(
        path: &Path,
        prompt: &[u32],
        decode_tokens: usize,
        runs: usize,
    ) -> Result<Vec<Run>> {
        let device = Device::Cpu;
        let t = Instant::now();
        let mut file = std::fs::File::open(path)
            .with_context(|| format!("candle: opening {}", path.display()))?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| e.with_path(path))
            .context("candle: reading GGUF header")?;
        let mut model = ModelWeights::from_gguf(content, &mut file, &device)
            .context("candle: loading weights")?;
        eprintln!(
            "candle: loaded {} in {:.2}s ({} threads)",
            path.display(),
            t.elapsed().as_secs_f64(),
            candle_core::utils::get_num_threads()
        );
        let n = prompt.len();
        let mut out = Vec::with_capacity(runs);
        for run in 0..runs {
            // A fresh KV cache every run, outside the timing.
            model.clear_kv_cache();
            let input = Tensor::new(prompt, &device)?.unsqueeze(0)?;

            let t = Instant::now();
            let mut logits = last_logits(&model.forward(&input, 0)?)?;
            let prefill_s = t.elapsed().as_secs_f64();

            let mut tokens = Vec::with_capacity(decode_tokens);
            let t = Instant::now();
            for k in 0..decode_tokens {
                let tok = argmax(&logits);
                tokens.push(tok);
                let input = Tensor::new(&[tok], &device)?.unsqueeze(0)?;
                logits = last_logits(&model.forward(&input, n + k)?)?;
            }
            let decode_s = t.elapsed().as_secs_f64();
            eprintln!(
                "candle run {run}: prefill {:.3}s, decode {:.3}s",
                prefill_s, decode_s
            );
            out.push(Run {
                prefill_tok_s: n as f64 / prefill_s,
                decode_tok_s: decode_tokens as f64 / decode_s,
                tokens,
            });
        }
        Ok(out)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.threads == 0 {
        bail!("--threads must be at least 1");
    }
    if args.prompt_tokens == 0 || args.runs == 0 {
        bail!("--prompt-tokens and --runs must be at least 1");
    }
    // Before any candle (or rayon) call: candle sizes its CPU parallelism
    // from RAYON_NUM_THREADS (candle_core::utils::get_num_threads, its own
    // rayon pool) and CANDLE_NUM_THREADS (its barrier pool for quantized
    // matmuls; it falls back to RAYON_NUM_THREADS), and some ops run on
    // rayon's global pool.
    std::env::set_var("RAYON_NUM_THREADS", args.threads.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", args.threads.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()
        .context("rayon global pool")?;

    let prompt = prompt(args.prompt_tokens);
    let runs = match args.engine {
        EngineKind::LlamaCpp => {
            llama::bench(&args.model, args.threads, &prompt, args.tokens, args.runs)?
        }
        EngineKind::Candle => candle::bench(&args.model, &prompt, args.tokens, args.runs)?,
    };
    for w in runs.windows(2) {
        if w[0].tokens != w[1].tokens {
            eprintln!("warning: greedy tokens differ between runs");
            break;
        }
    }
    let pre: Vec<f64> = runs.iter().map(|r| r.prefill_tok_s).collect();
    let dec: Vec<f64> = runs.iter().map(|r| r.decode_tok_s).collect();
    let report = Report {
        engine: args.engine.name(),
        threads: args.threads,
        prompt_tokens: args.prompt_tokens,
        decode_tokens: args.tokens,
        runs: args.runs,
        prefill_tok_s: median(&pre),
        decode_tok_s: if args.tokens == 0 { 0.0 } else { median(&dec) },
        prefill_runs_tok_s: pre,
        decode_runs_tok_s: dec,
        peak_rss_bytes: peak_rss(),
        tokens: runs.last().map(|r| r.tokens.clone()).unwrap_or_default(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
