//! Sampling the next token (CONTRACT.md §9.10), reproducible: the random
//! number is a pure function of (seed, position).

use super::argmax::argmax_spec;
use super::prim::{add, div, mul};
use super::softmax::softmax_spec;

/// How to choose the next token.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 means greedy ([`argmax_spec`]).
    pub temperature: f32,
    /// Keep only the `top_k` most likely tokens; 0 keeps all.
    pub top_k: usize,
    /// Then keep the shortest prefix whose probability reaches `top_p`;
    /// 1 keeps all.
    pub top_p: f32,
    pub seed: u64,
}

impl Sampling {
    pub const GREEDY: Sampling = Sampling {
        temperature: 0.0,
        top_k: 0,
        top_p: 1.0,
        seed: 0,
    };
}

/// SplitMix64's output function.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The counter-based uniform number of `(seed, position)`:
/// `u = (splitmix64(splitmix64(seed) XOR position) >> 40) · 2^−24`, in [0, 1),
/// exact in f32.
pub fn uniform(seed: u64, position: u64) -> f32 {
    let bits = splitmix64(splitmix64(seed) ^ position) >> 40;
    bits as f32 * f32::from_bits(0x3380_0000)
}

/// The token chosen from `logits` at `position`:
/// - temperature 0, or any NaN logit: [`argmax_spec`];
/// - `z_i = div(l_i, temperature)`; any infinite `z_i`: [`argmax_spec`];
///   else `p = softmax(z)`;
/// - candidates ordered by probability, highest first, lower index first
///   among equals; the first `top_k` kept (all when 0);
/// - of those, the shortest prefix whose running `add` from +0 reaches
///   `top_p` (all when none does); `total` = that running sum;
/// - `r = mul(uniform(seed, position), total)`; the first candidate whose
///   running `add` from +0 exceeds `r` is chosen (the last kept one if
///   rounding leaves none).
pub fn sample_spec(logits: &[f32], s: &Sampling, position: u64) -> Option<usize> {
    if s.temperature == 0.0 || logits.iter().any(|v| v.is_nan()) {
        return argmax_spec(logits);
    }
    if logits.is_empty() {
        return None;
    }
    let mut p: Vec<f32> = logits.iter().map(|&l| div(l, s.temperature)).collect();
    if p.iter().any(|z| z.is_infinite()) {
        // A tiny temperature (or infinite logits) leaves nothing to sample.
        return argmax_spec(logits);
    }
    softmax_spec(&mut p);
    let mut order: Vec<usize> = (0..p.len()).collect();
    order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
    if s.top_k > 0 && s.top_k < order.len() {
        order.truncate(s.top_k);
    }
    let mut total = 0.0f32;
    let mut keep = order.len();
    for (i, &t) in order.iter().enumerate() {
        total = add(total, p[t]);
        if total >= s.top_p {
            keep = i + 1;
            break;
        }
    }
    order.truncate(keep);
    let r = mul(uniform(s.seed, position), total);
    let mut acc = 0.0f32;
    for &t in &order {
        acc = add(acc, p[t]);
        if r < acc {
            return Some(t);
        }
    }
    order.last().copied()
}
