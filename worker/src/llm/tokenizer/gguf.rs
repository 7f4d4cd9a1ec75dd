//! The tokenizer stored in a GGUF file: byte-level BPE (`gpt2`, built with
//! Hugging Face's `tokenizers`: vocabulary and merges as stored, control
//! tokens as special tokens, GPT-2's byte-level pre-tokenizer with single
//! digits split first for `smollm`, as the model's own tokenizer.json does)
//! or SentencePiece BPE (`llama`: pieces, scores and types, see
//! [`super::spm`]).

use anyhow::{anyhow, bail, Result};
use lockstep_kernels::model::gguf::{Gguf, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::spm::{Kind, Spm};
use super::template::Specials;
use super::{Inner, TextTokenizer};

/// SHA3-256 over `lockstep.tokenizer\0`, then each of `tokenizer.ggml.model`,
/// `tokenizer.ggml.pre`, every token, every merge, every token type, the
/// BOS and EOS ids, `add_bos_token` and the chat template, each as a u64
/// little-endian length (or count) followed by its bytes (strings UTF-8,
/// numbers u64 little-endian, a missing value as length `u64::MAX`). For a
/// SentencePiece (`llama`) vocabulary, every score (f32 bits, u64) and
/// `add_space_prefix` follow.
pub fn tokenizer_digest(g: &Gguf) -> lockstep_kernels::Digest {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    h.update(b"lockstep.tokenizer\0");
    let mut put = |bytes: Option<&[u8]>| match bytes {
        Some(b) => {
            h.update((b.len() as u64).to_le_bytes());
            h.update(b);
        }
        None => h.update(u64::MAX.to_le_bytes()),
    };
    let text = |k: &str| {
        g.get(k)
            .and_then(Value::as_str)
            .map(|s| s.as_bytes().to_vec())
    };
    let number = |k: &str| {
        g.get(k)
            .and_then(Value::as_u64)
            .map(|v| v.to_le_bytes().to_vec())
    };
    put(text("tokenizer.ggml.model").as_deref());
    put(text("tokenizer.ggml.pre").as_deref());
    for key in [
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
    ] {
        match g.get(key).and_then(Value::as_array) {
            Some(a) => {
                put(Some(&(a.len() as u64).to_le_bytes()));
                for v in a {
                    match (v.as_str(), v.as_u64()) {
                        (Some(s), _) => put(Some(s.as_bytes())),
                        (None, Some(n)) => put(Some(&n.to_le_bytes())),
                        _ => put(None),
                    }
                }
            }
            None => put(None),
        }
    }
    put(number("tokenizer.ggml.bos_token_id").as_deref());
    put(number("tokenizer.ggml.eos_token_id").as_deref());
    put(Some(&[add_bos(g) as u8]));
    put(text("tokenizer.chat_template").as_deref());
    if kind(g) == "llama" {
        match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) => {
                put(Some(&(a.len() as u64).to_le_bytes()));
                for v in a {
                    let bits = v.as_f32().map(|f| f.to_bits() as u64);
                    put(bits.map(u64::to_le_bytes).as_ref().map(|b| &b[..]));
                }
            }
            None => put(None),
        }
        put(Some(&[add_space_prefix(g) as u8]));
    }
    lockstep_kernels::Digest(h.finalize().into())
}

fn kind(g: &Gguf) -> &str {
    g.get("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("none")
}

/// `tokenizer.ggml.add_bos_token`; unsaid, true for SentencePiece (as
/// llama.cpp has it), false for byte-level BPE.
fn add_bos(g: &Gguf) -> bool {
    match g.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => kind(g) == "llama",
    }
}

fn add_space_prefix(g: &Gguf) -> bool {
    !matches!(
        g.get("tokenizer.ggml.add_space_prefix"),
        Some(Value::Bool(false))
    )
}

fn strings<'a>(g: &'a Gguf, key: &str) -> Result<Vec<&'a str>> {
    g.get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the model file has no {key}"))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| anyhow!("{key} holds a non-string"))
        })
        .collect()
}

/// The tokenizer of a GGUF file.
pub fn from_gguf(g: &Gguf) -> Result<TextTokenizer> {
    let tokens = strings(g, "tokenizer.ggml.tokens")?;
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| anyhow!("tokenizer.ggml.token_type holds a non-integer"))
            })
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        bail!("{} tokens but {} token types", tokens.len(), types.len());
    }
    let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
    let (bos, eos) = (
        id("tokenizer.ggml.bos_token_id"),
        id("tokenizer.ggml.eos_token_id"),
    );
    for (what, i) in [("BOS", bos), ("EOS", eos)] {
        if i.is_some_and(|i| i as usize >= tokens.len()) {
            bail!("the {what} id {} is not a token", i.unwrap_or(0));
        }
    }
    let inner = match kind(g) {
        "gpt2" => Inner::Bpe(Box::new(byte_level_bpe(g, &tokens, &types)?)),
        "llama" => {
            let scores: Vec<f32> = match g.get("tokenizer.ggml.scores").and_then(Value::as_array) {
                Some(a) => a
                    .iter()
                    .map(|v| {
                        v.as_f32()
                            .ok_or_else(|| anyhow!("tokenizer.ggml.scores holds a non-number"))
                    })
                    .collect::<Result<_>>()?,
                None => bail!("a SentencePiece (`llama`) tokenizer needs tokenizer.ggml.scores"),
            };
            let kinds = types
                .iter()
                .map(|&t| Kind::from_gguf(t))
                .collect::<Result<Vec<_>>>()?;
            Inner::Spm(Box::new(Spm::new(
                tokens.iter().map(|t| t.to_string()).collect(),
                scores,
                kinds,
                add_space_prefix(g),
            )?))
        }
        k => bail!(
            "tokenizer {k:?} is not supported (byte-level BPE `gpt2` and SentencePiece `llama` are)"
        ),
    };
    let text_of = |i: Option<u32>| i.map(|i| tokens[i as usize].to_string());
    Ok(TextTokenizer {
        digest: tokenizer_digest(g),
        inner,
        bos,
        eos,
        add_bos: add_bos(g),
        chat_template: g
            .get("tokenizer.chat_template")
            .and_then(Value::as_str)
            .map(str::to_string),
        specials: Specials {
            bos_token: text_of(bos),
            eos_token: text_of(eos),
            unk_token: text_of(
                id("tokenizer.ggml.unknown_token_id").filter(|&i| (i as usize) < tokens.len()),
            ),
            pad_token: text_of(
                id("tokenizer.ggml.padding_token_id").filter(|&i| (i as usize) < tokens.len()),
            ),
        },
        kind: "gguf",
    })
}

fn byte_level_bpe(g: &Gguf, tokens: &[&str], types: &[u64]) -> Result<Tokenizer> {
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let mut vocab = Vocab::default();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t.to_string(), i as u32);
    }
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| anyhow!("merge {m:?} is not two tokens"))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| anyhow!("cannot build the BPE model: {e}"))?;
    let mut inner = Tokenizer::new(bpe);
    let byte_level = ByteLevel::new(false, true, true);
    let pre = g
        .get("tokenizer.ggml.pre")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let pre: PreTokenizerWrapper = match pre {
        "smollm" => Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into(),
        _ => byte_level.into(),
    };
    inner.with_pre_tokenizer(Some(pre));
    inner.with_decoder(Some(ByteLevelDecoder::default()));
    // Control tokens (type 3) are matched whole in the text.
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == 3)
        .map(|(s, _)| AddedToken::from(s.to_string(), true))
        .collect();
    inner
        .add_special_tokens(special)
        .map_err(|e| anyhow!("cannot add the special tokens: {e}"))?;
    Ok(inner)
}
