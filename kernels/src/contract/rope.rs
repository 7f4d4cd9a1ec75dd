//! Rotary position embedding (CONTRACT.md §9.4).
//!
//! The tables are computed by this scalar code on the host (every backend
//! uses them as given); the rotation is then two fmas per pair.

use super::canonicalize;
use super::prim::{div, exp, fma, ln, mul, sin_cos};

/// The inverse frequencies of a head of `head_dim`:
/// `f_i = exp(mul(ln(θ), div(−2i, head_dim)))` for i in 0..head_dim/2.
pub fn rope_frequencies(theta: f32, head_dim: usize) -> Vec<f32> {
    let ln_theta = ln(theta);
    (0..head_dim / 2)
        .map(|i| exp(mul(ln_theta, div(-((2 * i) as f32), head_dim as f32))))
        .collect()
}

/// `(cos, sin)` of `pos · f_i` for every frequency: the angle is
/// `mul(pos, f_i)` (`pos` is exact in f32 below 2^24), then [`sin_cos`].
#[inline(always)]
pub fn rope_table(freqs: &[f32], pos: usize) -> (Vec<f32>, Vec<f32>) {
    freqs
        .iter()
        .map(|&f| {
            let (s, c) = sin_cos(mul(pos as f32, f));
            (c, s)
        })
        .unzip()
}

/// Rotates each head of `x` (heads of `head_dim`, concatenated) in place:
/// the pair `(a, b) = (x[2i], x[2i+1])` of every head becomes
/// `(fma(a, cos_i, −mul(b, sin_i)), fma(a, sin_i, mul(b, cos_i)))`,
/// canonicalised. (Adjacent pairs, as llama2.c and GGUF's llama; GGUF
/// converters permute Hugging Face's q/k rows to match.)
#[inline(always)]
pub fn rope_spec(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]) {
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..head_dim / 2 {
            let (a, b) = (head[2 * i], head[2 * i + 1]);
            head[2 * i] = canonicalize(fma(a, cos[i], -mul(b, sin[i])));
            head[2 * i + 1] = canonicalize(fma(a, sin[i], mul(b, cos[i])));
        }
    }
}
