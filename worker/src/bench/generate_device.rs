//! `lockstep bench generate --backend wgpu|cuda`: the model on a GPU backend at
//! several batch sizes, against the CPU engine on the same prompts in the
//! same run. Reports prefill and decode tokens/s, the weight bandwidth one
//! decode step achieves against a device-to-device copy measured in the
//! same run, what the per-layer trace costs, and checks that every engine
//! produced the same tokens (the bits are the product; a faster wrong
//! answer is a failure, not a result).

use std::time::Instant;

use anyhow::{bail, Result};
use lockstep_kernels::contract::argmax::argmax_spec;
use lockstep_kernels::cpu::Isa;
use lockstep_kernels::cuda::{CudaBackend, CudaModel};
use lockstep_kernels::model::{Engine, Forward, Model};
use lockstep_kernels::wgpu::{WgpuBackend, WgpuModel};
use lockstep_kernels::{Backend, BackendKind};

/// One engine at one batch size.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    pub engine: String,
    pub batch: usize,
    pub prefill_tok_s: f64,
    /// Generated tokens per second over the whole batch.
    pub decode_tok_s: f64,
    pub decode_step_ms: f64,
    /// Decode with the per-layer trace on, ÷ without (batch 1 only).
    pub trace_cost: Option<f64>,
    /// Digest of every sequence's prompt and generated ids.
    pub tokens_digest: String,
}

#[derive(Debug, serde::Serialize)]
pub struct DeviceGenerateBench {
    pub model: String,
    pub model_digest: String,
    pub backend: String,
    pub device: String,
    pub path: String,
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub device_points: Vec<Point>,
    pub cpu_points: Vec<Point>,
    /// Device decode tok/s ÷ CPU decode tok/s, per batch size.
    pub ratios: Vec<(usize, f64)>,
    /// Weight bytes a decode step reads.
    pub weight_bytes: u64,
    /// Weight bytes per second of the batch-1 decode step.
    pub decode_weight_gb_s: f64,
    /// A device-to-device buffer copy, same run (bytes read per second).
    pub copy_gb_s: f64,
    pub bandwidth_fraction: f64,
}

fn prompts(model: &Model, batch: usize, n: usize) -> Vec<Vec<u32>> {
    let vocab = model.config.vocab_size as u64;
    (0..batch as u64)
        .map(|b| {
            (0..n as u64)
                .map(|i| (1 + (b * 131 + i * 7919) % (vocab - 1)) as u32)
                .collect()
        })
        .collect()
}

/// Prefill every prompt in one pass, then `tokens` greedy decode steps of
/// the whole batch.
fn measure<E: Forward>(
    engine: &E,
    name: &str,
    prompts: &[Vec<u32>],
    tokens: usize,
    traced: bool,
) -> Result<Point> {
    let n = prompts[0].len();
    let mut seqs: Vec<E::Seq> = prompts
        .iter()
        .map(|p| engine.sequence(p.len() + tokens + 1, traced))
        .collect::<Result<_, _>>()?;
    let t = Instant::now();
    let slices: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let mut refs: Vec<&mut E::Seq> = seqs.iter_mut().collect();
    let mut logits = engine.forward(&mut refs, &slices)?;
    let prefill = (n * prompts.len()) as f64 / t.elapsed().as_secs_f64();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    let t = Instant::now();
    for _ in 0..tokens {
        let next: Vec<[u32; 1]> = logits
            .iter()
            .map(|l| [argmax_spec(l.as_ref().expect("logits")).expect("vocabulary") as u32])
            .collect();
        for (o, t) in out.iter_mut().zip(&next) {
            o.push(t[0]);
        }
        let feed: Vec<&[u32]> = next.iter().map(|t| t.as_slice()).collect();
        let mut refs: Vec<&mut E::Seq> = seqs.iter_mut().collect();
        logits = engine.forward(&mut refs, &feed)?;
    }
    let secs = t.elapsed().as_secs_f64();
    let mut all = Vec::new();
    for (p, o) in prompts.iter().zip(&out) {
        all.extend_from_slice(p);
        all.extend_from_slice(o);
    }
    Ok(Point {
        engine: name.to_string(),
        batch: prompts.len(),
        prefill_tok_s: prefill,
        decode_tok_s: (tokens * prompts.len()) as f64 / secs,
        decode_step_ms: secs * 1e3 / tokens.max(1) as f64,
        trace_cost: None,
        tokens_digest: crate::llm::generate::token_digest(&all, &[]).to_string(),
    })
}

/// Every batch size on one engine; at batch 1 also traced, for its cost.
fn sweep<E: Forward>(
    engine: &E,
    name: &str,
    batches: &[usize],
    prompt_tokens: usize,
    tokens: usize,
    progress: &mut impl FnMut(&str),
) -> Result<Vec<Point>> {
    let mut points = Vec::new();
    for &b in batches {
        let p = prompts(engine.model(), b, prompt_tokens);
        let mut point = measure(engine, name, &p, tokens, false)?;
        if b == 1 {
            let traced = measure(engine, name, &p, tokens, true)?;
            point.trace_cost = Some(point.decode_tok_s / traced.decode_tok_s);
        }
        progress(&format!(
            "{name} batch {b}: prefill {:.1} tok/s, decode {:.1} tok/s ({:.1} ms a step)",
            point.prefill_tok_s, point.decode_tok_s, point.decode_step_ms
        ));
        points.push(point);
    }
    Ok(points)
}

#[allow(clippy::too_many_arguments)]
pub fn bench_generate_device(
    model: &str,
    backend: BackendKind,
    threads: usize,
    prompt_tokens: usize,
    tokens: usize,
    batches: &[usize],
    mut progress: impl FnMut(&str),
) -> Result<DeviceGenerateBench> {
    if prompt_tokens == 0 || tokens == 0 || batches.is_empty() || batches.contains(&0) {
        bail!("--prompt-tokens, --tokens and every --batch must be at least 1");
    }
    let (model, _) = crate::llm::generate::load(model)?;
    if model.config.vocab_size < 2 {
        bail!("the model's vocabulary is too small to benchmark");
    }
    // The device engine's sweep, its weight bytes and a device copy's
    // bandwidth, measured while the device and the model are resident.
    let (info, device_points, weight_bytes, copy) = match backend {
        BackendKind::Wgpu => {
            let gpu = WgpuBackend::new(Default::default())?;
            let on_gpu = WgpuModel::new(&gpu, &model)?;
            let points = sweep(
                &on_gpu,
                "wgpu",
                batches,
                prompt_tokens,
                tokens,
                &mut progress,
            )?;
            let bytes = on_gpu.weight_bytes();
            let copy = gpu.copy_bandwidth(bytes.clamp(1 << 20, 256 << 20))?;
            (gpu.info(), points, bytes, copy)
        }
        BackendKind::Cuda => {
            let gpu = CudaBackend::new(0)?;
            let on_gpu = CudaModel::new(&gpu, &model)?;
            let points = sweep(
                &on_gpu,
                "cuda",
                batches,
                prompt_tokens,
                tokens,
                &mut progress,
            )?;
            let bytes = on_gpu.weight_bytes();
            let copy = gpu.copy_bandwidth(bytes.clamp(1 << 20, 256 << 20))?;
            (gpu.info(), points, bytes, copy)
        }
        BackendKind::Cpu => bail!("the CPU is measured by `bench generate --backend cpu`"),
    };
    let engine = Engine::new(&model, threads, Isa::detect())?;
    let cpu_name = engine.describe();
    let cpu_points = sweep(
        &engine,
        &cpu_name,
        batches,
        prompt_tokens,
        tokens,
        &mut progress,
    )?;
    for (d, c) in device_points.iter().zip(&cpu_points) {
        if d.tokens_digest != c.tokens_digest {
            bail!(
                "batch {}: the device generated other tokens than the CPU ({} vs {})",
                d.batch,
                d.tokens_digest,
                c.tokens_digest
            );
        }
    }
    let step1 = device_points
        .iter()
        .find(|p| p.batch == 1)
        .unwrap_or(&device_points[0]);
    let weight_gb_s = weight_bytes as f64 / (step1.decode_step_ms / 1e3) / 1e9;
    Ok(DeviceGenerateBench {
        model: model.source.clone(),
        model_digest: model.digest.to_string(),
        backend: backend.to_string(),
        device: info.device,
        path: info.path,
        prompt_tokens,
        decode_tokens: tokens,
        ratios: device_points
            .iter()
            .zip(&cpu_points)
            .map(|(d, c)| (d.batch, d.decode_tok_s / c.decode_tok_s))
            .collect(),
        device_points,
        cpu_points,
        weight_bytes,
        decode_weight_gb_s: weight_gb_s,
        copy_gb_s: copy / 1e9,
        bandwidth_fraction: weight_gb_s * 1e9 / copy,
    })
}
