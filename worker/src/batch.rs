//! The batch file: JSON Lines, one job per line (docs/PROTOCOL.md, "Batch
//! file").
//!
//! ```text
//! {"id": "job-1", "op": "matmul", "params": {},
//!  "inputs": [{"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
//!             {"file": "ops.safetensors", "tensor": "b"}]}
//! ```
//! `params` may be left out when the op has none. The matmul shorthand of
//! protocol 1, `{"id": …, "kind": "matmul", "a": <tensor>, "b": <tensor>}`,
//! is still accepted.
//!
//! A tensor is `data` (JSON numbers), `inline` (base64 of little-endian f32),
//! `file` + `tensor` (a safetensors file, relative to the batch file), or
//! `object` (a digest already in the object store), each with `shape` (except
//! `file`, whose shape is read from the file).
//!
//! A generate job names a model file (or name) and gives its prompt as text,
//! as a chat, or as ids; the coordinator loads the model, tokenizes with the
//! model's own tokenizer (so every worker gets the same ids, and the job
//! binds the tokenizer's digest), and pushes the model to the model store:
//! ```text
//! {"id": "g1", "op": "generate", "model": "smollm2", "prompt": "The capital of France is",
//!  "max_tokens": 16}
//! {"id": "g2", "op": "generate", "model": "smollm2", "messages": [{"role": "user", "content": "Hi"}],
//!  "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "seed": 7}
//! {"id": "g3", "op": "generate", "model": "stories260K", "prompt_ids": [1, 403, 407], "max_tokens": 32}
//! ```
//! Text and chat prompts stop at the model's end-of-text id unless `stop`
//! gives the ids.

use std::path::Path;

use anyhow::{bail, Context, Result};
use lockstep_kernels::contract::{elements, short_shape};
use lockstep_kernels::{Digest, Matmul, Op};
use serde::Deserialize;

use crate::protocol::{quote, shorten, valid_token};

/// One line as written: the general form (`op`, `params`, `inputs`) or the
/// matmul shorthand (`kind`, `a`, `b`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    #[serde(default)]
    op: Option<String>,
    #[serde(default)]
    params: Option<serde_json::Value>,
    #[serde(default)]
    inputs: Option<Vec<TensorSource>>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    a: Option<TensorSource>,
    #[serde(default)]
    b: Option<TensorSource>,
    // generate: the model and the prompt (one of prompt, messages,
    // prompt_ids), and the sampling.
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt_ids: Option<Vec<u32>>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_k: Option<usize>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Vec<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorSource {
    #[serde(default)]
    shape: Option<Vec<usize>>,
    /// JSON numbers, read as f64 and checked to fit f32 (see [`to_f32`]).
    #[serde(default)]
    data: Option<Vec<f64>>,
    #[serde(default)]
    inline: Option<String>,
    #[serde(default)]
    file: Option<String>,
    #[serde(default)]
    tensor: Option<String>,
    #[serde(default)]
    object: Option<String>,
}

/// A tensor of a job, resolved to data or to a stored object.
#[derive(Clone, Debug)]
pub enum Tensor {
    Data { shape: Vec<usize>, data: Vec<f32> },
    Object { shape: Vec<usize>, digest: Digest },
}

impl Tensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            Tensor::Data { shape, .. } | Tensor::Object { shape, .. } => shape,
        }
    }
}

/// One job of a batch: an op and its inputs, already checked against the
/// op's contract module (counts, ranks, shapes that agree).
#[derive(Clone, Debug)]
pub struct BatchJob {
    pub id: String,
    pub op: Op,
    pub inputs: Vec<Tensor>,
    /// For a generate job made from a model file: the file, which the
    /// coordinator pushes to the model store before dispatching.
    pub model_file: Option<std::path::PathBuf>,
}

impl BatchJob {
    /// `c = a·b`.
    pub fn matmul(id: impl Into<String>, a: Tensor, b: Tensor) -> Self {
        Self {
            id: id.into(),
            op: Op::Matmul(Matmul {}),
            inputs: vec![a, b],
            model_file: None,
        }
    }
}

/// Parses a whole batch file; any bad line is an error naming the line, and
/// nothing is dispatched.
pub fn parse_batch(path: &Path) -> Result<Vec<BatchJob>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read batch file {}",
            shorten(&path.display().to_string(), 120)
        )
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_batch_str(&text, base).with_context(|| {
        format!(
            "in batch file {}",
            shorten(&path.display().to_string(), 120)
        )
    })
}

pub fn parse_batch_str(text: &str, base: &Path) -> Result<Vec<BatchJob>> {
    let mut jobs = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let job = parse_line(line, base).with_context(|| format!("line {}", i + 1))?;
        if !seen.insert(job.id.clone()) {
            bail!("line {}: job id `{}` appears twice", i + 1, job.id);
        }
        jobs.push(job);
    }
    if jobs.is_empty() {
        bail!("the batch has no jobs");
    }
    Ok(jobs)
}

/// The op a line names, with its parameters.
fn parse_op(name: &str, params: Option<serde_json::Value>) -> Result<Op> {
    if !Op::NAMES.contains(&name) {
        bail!(
            "unknown op {} (known: {})",
            quote(name),
            Op::NAMES.join(", ")
        );
    }
    let params = params.unwrap_or_else(|| serde_json::json!({}));
    serde_json::from_value(serde_json::json!({"op": name, "params": params}))
        .map_err(|e| anyhow::anyhow!("bad params for {name}: {}", shorten(&e.to_string(), 160)))
}

fn parse_line(line: &str, base: &Path) -> Result<BatchJob> {
    let l: Line = serde_json::from_str(line)
        .map_err(|e| anyhow::anyhow!("not a valid job line: {}", shorten(&e.to_string(), 160)))?;
    if !valid_token(&l.id) {
        bail!(
            "job id {} must be 1-64 characters of A-Z a-z 0-9 _ -",
            quote(&l.id)
        );
    }
    if l.model.is_some() {
        let id = l.id.clone();
        return generate_line(l).with_context(|| format!("job `{id}`"));
    }
    let generate_fields = [
        l.prompt.is_some(),
        l.messages.is_some(),
        l.prompt_ids.is_some(),
        l.max_tokens.is_some(),
        l.temperature.is_some(),
        l.top_k.is_some(),
        l.top_p.is_some(),
        l.seed.is_some(),
        l.stop.is_some(),
    ];
    if generate_fields.iter().any(|&g| g) {
        bail!(
            "job `{}`: prompt, messages, prompt_ids and the sampling fields belong to a generate job with `model`",
            l.id
        );
    }
    let (op, sources) = match (l.op, l.kind) {
        (Some(_), Some(_)) => bail!("job `{}`: give `op` or `kind`, not both", l.id),
        (Some(name), None) => {
            if l.a.is_some() || l.b.is_some() {
                bail!(
                    "job `{}`: with `op`, inputs go in `inputs`, not `a`/`b`",
                    l.id
                );
            }
            let op = parse_op(&name, l.params).with_context(|| format!("job `{}`", l.id))?;
            (op, l.inputs.unwrap_or_default())
        }
        (None, Some(kind)) => {
            if kind != Matmul::NAME {
                bail!(
                    "job `{}`: unknown kind {} (the `kind` shorthand is for matmul; other ops use `op` and `inputs`)",
                    l.id,
                    quote(&kind)
                );
            }
            if l.inputs.is_some() || l.params.is_some() {
                bail!(
                    "job `{}`: the `kind` shorthand takes `a` and `b` only",
                    l.id
                );
            }
            let (Some(a), Some(b)) = (l.a, l.b) else {
                bail!("job `{}`: matmul needs `a` and `b`", l.id);
            };
            (Op::Matmul(Matmul {}), vec![a, b])
        }
        (None, None) => bail!("job `{}`: no `op` (known: {})", l.id, Op::NAMES.join(", ")),
    };
    let names = op.input_names();
    let mut inputs = Vec::with_capacity(sources.len());
    for (i, src) in sources.iter().enumerate() {
        let name = names.get(i).copied().unwrap_or("extra");
        inputs.push(tensor(src, base).with_context(|| format!("job `{}`, input {name}", l.id))?);
    }
    let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape()).collect();
    op.plan(&shapes)
        .map_err(|e| anyhow::anyhow!("job `{}`: {e}", l.id))?;
    Ok(BatchJob {
        id: l.id,
        op,
        inputs,
        model_file: None,
    })
}

/// A generate line: the model loaded (for its digest, tokenizer, context
/// and vocabulary), the prompt turned into ids, everything checked.
fn generate_line(l: Line) -> Result<BatchJob> {
    use lockstep_kernels::contract::Generate;
    if l.op.as_deref().is_some_and(|o| o != Generate::NAME) || l.kind.is_some() {
        bail!("`model` belongs to `\"op\": \"generate\"`");
    }
    if l.params.is_some() || l.inputs.is_some() || l.a.is_some() || l.b.is_some() {
        bail!("a generate line with `model` takes no params, inputs, a or b");
    }
    let spec = l.model.as_deref().expect("checked by the caller");
    let local = crate::llm::distribute::LocalModel::load_shared(spec)?;
    let given = [
        l.prompt.is_some(),
        l.messages.is_some(),
        l.prompt_ids.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() != 1 {
        bail!("give exactly one of prompt (text), messages (chat) and prompt_ids");
    }
    let tok = || {
        local.tokenizer.as_ref().with_context(|| {
            format!("model {spec} has no tokenizer: give the prompt as prompt_ids")
        })
    };
    let (ids, tokenizer) = if let Some(ids) = l.prompt_ids {
        (ids, None)
    } else if let Some(text) = &l.prompt {
        let t = tok()?;
        (t.encode(text)?, Some(t))
    } else {
        let t = tok()?;
        let messages: Vec<(String, String)> = l
            .messages
            .unwrap_or_default()
            .into_iter()
            .map(|m| (m.role, m.content))
            .collect();
        (t.encode_chat(&t.chat_messages(&messages)?)?, Some(t))
    };
    // Unless the line says, a generation stops where the model's files say
    // (its tokenizer's end of text, its configuration's eos_token_id).
    let stop = match l.stop {
        Some(s) => s,
        None => {
            let mut s = local.model.end_ids.clone();
            s.extend(local.tokenizer.as_ref().and_then(|t| t.eos));
            s.sort_unstable();
            s.dedup();
            s
        }
    };
    let op = Generate {
        model: local.model.digest,
        tokenizer: tokenizer.map(|t| t.digest),
        max_tokens: l.max_tokens.context("`max_tokens` is required")?,
        stop,
        temperature: l.temperature.unwrap_or(0.0),
        top_k: l.top_k.unwrap_or(0),
        top_p: l.top_p.unwrap_or(1.0),
        seed: l.seed.unwrap_or(0),
    };
    let prompt = Tensor::Data {
        shape: vec![ids.len()],
        data: ids.iter().map(|&t| t as f32).collect(),
    };
    op.plan(&[prompt.shape()])
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    lockstep_kernels::model::generate::check(&local.model, &ids, &op)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(BatchJob {
        id: l.id,
        op: Op::Generate(op),
        inputs: vec![prompt],
        model_file: Some(local.path.clone()),
    })
}

fn tensor(s: &TensorSource, base: &Path) -> Result<Tensor> {
    let given = [
        s.data.is_some(),
        s.inline.is_some(),
        s.file.is_some(),
        s.object.is_some(),
    ];
    if given.iter().filter(|&&g| g).count() != 1 {
        bail!("give exactly one of data, inline, file, object");
    }
    if let Some(file) = &s.file {
        let name = s
            .tensor
            .as_deref()
            .context("`file` needs `tensor` (the tensor's name in the file)")?;
        let (shape, data) = crate::tensors::read_f32_tensor(&base.join(file), name)?;
        return Ok(Tensor::Data { shape, data });
    }
    let shape = s.shape.clone().context("`shape` is required")?;
    let n = elements(&shape).map_err(|e| anyhow::anyhow!(e.message))?;
    if let Some(d) = &s.object {
        let digest =
            Digest::parse(d).with_context(|| format!("{} is not a sha3-256 digest", quote(d)))?;
        return Ok(Tensor::Object { shape, digest });
    }
    let data = match (&s.data, &s.inline) {
        (Some(d), _) => to_f32(d)?,
        (_, Some(b64)) => crate::protocol::decode_f32(b64).map_err(anyhow::Error::msg)?,
        _ => unreachable!("checked above"),
    };
    if data.len() != n {
        bail!(
            "shape {} needs {n} values, got {}",
            short_shape(&shape),
            data.len()
        );
    }
    Ok(Tensor::Data { shape, data })
}

/// JSON numbers to f32, refusing any that f32 cannot hold (they would
/// silently become ±inf or ±0): magnitudes above `f32::MAX`, and non-zero
/// ones below half the smallest subnormal.
fn to_f32(values: &[f64]) -> Result<Vec<f32>> {
    values
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let x = v as f32;
            if x.is_infinite() {
                bail!(
                    "`data` value {v:e} (index {i}) is outside f32's range (largest {:e})",
                    f32::MAX
                );
            }
            if x == 0.0 && v != 0.0 {
                bail!("`data` value {v:e} (index {i}) is too small for f32 (it would become 0)");
            }
            Ok(x)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_data_and_inline_sources() {
        let dir = tempfile::tempdir().unwrap();
        crate::tensors::write_f32(
            &dir.path().join("ops.safetensors"),
            &[("b", &[3, 1], &[1.0, 2.0, 3.0])],
        )
        .unwrap();
        let inline = crate::protocol::encode_f32(&[4.0, 5.0, 6.0]);
        let text = format!(
            "# comment\n{{\"id\":\"j1\",\"kind\":\"matmul\",\"a\":{{\"shape\":[1,3],\"data\":[1,2,3]}},\"b\":{{\"file\":\"ops.safetensors\",\"tensor\":\"b\"}}}}\n\n{{\"id\":\"j2\",\"kind\":\"matmul\",\"a\":{{\"shape\":[1,3],\"inline\":\"{inline}\"}},\"b\":{{\"file\":\"ops.safetensors\",\"tensor\":\"b\"}}}}\n"
        );
        let jobs = parse_batch_str(&text, dir.path()).unwrap();
        assert_eq!(jobs.len(), 2);
        match &jobs[0].inputs[1] {
            Tensor::Data { shape, data } => {
                assert_eq!(shape, &[3, 1]);
                assert_eq!(data, &[1.0, 2.0, 3.0]);
            }
            other => panic!("{other:?}"),
        }
        match &jobs[1].inputs[0] {
            Tensor::Data { data, .. } => assert_eq!(data, &[4.0, 5.0, 6.0]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_lines_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let missing = "{\"id\":\"j\",\"kind\":\"matmul\",\"a\":{\"shape\":[1,1],\"data\":[1]},\"b\":{\"file\":\"nope.safetensors\",\"tensor\":\"b\"}}";
        let e = format!("{:#}", parse_batch_str(missing, dir.path()).unwrap_err());
        assert!(e.contains("line 1") && e.contains("cannot read"), "{e}");
        let dup = "{\"id\":\"j\",\"kind\":\"matmul\",\"a\":{\"shape\":[1,1],\"data\":[1]},\"b\":{\"shape\":[1,1],\"data\":[1]}}";
        let e = format!(
            "{:#}",
            parse_batch_str(&format!("{dup}\n{dup}"), dir.path()).unwrap_err()
        );
        assert!(e.contains("line 2") && e.contains("twice"), "{e}");
    }

    #[test]
    fn generate_lines_are_checked_against_the_model() {
        let dir = tempfile::tempdir().unwrap();
        let ok = r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1,403],"max_tokens":8,"temperature":0.5,"seed":3}"#;
        let jobs = parse_batch_str(ok, dir.path()).unwrap();
        let Op::Generate(g) = &jobs[0].op else {
            panic!("not generate")
        };
        assert_eq!((g.max_tokens, g.seed, g.temperature), (8, 3, 0.5));
        assert!(g.tokenizer.is_none() && g.stop.is_empty());
        assert!(jobs[0].model_file.is_some());
        for (line, says) in [
            (
                r#"{"id":"g","op":"generate","model":"stories260K","max_tokens":8}"#,
                "exactly one of",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1],"prompt":"hi","max_tokens":8}"#,
                "exactly one of",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1]}"#,
                "max_tokens",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1],"max_tokens":0}"#,
                "max_tokens",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1],"max_tokens":100000}"#,
                "max_tokens",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1],"max_tokens":600}"#,
                "context",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[99999],"max_tokens":4}"#,
                "vocabulary",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt":"hi","max_tokens":4}"#,
                "no tokenizer",
            ),
            (
                r#"{"id":"g","op":"generate","model":"no-such-model","prompt_ids":[1],"max_tokens":4}"#,
                "no model file",
            ),
            (
                r#"{"id":"g","op":"generate","model":"stories260K","prompt_ids":[1],"max_tokens":4,"top_p":0}"#,
                "top_p",
            ),
            (
                r#"{"id":"g","op":"matmul","prompt":"hi","inputs":[]}"#,
                "belong to a generate job",
            ),
        ] {
            let e = format!("{:#}", parse_batch_str(line, dir.path()).unwrap_err());
            assert!(e.contains(says), "{line}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn general_form_and_shorthand_give_the_same_job() {
        let dir = tempfile::tempdir().unwrap();
        let general = r#"{"id":"g","op":"matmul","params":{},"inputs":[{"shape":[1,2],"data":[1,2]},{"shape":[2,1],"data":[3,4]}]}"#;
        let no_params = r#"{"id":"n","op":"matmul","inputs":[{"shape":[1,2],"data":[1,2]},{"shape":[2,1],"data":[3,4]}]}"#;
        let short = r#"{"id":"s","kind":"matmul","a":{"shape":[1,2],"data":[1,2]},"b":{"shape":[2,1],"data":[3,4]}}"#;
        let jobs =
            parse_batch_str(&format!("{general}\n{no_params}\n{short}"), dir.path()).unwrap();
        assert_eq!(jobs.len(), 3);
        for j in &jobs {
            assert_eq!(j.op, Op::Matmul(Matmul {}));
            let shapes: Vec<&[usize]> = j.inputs.iter().map(|t| t.shape()).collect();
            assert_eq!(shapes, vec![&[1usize, 2][..], &[2, 1][..]]);
        }
    }

    #[test]
    fn ops_are_checked_against_their_contract_module() {
        let dir = tempfile::tempdir().unwrap();
        let err = |line: &str| format!("{:#}", parse_batch_str(line, dir.path()).unwrap_err());
        let e = err(r#"{"id":"x","op":"conv3d","inputs":[]}"#);
        assert!(
            e.contains("unknown op `conv3d`") && e.contains("matmul"),
            "{e}"
        );
        let e = err(r#"{"id":"x","op":"matmul","params":{"alpha":2},"inputs":[]}"#);
        assert!(e.contains("bad params"), "{e}");
        let e = err(r#"{"id":"x","op":"matmul","inputs":[{"shape":[1,2],"data":[1,2]}]}"#);
        assert!(e.contains("takes 2 inputs"), "{e}");
        let e = err(
            r#"{"id":"x","op":"matmul","inputs":[{"shape":[1,2],"data":[1,2]},{"shape":[3,1],"data":[1,2,3]}]}"#,
        );
        assert!(e.contains("columns must equal"), "{e}");
        let e = err(r#"{"id":"x","kind":"matmul","op":"matmul","a":{"shape":[1,1],"data":[1]}}"#);
        assert!(e.contains("not both"), "{e}");
        let e = err(r#"{"id":"x","kind":"softmax","a":{"shape":[1,1],"data":[1]}}"#);
        assert!(e.contains("unknown kind"), "{e}");
    }
}
