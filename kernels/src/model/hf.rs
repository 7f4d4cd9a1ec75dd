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

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

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

/// config.json keys read into the model (and so its digest).
const USED_KEYS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "rope_theta",
    "rms_norm_eps",
    "tie_word_embeddings",
    "rope_scaling",
    "head_dim",
];

/// config.json keys that do not change the computation (bookkeeping,
/// training-only settings, token ids a tokenizer or a caller uses).
const INERT_KEYS: &[&str] = &[
    "architectures",
    "torch_dtype",
    "transformers_version",
    "_name_or_path",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "is_llama_config",
    "transformers.js_config",
];

/// config.json keys that change the computation, accepted only at the value
/// the contract computes (anything else is refused, never ignored).
fn fixed_key(key: &str) -> Option<serde_json::Value> {
    use serde_json::json;
    Some(match key {
        "hidden_act" => json!("silu"),
        "attention_bias" | "mlp_bias" | "rope_interleaved" => json!(false),
        "pretraining_tp" => json!(1),
        _ => return None,
    })
}

/// Every config.json key is used, inert, or at its one accepted value.
fn check_keys(source: &str, cfg: &serde_json::Map<String, serde_json::Value>) -> Result<()> {
    let mut keys: Vec<&String> = cfg.keys().collect();
    keys.sort();
    for key in keys {
        if USED_KEYS.contains(&key.as_str()) || INERT_KEYS.contains(&key.as_str()) {
            continue;
        }
        match fixed_key(key) {
            Some(want) if cfg[key] == want || cfg[key].is_null() => {}
            Some(want) => {
                return Err(Error::model(format!(
                    "{source}/config.json: {key} = {} is not supported (only {want}): it would change the computation",
                    cfg[key]
                )))
            }
            None => {
                return Err(Error::model(format!(
                    "{source}/config.json: unknown key {key:?}; lockstep refuses settings it does not implement rather than ignore them"
                )))
            }
        }
    }
    Ok(())
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
    let raw: serde_json::Value = serde_json::from_slice(&read(&dir.join("config.json"))?)
        .map_err(|e| Error::model(format!("{source}/config.json: {e}")))?;
    let object = raw
        .as_object()
        .ok_or_else(|| Error::model(format!("{source}/config.json is not a JSON object")))?;
    let cfg: HfConfig = serde_json::from_value(raw.clone())
        .map_err(|e| Error::model(format!("{source}/config.json: {e}")))?;
    if let Some(t) = cfg.model_type.as_deref() {
        if t != "llama" {
            return Err(Error::model(format!(
                "{source}: model_type {t:?} is not supported (only llama)"
            )));
        }
    }
    check_keys(&source, object)?;
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
    // Which file holds each tensor: exactly one, as the index says. A
    // tensor in two shards, or in a shard the index does not name for it,
    // is an error (choosing one would depend on the order files are read).
    let index = dir.join("model.safetensors.index.json");
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let indexed = index.is_file();
    let shards: Vec<PathBuf> = if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: BTreeMap<String, String>,
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
    // Headers only: each tensor is read when the builder asks for it.
    let mut parsed: BTreeMap<PathBuf, super::st::StFile> = BTreeMap::new();
    let mut found: BTreeMap<String, PathBuf> = BTreeMap::new();
    for p in &shards {
        let st = super::st::StFile::open(p)?;
        for name in st.tensors.keys() {
            if let Some(other) = found.insert(name.to_string(), p.clone()) {
                return Err(Error::model(format!(
                    "{source}: tensor {name} is in both {} and {}",
                    other.display(),
                    p.display()
                )));
            }
            if indexed && files.get(name) != Some(p) {
                return Err(Error::model(format!(
                    "{source}: tensor {name} is in {}, but the index {}",
                    p.display(),
                    match files.get(name) {
                        Some(f) => format!("puts it in {}", f.display()),
                        None => "does not list it".to_string(),
                    }
                )));
            }
        }
        parsed.insert(p.clone(), st);
    }
    if indexed {
        if let Some((t, f)) = files.iter().find(|(t, _)| !found.contains_key(t.as_str())) {
            return Err(Error::model(format!(
                "{source}: the index puts {t} in {}, which does not hold it",
                f.display()
            )));
        }
    }
    let files = found;
    let has_head = files.contains_key("lm_head.weight");
    let tied = match cfg.tie_word_embeddings {
        Some(true) if has_head => {
            return Err(Error::model(format!(
                "{source}: tie_word_embeddings is true but lm_head.weight is present"
            )))
        }
        Some(false) if !has_head => {
            return Err(Error::model(format!(
                "{source}: tie_word_embeddings is false but there is no lm_head.weight"
            )))
        }
        Some(t) => t,
        // Unsaid: tied exactly when there is no separate classifier.
        None => !has_head,
    };
    // Every tensor in the files is one the model uses.
    let mut used: Vec<String> = ["token_embd", "output_norm"]
        .iter()
        .map(|n| hf_name(n))
        .collect();
    if !tied {
        used.push(hf_name("output"));
    }
    for l in 0..config.n_layers {
        for w in [
            "attn_norm",
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_norm",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ] {
            used.push(hf_name(&format!("blk.{l}.{w}")));
        }
    }
    if let Some(extra) = files.keys().find(|t| !used.contains(t)) {
        return Err(Error::model(format!(
            "{source}: tensor {extra} is not part of the llama architecture lockstep computes; refusing rather than ignoring it"
        )));
    }
    let (hd, n_heads, n_kv) = (config.head_dim(), config.n_heads, config.n_kv_heads);
    let end_ids = end_ids(dir, object)?;
    let mut model = Model::build(
        config.clone(),
        tied,
        source.clone(),
        None,
        |name, rows, cols| {
            let hf = hf_name(name);
            let file = files
                .get(&hf)
                .ok_or_else(|| Error::model(format!("{source}: no tensor {hf}")))?;
            let st = &parsed[file];
            let t = &st.tensors[&hf];
            let format = match t.dtype.as_str() {
                "F32" => Format::F32,
                "F16" => Format::F16,
                "BF16" => Format::BF16,
                d => {
                    return Err(Error::model(format!(
                        "{source}: {hf} is {d}; F32, F16 and BF16 are supported"
                    )))
                }
            };
            // Norm weights are vectors, everything else a matrix.
            let vector = name.ends_with("norm");
            let want: Vec<usize> = if vector { vec![cols] } else { vec![rows, cols] };
            if t.shape != want {
                return Err(Error::model(format!(
                    "{source}: {hf} has shape {:?}, the model needs {want:?}",
                    t.shape
                )));
            }
            let mut data = st.read(&hf)?;
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
    )?;
    model.end_ids = end_ids;
    Ok(model)
}

/// The ids that end a generation: `eos_token_id` of generation_config.json
/// when it says, else of config.json (a number or a list).
fn end_ids(dir: &Path, cfg: &serde_json::Map<String, serde_json::Value>) -> Result<Vec<u32>> {
    let read_ids = |v: &serde_json::Value, whence: &str| -> Result<Vec<u32>> {
        let ids: Option<Vec<u32>> = match v {
            serde_json::Value::Null => Some(vec![]),
            serde_json::Value::Array(a) => a.iter().map(|x| x.as_u64().map(|n| n as u32)).collect(),
            x => x.as_u64().map(|n| vec![n as u32]),
        };
        ids.ok_or_else(|| {
            Error::model(format!(
                "{whence}: eos_token_id {v} is not a token id or a list of them"
            ))
        })
    };
    let gen = dir.join("generation_config.json");
    if gen.is_file() {
        let text = std::fs::read(&gen)
            .map_err(|e| Error::model(format!("cannot read {}: {e}", gen.display())))?;
        let g: serde_json::Value = serde_json::from_slice(&text)
            .map_err(|e| Error::model(format!("{}: {e}", gen.display())))?;
        if let Some(v) = g.get("eos_token_id") {
            return read_ids(v, &gen.display().to_string());
        }
    }
    match cfg.get("eos_token_id") {
        Some(v) => read_ids(v, "config.json"),
        None => Ok(vec![]),
    }
}
