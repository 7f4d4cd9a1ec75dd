//! `lockstep tokenize`: a model's tokenizer on its own (text → ids, a chat
//! through its template, ids → text), with the tokenizer's digest: what a
//! coordinator does to a batch line's `prompt` or `messages`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    /// The model (a .gguf, a Hugging Face folder, a llama2.c checkpoint, or
    /// a name, as for `generate`).
    #[arg(long, env = "LOCKSTEP_MODEL", default_value = "smollm2")]
    pub model: String,
    /// The tokenizer, when not the model's own (as for `generate`).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// The text to tokenize.
    #[arg(long, conflicts_with_all = ["messages", "ids"], allow_hyphen_values = true)]
    pub text: Option<String>,
    /// Put --text as the user's message in the model's chat template.
    #[arg(long, requires = "text")]
    pub chat: bool,
    /// A conversation as JSON, `[{"role": "user", "content": "…"}, …]`, put
    /// in the chat template with the assistant's turn opened.
    #[arg(long, allow_hyphen_values = true)]
    pub messages: Option<String>,
    /// Token ids to turn back into text ("1 400 45").
    #[arg(long)]
    pub ids: Option<String>,
    /// Print one JSON object (ids, text, rendered chat, digests).
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Deserialize)]
struct Message {
    role: String,
    content: String,
}

pub fn run(args: TokenizeArgs) -> Result<()> {
    let (model, tok) = super::generate::load_with(&args.model, args.tokenizer.as_deref())?;
    let tok = tok.with_context(|| {
        format!(
            "{} has no tokenizer (give one with --tokenizer: a tokenizer.json or a llama2.c tokenizer file)",
            args.model
        )
    })?;
    let (ids, text, rendered) = if let Some(ids) = &args.ids {
        let ids = ids
            .split_whitespace()
            .map(|s| {
                s.parse::<u32>()
                    .with_context(|| format!("--ids: {s:?} is not a token id"))
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= model.config.vocab_size) {
            bail!(
                "--ids: {bad} is not below the vocabulary size {}",
                model.config.vocab_size
            );
        }
        let text = tok.decode(&ids)?;
        (ids, text, None)
    } else if let Some(m) = &args.messages {
        let messages: Vec<Message> =
            serde_json::from_str(m).context("--messages is not a list of {role, content}")?;
        let messages: Vec<(String, String)> =
            messages.into_iter().map(|m| (m.role, m.content)).collect();
        let rendered = tok.chat_messages(&messages)?;
        (
            tok.encode_chat(&rendered)?,
            rendered.clone(),
            Some(rendered),
        )
    } else if let Some(t) = &args.text {
        if args.chat {
            let rendered = tok.chat(t)?;
            (tok.encode_chat(&rendered)?, t.clone(), Some(rendered))
        } else {
            (tok.encode(t)?, t.clone(), None)
        }
    } else {
        bail!("give --text TEXT, --messages JSON or --ids IDS");
    };
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ids": ids,
                "text": text,
                "rendered": rendered,
                "tokenizer": tok.kind,
                "tokenizer_digest": tok.digest.to_string(),
                "model_digest": model.digest.to_string(),
            })
        );
    } else {
        if let Some(r) = &rendered {
            eprintln!("{r}");
        }
        if args.ids.is_some() {
            println!("{text}");
        } else {
            println!(
                "{}",
                ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" ")
            );
        }
        eprintln!(
            "{} tokens; tokenizer ({}) {}",
            ids.len(),
            tok.kind,
            tok.digest
        );
    }
    Ok(())
}
