//! Llama-architecture language models under the contract: loading
//! (GGUF, llama2.c checkpoints), the model digest, the scalar forward pass
//! that defines every bit ([`spec`]), the fast CPU engine that matches
//! it ([`engine`]), and [`Forward`], what every backend's engine offers
//! (the WGSL one is [`crate::wgpu::WgpuModel`]).
//!
//! Weights stay in their stored format ([`PackedMatrix`]); activations are
//! f32 throughout.

pub mod engine;
pub mod forward;
pub mod generate;
pub mod gguf;
mod hf;
mod llama2c;
pub mod spec;
pub mod st;

use std::path::Path;

use sha3::{Digest as _, Sha3_256};

use crate::contract::attention::AttentionDims;
use crate::contract::quant::Format;
use crate::cpu::qmatvec::PackedMatrix;
use crate::digest::Digest;
use crate::error::{Error, Result};

pub use engine::{Engine, Sequence, Trace};
pub use forward::Forward;

/// A model's hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub dim: usize,
    pub hidden_dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub vocab_size: usize,
    /// The context length the model was trained for.
    pub max_seq: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

impl Config {
    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }
    pub fn attention(&self) -> AttentionDims {
        AttentionDims {
            n_heads: self.n_heads,
            n_kv_heads: self.n_kv_heads,
            head_dim: self.head_dim(),
        }
    }
    pub fn kv_dim(&self) -> usize {
        self.attention().kv_dim()
    }

    fn check(&self) -> Result<()> {
        let ok = self.dim > 0
            && self.n_heads > 0
            && self.n_kv_heads > 0
            && self.dim.is_multiple_of(self.n_heads)
            && self.n_heads.is_multiple_of(self.n_kv_heads)
            && self.head_dim().is_multiple_of(2)
            && self.hidden_dim > 0
            && self.n_layers > 0
            && self.vocab_size > 0
            && self.max_seq > 0
            && self.max_seq <= 1 << 24
            && self.dim <= 1 << 16
            && self.hidden_dim <= 1 << 18
            && self.n_layers <= 1024
            && self.vocab_size <= 1 << 22
            && self.rope_theta > 0.0
            && self.norm_eps >= 0.0;
        if ok {
            Ok(())
        } else {
            Err(Error::model(format!(
                "unsupported hyper-parameters: {self:?}"
            )))
        }
    }
}

/// One transformer block's weights.
#[derive(Debug)]
pub struct Layer {
    pub attn_norm: Vec<f32>,
    pub wq: PackedMatrix,
    pub wk: PackedMatrix,
    pub wv: PackedMatrix,
    pub wo: PackedMatrix,
    pub ffn_norm: Vec<f32>,
    pub w_gate: PackedMatrix,
    pub w_up: PackedMatrix,
    pub w_down: PackedMatrix,
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    pub config: Config,
    pub embedding: PackedMatrix,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// The classifier; `None` when it is the embedding (tied).
    pub output: Option<PackedMatrix>,
    /// SHA3-256 over the canonical weights and hyper-parameters.
    pub digest: Digest,
    /// The GGUF's tokenizer, when it has one.
    pub gguf: Option<gguf::Gguf>,
    /// Ids that end a generation, as the model's files say (GGUF
    /// `tokenizer.ggml.eos_token_id`; Hugging Face `eos_token_id` in
    /// generation_config.json, else config.json, a number or a list); empty
    /// for llama2.c checkpoints. Not part of the digest: when to stop is a
    /// parameter of each generation (a job states its stop ids).
    pub end_ids: Vec<u32>,
    /// What it was loaded from, for messages.
    pub source: String,
}

/// Receives a model's tensors in the canonical order (embedding; per layer
/// attention norm, q, k, v, o, FFN norm, gate, up, down; final norm;
/// classifier if not tied), hashes each and packs it. Loaders feed it.
/// A loader's reader of one tensor: (name, rows, cols) → its stored bytes.
type Loader<'a> = dyn FnMut(&str, usize, usize) -> Result<Raw> + 'a;

struct Builder<'a> {
    hasher: Sha3_256,
    /// The loader: reads tensor (name, rows, cols) when asked.
    next: Box<Loader<'a>>,
}

impl<'a> Builder<'a> {
    fn new(c: &Config, next: impl FnMut(&str, usize, usize) -> Result<Raw> + 'a) -> Self {
        let mut hasher = Sha3_256::new();
        hasher.update(b"lockstep.model\0");
        for v in [
            c.dim,
            c.hidden_dim,
            c.n_layers,
            c.n_heads,
            c.n_kv_heads,
            c.vocab_size,
            c.max_seq,
        ] {
            hasher.update((v as u64).to_le_bytes());
        }
        hasher.update(c.rope_theta.to_bits().to_le_bytes());
        hasher.update(c.norm_eps.to_bits().to_le_bytes());
        Self {
            hasher,
            next: Box::new(next),
        }
    }

    fn header(&mut self, format: Format, rows: usize, cols: usize) {
        // F16/BF16 hash as the f32 they widen to: the weights, not the file.
        let f = match format {
            Format::F16 | Format::BF16 => Format::F32,
            f => f,
        };
        self.hasher.update(f.ggml().to_le_bytes());
        self.hasher.update((rows as u64).to_le_bytes());
        self.hasher.update((cols as u64).to_le_bytes());
    }

    /// The loader's tensor `name`, checked to be [rows, cols].
    fn fetch(&mut self, name: &str, rows: usize, cols: usize) -> Result<Raw> {
        let raw = (self.next)(name, rows, cols)?;
        if (raw.rows, raw.cols) != (rows, cols) {
            return Err(Error::model(format!(
                "{name} is [{}, {}], the model needs [{rows}, {cols}]",
                raw.rows, raw.cols
            )));
        }
        Ok(raw)
    }

    /// A weight matrix: hashed, then packed.
    fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<PackedMatrix> {
        let Raw { format, bytes, .. } = self.fetch(name, rows, cols)?;
        let m = PackedMatrix::pack(format, rows, cols, &bytes)
            .map_err(|e| Error::model(format!("{name}: {}", e.message)))?;
        self.header(format, rows, cols);
        if matches!(format, Format::F16 | Format::BF16) {
            for r in 0..rows {
                self.hasher.update(m.raw_row(r));
            }
        } else {
            self.hasher.update(&bytes);
        }
        Ok(m)
    }

    /// A norm weight vector (a vector by role: a weight matrix may have one
    /// row), hashed as the f32 it dequantises to.
    fn vector(&mut self, name: &str, n: usize) -> Result<Vec<f32>> {
        let v = self.fetch(name, 1, n)?.f32s(name)?;
        self.header(Format::F32, 1, v.len());
        for x in &v {
            self.hasher.update(x.to_le_bytes());
        }
        Ok(v)
    }

    fn tied(&mut self, tied: bool) {
        self.hasher.update([tied as u8]);
    }

    fn finish(self) -> Digest {
        Digest(self.hasher.finalize().into())
    }
}

/// A weight tensor as read from a file, before packing.
struct Raw {
    format: Format,
    rows: usize,
    cols: usize,
    bytes: Vec<u8>,
}

impl Raw {
    fn f32s(&self, what: &str) -> Result<Vec<f32>> {
        if self.rows != 1 {
            return Err(Error::model(format!("{what} should be a vector")));
        }
        Ok(crate::contract::quant::dequantize(
            self.format,
            &self.bytes,
            self.cols,
        ))
    }
}

impl Model {
    /// Loads a GGUF file (by its magic), a Hugging Face checkpoint (a
    /// folder with config.json and safetensors, or a .safetensors file in
    /// one) or a llama2.c checkpoint.
    pub fn load(path: &Path) -> Result<Model> {
        use std::io::Read;
        if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
            return match hf::is_checkpoint(path) {
                Some(dir) => hf::load(&dir),
                None => Err(Error::model(format!(
                    "{}: a Hugging Face checkpoint needs a config.json beside its safetensors",
                    path.display()
                ))),
            };
        }
        let mut magic = [0u8; 4];
        std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .map_err(|e| {
                Error::model(format!(
                    "cannot read the model file {}: {e}",
                    path.display()
                ))
            })?;
        if &magic == b"GGUF" {
            Self::load_gguf(path)
        } else {
            llama2c::load(path)
        }
    }

    /// Builds a model from tensors handed over in the canonical order by
    /// `next(name, rows, cols)` (a loader reads each when asked, so at most
    /// one unpacked tensor is held at a time). Vectors are asked for as
    /// [1, n].
    fn build(
        config: Config,
        tied: bool,
        source: String,
        gguf: Option<gguf::Gguf>,
        next: impl FnMut(&str, usize, usize) -> Result<Raw>,
    ) -> Result<Model> {
        config.check()?;
        let c = config.clone();
        let mut b = Builder::new(&c, next);
        let kv = c.kv_dim();
        let embedding = b.matrix("token_embd", c.vocab_size, c.dim)?;
        let mut layers = Vec::with_capacity(c.n_layers);
        for l in 0..c.n_layers {
            let p = |s: &str| format!("blk.{l}.{s}");
            layers.push(Layer {
                attn_norm: b.vector(&p("attn_norm"), c.dim)?,
                wq: b.matrix(&p("attn_q"), c.dim, c.dim)?,
                wk: b.matrix(&p("attn_k"), kv, c.dim)?,
                wv: b.matrix(&p("attn_v"), kv, c.dim)?,
                wo: b.matrix(&p("attn_output"), c.dim, c.dim)?,
                ffn_norm: b.vector(&p("ffn_norm"), c.dim)?,
                w_gate: b.matrix(&p("ffn_gate"), c.hidden_dim, c.dim)?,
                w_up: b.matrix(&p("ffn_up"), c.hidden_dim, c.dim)?,
                w_down: b.matrix(&p("ffn_down"), c.dim, c.hidden_dim)?,
            });
        }
        let final_norm = b.vector("output_norm", c.dim)?;
        b.tied(tied);
        let output = if tied {
            None
        } else {
            Some(b.matrix("output", c.vocab_size, c.dim)?)
        };
        let end_ids = gguf
            .as_ref()
            .and_then(|g| g.get("tokenizer.ggml.eos_token_id"))
            .and_then(|v| v.as_u64())
            .map(|v| vec![v as u32])
            .unwrap_or_default();
        Ok(Model {
            config,
            embedding,
            layers,
            final_norm,
            output,
            digest: b.finish(),
            gguf,
            end_ids,
            source,
        })
    }

    /// The classifier (the embedding when tied).
    pub fn classifier(&self) -> &PackedMatrix {
        self.output.as_ref().unwrap_or(&self.embedding)
    }

    /// Bytes of weights held.
    pub fn weight_bytes(&self) -> usize {
        let l: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<usize>()
                    + (l.attn_norm.len() + l.ffn_norm.len()) * 4
            })
            .sum();
        l + self.embedding.bytes()
            + self.output.as_ref().map_or(0, |m| m.bytes())
            + self.final_norm.len() * 4
    }

    /// Loads a GGUF file of the llama architecture.
    pub fn load_gguf(path: &Path) -> Result<Model> {
        use std::io::{Read, Seek, SeekFrom};
        let g = gguf::Gguf::open(path)?;
        let arch = g
            .get("general.architecture")
            .and_then(|v| v.as_str())
            .unwrap_or("?");
        if arch != "llama" {
            return Err(Error::model(format!(
                "{}: architecture {arch:?} is not supported (only llama)",
                path.display()
            )));
        }
        let src = path.display().to_string();
        // A key present with the wrong type is an error, never a default.
        let opt_u = |k: &str| -> Result<Option<usize>> {
            match g.get(&format!("llama.{k}")) {
                None => Ok(None),
                Some(v) => v.as_u64().map(|v| Some(v as usize)).ok_or_else(|| {
                    Error::model(format!("{src}: llama.{k} is not an unsigned integer"))
                }),
            }
        };
        let u = |k: &str| -> Result<usize> {
            opt_u(k)?.ok_or_else(|| Error::model(format!("{src}: no llama.{k} in the metadata")))
        };
        let opt_f = |k: &str| -> Result<Option<f32>> {
            match g.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f32()
                    .map(Some)
                    .ok_or_else(|| Error::model(format!("{src}: {k} is not a float"))),
            }
        };
        let dim = u("embedding_length")?;
        let n_heads = u("attention.head_count")?;
        let vocab = match opt_u("vocab_size")? {
            Some(v) => v,
            None => g
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| Error::model(format!("{src}: no vocabulary size")))?,
        };
        let config = Config {
            dim,
            hidden_dim: u("feed_forward_length")?,
            n_layers: u("block_count")?,
            n_heads,
            n_kv_heads: opt_u("attention.head_count_kv")?.unwrap_or(n_heads),
            vocab_size: vocab,
            max_seq: u("context_length")?,
            rope_theta: opt_f("llama.rope.freq_base")?.unwrap_or(10_000.0),
            norm_eps: opt_f("llama.attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5),
        };
        config.check()?;
        if let Some(rd) = opt_u("rope.dimension_count")? {
            if rd != config.head_dim() {
                return Err(Error::model(format!(
                    "partial rotary embedding ({rd} of {} dims) is not supported",
                    config.head_dim()
                )));
            }
        }
        if opt_u("expert_count")?.is_some_and(|n| n > 0) {
            return Err(Error::model(format!(
                "{src}: mixture-of-experts models are not supported"
            )));
        }
        if g.get("llama.rope.scaling.type")
            .is_some_and(|v| v.as_str() != Some("none"))
        {
            return Err(Error::model(format!(
                "{src}: RoPE scaling is not supported"
            )));
        }
        let tied = g.tensor("output.weight").is_none();
        let mut file = std::fs::File::open(path)
            .map_err(|e| Error::model(format!("cannot open {}: {e}", path.display())))?;
        let size = g.file_size;
        let infos = g.tensors.clone();
        let source = path.display().to_string();
        Model::build(config, tied, source.clone(), Some(g), |name, rows, cols| {
            let full = format!("{name}.weight");
            let t = infos
                .iter()
                .find(|t| t.name == full)
                .ok_or_else(|| Error::model(format!("{source}: no tensor {full}")))?;
            let format = Format::from_ggml(t.ggml_type).ok_or_else(|| {
                Error::model(format!(
                    "{source}: tensor {full} has GGML type {}, which is not supported (f32, f16, bf16, q8_0, q4_1 are)",
                    t.ggml_type
                ))
            })?;
            let (tc, tr) = match t.dims.as_slice() {
                [c] => (*c, 1),
                [c, r] => (*c, *r),
                d => {
                    return Err(Error::model(format!(
                        "{source}: tensor {full} has shape {d:?}"
                    )))
                }
            };
            if (tr as usize, tc as usize) != (rows, cols) {
                return Err(Error::model(format!(
                    "{source}: tensor {full} is [{tr}, {tc}], the model needs [{rows}, {cols}]"
                )));
            }
            let n = format
                .row_bytes(cols)
                .and_then(|rb| rb.checked_mul(rows))
                .ok_or_else(|| {
                    Error::model(format!(
                        "{source}: tensor {full}: rows are not whole blocks"
                    ))
                })?;
            if t.offset.checked_add(n as u64).is_none_or(|end| end > size) {
                return Err(Error::model(format!(
                    "{source}: tensor {full} runs past the end of the file (truncated?)"
                )));
            }
            let mut bytes = vec![0u8; n];
            file.seek(SeekFrom::Start(t.offset))
                .and_then(|_| file.read_exact(&mut bytes))
                .map_err(|e| Error::model(format!("{source}: reading {full}: {e}")))?;
            Ok(Raw {
                format,
                rows,
                cols,
                bytes,
            })
        })
    }
}
