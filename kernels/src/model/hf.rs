//! Hugging Face checkpoints of the Llama architecture: a folder with
//! `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), weights in F32, F16 or BF16.
//!
//! Hugging Face rotates the two halves of each head (`rotate_half`); the
//! contract's RoPE rotates adjacent pairs (§9.4), as llama2.c and GGUF do.
//! So the rows of `q_proj` and `k_proj` are permuted on load exactly as
//! llama.cpp's converter does: row `h·d + 2i + j` takes Hugging Face's row
//! `h·d + j·d/2 + i`. The model digest is therefore the same as that of the
//! same weights converted to GGUF or llama2.c.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use super::{Config, Model, Raw};
use crate::contract::quant::Format;
use crate::error::{Error, Result};

#[derive(Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rope_theta: Option<f32>,
    rms_norm_eps: Option<f32>,
    tie_word_embeddings: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
    head_dim: Option<usize>,
}

/// Whether `path` is (or is inside) a Hugging Face checkpoint folder.
pub fn is_checkpoint(path: &Path) -> Option<PathBuf> {
    let dir = if path.is_dir() { path } else { path.parent()? };
    dir.join("config.json").is_file().then(|| dir.to_path_buf())
}

/// HF name of a tensor the builder asks for.
fn hf_name(name: &str) -> String {
    if let Some(rest) = name.strip_prefix("blk.") {
        let (l, what) = rest.split_once('.').expect("blk.<l>.<what>");
        let w = match what {
            "attn_norm" => "input_layernorm",
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_norm" => "post_attention_layernorm",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            other => other,
        };
        return format!("model.layers.{l}.{w}.weight");
    }
    match name {
        "token_embd" => "model.embed_tokens.weight".into(),
        "output_norm" => "model.norm.weight".into(),
        "output" => "lm_head.weight".into(),
        other => other.into(),
    }
}

pub(super) fn load(dir: &Path) -> Result<Model> {
    let source = dir.display().to_string();
    let read = |p: &Path| {
        std::fs::read(p).map_err(|e| Error::model(format!("cannot read {}: {e}", p.display())))
    };
    let cfg: HfConfig = serde_json::from_slice(&read(&dir.join("config.json"))?)
        .map_err(|e| Error::model(format!("{source}/config.json: {e}")))?;
    if let Some(t) = cfg.model_type.as_deref() {
        if t != "llama" {
            return Err(Error::model(format!(
                "{source}: model_type {t:?} is not supported (only llama)"
            )));
        }
    }
    if cfg.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::model(format!(
            "{source}: rope_scaling is not supported"
        )));
    }
    let config = Config {
        dim: cfg.hidden_size,
        hidden_dim: cfg.intermediate_size,
        n_layers: cfg.num_hidden_layers,
        n_heads: cfg.num_attention_heads,
        n_kv_heads: cfg.num_key_value_heads.unwrap_or(cfg.num_attention_heads),
        vocab_size: cfg.vocab_size,
        max_seq: cfg.max_position_embeddings,
        rope_theta: cfg.rope_theta.unwrap_or(10_000.0),
        norm_eps: cfg.rms_norm_eps.unwrap_or(1e-6),
    };
    config.check()?;
    if let Some(hd) = cfg.head_dim {
        if hd.checked_mul(cfg.num_attention_heads) != Some(cfg.hidden_size) {
            return Err(Error::model(format!(
                "{source}: head_dim {hd} × heads ≠ hidden_size is not supported"
            )));
        }
    }
    // Which file holds each tensor.
    let index = dir.join("model.safetensors.index.json");
    let mut files: HashMap<String, PathBuf> = HashMap::new();
    let shards: Vec<PathBuf> = if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let idx: Index = serde_json::from_slice(&read(&index)?)
            .map_err(|e| Error::model(format!("{}: {e}", index.display())))?;
        for (t, f) in idx.weight_map {
            // Shards are files beside the index, nothing else.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(Error::model(format!(
                    "{}: shard name {f:?} is not a plain file name",
                    index.display()
                )));
            }
            files.insert(t, dir.join(f));
        }
        let mut shards: Vec<PathBuf> = files.values().cloned().collect();
        shards.sort();
        shards.dedup();
        shards
    } else {
        vec![dir.join("model.safetensors")]
    };
    let mut bytes: HashMap<PathBuf, Vec<u8>> = HashMap::new();
    for s in &shards {
        bytes.insert(s.clone(), read(s)?);
    }
    let mut parsed: HashMap<PathBuf, SafeTensors<'_>> = HashMap::new();
    for (p, b) in &bytes {
        let st = SafeTensors::deserialize(b)
            .map_err(|e| Error::model(format!("{}: {e}", p.display())))?;
        for name in st.names() {
            files.entry(name.to_string()).or_insert_with(|| p.clone());
        }
        parsed.insert(p.clone(), st);
    }
    let tied = cfg.tie_word_embeddings.unwrap_or(false) || !files.contains_key("lm_head.weight");
    let (hd, n_heads, n_kv) = (config.head_dim(), config.n_heads, config.n_kv_heads);
    Model::build(
        config.clone(),
        tied,
        source.clone(),
        None,
        |name, rows, cols| {
            let hf = hf_name(name);
            let file = files
                .get(&hf)
                .ok_or_else(|| Error::model(format!("{source}: no tensor {hf}")))?;
            let t = parsed[file]
                .tensor(&hf)
                .map_err(|e| Error::model(format!("{source}: {hf}: {e}")))?;
            let format = match t.dtype() {
                Dtype::F32 => Format::F32,
                Dtype::F16 => Format::F16,
                Dtype::BF16 => Format::BF16,
                d => {
                    return Err(Error::model(format!(
                        "{source}: {hf} is {d:?}; f32, f16 and bf16 are supported"
                    )))
                }
            };
            let shape = t.shape();
            let (tr, tc) = match shape {
                [c] => (1, *c),
                [r, c] => (*r, *c),
                s => return Err(Error::model(format!("{source}: {hf} has shape {s:?}"))),
            };
            if (tr, tc) != (rows, cols) {
                return Err(Error::model(format!(
                    "{source}: {hf} is [{tr}, {tc}], the model needs [{rows}, {cols}]"
                )));
            }
            let mut data = t.data().to_vec();
            let heads = if name.ends_with("attn_q") {
                Some(n_heads)
            } else if name.ends_with("attn_k") {
                Some(n_kv)
            } else {
                None
            };
            if let Some(heads) = heads {
                let rb = data.len() / rows;
                let src = data.clone();
                for h in 0..heads {
                    for i in 0..hd / 2 {
                        for j in 0..2 {
                            let to = h * hd + 2 * i + j;
                            let from = h * hd + j * hd / 2 + i;
                            data[to * rb..(to + 1) * rb]
                                .copy_from_slice(&src[from * rb..(from + 1) * rb]);
                        }
                    }
                }
            }
            Ok(Raw {
                format,
                rows,
                cols,
                bytes: data,
            })
        },
    )
}
