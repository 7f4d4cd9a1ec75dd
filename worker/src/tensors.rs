//! Matmul operands in safetensors files: `a` [M,K] and `b` [K,N] in, `c`
//! [M,N] out, all F32.

use std::path::Path;

use lockstep_kernels::MatmulDims;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

/// Everything that can be wrong with a tensor file, said plainly.
#[derive(Debug, thiserror::Error)]
pub enum TensorFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file ({source}); is it truncated?")]
    Format {
        path: String,
        source: safetensors::SafeTensorError,
    },
    #[error("{path} has no tensor named `{name}` (it has: {found})")]
    Missing {
        path: String,
        name: String,
        found: String,
    },
    #[error("tensor `{name}` in {path} is {dtype:?}; lockstep matmul needs F32")]
    Dtype {
        path: String,
        name: String,
        dtype: Dtype,
    },
    #[error("tensor `{name}` in {path} has shape {shape:?}; it must be a matrix (rank 2)")]
    Rank {
        path: String,
        name: String,
        shape: Vec<usize>,
    },
    #[error(
        "shapes do not chain: a is {a:?} and b is {b:?}, but a's columns must equal b's rows (K)"
    )]
    Mismatch { a: Vec<usize>, b: Vec<usize> },
}

/// A matrix read from a file.
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

/// Reads `a` and `b` from `path` and checks that they multiply.
pub fn read_operands(path: &Path) -> Result<(Matrix, Matrix, MatmulDims), TensorFileError> {
    with_file(path, |st, p| {
        let a = matrix(st, p, "a")?;
        let b = matrix(st, p, "b")?;
        if a.cols != b.rows {
            return Err(TensorFileError::Mismatch {
                a: vec![a.rows, a.cols],
                b: vec![b.rows, b.cols],
            });
        }
        let dims = MatmulDims::new(a.rows, a.cols, b.cols);
        Ok((a, b, dims))
    })
}

/// Reads and parses a safetensors file, then hands it to `f` with the path
/// as it appears in messages.
fn with_file<T>(
    path: &Path,
    f: impl FnOnce(&SafeTensors<'_>, &str) -> Result<T, TensorFileError>,
) -> Result<T, TensorFileError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| TensorFileError::Read {
        path: p.clone(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|source| TensorFileError::Format {
        path: p.clone(),
        source,
    })?;
    f(&st, &p)
}

fn matrix(st: &SafeTensors<'_>, path: &str, name: &str) -> Result<Matrix, TensorFileError> {
    let (shape, data) = f32_tensor(st, path, name)?;
    if shape.len() != 2 {
        return Err(TensorFileError::Rank {
            path: path.into(),
            name: name.into(),
            shape,
        });
    }
    Ok(Matrix {
        rows: shape[0],
        cols: shape[1],
        data,
    })
}

/// Reads one F32 tensor (any rank) from a safetensors file.
pub fn read_f32_tensor(path: &Path, name: &str) -> Result<(Vec<usize>, Vec<f32>), TensorFileError> {
    with_file(path, |st, p| f32_tensor(st, p, name))
}

fn f32_tensor(
    st: &SafeTensors<'_>,
    path: &str,
    name: &str,
) -> Result<(Vec<usize>, Vec<f32>), TensorFileError> {
    let t = st.tensor(name).map_err(|_| {
        let mut names: Vec<_> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        TensorFileError::Missing {
            path: path.into(),
            name: name.into(),
            found: if names.is_empty() {
                "nothing".into()
            } else {
                names.join(", ")
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

/// Writes f32 tensors to a safetensors file.
pub fn write_f32(path: &Path, tensors: &[(&str, &[usize], &[f32])]) -> Result<(), TensorFileError> {
    let p = path.display().to_string();
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
    let out = safetensors::serialize(views, None).map_err(|source| TensorFileError::Format {
        path: p.clone(),
        source,
    })?;
    std::fs::write(path, out).map_err(|source| TensorFileError::Write { path: p, source })
}
