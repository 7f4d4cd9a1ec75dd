//! `lockstep generate`: text from a model under the contract, and
//! `lockstep replay-layer`: one layer recomputed alone by the scalar spec.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use lockstep_kernels::contract::sample::{sample_spec, Sampling};
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::model::generate::{self as model_generate, TestFault};
use lockstep_kernels::model::{spec, Engine, Forward, Model, Trace};
use lockstep_kernels::{tensor_digest_f32, BackendKind, Digest, CONTRACT_VERSION};
use sha3::{Digest as _, Sha3_256};

use super::models::resolve;
use super::tokenizer::{TextStream, TextTokenizer};

/// Which CPU instruction set the engine uses (all give the same bits).
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum IsaChoice {
    Auto,
    Avx512,
    Avx2,
    Portable,
}

impl IsaChoice {
    pub fn isa(self) -> Isa {
        match self {
            IsaChoice::Auto => Isa::detect(),
            IsaChoice::Avx512 => Isa::Avx512,
            IsaChoice::Avx2 => Isa::Avx2,
            IsaChoice::Portable => Isa::Portable,
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct GenerateArgs {
    /// A .gguf file (llama architecture; f32, f16, bf16, q8_0, q4_1 weights),
    /// a Hugging Face folder (config.json, safetensors, tokenizer.json), a
    /// llama2.c checkpoint, or a name: smollm2 (SmolLM2-135M-Instruct Q4_1,
    /// fetched by `./dev setup`), stories260K, aidreams260K.
    #[arg(long, env = "LOCKSTEP_MODEL", default_value = "smollm2")]
    pub model: String,
    /// The tokenizer, when not the model's own: a tokenizer.json (with its
    /// tokenizer_config.json beside it) or a llama2.c tokenizer file. A
    /// llama2.c checkpoint finds `tokenizer.bin` or the one
    /// `<model>-tok*.bin` beside it by itself.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The prompt text.
    #[arg(long, conflicts_with_all = ["prompts", "tokens"], allow_hyphen_values = true)]
    pub prompt: Option<String>,
    /// A file with one prompt per line, decoded together as one batch.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// The prompt as token ids ("1 400 45"), for models without a tokenizer.
    #[arg(long)]
    pub tokens: Option<String>,
    /// Wrap the prompt in the model's chat template (the Jinja template its
    /// files ship, rendered as transformers renders it).
    #[arg(long)]
    pub chat: bool,
    /// Tokens to generate (at most; generation stops at end-of-text).
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy; otherwise softmax(logits / T), sampled reproducibly.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep the smallest set of likeliest tokens reaching this probability.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K likeliest tokens (0: all).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the counter-based sampler: (seed, position) fixes each draw.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to compute: cpu, wgpu or cuda (device 0): the same bits.
    #[arg(long, default_value = "cpu")]
    pub backend: BackendKind,
    /// CPU threads (0 = one per core). The bits do not depend on it.
    #[arg(long, env = "LOCKSTEP_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// CPU instruction set (the bits do not depend on it).
    #[arg(long, value_enum, default_value = "auto")]
    pub isa: IsaChoice,
    /// Write the digest of every layer's output at every position here
    /// (JSON Lines: prompt, position, layer, digest).
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// With --dump: the layer whose inputs to save.
    #[arg(long, requires = "dump")]
    pub dump_layer: Option<usize>,
    /// Save that layer's inputs at every position (safetensors, tensor
    /// `inputs` [positions, dim]) for `lockstep replay-layer`.
    #[arg(long, requires = "dump_layer")]
    pub dump: Option<PathBuf>,
    /// Print one JSON object per prompt at the end instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One finished generation.
#[derive(serde::Serialize)]
pub struct Generation {
    pub prompt_tokens: Vec<u32>,
    pub tokens: Vec<u32>,
    pub text: Option<String>,
    pub token_digest: String,
    pub trace_root: String,
    pub model_digest: String,
    /// The tokenizer's digest (what turned text into the prompt's ids);
    /// null for a model without one.
    pub tokenizer_digest: Option<String>,
    pub contract_version: u32,
}

/// SHA3-256 over `lockstep.tokens\0`, the prompt's length and ids, then the
/// generated length and ids (u64 and u32, little-endian).
pub fn token_digest(prompt: &[u32], generated: &[u32]) -> Digest {
    let mut h = Sha3_256::new();
    h.update(b"lockstep.tokens\0");
    for part in [prompt, generated] {
        h.update((part.len() as u64).to_le_bytes());
        for t in part {
            h.update(t.to_le_bytes());
        }
    }
    Digest(h.finalize().into())
}

/// Loads a model by name or path, with its tokenizer when it has one.
pub fn load(spec: &str) -> Result<(Model, Option<TextTokenizer>)> {
    load_with(spec, None)
}

/// [`load`], with the tokenizer from `tokenizer` when given.
pub fn load_with(
    spec: &str,
    tokenizer: Option<&std::path::Path>,
) -> Result<(Model, Option<TextTokenizer>)> {
    let path = resolve(spec)?;
    let model = Model::load(&path).with_context(|| format!("cannot load {}", path.display()))?;
    let tok = TextTokenizer::for_model(&path, &model, tokenizer)
        .with_context(|| format!("the tokenizer of {}", path.display()))?;
    Ok((model, tok))
}

/// The prompts as token ids.
fn prompts(args: &GenerateArgs, tok: Option<&TextTokenizer>) -> Result<Vec<Vec<u32>>> {
    let texts: Vec<String> = if let Some(t) = &args.tokens {
        let ids = t
            .split_whitespace()
            .map(|s| {
                s.parse::<u32>()
                    .with_context(|| format!("--tokens: {s:?} is not a token id"))
            })
            .collect::<Result<Vec<_>>>()?;
        return Ok(vec![ids]);
    } else if let Some(p) = &args.prompt {
        vec![p.clone()]
    } else if let Some(f) = &args.prompts {
        let s =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    } else {
        bail!("give --prompt TEXT, --prompts FILE or --tokens IDS");
    };
    let tok =
        tok.context("this model has no tokenizer: give the prompt as token ids with --tokens")?;
    texts
        .iter()
        .map(|t| {
            if args.chat {
                tok.encode_chat(&tok.chat(t)?)
            } else {
                tok.encode(t)
            }
        })
        .collect()
}

pub fn run(args: GenerateArgs) -> Result<()> {
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if !(args.temperature >= 0.0 && args.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0");
    }
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let (model, tok) = load_with(&args.model, args.tokenizer.as_deref())?;
    let prompts = prompts(&args, tok.as_ref())?;
    let c = &model.config;
    for p in &prompts {
        if p.is_empty() {
            bail!("a prompt has no tokens");
        }
        if p.len()
            .checked_add(args.max_tokens)
            .is_none_or(|n| n > c.max_seq)
        {
            bail!(
                "a prompt of {} tokens plus --max-tokens {} exceeds the model's context of {} tokens",
                p.len(),
                args.max_tokens,
                c.max_seq
            );
        }
    }
    if args.dump.is_some() && prompts.len() > 1 {
        bail!("--dump saves one sequence's layer inputs: give a single prompt");
    }
    if let Some(l) = args.dump_layer {
        if l >= c.n_layers {
            bail!("--dump-layer {l}: the model has {} layers", c.n_layers);
        }
    }
    let (generated, traces) = match args.backend {
        BackendKind::Cpu => {
            let engine = Engine::new(&model, args.threads, args.isa.isa())?;
            decode(&engine, &args, tok.as_ref(), &prompts)?
        }
        BackendKind::Wgpu => {
            let gpu = lockstep_kernels::wgpu::WgpuBackend::new(Default::default())?;
            let on_gpu = lockstep_kernels::wgpu::WgpuModel::new(&gpu, &model)?;
            decode(&on_gpu, &args, tok.as_ref(), &prompts)?
        }
        BackendKind::Cuda => {
            let gpu = lockstep_kernels::cuda::CudaBackend::new(0)?;
            let on_gpu = lockstep_kernels::cuda::CudaModel::new(&gpu, &model)?;
            decode(&on_gpu, &args, tok.as_ref(), &prompts)?
        }
    };
    let traced = args.trace.is_some();
    let stream = prompts.len() == 1 && !args.json && tok.is_some();
    let mut results = Vec::new();
    for (i, trace) in traces.iter().enumerate() {
        let trace = trace.as_deref().unwrap_or(&[]);
        results.push(Generation {
            prompt_tokens: prompts[i].clone(),
            tokens: generated[i].clone(),
            text: tok.as_ref().map(|t| t.decode(&generated[i])).transpose()?,
            token_digest: token_digest(&prompts[i], &generated[i]).to_string(),
            trace_root: if traced {
                Trace::root(trace).to_string()
            } else {
                String::new()
            },
            model_digest: model.digest.to_string(),
            tokenizer_digest: tok.as_ref().map(|t| t.digest.to_string()),
            contract_version: CONTRACT_VERSION,
        });
    }
    if let Some(path) = &args.trace {
        let mut f = std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot write {}", path.display()))?,
        );
        for (i, trace) in traces.iter().enumerate() {
            for (pos, layers) in trace.iter().flatten().enumerate() {
                for (layer, d) in layers.iter().enumerate() {
                    writeln!(
                        f,
                        r#"{{"prompt":{i},"position":{pos},"layer":{layer},"digest":"{d}"}}"#
                    )?;
                }
            }
        }
        f.flush()?;
    }
    if let (Some(path), Some(layer)) = (&args.dump, args.dump_layer) {
        // The layer's inputs at every position fed, by a replay of the fed
        // tokens on the CPU (the same bits as any backend's pass).
        let fed: Vec<u32> = prompts[0]
            .iter()
            .chain(&generated[0][..generated[0].len() - 1])
            .copied()
            .collect();
        let engine = Engine::new(&model, args.threads, args.isa.isa())?;
        let inputs = model_generate::replay(&engine, &fed, Some(layer), TestFault::default())?
            .inputs
            .unwrap_or_default();
        let n = inputs.len() / c.dim;
        crate::tensors::write_f32(path, &[("inputs", &[n, c.dim], &inputs)])?;
    }
    for (i, r) in results.iter().enumerate() {
        if args.json {
            println!("{}", serde_json::to_string(r)?);
            continue;
        }
        if !stream {
            match &r.text {
                Some(t) => println!("[{i}] {t}"),
                None => println!("[{i}] tokens {:?}", r.tokens),
            }
        }
        println!(
            "tokens: {} generated; token digest {}",
            r.tokens.len(),
            r.token_digest
        );
        if traced {
            println!("trace root {}", r.trace_root);
        }
    }
    if !args.json {
        println!("model {} (contract v{CONTRACT_VERSION})", model.digest);
        if let Some(t) = &tok {
            println!("tokenizer {} ({})", t.digest, t.kind);
        }
    }
    Ok(())
}

/// Every prompt decoded as one batch on `engine`, text streamed when there
/// is one prompt: the generated ids and (with --trace) the traces.
#[allow(clippy::type_complexity)]
fn decode<E: Forward>(
    engine: &E,
    args: &GenerateArgs,
    tok: Option<&TextTokenizer>,
    prompts: &[Vec<u32>],
) -> Result<(Vec<Vec<u32>>, Vec<Option<Vec<Vec<Digest>>>>)> {
    let model = engine.model();
    let sampling = Sampling {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    tracing::info!(
        model = %model.source, digest = %model.digest, engine = %engine.describe(),
        prompts = prompts.len(), "generating"
    );
    let traced = args.trace.is_some();
    let mut seqs: Vec<E::Seq> = prompts
        .iter()
        .map(|p| engine.sequence(p.len() + args.max_tokens, traced))
        .collect::<Result<_, _>>()?;
    let stream = prompts.len() == 1 && !args.json && tok.is_some();
    // Without streamed text, a bar on a terminal shows the decode going.
    use std::io::IsTerminal;
    let bar = if !stream && std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(args.max_tokens as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} tokens  {per_sec}",
            )
            .expect("valid template"),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let mut done = vec![false; prompts.len()];
    let mut text = TextStream::default();
    let stdout = std::io::stdout();
    // Prefill: every prompt in one pass.
    let mut feed: Vec<Vec<u32>> = prompts.to_vec();
    loop {
        let mut refs: Vec<&mut E::Seq> = seqs.iter_mut().collect();
        let slices: Vec<&[u32]> = feed.iter().map(|f| f.as_slice()).collect();
        let logits = engine.forward(&mut refs, &slices)?;
        for (i, l) in logits.into_iter().enumerate() {
            let Some(l) = l else { continue };
            let position = (prompts[i].len() + generated[i].len()) as u64;
            let t = sample_spec(&l, &sampling, position).context("empty vocabulary")? as u32;
            generated[i].push(t);
            if Some(t) == tok.and_then(|t| t.eos)
                || model.end_ids.contains(&t)
                || generated[i].len() >= args.max_tokens
            {
                done[i] = true;
            }
            if stream {
                let piece = text.next(tok.expect("stream has a tokenizer"), &generated[i])?;
                let mut out = stdout.lock();
                write!(out, "{piece}")?;
                out.flush()?;
            }
        }
        bar.set_position(generated.iter().map(Vec::len).max().unwrap_or(0) as u64);
        if done.iter().all(|&d| d) {
            break;
        }
        feed = (0..prompts.len())
            .map(|i| {
                if done[i] {
                    Vec::new()
                } else {
                    vec![*generated[i].last().unwrap()]
                }
            })
            .collect();
    }
    bar.finish_and_clear();
    if stream {
        println!();
    }
    let traces = seqs.iter_mut().map(|s| E::take_trace(s)).collect();
    Ok((generated, traces))
}

#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// The model (as for generate).
    #[arg(long, default_value = "smollm2")]
    pub model: String,
    /// The layer to recompute.
    #[arg(long)]
    pub layer: usize,
    /// The layer's inputs at positions 0..=p: safetensors with `inputs`
    /// [p+1, dim] (what `generate --dump-layer L --dump FILE` writes). The
    /// layer's KV state is rebuilt from them.
    #[arg(long)]
    pub inputs: PathBuf,
    /// Print every position's output digest, not only the last.
    #[arg(long)]
    pub all: bool,
}

/// Recomputes one layer by the scalar spec and prints its output digests.
pub fn replay(args: ReplayArgs) -> Result<()> {
    let (model, _) = load(&args.model)?;
    let c = &model.config;
    if args.layer >= c.n_layers {
        bail!(
            "--layer {}: the model has {} layers",
            args.layer,
            c.n_layers
        );
    }
    let (shape, data) = crate::tensors::read_f32_tensor(&args.inputs, "inputs")?;
    if shape.len() != 2 || shape[1] != c.dim || shape[0] == 0 {
        bail!("inputs must be [positions, {}], got {shape:?}", c.dim);
    }
    if shape[0] > c.max_seq {
        bail!(
            "{} positions exceed the model's context of {}",
            shape[0],
            c.max_seq
        );
    }
    let mut cache = spec::LayerCache::default();
    for (pos, row) in data.chunks_exact(c.dim).enumerate() {
        let mut x = row.to_vec();
        spec::layer_spec(&model, args.layer, &mut x, pos, &mut cache);
        if args.all || pos + 1 == shape[0] {
            println!(
                "layer {} position {pos} output {}",
                args.layer,
                tensor_digest_f32(&[c.dim], &x)
            );
        }
    }
    Ok(())
}
