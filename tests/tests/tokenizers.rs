//! Tokenizers and chat templates against independent references:
//! llama2.c tokenizer files (SentencePiece BPE) against the `sentencepiece`
//! package itself, chat templates against Jinja2 rendering them as
//! transformers does, and Hugging Face tokenizer.json folders against the
//! model's own token ids. Everything through `lockstep tokenize` and
//! `lockstep generate`, as a user runs them.

use std::path::{Path, PathBuf};
use std::process::Command;

use lockstep_tests::lockstep_bin;
use lockstep_tests::models::{shared_model, smollm2};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// The pinned Python wheels (`./dev` fetches jinja2 and sentencepiece into
/// .tools/py); `LOCKSTEP_REQUIRE_PYTHON=1` makes their absence a failure.
fn python_path() -> Option<String> {
    match std::env::var("LOCKSTEP_PYTHONPATH") {
        Ok(p)
            if Path::new(&p).join("sentencepiece").is_dir()
                && Path::new(&p).join("jinja2").is_dir() =>
        {
            Some(p)
        }
        _ => {
            assert!(
                std::env::var_os("LOCKSTEP_REQUIRE_PYTHON").is_none(),
                "LOCKSTEP_REQUIRE_PYTHON is set but LOCKSTEP_PYTHONPATH lacks sentencepiece or jinja2"
            );
            eprintln!(
                "SKIPPED: no sentencepiece / jinja2 (./dev setup fetches them into .tools/py)"
            );
            None
        }
    }
}

fn reference(py: &str, args: &[&str]) -> Value {
    let script = lockstep_tests::models::repo_root().join("tests/python/tokenizer_ref.py");
    let o = Command::new("python3")
        .arg(script)
        .args(args)
        .env("PYTHONPATH", py)
        .output()
        .expect("run python3");
    assert!(
        o.status.success(),
        "tokenizer_ref.py {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn lockstep(args: &[&str]) -> Result<Value, String> {
    let o = Command::new(lockstep_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!err.contains("panicked"), "{err}");
    if !o.status.success() {
        return Err(err);
    }
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    Ok(serde_json::from_str(out.lines().last().unwrap_or("null")).unwrap_or(Value::String(out)))
}

fn lockstep_out(args: &[&str]) -> String {
    let o = Command::new(lockstep_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "lockstep {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

fn ids(v: &Value) -> Vec<u64> {
    v["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect()
}

/// Texts for the SentencePiece comparison: fixed edge cases, then random
/// strings of the vocabulary's pieces, ASCII, spaces and characters no
/// piece holds (byte fallback).
fn texts(tokenizer: &Path) -> Vec<String> {
    let mut t: Vec<String> = [
        "I dreamed of a blue house",
        "Hello world",
        "  two  spaces ",
        " leading space",
        "trailing space ",
        "café naïve",
        "日本語のテキスト",
        "emoji 🎉 here",
        "line\nbreak\ttab\r\n",
        "12345 678.9 -0",
        "a",
        " ",
        "   ",
        "<s> is not a token here",
        "The quick brown fox jumps over the lazy dog.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // The pieces of the file (spaces as stored).
    let bytes = std::fs::read(tokenizer).unwrap();
    let mut pieces = Vec::new();
    let mut at = 4;
    while at < bytes.len() {
        let n = i32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let p = String::from_utf8(bytes[at + 8..at + 8 + n].to_vec()).unwrap();
        if !p.starts_with("<0x") && !p.contains('<') {
            pieces.push(p);
        }
        at += 8 + n;
    }
    let extra = [
        "é", "ß", "€", "ж", "😀", "\u{2581}", "  ", "\t", "0", "x", "Q",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(19);
    for _ in 0..60 {
        let mut s = String::new();
        for _ in 0..rng.random_range(1..12) {
            if rng.random_range(0..4) == 0 {
                s.push_str(extra[rng.random_range(0..extra.len())]);
            } else {
                s.push_str(&pieces[rng.random_range(0..pieces.len())]);
            }
        }
        t.push(s);
    }
    t
}

#[test]
fn llama2c_tokenizer_files_encode_as_sentencepiece_does() {
    let Some(py) = python_path() else { return };
    let tok = shared_model("aidreams260K-tok512.bin");
    let texts = texts(&tok);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("texts.json");
    std::fs::write(&file, serde_json::to_string(&texts).unwrap()).unwrap();
    let want = reference(
        &py,
        &["spm", tok.to_str().unwrap(), "512", file.to_str().unwrap()],
    );
    let mut digests = std::collections::BTreeSet::new();
    for (text, want) in texts.iter().zip(want.as_array().unwrap()) {
        // The model finds its tokenizer beside it (aidreams260K-tok512.bin).
        let got = lockstep(&[
            "tokenize",
            "--model",
            "aidreams260K",
            "--text",
            text,
            "--json",
        ])
        .unwrap();
        let got_ids = ids(&got);
        let want: Vec<u64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        assert_eq!(got_ids[0], 1, "BOS first: {text:?}");
        assert_eq!(got_ids[1..], want[..], "{text:?}");
        assert_eq!(got["tokenizer"], "llama2c");
        digests.insert(got["tokenizer_digest"].as_str().unwrap().to_string());
        // And back: the text, the prefix space dropped after BOS.
        let list = got_ids
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let back = lockstep_out(&["tokenize", "--model", "aidreams260K", "--ids", &list]);
        // (A `▁` in the text is a space to SentencePiece, both ways.)
        let text_back = text.replace('\u{2581}', " ");
        assert_eq!(back.strip_suffix('\n'), Some(text_back.as_str()), "{list}");
    }
    assert_eq!(digests.len(), 1, "one tokenizer, one digest");
    // A text prompt now works for the llama2.c model, and --tokenizer names
    // the file explicitly (same ids).
    let g = lockstep(&[
        "generate",
        "--model",
        "aidreams260K",
        "--prompt",
        "I dreamed of",
        "--max-tokens",
        "6",
        "--json",
    ])
    .unwrap();
    let t = lockstep(&[
        "tokenize",
        "--model",
        "aidreams260K",
        "--text",
        "I dreamed of",
        "--json",
    ])
    .unwrap();
    assert_eq!(g["prompt_tokens"], t["ids"]);
    assert!(g["text"].as_str().is_some_and(|s| !s.is_empty()), "{g}");
    let stories = shared_model("stories260K.bin");
    let explicit = lockstep(&[
        "tokenize",
        "--model",
        stories.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--text",
        "I dreamed of",
        "--json",
    ])
    .unwrap();
    assert_eq!(explicit["ids"], t["ids"]);
    // stories260K has no tokenizer beside it.
    let e = lockstep(&["tokenize", "--model", "stories260K", "--text", "x"]).unwrap_err();
    assert!(e.contains("has no tokenizer"), "{e}");
    // A tokenizer file of another size is refused with a clear message.
    let cut = dir.path().join("cut-tok.bin");
    let bytes = std::fs::read(&tok).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
    let e = lockstep(&[
        "tokenize",
        "--model",
        "aidreams260K",
        "--tokenizer",
        cut.to_str().unwrap(),
        "--text",
        "x",
    ])
    .unwrap_err();
    assert!(e.contains("not a llama2.c tokenizer of 512 tokens"), "{e}");
}

/// GPT-2's byte → character map (the byte-level alphabet).
fn byte_chars() -> Vec<char> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut map = vec!['\0'; 256];
    for (b, c) in bs.iter().zip(cs) {
        map[*b as usize] = char::from_u32(c).unwrap();
    }
    map
}

/// A tokenizer.json of a byte-level BPE without merges (id = the byte)
/// plus `<s>` (256) and `</s>` (257), whose post-processor puts `<s>`
/// first, and a tokenizer_config.json with `template`.
fn write_byte_tokenizer(dir: &Path, template: &str) -> PathBuf {
    let vocab: serde_json::Map<String, Value> = byte_chars()
        .iter()
        .enumerate()
        .map(|(i, c)| (c.to_string(), json!(i)))
        .collect();
    let special = |id: u32, s: &str| json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(256, "<s>"), special(257, "</s>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<s>": {"id": "<s>", "ids": [256], "tokens": ["<s>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tj.to_string()).unwrap();
    let config = json!({"bos_token": "<s>", "eos_token": {"content": "</s>", "special": true}, "chat_template": template});
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
    dir.join("tokenizer.json")
}

/// Chat templates as models ship them (SmolLM2's ChatML, Llama 2, Llama 3,
/// Mistral, Zephyr's multi-line form), one of jinja's corners, and Llama
/// 3.1's opening (a default date, `tools` passed as None).
const TEMPLATES: &[&str] = &[
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}",
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}",
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}",
    "{{- bos_token }}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n{%- for message in messages %}\n    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n",
    "{%- set ns = namespace(n=0) -%}\n  {%- for m in messages -%}\n    {%- if m.content.startswith('#') %}{% continue %}{% endif -%}\n    {%- set ns.n = ns.n + 1 -%}\n    [{{ ns.n }}/{{ messages|length }}] {{ m.role|upper }}: {{ m.content.split(' ')|join('_') }}{{ '\\n' if not loop.last }}\n  {%- endfor %}\n{{ messages[-1]['content']|tojson }}",
];

#[test]
fn chat_templates_render_as_jinja2_does() {
    let Some(py) = python_path() else { return };
    let conversations = [
        json!([{"role": "user", "content": "What is the capital of France?"}]),
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi there  "}]),
        json!([{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"}, {"role": "user", "content": "# skip me \"quoted\" é"}]),
        // Not alternating: Llama 2 and Mistral refuse.
        json!([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
    ];
    let dir = tempfile::tempdir().unwrap();
    let mut cases = Vec::new();
    for t in TEMPLATES {
        for c in &conversations {
            cases.push(
                json!({"template": t, "messages": c, "bos_token": "<s>", "eos_token": "</s>"}),
            );
        }
    }
    let file = dir.path().join("cases.json");
    std::fs::write(&file, serde_json::to_string(&cases).unwrap()).unwrap();
    let want = reference(&py, &["jinja", file.to_str().unwrap()]);
    let (mut rendered, mut refused) = (0, 0);
    for (case, want) in cases.iter().zip(want.as_array().unwrap()) {
        let sub = tempfile::tempdir_in(dir.path()).unwrap();
        let tj = write_byte_tokenizer(sub.path(), case["template"].as_str().unwrap());
        let got = lockstep(&[
            "tokenize",
            "--model",
            "aidreams260K",
            "--tokenizer",
            tj.to_str().unwrap(),
            "--messages",
            &case["messages"].to_string(),
            "--json",
        ]);
        match (want, got) {
            (Value::String(w), Ok(g)) => {
                assert_eq!(g["rendered"].as_str().unwrap(), w, "{case}");
                // The rendered text's ids: its bytes, `<s>`/`</s>` written
                // in it as those tokens, nothing added (the template wrote
                // what the model wants).
                let mut want_ids = Vec::new();
                let mut rest = w.as_str();
                while !rest.is_empty() {
                    if let Some(r) = rest.strip_prefix("<s>") {
                        want_ids.push(256);
                        rest = r;
                    } else if let Some(r) = rest.strip_prefix("</s>") {
                        want_ids.push(257);
                        rest = r;
                    } else {
                        let c = rest.chars().next().unwrap();
                        want_ids.extend(c.to_string().bytes().map(u64::from));
                        rest = &rest[c.len_utf8()..];
                    }
                }
                assert_eq!(ids(&g), want_ids, "{case}");
                rendered += 1;
            }
            (Value::Object(w), Err(e)) => {
                let msg = w["error"].as_str().unwrap();
                assert!(e.contains(msg), "{case}: {e} (Jinja2: {msg})");
                refused += 1;
            }
            (w, g) => panic!("{case}: Jinja2 gives {w}, lockstep {g:?}"),
        }
    }
    assert!(
        rendered >= 18 && refused >= 2,
        "{rendered} rendered, {refused} refused"
    );
}

/// A Hugging Face folder of aidreams260K's weights with a byte-level
/// tokenizer.json: `--prompt` and `--chat` work on the folder itself.
#[test]
fn a_hugging_face_folder_reads_its_tokenizer_json() {
    let model = lockstep_kernels::model::Model::load(&shared_model("aidreams260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    lockstep_tests::models::write_hf(&model, dir.path());
    let d = dir.path().to_str().unwrap();
    let e = lockstep(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
    ])
    .unwrap_err();
    assert!(e.contains("has no tokenizer"), "{e}");
    write_byte_tokenizer(dir.path(), TEMPLATES[4]);
    let g = lockstep(&[
        "generate",
        "--model",
        d,
        "--prompt",
        "hi é",
        "--max-tokens",
        "3",
        "--json",
    ])
    .unwrap();
    // The post-processor's <s>, then the bytes.
    assert_eq!(
        g["prompt_tokens"],
        json!([256, 104, 105, 32, 195, 169]),
        "{g}"
    );
    let t = lockstep(&["tokenize", "--model", d, "--text", "hi", "--json"]).unwrap();
    assert_eq!(t["tokenizer"], "hf");
    assert_eq!(
        t["model_digest"].as_str(),
        Some(model.digest.to_string().as_str())
    );
    let c = lockstep(&[
        "generate",
        "--model",
        d,
        "--chat",
        "--prompt",
        "hi",
        "--max-tokens",
        "2",
        "--json",
    ])
    .unwrap();
    let want: Vec<u64> = "<|user|>\nhi"
        .bytes()
        .map(u64::from)
        .chain([257])
        .chain("\n<|assistant|>\n".bytes().map(u64::from))
        .collect();
    assert_eq!(c["prompt_tokens"], json!(want), "{c}");
    // The digest binds both files: another template, another digest.
    write_byte_tokenizer(dir.path(), TEMPLATES[0]);
    let t2 = lockstep(&["tokenize", "--model", d, "--text", "hi", "--json"]).unwrap();
    assert_eq!(t2["ids"], t["ids"]);
    assert_ne!(t2["tokenizer_digest"], t["tokenizer_digest"]);
    // A broken tokenizer.json, or a special token it lacks, is a clear error.
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}").unwrap();
    let e = lockstep(&["tokenize", "--model", d, "--text", "hi"]).unwrap_err();
    assert!(e.contains("tokenizer.json"), "{e}");
    write_byte_tokenizer(dir.path(), TEMPLATES[0]);
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        json!({"eos_token": "<|nope|>"}).to_string(),
    )
    .unwrap();
    let e = lockstep(&["tokenize", "--model", d, "--text", "hi"]).unwrap_err();
    assert!(
        e.contains("<|nope|>") && e.contains("not in tokenizer.json"),
        "{e}"
    );
}

/// SmolLM2's tokenizer written as its Hugging Face tokenizer.json (the
/// GGUF's vocabulary and merges, its digit-splitting byte-level
/// pre-tokenizer, its control tokens) gives the model's own ids.
#[test]
fn smollm2s_tokenizer_json_gives_the_same_ids_as_its_gguf() {
    let Some(path) = smollm2() else { return };
    use lockstep_kernels::model::gguf::{Gguf, Value as G};
    let g = Gguf::open(&path).unwrap();
    let strings = |k: &str| -> Vec<String> {
        g.get(k)
            .and_then(G::as_array)
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens");
    let merges = strings("tokenizer.ggml.merges");
    let types: Vec<u64> = g
        .get("tokenizer.ggml.token_type")
        .and_then(G::as_array)
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let vocab: serde_json::Map<String, Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), json!(i)))
        .collect();
    let added: Vec<Value> = tokens.iter().zip(&types).enumerate().filter(|(_, (_, &t))| t == 3).map(|(i, (t, _))| {
        json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true})
    }).collect();
    let tj = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    });
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), tj.to_string()).unwrap();
    let template = g
        .get("tokenizer.chat_template")
        .and_then(G::as_str)
        .unwrap();
    let config =
        json!({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tj = dir.path().join("tokenizer.json");
    let m = path.to_str().unwrap();
    let hf = lockstep(&[
        "tokenize",
        "--model",
        m,
        "--tokenizer",
        tj.to_str().unwrap(),
        "--text",
        "The capital of France is",
        "--json",
    ])
    .unwrap();
    assert_eq!(
        hf["ids"],
        json!([504, 3575, 282, 4649, 314]),
        "the model's own tokenizer.json ids"
    );
    assert_eq!(hf["tokenizer"], "hf");
    for text in [
        "The capital of France is",
        "Prices rose 12.5% in 2024 — très cher!",
        "  spaced\n\nlines\t",
    ] {
        let a = lockstep(&[
            "tokenize",
            "--model",
            m,
            "--tokenizer",
            tj.to_str().unwrap(),
            "--chat",
            "--text",
            text,
            "--json",
        ])
        .unwrap();
        let b = lockstep(&["tokenize", "--model", m, "--chat", "--text", text, "--json"]).unwrap();
        assert_eq!(a["rendered"], b["rendered"], "{text:?}");
        assert_eq!(a["ids"], b["ids"], "{text:?}");
        let a = lockstep(&[
            "tokenize",
            "--model",
            m,
            "--tokenizer",
            tj.to_str().unwrap(),
            "--text",
            text,
            "--json",
        ])
        .unwrap();
        let b = lockstep(&["tokenize", "--model", m, "--text", text, "--json"]).unwrap();
        assert_eq!(a["ids"], b["ids"], "{text:?}");
    }
}

#[test]
fn gguf_sentencepiece_vocabularies_encode_as_sentencepiece_does() {
    use lockstep_tests::models::{llama_vocabulary, write_gguf, Meta};
    let Some(py) = python_path() else { return };
    let tok = shared_model("aidreams260K-tok512.bin");
    let model = lockstep_kernels::model::Model::load(&shared_model("aidreams260K.bin")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, scores_delta: f32| {
        let (pieces, mut scores, types) = llama_vocabulary(&tok);
        scores[300] += scores_delta;
        let path = dir.path().join(name);
        write_gguf(
            &model,
            &path,
            vec![
                ("tokenizer.ggml.model", Meta::Str("llama".into())),
                ("tokenizer.ggml.tokens", Meta::Strs(pieces)),
                ("tokenizer.ggml.scores", Meta::F32s(scores)),
                ("tokenizer.ggml.token_type", Meta::I32s(types)),
                ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
                ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
                ("tokenizer.ggml.unknown_token_id", Meta::U32(0)),
                ("tokenizer.ggml.add_bos_token", Meta::Bool(true)),
                ("tokenizer.chat_template", Meta::Str(TEMPLATES[1].into())),
            ],
        );
        path
    };
    let gguf = write("aidreams-spm.gguf", 0.0);
    let g = gguf.to_str().unwrap();
    // `<s>` written in a text is BOS here (a control token of the file, as
    // llama.cpp and transformers read it), and the text after it gets the
    // space prefix again: checked below, not against plain SentencePiece.
    let mut texts: Vec<String> = texts(&tok)
        .into_iter()
        .filter(|t| !t.contains("<s>"))
        .collect();
    texts.truncate(40);
    texts.push(" is not a token here".into());
    let file = dir.path().join("texts.json");
    std::fs::write(&file, serde_json::to_string(&texts).unwrap()).unwrap();
    let want = reference(
        &py,
        &["spm", tok.to_str().unwrap(), "512", file.to_str().unwrap()],
    );
    let mut digest = None;
    for (text, want) in texts.iter().zip(want.as_array().unwrap()) {
        let got = lockstep(&["tokenize", "--model", g, "--text", text, "--json"]).unwrap();
        let want: Vec<u64> = want
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_u64().unwrap())
            .collect();
        assert_eq!(
            ids(&got)[..],
            [&[1u64][..], &want[..]].concat()[..],
            "{text:?}"
        );
        assert_eq!(got["tokenizer"], "gguf");
        // The same weights as the llama2.c file: the same model.
        assert_eq!(
            got["model_digest"].as_str(),
            Some(model.digest.to_string().as_str())
        );
        digest = Some(got["tokenizer_digest"].clone());
    }
    let special = lockstep(&[
        "tokenize",
        "--model",
        g,
        "--text",
        "<s> is not a token here",
        "--json",
    ])
    .unwrap();
    let plain = lockstep(&[
        "tokenize",
        "--model",
        g,
        "--text",
        " is not a token here",
        "--json",
    ])
    .unwrap();
    assert_eq!(
        special["ids"], plain["ids"],
        "BOS written, then the text after it"
    );
    // Llama 2's template writes `<s>`, which is BOS (not added twice), and
    // the text after it gets the space prefix again, as llama.cpp does.
    let chat = lockstep(&[
        "tokenize",
        "--model",
        g,
        "--chat",
        "--text",
        "I dreamed",
        "--json",
    ])
    .unwrap();
    assert_eq!(chat["rendered"], "<s>[INST] I dreamed [/INST]");
    std::fs::write(&file, json!(["[INST] I dreamed [/INST]"]).to_string()).unwrap();
    let want = reference(
        &py,
        &["spm", tok.to_str().unwrap(), "512", file.to_str().unwrap()],
    );
    let want: Vec<u64> = std::iter::once(1)
        .chain(
            want[0]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i.as_u64().unwrap()),
        )
        .collect();
    assert_eq!(ids(&chat), want);
    // Scores decide merges, so they are bound into the tokenizer digest.
    let other = write("aidreams-spm-2.gguf", 0.5);
    let got = lockstep(&[
        "tokenize",
        "--model",
        other.to_str().unwrap(),
        "--text",
        "x",
        "--json",
    ])
    .unwrap();
    assert_ne!(Some(got["tokenizer_digest"].clone()), digest);
    // A generation from text on the GGUF file.
    let r = lockstep(&[
        "generate",
        "--model",
        g,
        "--prompt",
        "I dreamed of",
        "--max-tokens",
        "4",
        "--json",
    ])
    .unwrap();
    assert_eq!(r["tokenizer_digest"], digest.unwrap());
}
