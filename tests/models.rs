//! Where the tests find models: `../shared/models` beside the repository,
//! and the pinned SmolLM2 GGUF that `./dev` unpacks under `.tools/`.

use std::path::PathBuf;

/// The repository's root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A model from `../shared/models` (present in CI and here).
pub fn shared_model(name: &str) -> PathBuf {
    let p = repo_root()
        .parent()
        .unwrap()
        .join("shared/models")
        .join(name);
    assert!(
        p.exists(),
        "{} is missing: ../shared must sit beside the repository",
        p.display()
    );
    p
}

/// The SmolLM2-135M Q4_1 GGUF, when `./dev` has fetched it; a test that
/// needs it fails under `LOCKSTEP_REQUIRE_MODELS=1` (as `./dev test` sets)
/// and skips otherwise.
pub fn smollm2() -> Option<PathBuf> {
    match lockstep::llm::models::resolve("smollm2") {
        Ok(p) => Some(p),
        Err(e) => {
            if std::env::var_os("LOCKSTEP_REQUIRE_MODELS").is_some() {
                panic!("{e:#}");
            }
            eprintln!("skipped: {e:#}");
            None
        }
    }
}

/// A tensor's shape and little-endian bytes.
pub type Shaped = (Vec<usize>, Vec<u8>);

/// Writes `tensors` (each's bytes already in `dtype`) as one safetensors file.
pub fn write_safetensors(
    path: &std::path::Path,
    dtype: safetensors::Dtype,
    tensors: &[(String, Shaped)],
) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(dtype, s.clone(), b).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Writes a llama2.c model as a Hugging Face checkpoint (config.json and
/// model.safetensors, F32), with q/k rows in Hugging Face's rotate-half
/// order, as a converter from llama2.c to Hugging Face would.
pub fn write_hf(model: &lockstep_kernels::model::Model, dir: &std::path::Path) {
    use lockstep_kernels::cpu::qmatvec::PackedMatrix;
    let c = &model.config;
    let hd = c.head_dim();
    let rows = |m: &PackedMatrix, heads: Option<usize>| -> Shaped {
        let mut out = vec![Vec::new(); m.rows];
        for r in 0..m.rows {
            // Our row h·d + 2i + j is Hugging Face's row h·d + j·d/2 + i.
            let to = match heads {
                Some(_) => {
                    let (h, k) = (r / hd, r % hd);
                    h * hd + (k % 2) * hd / 2 + k / 2
                }
                None => r,
            };
            out[to] = m.dequantize_row(r);
        }
        (
            vec![m.rows, m.cols],
            out.concat().iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    };
    let vector = |v: &[f32]| {
        (
            vec![v.len()],
            v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>(),
        )
    };
    let mut tensors: Vec<(String, Shaped)> = vec![(
        "model.embed_tokens.weight".into(),
        rows(&model.embedding, None),
    )];
    for (l, layer) in model.layers.iter().enumerate() {
        let p = |s: &str| format!("model.layers.{l}.{s}.weight");
        tensors.push((p("input_layernorm"), vector(&layer.attn_norm)));
        tensors.push((p("self_attn.q_proj"), rows(&layer.wq, Some(c.n_heads))));
        tensors.push((p("self_attn.k_proj"), rows(&layer.wk, Some(c.n_kv_heads))));
        tensors.push((p("self_attn.v_proj"), rows(&layer.wv, None)));
        tensors.push((p("self_attn.o_proj"), rows(&layer.wo, None)));
        tensors.push((p("post_attention_layernorm"), vector(&layer.ffn_norm)));
        tensors.push((p("mlp.gate_proj"), rows(&layer.w_gate, None)));
        tensors.push((p("mlp.up_proj"), rows(&layer.w_up, None)));
        tensors.push((p("mlp.down_proj"), rows(&layer.w_down, None)));
    }
    tensors.push(("model.norm.weight".into(), vector(&model.final_norm)));
    write_safetensors(
        &dir.join("model.safetensors"),
        safetensors::Dtype::F32,
        &tensors,
    );
    let config = serde_json::json!({
        "model_type": "llama", "hidden_size": c.dim, "intermediate_size": c.hidden_dim,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "vocab_size": c.vocab_size, "max_position_embeddings": c.max_seq, "rope_theta": c.rope_theta,
        "rms_norm_eps": c.norm_eps, "tie_word_embeddings": model.output.is_none(),
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
}

/// A GGUF metadata value, as [`write_gguf`] writes it.
pub enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    F32s(Vec<f32>),
    I32s(Vec<i32>),
}

/// Writes a model as a GGUF v3 file (F32 tensors under llama.cpp's names,
/// `general.architecture = llama` and its hyper-parameters) with `extra`
/// metadata (a tokenizer, say). llama2.c and GGUF share the adjacent-pair
/// RoPE row order, so the rows go as they are.
pub fn write_gguf(
    model: &lockstep_kernels::model::Model,
    path: &std::path::Path,
    extra: Vec<(&str, Meta)>,
) {
    use lockstep_kernels::cpu::qmatvec::PackedMatrix;
    let c = &model.config;
    let mut meta: Vec<(&str, Meta)> = vec![
        ("general.architecture", Meta::Str("llama".into())),
        ("llama.embedding_length", Meta::U32(c.dim as u32)),
        ("llama.feed_forward_length", Meta::U32(c.hidden_dim as u32)),
        ("llama.block_count", Meta::U32(c.n_layers as u32)),
        ("llama.attention.head_count", Meta::U32(c.n_heads as u32)),
        (
            "llama.attention.head_count_kv",
            Meta::U32(c.n_kv_heads as u32),
        ),
        ("llama.context_length", Meta::U32(c.max_seq as u32)),
        ("llama.vocab_size", Meta::U32(c.vocab_size as u32)),
        ("llama.rope.freq_base", Meta::F32(c.rope_theta)),
        (
            "llama.attention.layer_norm_rms_epsilon",
            Meta::F32(c.norm_eps),
        ),
    ];
    meta.extend(extra);
    let matrix = |m: &PackedMatrix| -> (Vec<u64>, Vec<u8>) {
        let rows: Vec<f32> = (0..m.rows).flat_map(|r| m.dequantize_row(r)).collect();
        (
            vec![m.cols as u64, m.rows as u64],
            rows.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let vector = |v: &[f32]| -> (Vec<u64>, Vec<u8>) {
        (
            vec![v.len() as u64],
            v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    };
    let mut tensors = vec![("token_embd.weight".to_string(), matrix(&model.embedding))];
    for (l, layer) in model.layers.iter().enumerate() {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        tensors.push((n("attn_norm"), vector(&layer.attn_norm)));
        tensors.push((n("attn_q"), matrix(&layer.wq)));
        tensors.push((n("attn_k"), matrix(&layer.wk)));
        tensors.push((n("attn_v"), matrix(&layer.wv)));
        tensors.push((n("attn_output"), matrix(&layer.wo)));
        tensors.push((n("ffn_norm"), vector(&layer.ffn_norm)));
        tensors.push((n("ffn_gate"), matrix(&layer.w_gate)));
        tensors.push((n("ffn_up"), matrix(&layer.w_up)));
        tensors.push((n("ffn_down"), matrix(&layer.w_down)));
    }
    tensors.push(("output_norm.weight".into(), vector(&model.final_norm)));
    if let Some(o) = &model.output {
        tensors.push(("output.weight".into(), matrix(o)));
    }
    let mut out: Vec<u8> = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((meta.len() as u64).to_le_bytes());
    let string = |out: &mut Vec<u8>, s: &str| {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    };
    for (k, v) in &meta {
        string(&mut out, k);
        match v {
            Meta::U32(x) => {
                out.extend(4u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::F32(x) => {
                out.extend(6u32.to_le_bytes());
                out.extend(x.to_le_bytes());
            }
            Meta::Bool(x) => {
                out.extend(7u32.to_le_bytes());
                out.push(*x as u8);
            }
            Meta::Str(x) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, x);
            }
            Meta::Strs(x) => {
                out.extend(9u32.to_le_bytes());
                out.extend(8u32.to_le_bytes());
                out.extend((x.len() as u64).to_le_bytes());
                for s in x {
                    string(&mut out, s);
                }
            }
            Meta::F32s(x) => {
                out.extend(9u32.to_le_bytes());
                out.extend(6u32.to_le_bytes());
                out.extend((x.len() as u64).to_le_bytes());
                x.iter().for_each(|f| out.extend(f.to_le_bytes()));
            }
            Meta::I32s(x) => {
                out.extend(9u32.to_le_bytes());
                out.extend(5u32.to_le_bytes());
                out.extend((x.len() as u64).to_le_bytes());
                x.iter().for_each(|i| out.extend(i.to_le_bytes()));
            }
        }
    }
    let align = |n: u64| n.div_ceil(32) * 32;
    let mut offset = 0u64;
    for (name, (dims, bytes)) in &tensors {
        string(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(0u32.to_le_bytes()); // F32
        out.extend(offset.to_le_bytes());
        offset = align(offset + bytes.len() as u64);
    }
    out.resize(align(out.len() as u64) as usize, 0);
    for (_, (_, bytes)) in &tensors {
        out.extend(bytes);
        out.resize(align(out.len() as u64) as usize, 0);
    }
    std::fs::write(path, out).unwrap();
}

/// A llama2.c tokenizer file's pieces as a GGUF SentencePiece vocabulary
/// (`tokenizer.ggml.model = llama`, as Llama 2, TinyLlama and Mistral
/// files have it): pieces with `▁` for spaces, scores, token types.
pub fn llama_vocabulary(tok: &std::path::Path) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let bytes = std::fs::read(tok).unwrap();
    let (mut pieces, mut scores, mut types) = (Vec::new(), Vec::new(), Vec::new());
    let mut at = 4;
    while at < bytes.len() {
        let score = f32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
        let n = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let p = String::from_utf8(bytes[at + 8..at + 8 + n].to_vec()).unwrap();
        let id = pieces.len();
        let (p, t) = match id {
            0 => ("<unk>".to_string(), 2),
            1 => ("<s>".to_string(), 3),
            2 => ("</s>".to_string(), 3),
            _ if p.starts_with("<0x") && p.len() == 6 => (p, 6),
            _ => (p.replace(' ', "\u{2581}"), 1),
        };
        pieces.push(p);
        scores.push(score);
        types.push(t);
        at += 8 + n;
    }
    (pieces, scores, types)
}
