//! The forward pass as the contract defines it (CONTRACT.md §10): plain
//! scalar code, one token at a time, built only from the ops' specs. The
//! engine ([`super::engine`]) must match it bit for bit; it is also what
//! `lockstep replay-layer` runs to check one layer alone.

use super::Model;
use crate::contract::attention::attention_spec;
use crate::contract::canonicalize;
use crate::contract::elementwise::add_spec;
use crate::contract::quant::dot;
use crate::contract::rmsnorm::rmsnorm_spec;
use crate::contract::rope::{rope_frequencies, rope_spec, rope_table};
use crate::contract::swiglu::swiglu_spec;
use crate::cpu::qmatvec::PackedMatrix;
use crate::digest::{tensor_digest_f32, Digest};

/// `W·x` by the scalar spec, row by row.
pub fn matvec(m: &PackedMatrix, x: &[f32]) -> Vec<f32> {
    (0..m.rows)
        .map(|r| canonicalize(dot(m.raw_format(), &m.raw_row(r), x)))
        .collect()
}

/// One layer's keys and values, row t = position t.
#[derive(Clone, Default)]
pub struct LayerCache {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

/// Layer `li` applied to `x` (the layer's input at position `pos`, [dim]),
/// in place: the output. Appends the position's key and value to `cache`,
/// which must hold positions `0..pos`.
pub fn layer_spec(model: &Model, li: usize, x: &mut [f32], pos: usize, cache: &mut LayerCache) {
    let c = &model.config;
    let layer = &model.layers[li];
    let (dim, kvd, hd) = (c.dim, c.kv_dim(), c.head_dim());
    assert_eq!(
        cache.keys.len(),
        pos * kvd,
        "the cache must hold positions 0..pos"
    );
    let freqs = rope_frequencies(c.rope_theta, hd);
    let (cos, sin) = rope_table(&freqs, pos);
    let mut xb = vec![0f32; dim];
    rmsnorm_spec(x, &layer.attn_norm, c.norm_eps, &mut xb);
    let mut q = matvec(&layer.wq, &xb);
    let mut k = matvec(&layer.wk, &xb);
    let v = matvec(&layer.wv, &xb);
    rope_spec(&mut q, hd, &cos, &sin);
    rope_spec(&mut k, hd, &cos, &sin);
    cache.keys.extend_from_slice(&k);
    cache.values.extend_from_slice(&v);
    let mut att = vec![0f32; dim];
    attention_spec(c.attention(), &q, &cache.keys, &cache.values, pos, &mut att);
    add_spec(x, &matvec(&layer.wo, &att));
    rmsnorm_spec(x, &layer.ffn_norm, c.norm_eps, &mut xb);
    let g = matvec(&layer.w_gate, &xb);
    let u = matvec(&layer.w_up, &xb);
    let mut h = vec![0f32; c.hidden_dim];
    swiglu_spec(&g, &u, &mut h);
    add_spec(x, &matvec(&layer.w_down, &h));
}

/// The whole model over `tokens` from position 0: the logits after each
/// token, and the digest of every layer's output at every position.
pub fn forward_spec(model: &Model, tokens: &[u32]) -> (Vec<Vec<f32>>, Vec<Vec<Digest>>) {
    let c = &model.config;
    let mut caches = vec![LayerCache::default(); c.n_layers];
    let (mut logits, mut trace) = (Vec::new(), Vec::new());
    for (pos, &t) in tokens.iter().enumerate() {
        let mut x = model.embedding.dequantize_row(t as usize);
        let mut digests = Vec::with_capacity(c.n_layers);
        for (li, cache) in caches.iter_mut().enumerate() {
            layer_spec(model, li, &mut x, pos, cache);
            digests.push(tensor_digest_f32(&[c.dim], &x));
        }
        let mut xn = vec![0f32; c.dim];
        rmsnorm_spec(&x, &model.final_norm, c.norm_eps, &mut xn);
        logits.push(matvec(model.classifier(), &xn));
        trace.push(digests);
    }
    (logits, trace)
}
