//! Chat templates: the Jinja template a model ships (GGUF
//! `tokenizer.chat_template`, Hugging Face `tokenizer_config.json`'s
//! `chat_template`), rendered as transformers' `apply_chat_template` renders
//! it: Jinja2 with `trim_blocks` and `lstrip_blocks`, loop controls,
//! Python's string and dict methods, `raise_exception`, and the variables
//! `messages`, `add_generation_prompt` and the special tokens' text. The
//! tests check the output against Jinja2 itself.

use anyhow::{anyhow, Result};
use minijinja::{Environment, Error, ErrorKind};

/// The special tokens' text a template may name.
#[derive(Default, Clone)]
pub struct Specials {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

/// The conversation `messages` (role, content) in `template`, with the
/// assistant's turn opened when `add_generation_prompt`.
pub fn render(
    template: &str,
    messages: &[(String, String)],
    specials: &Specials,
    add_generation_prompt: bool,
) -> Result<String> {
    let mut env = Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters"),
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<String, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_template("chat", template)
        .map_err(|e| anyhow!("the chat template does not parse: {e:#}"))?;
    let messages: Vec<minijinja::Value> = messages
        .iter()
        .map(|(role, content)| {
            minijinja::Value::from(std::collections::BTreeMap::from([
                ("role".to_string(), role.clone()),
                ("content".to_string(), content.clone()),
            ]))
        })
        .collect();
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => specials.bos_token.as_deref().unwrap_or(""),
        eos_token => specials.eos_token.as_deref().unwrap_or(""),
        unk_token => specials.unk_token.as_deref().unwrap_or(""),
        pad_token => specials.pad_token.as_deref().unwrap_or(""),
    };
    env.get_template("chat")
        .expect("added above")
        .render(ctx)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidOperation => anyhow!(
                "the chat template refuses: {}",
                e.detail().unwrap_or("no reason given")
            ),
            _ => anyhow!("the chat template fails: {e:#}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_with_trimmed_blocks_python_methods_and_refusals() {
        let t = "{% for m in messages %}\n  {{ bos_token }}{{ m['role'].upper() }}: {{ m.content.strip() }}\n{% endfor %}\n{% if add_generation_prompt %}A:{% endif %}";
        let msgs = vec![("user".to_string(), "  hi ".to_string())];
        let s = Specials {
            bos_token: Some("<s>".into()),
            ..Default::default()
        };
        assert_eq!(render(t, &msgs, &s, true).unwrap(), "  <s>USER: hi\nA:");
        assert_eq!(render(t, &msgs, &s, false).unwrap(), "  <s>USER: hi\n");
        let refuse = "{{ raise_exception('only user turns') }}";
        let e = render(refuse, &msgs, &s, true).unwrap_err().to_string();
        assert!(e.contains("only user turns"), "{e}");
        assert!(render("{% for %}", &msgs, &s, true).is_err());
    }
}
