//! Grouped-query causal attention of one query position over a KV cache
//! (CONTRACT.md §9.8).

use super::prim::{add, div, fma, mul, sqrt};
use super::quant::dot_f32;
use super::softmax::softmax_spec;
use super::{canonicalize, K_CHUNK};

/// The shape of a model's attention.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionDims {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

impl AttentionDims {
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// `div(1, sqrt(head_dim))`: the score scale.
    pub fn scale(&self) -> f32 {
        div(1.0, sqrt(self.head_dim as f32))
    }
}

/// `out` [n_heads·head_dim] for the query `q` at position `pos`, attending
/// to positions `0..=pos` of `keys`/`values` (row t = position t,
/// [kv_dim] each). Query head h reads KV head `h / (n_heads / n_kv_heads)`.
/// Per head:
/// - `score_t = mul(dot(q_h, k_t), scale)`, the dot by the 256-chunk rule
///   over the head's dims, `scale` = [`AttentionDims::scale`];
/// - `p = softmax(score)` ([`softmax_spec`]);
/// - `out_h[d] = Σ_t p_t · v_t[d]` by the 256-chunk rule over t (an fma
///   chain from +0 per chunk of 256 positions, chunk sums added in order),
///   canonicalised.
pub fn attention_spec(
    dims: AttentionDims,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    pos: usize,
    out: &mut [f32],
) {
    let (hd, kvd) = (dims.head_dim, dims.kv_dim());
    let group = dims.n_heads / dims.n_kv_heads;
    let scale = dims.scale();
    let mut scores = vec![0f32; pos + 1];
    for h in 0..dims.n_heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        for (t, s) in scores.iter_mut().enumerate() {
            let k = &keys[t * kvd + kvh * hd..][..hd];
            *s = mul(dot_f32(qh, k), scale);
        }
        softmax_spec(&mut scores);
        for d in 0..hd {
            let mut total = 0.0f32;
            for (c, pc) in scores.chunks(K_CHUNK).enumerate() {
                let mut acc = 0.0f32;
                for (i, &p) in pc.iter().enumerate() {
                    let t = c * K_CHUNK + i;
                    acc = fma(p, values[t * kvd + kvh * hd + d], acc);
                }
                total = add(total, acc);
            }
            out[h * hd + d] = canonicalize(total);
        }
    }
}
