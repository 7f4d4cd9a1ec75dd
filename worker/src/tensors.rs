//! Tensors in safetensors files: named F32 tensors in (an op's inputs),
//! named F32 tensors out (its outputs). Every way a file can be wrong is one
//! clear error that names its cause once.

use std::path::Path;

use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::protocol::quote;

/// Everything that can be wrong with a tensor file, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("cannot read {path}: {cause}")]
    Read { path: String, cause: String },
    #[error("cannot write {path}: {cause}")]
    Write { path: String, cause: String },
    #[error("{path} is not a valid safetensors file: {detail}{hint}")]
    Format {
        path: String,
        detail: String,
        /// "; is it truncated?" where the error suggests so, else empty.
        hint: &'static str,
    },
    #[error(
        "{path} names tensor {} twice in its header; which one is meant is ambiguous",
        quote(name)
    )]
    Duplicate { path: String, name: String },
    #[error("{path} has no tensor named {} (it has: {found})", quote(name))]
    Missing {
        path: String,
        name: String,
        found: String,
    },
    #[error("tensor {} in {path} is {dtype:?}; lockstep needs F32", quote(name))]
    Dtype {
        path: String,
        name: String,
        dtype: Dtype,
    },
}

/// A tensor read from a file: its shape and its values.
pub type ShapedF32 = (Vec<usize>, Vec<f32>);

/// Reads the named F32 tensors (any rank) from one safetensors file, in
/// order.
pub fn read_f32_tensors(path: &Path, names: &[&str]) -> Result<Vec<ShapedF32>, TensorFileError> {
    let p = shown(path);
    let bytes = std::fs::read(path).map_err(|e| TensorFileError::Read {
        path: p.clone(),
        cause: e.to_string(),
    })?;
    read_f32_tensors_from(&bytes, &p, names)
}

/// [`read_f32_tensors`] of a file's bytes; `path` names it in errors.
pub fn read_f32_tensors_from(
    bytes: &[u8],
    path: &str,
    names: &[&str],
) -> Result<Vec<ShapedF32>, TensorFileError> {
    let p = path.to_string();
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_error(&p, e))?;
    if let Some(name) = duplicate_name(bytes) {
        return Err(TensorFileError::Duplicate { path: p, name });
    }
    names.iter().map(|name| f32_tensor(&st, &p, name)).collect()
}

/// Reads one F32 tensor (any rank) from a safetensors file.
pub fn read_f32_tensor(path: &Path, name: &str) -> Result<ShapedF32, TensorFileError> {
    Ok(read_f32_tensors(path, &[name])?.remove(0))
}

fn format_error(path: &str, e: safetensors::SafeTensorError) -> TensorFileError {
    use safetensors::SafeTensorError as E;
    let hint = match e {
        E::HeaderTooSmall
        | E::InvalidHeaderLength
        | E::MetadataIncompleteBuffer
        | E::InvalidOffset(_)
        | E::TensorInvalidInfo => "; is it truncated?",
        _ => "",
    };
    TensorFileError::Format {
        path: path.into(),
        detail: crate::protocol::shorten(&e.to_string(), 160),
        hint,
    }
}

/// A tensor name the header lists twice (safetensors itself keeps the last
/// one silently). The header is valid JSON here: `deserialize` accepted it.
fn duplicate_name(bytes: &[u8]) -> Option<String> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Option<String>, A::Error> {
            let mut seen = std::collections::HashSet::new();
            let mut dup = None;
            while let Some(k) = map.next_key::<String>()? {
                map.next_value::<IgnoredAny>()?;
                if dup.is_none() && !seen.insert(k.clone()) {
                    dup = Some(k);
                }
            }
            Ok(dup)
        }
    }
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let header = bytes.get(8..8usize.checked_add(n)?)?;
    let mut de = serde_json::Deserializer::from_slice(header);
    de.deserialize_map(Keys).ok().flatten()
}

fn f32_tensor(st: &SafeTensors<'_>, path: &str, name: &str) -> Result<ShapedF32, TensorFileError> {
    let t = st.tensor(name).map_err(|_| {
        let mut names: Vec<_> = st.names().into_iter().map(quote).collect();
        names.sort();
        let count = names.len();
        // As many names as fit in about 120 characters.
        let mut found = String::new();
        let mut shown = 0;
        for n in &names {
            if !found.is_empty() && found.len() + n.len() > 120 {
                break;
            }
            if !found.is_empty() {
                found.push_str(", ");
            }
            found.push_str(n);
            shown += 1;
        }
        TensorFileError::Missing {
            path: path.into(),
            name: name.into(),
            found: match count {
                0 => "nothing".into(),
                n if n > shown => format!("{found}, … ({n} in all)"),
                _ => found,
            },
        }
    })?;
    if t.dtype() != Dtype::F32 {
        return Err(TensorFileError::Dtype {
            path: path.into(),
            name: name.into(),
            dtype: t.dtype(),
        });
    }
    // safetensors data is little-endian and may be unaligned.
    Ok((
        t.shape().to_vec(),
        crate::protocol::f32_from_le_bytes(t.data()),
    ))
}

/// A path for a message: at most 120 characters (its end, which names the
/// file, is kept).
fn shown(path: &Path) -> String {
    let p = path.display().to_string();
    let n = p.chars().count();
    if n > 120 {
        format!("…{}", p.chars().skip(n - 119).collect::<String>())
    } else {
        p
    }
}

/// Writes f32 tensors to a safetensors file.
pub fn write_f32(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<(), TensorFileError> {
    let p = shown(path);
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, data)| crate::protocol::f32_bytes(data))
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| {
            (
                *name,
                TensorView::new(Dtype::F32, shape.to_vec(), b).expect("shape matches data"),
            )
        })
        .collect();
    let out = safetensors::serialize(views, None).map_err(|e| TensorFileError::Write {
        path: p.clone(),
        cause: e.to_string(),
    })?;
    std::fs::write(path, out).map_err(|e| TensorFileError::Write {
        path: p,
        cause: e.to_string(),
    })
}
