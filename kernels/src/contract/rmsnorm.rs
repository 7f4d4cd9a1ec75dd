//! RMSNorm (CONTRACT.md §9.3).

use super::prim::{add, div, fma, mul, sqrt};
use super::{canonicalize, K_CHUNK};

/// `y_i = (x_i · inv) · w_i` with `inv = 1 / √(Σx²/n + eps)`:
/// - `ss`: the sum of `x_i·x_i` by the 256-chunk rule (an fma chain from +0
///   per chunk, chunk sums added in order to +0);
/// - `inv = div(1, sqrt(add(div(ss, n), eps)))`;
/// - `y_i = mul(mul(x_i, inv), w_i)`, canonicalised.
#[inline(always)]
pub fn rmsnorm_spec(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let inv = rms_inverse(x, eps);
    for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
        *y = canonicalize(mul(mul(x, inv), w));
    }
}

/// `1 / √(Σx²/n + eps)` as [`rmsnorm_spec`] computes it.
#[inline(always)]
pub fn rms_inverse(x: &[f32], eps: f32) -> f32 {
    let mut ss = 0.0f32;
    for c in x.chunks(K_CHUNK) {
        let mut acc = 0.0f32;
        for &v in c {
            acc = fma(v, v, acc);
        }
        ss = add(ss, acc);
    }
    div(1.0, sqrt(add(div(ss, x.len() as f32), eps)))
}
