//! The byte-level BPE tokenizer stored in a GGUF file (`tokenizer.ggml.*`),
//! built with Hugging Face's `tokenizers`: the vocabulary and merges as
//! stored, the control tokens as special tokens, GPT-2's byte-level
//! pre-tokenizer (with single digits split first for `smollm`, as the
//! model's own tokenizer.json does), and its byte-level decoder.

use anyhow::{anyhow, bail, Context, Result};
use lockstep_kernels::model::gguf::{Gguf, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

/// A model's tokenizer and its special tokens.
pub struct TextTokenizer {
    inner: Tokenizer,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The tokenizer digest: SHA3-256 over `lockstep.tokenizer\0` and
    /// everything that decides text → ids and the chat template (see
    /// [`tokenizer_digest`]). A generate job made from text names it.
    pub digest: lockstep_kernels::Digest,
}

/// SHA3-256 over `lockstep.tokenizer\0`, then each of `tokenizer.ggml.model`,
/// `tokenizer.ggml.pre`, every token, every merge, every token type, the
/// BOS and EOS ids, `add_bos_token` and the chat template, each as a u64
/// little-endian length (or count) followed by its bytes (strings UTF-8,
/// numbers u64 little-endian, a missing value as length `u64::MAX`).
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
    put(Some(&[matches!(
        g.get("tokenizer.ggml.add_bos_token"),
        Some(Value::Bool(true))
    ) as u8]));
    put(text("tokenizer.chat_template").as_deref());
    lockstep_kernels::Digest(h.finalize().into())
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

impl TextTokenizer {
    /// The tokenizer of a GGUF file (`tokenizer.ggml.model` must be `gpt2`,
    /// byte-level BPE).
    pub fn from_gguf(g: &Gguf) -> Result<Self> {
        let kind = g
            .get("tokenizer.ggml.model")
            .and_then(Value::as_str)
            .unwrap_or("none");
        if kind != "gpt2" {
            bail!("tokenizer {kind:?} is not supported (only byte-level BPE, `gpt2`)");
        }
        let tokens = strings(g, "tokenizer.ggml.tokens")?;
        let merges = strings(g, "tokenizer.ggml.merges")?;
        let types: Vec<u64> = match g.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
            Some(a) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
            None => vec![1; tokens.len()],
        };
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
            .zip(&types)
            .filter(|(_, &t)| t == 3)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        inner
            .add_special_tokens(special)
            .map_err(|e| anyhow!("cannot add the special tokens: {e}"))?;
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        Ok(Self {
            digest: tokenizer_digest(g),
            inner,
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
            add_bos: matches!(
                g.get("tokenizer.ggml.add_bos_token"),
                Some(Value::Bool(true))
            ),
            chat_template: g
                .get("tokenizer.chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }

    /// Token ids of `text` (with BOS first when the model asks for it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?;
        let mut ids = Vec::new();
        if self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// The text of `ids` (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("cannot decode tokens: {e}"))
    }

    /// The prompt wrapped in the model's chat template, for a template of
    /// the ChatML kind (`<|im_start|>role\n…<|im_end|>\n`), as SmolLM2's:
    /// its default system message when the template has one, the user's
    /// message, and the assistant's turn opened.
    pub fn chat(&self, prompt: &str) -> Result<String> {
        let t = self
            .chat_template
            .as_deref()
            .context("--chat: the model file has no chat template")?;
        if !t.contains("<|im_start|>") {
            bail!("--chat: only ChatML-style chat templates (<|im_start|>…) are supported");
        }
        let mut s = String::new();
        // The default system message the template inserts, if any.
        if let Some(i) = t.find("'<|im_start|>system\n") {
            let rest = &t[i + 1..];
            if let Some(end) = rest.find("<|im_end|>") {
                s.push_str(&rest[..end]);
                s.push_str("<|im_end|>\n");
            }
        }
        s.push_str(&format!(
            "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
        ));
        Ok(s)
    }

    /// A conversation (`(role, content)` in order) in the ChatML template,
    /// the assistant's turn opened. Without a system message first, the
    /// template's default one is put in, as [`TextTokenizer::chat`] does.
    pub fn chat_messages(&self, messages: &[(String, String)]) -> Result<String> {
        let Some(((first_role, first), rest)) = messages.split_first() else {
            bail!("`messages` is empty");
        };
        for (role, _) in messages {
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                bail!("message role {role:?} is not system, user or assistant");
            }
        }
        let (mut s, rest) = if first_role == "user" {
            // The default system message and the first user turn.
            let s = self.chat(first)?;
            (
                s.trim_end_matches("<|im_start|>assistant\n").to_string(),
                rest,
            )
        } else {
            self.chat("")?;
            (String::new(), messages)
        };
        for (role, content) in rest {
            s.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
        }
        s.push_str("<|im_start|>assistant\n");
        Ok(s)
    }
}

/// Emits the text of a growing token list piece by piece, holding back
/// bytes that do not yet form whole characters.
#[derive(Default)]
pub struct TextStream {
    printed: usize,
}

impl TextStream {
    /// The new text since the last call.
    pub fn next(&mut self, tok: &TextTokenizer, ids: &[u32]) -> Result<String> {
        let text = tok.decode(ids)?;
        if text.ends_with('\u{FFFD}') || text.len() < self.printed {
            return Ok(String::new());
        }
        let Some(new) = text.get(self.printed..).map(str::to_string) else {
            return Ok(String::new());
        };
        self.printed = text.len();
        Ok(new)
    }
}
