//! `lockstep-gen-model`: a llama2.c checkpoint with random weights, for the
//! GPU check (benches/gpu/run.sh). The trained models that matter do not fit
//! the device tool's 64 MiB carry (SmolLM2-135M is 96 MiB as Q4_1), so the
//! check builds one of the same shape on the GPU machine and compares every
//! backend's tokens, token digests and traces on it, and times it.
//!
//! ```sh
//! lockstep-gen-model --shape smollm2 --seed 1 --out smol-shape.bin
//! ```
//!
//! Weights are uniform in ±1/√cols (so activations stay in range through
//! the layers), norms 1, from ChaCha8 with the seed: the same arguments
//! give the same file everywhere. The classifier is tied to the embedding.

use std::io::Write;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(about = "Write a llama2.c checkpoint with random weights (for the GPU check)")]
struct Args {
    /// smollm2 (576 dims, 30 layers, 9 heads / 3 KV heads, 1536 hidden,
    /// 49152 tokens), or dim,hidden,layers,heads,kv_heads,vocab,context.
    #[arg(long, default_value = "smollm2")]
    shape: String,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long)]
    out: std::path::PathBuf,
}

fn shape(s: &str) -> Result<[usize; 7]> {
    if s == "smollm2" {
        return Ok([576, 1536, 30, 9, 3, 49152, 1024]);
    }
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--shape {s:?}: seven comma-separated numbers, or smollm2"))?;
    let Ok(a) = <[usize; 7]>::try_from(v) else {
        bail!("--shape {s:?}: seven numbers (dim,hidden,layers,heads,kv_heads,vocab,context)")
    };
    if a.contains(&0) || a[0] % a[3] != 0 || a[3] % a[4] != 0 || (a[0] / a[3]) % 2 != 0 {
        bail!("--shape {s:?}: dims must divide into an even head size and heads into KV heads");
    }
    Ok(a)
}

fn run(args: Args) -> Result<()> {
    let [dim, hidden, layers, heads, kv_heads, vocab, ctx] = shape(&args.shape)?;
    let kv = dim / heads * kv_heads;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    for v in [dim, hidden, layers, heads, kv_heads, vocab, ctx] {
        w.write_all(&(v as i32).to_le_bytes())?;
    }
    let mut random =
        |w: &mut std::io::BufWriter<std::fs::File>, n: usize, cols: usize| -> Result<()> {
            let a = 1.0 / (cols as f32).sqrt();
            for _ in 0..n {
                w.write_all(&rng.random_range(-a..a).to_le_bytes())?;
            }
            Ok(())
        };
    let ones = |w: &mut std::io::BufWriter<std::fs::File>, n: usize| -> Result<()> {
        for _ in 0..n {
            w.write_all(&1f32.to_le_bytes())?;
        }
        Ok(())
    };
    // llama2.c order (../shared/README.md).
    random(&mut w, vocab * dim, 1)?;
    ones(&mut w, layers * dim)?;
    random(&mut w, layers * dim * dim, dim)?;
    random(&mut w, layers * kv * dim, dim)?;
    random(&mut w, layers * kv * dim, dim)?;
    random(&mut w, layers * dim * dim, dim)?;
    ones(&mut w, layers * dim)?;
    random(&mut w, layers * hidden * dim, dim)?;
    random(&mut w, layers * dim * hidden, hidden)?;
    random(&mut w, layers * hidden * dim, dim)?;
    ones(&mut w, dim)?;
    // The RoPE tables llama2.c stores (lockstep computes its own).
    w.write_all(&vec![0u8; ctx * (dim / heads) * 4])?;
    w.flush()?;
    eprintln!(
        "{}: [{dim}, {hidden}, {layers}, {heads}, {kv_heads}, {vocab}, {ctx}], seed {}",
        args.out.display(),
        args.seed
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
