//! The batch file: JSON Lines, one job per line (docs/PROTOCOL.md §Batch).
//!
//! ```text
//! {"id": "job-1", "kind": "matmul", "a": {"shape": [2, 3], "data": [1, 2, 3, 4, 5, 6]},
//!                                  "b": {"file": "ops.safetensors", "tensor": "b"}}
//! ```
//! A tensor is `data` (JSON numbers), `inline` (base64 of little-endian f32),
//! `file` + `tensor` (a safetensors file, relative to the batch file), or
//! `object` (a digest already in the object store), each with `shape` (except
//! `file`, whose shape is read from the file).

use std::path::Path;

use anyhow::{bail, Context, Result};
use lockstep_kernels::Digest;
use serde::Deserialize;

use crate::protocol::valid_token;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    kind: String,
    a: TensorSource,
    b: TensorSource,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TensorSource {
    #[serde(default)]
    shape: Option<Vec<usize>>,
    #[serde(default)]
    data: Option<Vec<f32>>,
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

#[derive(Clone, Debug)]
pub struct BatchJob {
    pub id: String,
    pub a: Tensor,
    pub b: Tensor,
}

/// Parses a whole batch file; any bad line is an error naming the line, and
/// nothing is dispatched.
pub fn parse_batch(path: &Path) -> Result<Vec<BatchJob>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read batch file {}", path.display()))?;
    let base = path.parent().unwrap_or(Path::new("."));
    parse_batch_str(&text, base).with_context(|| format!("in batch file {}", path.display()))
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

fn parse_line(line: &str, base: &Path) -> Result<BatchJob> {
    let l: Line = serde_json::from_str(line).context("not a valid job line")?;
    if !valid_token(&l.id) {
        bail!(
            "job id `{}` must be 1-64 characters of A-Z a-z 0-9 _ -",
            l.id
        );
    }
    if l.kind != "matmul" {
        bail!("job `{}`: unknown kind `{}` (known: matmul)", l.id, l.kind);
    }
    let a = tensor(&l.a, base).with_context(|| format!("job `{}`, tensor a", l.id))?;
    let b = tensor(&l.b, base).with_context(|| format!("job `{}`, tensor b", l.id))?;
    if a.shape().len() != 2 || b.shape().len() != 2 || a.shape()[1] != b.shape()[0] {
        bail!(
            "job `{}`: a {:?} and b {:?} are not multipliable matrices",
            l.id,
            a.shape(),
            b.shape()
        );
    }
    Ok(BatchJob { id: l.id, a, b })
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
    let n: usize = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .context("shape overflows")?;
    if let Some(d) = &s.object {
        let digest = Digest::parse(d).with_context(|| format!("`{d}` is not a sha3-256 digest"))?;
        return Ok(Tensor::Object { shape, digest });
    }
    let data = match (&s.data, &s.inline) {
        (Some(d), _) => d.clone(),
        (_, Some(b64)) => crate::protocol::decode_f32(b64).map_err(anyhow::Error::msg)?,
        _ => unreachable!("checked above"),
    };
    if data.len() != n {
        bail!("shape {shape:?} needs {n} values, got {}", data.len());
    }
    Ok(Tensor::Data { shape, data })
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
        match &jobs[0].b {
            Tensor::Data { shape, data } => {
                assert_eq!(shape, &[3, 1]);
                assert_eq!(data, &[1.0, 2.0, 3.0]);
            }
            other => panic!("{other:?}"),
        }
        match &jobs[1].a {
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
}
