//! A model's tokenizer: text → token ids and back, and its chat template.
//! Three kinds, each from the model's own files and each with a digest that
//! a generate job made from text names:
//!
//! - GGUF (`tokenizer.ggml.*`): byte-level BPE (`gpt2`) or SentencePiece
//!   (`llama`), see [`gguf`];
//! - Hugging Face folders: `tokenizer.json` and `tokenizer_config.json`,
//!   see [`hf`];
//! - llama2.c tokenizer files (SentencePiece pieces and scores), see
//!   [`spm::from_llama2c`].
//!
//! Chat templates are rendered as transformers renders them ([`template`]).

pub mod gguf;
pub mod hf;
pub mod spm;
pub mod template;

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use lockstep_kernels::model::Model;
use tokenizers::Tokenizer;

pub use gguf::tokenizer_digest;

/// A model's tokenizer and its special tokens.
pub struct TextTokenizer {
    inner: Inner,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    /// Put BOS in front of every encoded text (unless it starts with it).
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The special tokens' text, for the chat template.
    pub specials: template::Specials,
    /// The tokenizer digest: SHA3-256 over everything that decides text →
    /// ids and the chat template (per kind: [`tokenizer_digest`] for GGUF,
    /// the two files for Hugging Face, the file for llama2.c). A generate
    /// job made from text names it.
    pub digest: lockstep_kernels::Digest,
    /// `gguf`, `hf` or `llama2c`.
    pub kind: &'static str,
}

enum Inner {
    /// Byte-level BPE built from a GGUF's vocabulary and merges.
    Bpe(Box<Tokenizer>),
    /// A Hugging Face tokenizer.json, post-processor included.
    Hf(Box<Tokenizer>),
    Spm(Box<spm::Spm>),
}

/// SHA3-256 over `lockstep.tokenizer.llama2c\0`, the file's length (u64
/// little-endian) and its bytes.
fn llama2c_digest(bytes: &[u8]) -> lockstep_kernels::Digest {
    use sha3::Digest as _;
    let mut h = sha3::Sha3_256::new();
    h.update(b"lockstep.tokenizer.llama2c\0");
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(bytes);
    lockstep_kernels::Digest(h.finalize().into())
}

/// The tokenizer file of a llama2.c checkpoint when none is named:
/// `tokenizer.bin` beside it, else the one `<stem>-tok*.bin` beside it.
fn llama2c_sibling(model: &Path) -> Option<PathBuf> {
    let dir = model.parent()?;
    let plain = dir.join("tokenizer.bin");
    if plain.is_file() {
        return Some(plain);
    }
    let stem = model.file_stem()?.to_str()?;
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{stem}-tok")) && n.ends_with(".bin"))
        })
        .collect();
    found.sort();
    (found.len() == 1).then(|| found.remove(0))
}

impl TextTokenizer {
    /// The tokenizer of the model loaded from `path`: the one its files
    /// hold (GGUF metadata, a Hugging Face folder's tokenizer.json, a
    /// llama2.c checkpoint's tokenizer file beside it), or the file named
    /// by `explicit` (a tokenizer.json or a llama2.c tokenizer file).
    /// `None` when the model has none.
    pub fn for_model(path: &Path, model: &Model, explicit: Option<&Path>) -> Result<Option<Self>> {
        let vocab = model.config.vocab_size;
        if let Some(t) = explicit {
            let t = if t.is_dir() {
                t.join("tokenizer.json")
            } else {
                t.to_path_buf()
            };
            return if t.extension().is_some_and(|e| e == "json") {
                Ok(Some(hf::from_files(&t, vocab)?))
            } else {
                Ok(Some(Self::from_llama2c_file(&t, vocab)?))
            };
        }
        if let Some(g) = &model.gguf {
            return Ok(Some(gguf::from_gguf(g)?));
        }
        if path.is_dir() {
            let t = path.join("tokenizer.json");
            return if t.is_file() {
                Ok(Some(hf::from_files(&t, vocab)?))
            } else {
                Ok(None)
            };
        }
        match llama2c_sibling(path) {
            Some(t) => Ok(Some(Self::from_llama2c_file(&t, vocab)?)),
            None => Ok(None),
        }
    }

    /// A llama2.c tokenizer file for a model of `vocab_size` tokens (BOS 1,
    /// EOS 2, BOS put in front, as llama2.c's `run.c` does).
    pub fn from_llama2c_file(path: &Path, vocab_size: usize) -> Result<Self> {
        let bytes =
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        let spm = spm::from_llama2c(&bytes, vocab_size).with_context(|| {
            format!(
                "{} is not a llama2.c tokenizer of {vocab_size} tokens",
                path.display()
            )
        })?;
        Ok(Self {
            digest: llama2c_digest(&bytes),
            inner: Inner::Spm(Box::new(spm)),
            bos: Some(1),
            eos: Some(2),
            add_bos: true,
            chat_template: None,
            specials: Default::default(),
            kind: "llama2c",
        })
    }

    /// Token ids of `text` (BOS first when the model asks for it).
    /// Special tokens written in the text (`<|im_start|>`, `<s>`) are those
    /// tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_as(text, true)
    }

    /// `text` as ids; `prompt`: a plain prompt (a Hugging Face
    /// post-processor adds its tokens) rather than a rendered chat (whose
    /// template wrote them).
    fn encode_as(&self, text: &str, prompt: bool) -> Result<Vec<u32>> {
        let mut ids = match &self.inner {
            Inner::Bpe(t) | Inner::Hf(t) => {
                let post = prompt && matches!(self.inner, Inner::Hf(_));
                t.encode(text, post)
                    .map_err(|e| anyhow!("cannot tokenize the prompt: {e}"))?
                    .get_ids()
                    .to_vec()
            }
            Inner::Spm(s) => self.encode_spm(s, text)?,
        };
        if self.add_bos {
            if let Some(b) = self.bos {
                if ids.first() != Some(&b) {
                    ids.insert(0, b);
                }
            }
        }
        Ok(ids)
    }

    /// SentencePiece over the text between control tokens written in it
    /// (each such token is its id; the text after one gets the space
    /// prefix again, as llama.cpp does).
    fn encode_spm(&self, s: &spm::Spm, text: &str) -> Result<Vec<u32>> {
        let mut controls: Vec<(&str, u32)> = [self.bos, self.eos]
            .into_iter()
            .flatten()
            .filter_map(|id| Some((s.piece(id)?, id)))
            .filter(|(p, _)| !p.is_empty() && !p.contains('\n'))
            .collect();
        controls.sort_by_key(|c| std::cmp::Reverse(c.0.len()));
        let mut ids = Vec::new();
        let mut rest = text;
        loop {
            let next = controls
                .iter()
                .filter_map(|&(p, id)| rest.find(p).map(|at| (at, p, id)))
                .min_by_key(|&(at, p, _)| (at, usize::MAX - p.len()));
            match next {
                Some((at, p, id)) => {
                    ids.extend(s.encode(&rest[..at])?);
                    ids.push(id);
                    rest = &rest[at + p.len()..];
                }
                None => {
                    ids.extend(s.encode(rest)?);
                    return Ok(ids);
                }
            }
        }
    }

    /// The text of `ids` (special tokens dropped).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match &self.inner {
            Inner::Bpe(t) | Inner::Hf(t) => t
                .decode(ids, true)
                .map_err(|e| anyhow!("cannot decode tokens: {e}")),
            Inner::Spm(s) => Ok(s.decode(ids, self.bos)),
        }
    }

    /// The prompt as the user's one message in the model's chat template,
    /// the assistant's turn opened.
    pub fn chat(&self, prompt: &str) -> Result<String> {
        self.chat_messages(&[("user".to_string(), prompt.to_string())])
    }

    /// A conversation (`(role, content)` in order) in the model's chat
    /// template, the assistant's turn opened.
    pub fn chat_messages(&self, messages: &[(String, String)]) -> Result<String> {
        if messages.is_empty() {
            bail!("`messages` is empty");
        }
        for (role, _) in messages {
            if !matches!(role.as_str(), "system" | "user" | "assistant") {
                bail!("message role {role:?} is not system, user or assistant");
            }
        }
        let t = self
            .chat_template
            .as_deref()
            .context("the model has no chat template")?;
        template::render(t, messages, &self.specials, true)
    }

    /// Ids of a rendered chat (the template wrote the special tokens).
    pub fn encode_chat(&self, rendered: &str) -> Result<Vec<u32>> {
        self.encode_as(rendered, false)
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
