//! The tokenizer of a Hugging Face folder: `tokenizer.json` (read by Hugging
//! Face's own `tokenizers`, so its normalizer, pre-tokenizer, model,
//! post-processor and decoder are the model's) and `tokenizer_config.json`
//! (the chat template and the special tokens' text).

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tokenizers::Tokenizer;

use super::template::Specials;
use super::{Inner, TextTokenizer};

/// SHA3-256 over `lockstep.tokenizer.hf\0`, then tokenizer.json's bytes and
/// tokenizer_config.json's bytes, each as a u64 little-endian length and
/// the bytes (a missing file as length `u64::MAX`): the two files decide
/// text → ids and the chat template.
fn digest(json: &[u8], config: Option<&[u8]>) -> lockstep_kernels::Digest {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    h.update(b"lockstep.tokenizer.hf\0");
    for part in [Some(json), config] {
        match part {
            Some(b) => {
                h.update((b.len() as u64).to_le_bytes());
                h.update(b);
            }
            None => h.update(u64::MAX.to_le_bytes()),
        }
    }
    lockstep_kernels::Digest(h.finalize().into())
}

/// A special token in tokenizer_config.json: a string, or an added-token
/// object with `content`.
fn token_text(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// The tokenizer in `tokenizer.json` (and `tokenizer_config.json` beside
/// it, when there is one), for a model of `vocab_size` ids.
pub fn from_files(json_path: &Path, vocab_size: usize) -> Result<TextTokenizer> {
    let json =
        std::fs::read(json_path).with_context(|| format!("cannot read {}", json_path.display()))?;
    let inner =
        Tokenizer::from_bytes(&json).map_err(|e| anyhow!("{}: {e}", json_path.display()))?;
    let n = inner.get_vocab_size(true);
    if n > vocab_size {
        bail!(
            "{}: the tokenizer has {n} tokens, more than the model's {vocab_size}",
            json_path.display()
        );
    }
    let config_path = json_path.with_file_name("tokenizer_config.json");
    let config_bytes = match std::fs::read(&config_path) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("cannot read {}: {e}", config_path.display()),
    };
    let config: serde_json::Map<String, serde_json::Value> = match &config_bytes {
        Some(b) => serde_json::from_slice(b)
            .with_context(|| format!("{} is not a JSON object", config_path.display()))?,
        None => Default::default(),
    };
    // A string, or a list of named templates (transformers uses "default").
    let chat_template = match config.get("chat_template") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str().map(str::to_string)),
        Some(_) => bail!(
            "{}: chat_template is neither a string nor a list",
            config_path.display()
        ),
    };
    let specials = Specials {
        bos_token: token_text(config.get("bos_token")),
        eos_token: token_text(config.get("eos_token")),
        unk_token: token_text(config.get("unk_token")),
        pad_token: token_text(config.get("pad_token")),
    };
    let id = |t: &Option<String>| -> Result<Option<u32>> {
        match t {
            None => Ok(None),
            Some(t) => inner.token_to_id(t).map(Some).ok_or_else(|| {
                anyhow!(
                    "{}: special token {t:?} is not in tokenizer.json",
                    config_path.display()
                )
            }),
        }
    };
    let (bos, eos) = (id(&specials.bos_token)?, id(&specials.eos_token)?);
    Ok(TextTokenizer {
        digest: digest(&json, config_bytes.as_deref()),
        inner: Inner::Hf(Box::new(inner)),
        bos,
        eos,
        // tokenizer.json's post-processor adds what the model wants.
        add_bos: false,
        chat_template,
        specials,
        kind: "hf",
    })
}
