//! Matmul, `C[M,N] = A[M,K] · B[K,N]` (CONTRACT.md §4): parameters (none),
//! input validation, output shape and the scalar spec.

use crate::contract::{canonicalize, elements, short_shape, K_CHUNK};
use crate::error::{Error, Result};

/// The matmul op. It has no parameters: `"params": {}` on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Matmul {}

impl Matmul {
    pub const NAME: &'static str = "matmul";
    /// `a` [M,K] and `b` [K,N], row-major f32.
    pub const INPUTS: &'static [&'static str] = &["a", "b"];
    /// `c` [M,N].
    pub const OUTPUTS: &'static [&'static str] = &["c"];

    /// Checks that `a` and `b` are matrices that chain, and that no size
    /// overflows.
    /// ([`crate::Op::plan`] has checked the input count.)
    pub fn plan(&self, shapes: &[&[usize]]) -> Result<MatmulDims> {
        let [a, b] = shapes else {
            return Err(Error::shape("matmul takes 2 inputs (a, b)"));
        };
        for (name, s) in [("a", a), ("b", b)] {
            if s.len() != 2 {
                return Err(Error::shape(format!(
                    "{name} has shape {}; matmul needs a matrix (rank 2)",
                    short_shape(s)
                )));
            }
        }
        if a[1] != b[0] {
            return Err(Error::shape(format!(
                "a is {a:?} and b is {b:?}: a's columns must equal b's rows (K)"
            )));
        }
        let dims = MatmulDims::new(a[0], a[1], b[1]);
        elements(a)?;
        elements(b)?;
        elements(&dims.output_shape())?;
        Ok(dims)
    }
}

/// Shape of `C[M,N] = A[M,K] · B[K,N]` (all row-major, f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct MatmulDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
}

impl MatmulDims {
    pub fn new(m: usize, k: usize, n: usize) -> Self {
        Self { m, k, n }
    }

    /// Floating-point operations of the product, counting an fma as two.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.k as f64 * self.n as f64
    }

    /// Multiply-adds, saturating.
    pub fn macs(&self) -> u64 {
        (self.m as u64)
            .saturating_mul(self.k as u64)
            .saturating_mul(self.n as u64)
    }

    /// `[M, N]`.
    pub fn output_shape(&self) -> Vec<usize> {
        vec![self.m, self.n]
    }
}

/// The executable spec of matmul (CONTRACT.md §4):
///
/// ```text
/// for each (i, j):
///     total = +0.0
///     for each chunk of 256 consecutive k (the last may be shorter), in order:
///         acc = +0.0
///         for k in the chunk, in order: acc = fma(A[i,k], B[k,j], acc)
///         total = total + acc
///     C[i,j] = canonicalize(total)
/// ```
///
/// Panics if the slices do not match `dims` (callers validate first).
pub fn matmul_spec(a: &[f32], b: &[f32], dims: MatmulDims) -> Vec<f32> {
    let MatmulDims { m, k, n } = dims;
    assert_eq!(a.len(), m * k, "A must hold M*K values");
    assert_eq!(b.len(), k * n, "B must hold K*N values");
    let mut c = vec![0.0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut total = 0.0f32;
            let mut start = 0;
            while start < k {
                let end = (start + K_CHUNK).min(k);
                let mut acc = 0.0f32;
                for kk in start..end {
                    // f32::mul_add is a single correctly rounded fma on every
                    // target (a libm call where the hardware has none).
                    acc = a[i * k + kk].mul_add(b[kk * n + j], acc);
                }
                total += acc;
                start = end;
            }
            c[i * n + j] = canonicalize(total);
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::CANONICAL_NAN_BITS;

    #[test]
    fn k_zero_gives_positive_zero() {
        let c = matmul_spec(&[], &[], MatmulDims::new(2, 0, 3));
        assert!(c.iter().all(|x| x.to_bits() == 0));
    }

    #[test]
    fn chunks_change_rounding_exactly_as_specified() {
        // CONTRACT.md §4's worked example: the first chunk absorbs its tiny
        // terms (each step is a tie to even), the second sums them exactly.
        let k = 512;
        let mut a = vec![2f32.powi(-24); k];
        a[0] = 1.0;
        let b = vec![1.0f32; k];
        let c = matmul_spec(&a, &b, MatmulDims::new(1, k, 1));
        assert_eq!(c[0].to_bits(), 0x3F80_0080);
        let unchunked = a.iter().fold(0.0f32, |acc, &x| x.mul_add(1.0, acc));
        assert_eq!(unchunked, 1.0);
    }

    #[test]
    fn nan_is_canonical_and_negative_zero_sums_to_positive() {
        let a = [f32::INFINITY, 0.0];
        let b = [0.0f32, 1.0];
        let c = matmul_spec(&a, &b, MatmulDims::new(1, 2, 1));
        assert_eq!(c[0].to_bits(), CANONICAL_NAN_BITS);
        // (-1)·(+0) = -0; fma(-1, +0, +0) = +0 under round-to-nearest-even.
        let c = matmul_spec(&[-1.0], &[0.0], MatmulDims::new(1, 1, 1));
        assert_eq!(c[0].to_bits(), 0);
    }
}
