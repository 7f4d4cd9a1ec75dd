//! Softmax over a row (CONTRACT.md §9.6).

use super::prim::{add, div, exp, sub};
use super::{canonicalize, K_CHUNK};

/// In place over `x`:
/// - any NaN in the row → every output is NaN;
/// - `m` = the row's maximum (`−inf` for an all-`−inf` row, whose outputs
///   are then NaN: `−inf − −inf`; a `+inf` likewise makes every output NaN);
/// - `e_i = exp(sub(x_i, m))`;
/// - `s` = the sum of `e_i` by the 256-chunk rule (`add` from +0 per chunk,
///   chunk sums added in order to +0);
/// - `y_i = div(e_i, s)`, canonicalised.
///
/// An empty row stays empty.
#[inline(always)]
pub fn softmax_spec(x: &mut [f32]) {
    if x.iter().any(|v| v.is_nan()) {
        x.fill(canonicalize(f32::NAN));
        return;
    }
    let m = x
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for v in x.iter_mut() {
        *v = exp(sub(*v, m));
    }
    let mut s = 0.0f32;
    for c in x.chunks(K_CHUNK) {
        let mut acc = 0.0f32;
        for &v in c {
            acc = add(acc, v);
        }
        s = add(s, acc);
    }
    for v in x.iter_mut() {
        *v = canonicalize(div(*v, s));
    }
}
