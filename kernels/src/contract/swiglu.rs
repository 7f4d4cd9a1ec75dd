//! The gated feed-forward activation (CONTRACT.md §9.5): SiLU of the gate
//! times the up projection.

use super::canonicalize;
use super::prim::{mul, silu};

/// `h_i = mul(silu(g_i), u_i)`, canonicalised, with
/// `silu(g) = div(g, add(1, exp(−g)))` ([`silu`]).
#[inline(always)]
pub fn swiglu_spec(g: &[f32], u: &[f32], h: &mut [f32]) {
    for ((h, &g), &u) in h.iter_mut().zip(g).zip(u) {
        *h = canonicalize(mul(silu(g), u));
    }
}
