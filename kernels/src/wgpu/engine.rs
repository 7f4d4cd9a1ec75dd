//! The model on WGSL: weights uploaded once and kept in device memory,
//! each sequence's KV cache on the device, and a forward pass recorded as
//! one chain of op dispatches ([`super::ops`]) with one read-back (the
//! logits of each sequence's last token, and the layer outputs when a
//! trace is asked for).
//!
//! The pass is the CPU engine's ([`crate::model::engine`]) step for step:
//! the same op specs, rows of several sequences batched through the
//! weight products, attention per sequence over its own cache. Every op's
//! shader is bit for bit its spec, so logits and trace digests equal the
//! CPU's (`tests/tests/wgsl_model.rs`). Embedding rows and the RoPE tables
//! (ln, sin, cos) are computed on the host, as the contract allows.

use super::ops::GpuMatrix;
use super::WgpuBackend;
use crate::contract::rope::{rope_frequencies, rope_table};
use crate::cpu::qmatvec::PackedMatrix;
use crate::digest::{tensor_digest_f32, Digest};
use crate::error::{Error, Result};
use crate::model::{Forward, Model};

struct GpuLayer {
    attn_norm: wgpu::Buffer,
    wq: GpuMatrix,
    wk: GpuMatrix,
    wv: GpuMatrix,
    wo: GpuMatrix,
    ffn_norm: wgpu::Buffer,
    w_gate: GpuMatrix,
    w_up: GpuMatrix,
    w_down: GpuMatrix,
}

/// A model resident on a WGSL device.
pub struct WgpuModel<'a> {
    pub gpu: &'a WgpuBackend,
    pub model: &'a Model,
    layers: Vec<GpuLayer>,
    final_norm: wgpu::Buffer,
    classifier: GpuMatrix,
    freqs: Vec<f32>,
}

/// One sequence on the device: its KV cache (per layer, [capacity,
/// kv_dim]) and position; when traced, every layer's output digest at
/// every position (`trace[pos][layer]`), as the CPU engine keeps them.
pub struct WgpuSequence {
    pub pos: usize,
    capacity: usize,
    keys: Vec<wgpu::Buffer>,
    values: Vec<wgpu::Buffer>,
    pub trace: Option<Vec<Vec<Digest>>>,
}

impl WgpuSequence {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn upload(gpu: &WgpuBackend, m: &PackedMatrix) -> Result<GpuMatrix> {
    // Rows as the CPU holds them (F16/BF16 already widened to F32).
    let raw: Vec<u8> = (0..m.rows).flat_map(|r| m.raw_row(r)).collect();
    gpu.upload_matrix(m.raw_format(), m.rows, m.cols, &raw)
}

impl<'a> WgpuModel<'a> {
    /// Uploads `model`'s weights to `gpu`.
    pub fn new(gpu: &'a WgpuBackend, model: &'a Model) -> Result<Self> {
        let c = &model.config;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(GpuLayer {
                    attn_norm: gpu.buffer_f32("attn_norm", &l.attn_norm),
                    wq: upload(gpu, &l.wq)?,
                    wk: upload(gpu, &l.wk)?,
                    wv: upload(gpu, &l.wv)?,
                    wo: upload(gpu, &l.wo)?,
                    ffn_norm: gpu.buffer_f32("ffn_norm", &l.ffn_norm),
                    w_gate: upload(gpu, &l.w_gate)?,
                    w_up: upload(gpu, &l.w_up)?,
                    w_down: upload(gpu, &l.w_down)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gpu,
            model,
            layers,
            final_norm: gpu.buffer_f32("final_norm", &model.final_norm),
            classifier: upload(gpu, model.classifier())?,
            freqs: rope_frequencies(c.rope_theta, c.head_dim()),
        })
    }

    /// Bytes of weights held on the device.
    pub fn weight_bytes(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| {
                [&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down]
                    .iter()
                    .map(|m| m.bytes())
                    .sum::<u64>()
            })
            .sum::<u64>()
            + self.classifier.bytes()
    }

    /// A new, empty sequence with room for `positions` tokens.
    pub fn sequence(&self, positions: usize, traced: bool) -> Result<WgpuSequence> {
        let c = &self.model.config;
        if positions > c.max_seq {
            return Err(Error::model(format!(
                "{positions} positions exceed the model's context of {}",
                c.max_seq
            )));
        }
        let n = positions.max(1) * c.kv_dim();
        self.gpu.fits("a layer's KV cache", n)?;
        Ok(WgpuSequence {
            pos: 0,
            capacity: positions.max(1),
            keys: (0..c.n_layers)
                .map(|_| self.gpu.scratch("keys", n))
                .collect(),
            values: (0..c.n_layers)
                .map(|_| self.gpu.scratch("values", n))
                .collect(),
            trace: traced.then(Vec::new),
        })
    }

    /// Rows of one pass that every buffer can hold.
    fn max_rows(&self, span: usize) -> usize {
        let c = &self.model.config;
        let widest = c.dim.max(c.hidden_dim).max(c.n_heads * span.max(1));
        ((self.gpu.max_binding / 4) as usize / widest).clamp(1, 4096)
    }

    /// Feeds `tokens[i]` to `seqs[i]` and returns, for each sequence fed at
    /// least one token, the logits after its last token: what
    /// [`crate::model::Engine::forward`] returns, bit for bit. Long inputs
    /// run in several passes (exact: a row's bits do not depend on what
    /// else is in its pass).
    pub fn forward(
        &self,
        seqs: &mut [&mut WgpuSequence],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        assert_eq!(seqs.len(), tokens.len());
        let c = &self.model.config;
        for (seq, toks) in seqs.iter().zip(tokens) {
            if seq.pos + toks.len() > seq.capacity {
                return Err(Error::model(format!(
                    "the sequence would reach {} positions; it has room for {}",
                    seq.pos + toks.len(),
                    seq.capacity
                )));
            }
            if let Some(&t) = toks.iter().find(|&&t| t as usize >= c.vocab_size) {
                return Err(Error::model(format!(
                    "token {t} is outside the vocabulary of {}",
                    c.vocab_size
                )));
            }
        }
        let span = seqs
            .iter()
            .zip(tokens)
            .map(|(s, t)| s.pos + t.len())
            .max()
            .unwrap_or(0);
        let per = (self.max_rows(span) / seqs.len().max(1)).max(1);
        let mut out: Vec<Option<Vec<f32>>> = vec![None; seqs.len()];
        let mut fed = vec![0usize; seqs.len()];
        loop {
            let round: Vec<&[u32]> = tokens
                .iter()
                .zip(&fed)
                .map(|(t, &f)| &t[f..(f + per).min(t.len())])
                .collect();
            if round.iter().all(|r| r.is_empty()) {
                break;
            }
            let logits = self.pass(seqs, &round)?;
            for (i, l) in logits.into_iter().enumerate() {
                fed[i] += round[i].len();
                if l.is_some() {
                    out[i] = l;
                }
            }
        }
        Ok(out)
    }

    /// One pass: every row on the device, one submission, one read-back.
    fn pass(
        &self,
        seqs: &mut [&mut WgpuSequence],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let gpu = self.gpu;
        let c = &self.model.config;
        let (dim, kvd, hd, hidden) = (c.dim, c.kv_dim(), c.head_dim(), c.hidden_dim);
        // Rows: (sequence, position), sequence by sequence.
        let mut rows = Vec::new();
        for (s, (seq, toks)) in seqs.iter().zip(tokens).enumerate() {
            rows.extend((0..toks.len()).map(|i| (s, seq.pos + i)));
        }
        let r = rows.len();
        let flat: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let mut x0 = Vec::with_capacity(r * dim);
        for &t in &flat {
            x0.extend(self.model.embedding.dequantize_row(t as usize));
        }
        let (mut cos, mut sin) = (
            Vec::with_capacity(r * hd / 2),
            Vec::with_capacity(r * hd / 2),
        );
        for &(_, pos) in &rows {
            let (c, s) = rope_table(&self.freqs, pos);
            cos.extend(c);
            sin.extend(s);
        }
        let span = rows.iter().map(|&(_, p)| p + 1).max().unwrap_or(1);
        let most = tokens.iter().map(|t| t.len()).max().unwrap_or(0);
        let scores_n = super::ops::attention_scratch(c.attention(), most, span);
        for (what, n) in [
            ("the pass's activations", r * dim.max(hidden)),
            ("attention scores", scores_n),
        ] {
            gpu.fits(what, n)?;
        }
        let traced = seqs.iter().any(|s| s.trace.is_some());
        let scope = gpu.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let x = gpu.buffer_f32("x", &x0);
        let (cos_b, sin_b) = (gpu.buffer_f32("cos", &cos), gpu.buffer_f32("sin", &sin));
        let xb = gpu.scratch("xb", r * dim);
        let q = gpu.scratch("q", r * dim);
        let k = gpu.scratch("k", r * kvd);
        let v = gpu.scratch("v", r * kvd);
        let att = gpu.scratch("att", r * dim);
        let o = gpu.scratch("o", r * dim);
        let g = gpu.scratch("g", r * hidden);
        let u = gpu.scratch("u", r * hidden);
        let h = gpu.scratch("h", r * hidden);
        let scores = gpu.scratch("scores", scores_n);
        let trace = gpu.scratch("trace", if traced { c.n_layers * r * dim } else { 0 });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        for (li, layer) in self.layers.iter().enumerate() {
            let e = &mut enc;
            gpu.encode_rmsnorm(e, &x, &layer.attn_norm, &xb, dim, r, c.norm_eps)?;
            gpu.encode_qmatmul(e, &layer.wq, &xb, &q, r)?;
            gpu.encode_qmatmul(e, &layer.wk, &xb, &k, r)?;
            gpu.encode_qmatmul(e, &layer.wv, &xb, &v, r)?;
            gpu.encode_rope(e, &q, &cos_b, &sin_b, dim, hd, r)?;
            gpu.encode_rope(e, &k, &cos_b, &sin_b, kvd, hd, r)?;
            let mut row0 = 0;
            for (seq, toks) in seqs.iter().zip(tokens) {
                let n = toks.len();
                if n == 0 {
                    continue;
                }
                let (from, to, bytes) = (
                    (row0 * kvd * 4) as u64,
                    (seq.pos * kvd * 4) as u64,
                    (n * kvd * 4) as u64,
                );
                e.copy_buffer_to_buffer(&k, from, &seq.keys[li], to, bytes);
                e.copy_buffer_to_buffer(&v, from, &seq.values[li], to, bytes);
                gpu.encode_attention(
                    e,
                    c.attention(),
                    &q,
                    &seq.keys[li],
                    &seq.values[li],
                    &scores,
                    &att,
                    row0,
                    seq.pos,
                    n,
                )?;
                row0 += n;
            }
            gpu.encode_qmatmul(e, &layer.wo, &att, &o, r)?;
            gpu.encode_residual(e, &x, &o, r * dim)?;
            gpu.encode_rmsnorm(e, &x, &layer.ffn_norm, &xb, dim, r, c.norm_eps)?;
            gpu.encode_qmatmul(e, &layer.w_gate, &xb, &g, r)?;
            gpu.encode_qmatmul(e, &layer.w_up, &xb, &u, r)?;
            gpu.encode_swiglu(e, &g, &u, &h, r * hidden)?;
            gpu.encode_qmatmul(e, &layer.w_down, &h, &o, r)?;
            gpu.encode_residual(e, &x, &o, r * dim)?;
            if traced {
                let bytes = (r * dim * 4) as u64;
                e.copy_buffer_to_buffer(&x, 0, &trace, li as u64 * bytes, bytes);
            }
        }
        // The final norm and the classifier, for each sequence's last row.
        let mut last = Vec::new();
        let mut at = 0;
        for toks in tokens {
            at += toks.len();
            if !toks.is_empty() {
                last.push(at - 1);
            }
        }
        let nl = last.len();
        let xl = gpu.scratch("last", nl * dim);
        for (j, &i) in last.iter().enumerate() {
            let bytes = (dim * 4) as u64;
            enc.copy_buffer_to_buffer(&x, i as u64 * bytes, &xl, j as u64 * bytes, bytes);
        }
        let xn = gpu.scratch("xn", nl * dim);
        gpu.encode_rmsnorm(&mut enc, &xl, &self.final_norm, &xn, dim, nl, c.norm_eps)?;
        let logits = gpu.scratch("logits", nl * c.vocab_size);
        gpu.encode_qmatmul(&mut enc, &self.classifier, &xn, &logits, nl)?;
        let words = gpu.read_back(enc, &logits, (nl.max(1) * c.vocab_size * 4) as u64)?;
        let layer_outputs = if traced {
            let enc = gpu.device.create_command_encoder(&Default::default());
            gpu.read_back(enc, &trace, (c.n_layers * r * dim * 4) as u64)?
        } else {
            Vec::new()
        };
        gpu.check_scope(scope)?;
        if traced {
            let outs: &[f32] = bytemuck::cast_slice(&layer_outputs);
            for (i, &(s, pos)) in rows.iter().enumerate() {
                if let Some(t) = seqs[s].trace.as_mut() {
                    if t.len() <= pos {
                        t.resize(pos + 1, Vec::new());
                    }
                    t[pos] = (0..c.n_layers)
                        .map(|li| {
                            let o = (li * r + i) * dim;
                            tensor_digest_f32(&[dim], &outs[o..o + dim])
                        })
                        .collect();
                }
            }
        }
        let mut chunks = words.chunks_exact(c.vocab_size);
        let mut out = Vec::with_capacity(seqs.len());
        for (seq, toks) in seqs.iter_mut().zip(tokens) {
            seq.pos += toks.len();
            out.push(if toks.is_empty() {
                None
            } else {
                chunks
                    .next()
                    .map(|l| l.iter().map(|&w| f32::from_bits(w)).collect())
            });
        }
        Ok(out)
    }
}

impl<'a> Forward for WgpuModel<'a> {
    type Seq = WgpuSequence;

    fn model(&self) -> &Model {
        self.model
    }

    fn describe(&self) -> String {
        use crate::Backend;
        let info = self.gpu.info();
        format!("wgpu {} ({})", info.device, info.path)
    }

    fn sequence(&self, positions: usize, traced: bool) -> Result<Self::Seq> {
        WgpuModel::sequence(self, positions, traced)
    }

    fn forward(
        &self,
        seqs: &mut [&mut Self::Seq],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        WgpuModel::forward(self, seqs, tokens)
    }

    fn take_trace(seq: &mut Self::Seq) -> Option<Vec<Vec<Digest>>> {
        seq.trace.take()
    }
}
