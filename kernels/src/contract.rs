//! The arithmetic contract, executable: plain scalar functions that define
//! every op's result bit for bit. `CONTRACT.md` at the repository root is the
//! prose version; where they disagree, that is a bug in one of them.
//!
//! Every fast path (SIMD CPU, WGSL, CUDA) is tested bit for bit against the
//! functions here. They are written for clarity, not speed: one loop per rule.

/// Version of the arithmetic contract. Every result carries it; any change to
/// the arithmetic of any op bumps it.
pub const CONTRACT_VERSION: u32 = 1;

/// Length of the fixed reduction chunks along K. A product's sum is formed
/// chunk by chunk, so a GPU may hand different chunks to different threads
/// (split-K) without changing a bit, as long as it adds the chunk sums in order.
pub const K_CHUNK: usize = 256;

/// The one NaN every op emits: quiet, positive, zero payload.
pub const CANONICAL_NAN_BITS: u32 = 0x7FC0_0000;

/// Replaces any NaN by the canonical NaN; every other value (subnormals, ±0,
/// ±inf) passes through unchanged.
#[inline]
pub fn canonicalize(x: f32) -> f32 {
    if x.is_nan() {
        f32::from_bits(CANONICAL_NAN_BITS)
    } else {
        x
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
}

/// The executable spec of matmul (CONTRACT.md §3):
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
