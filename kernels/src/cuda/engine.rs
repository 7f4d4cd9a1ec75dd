//! The model on CUDA: weights uploaded once and kept in device memory,
//! each sequence's KV cache on the device, and a forward pass as one chain
//! of kernel launches on the backend's stream ([`super::ops`]) with one
//! read-back (the logits of each sequence's last token, and the layer
//! outputs when a trace is asked for).
//!
//! The pass is the CPU engine's ([`crate::model::engine`]) and the WGSL
//! engine's ([`crate::wgpu::engine`]) step for step: the same op specs,
//! rows of several sequences batched through the weight products,
//! attention per sequence over its own cache. Every kernel is bit for bit
//! its spec, so logits and trace digests equal the CPU's
//! (`tests/tests/cuda_model.rs`). Embedding rows and the RoPE tables (ln,
//! sin, cos) are computed on the host, as the contract allows.

use cudarc::driver::CudaSlice;

use super::ops::{attention_scratch, CudaMatrix};
use super::{dev_err, CudaBackend};
use crate::contract::rope::{rope_frequencies, rope_table};
use crate::cpu::qmatvec::PackedMatrix;
use crate::digest::{tensor_digest_f32, Digest};
use crate::error::{Error, Result};
use crate::model::{Forward, Model};

struct CudaLayer {
    attn_norm: CudaSlice<f32>,
    wq: CudaMatrix,
    wk: CudaMatrix,
    wv: CudaMatrix,
    wo: CudaMatrix,
    ffn_norm: CudaSlice<f32>,
    w_gate: CudaMatrix,
    w_up: CudaMatrix,
    w_down: CudaMatrix,
}

/// A model resident on a CUDA device.
pub struct CudaModel<'a> {
    pub gpu: &'a CudaBackend,
    pub model: &'a Model,
    layers: Vec<CudaLayer>,
    final_norm: CudaSlice<f32>,
    classifier: CudaMatrix,
    freqs: Vec<f32>,
}

/// One sequence on the device: its KV cache (per layer, [capacity,
/// kv_dim]) and position; when traced, every layer's output digest at
/// every position (`trace[pos][layer]`), as the CPU engine keeps them.
pub struct CudaSequence {
    pub pos: usize,
    capacity: usize,
    keys: Vec<CudaSlice<f32>>,
    values: Vec<CudaSlice<f32>>,
    pub trace: Option<Vec<Vec<Digest>>>,
}

impl CudaSequence {
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

/// Values a pass's activation buffers and attention scratch may each hold
/// (1 GiB of f32): a longer input runs in several passes.
const MAX_PASS_VALUES: usize = 1 << 28;

fn upload(gpu: &CudaBackend, m: &PackedMatrix) -> Result<CudaMatrix> {
    // Rows as the CPU holds them (F16/BF16 already widened to F32).
    let raw: Vec<u8> = (0..m.rows).flat_map(|r| m.raw_row(r)).collect();
    gpu.upload_matrix(m.raw_format(), m.rows, m.cols, &raw)
}

impl<'a> CudaModel<'a> {
    /// Uploads `model`'s weights to `gpu`.
    pub fn new(gpu: &'a CudaBackend, model: &'a Model) -> Result<Self> {
        let c = &model.config;
        let layers = model
            .layers
            .iter()
            .map(|l| {
                Ok(CudaLayer {
                    attn_norm: gpu.upload_f32(&l.attn_norm)?,
                    wq: upload(gpu, &l.wq)?,
                    wk: upload(gpu, &l.wk)?,
                    wv: upload(gpu, &l.wv)?,
                    wo: upload(gpu, &l.wo)?,
                    ffn_norm: gpu.upload_f32(&l.ffn_norm)?,
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
            final_norm: gpu.upload_f32(&model.final_norm)?,
            classifier: upload(gpu, model.classifier())?,
            freqs: rope_frequencies(c.rope_theta, c.head_dim()),
        })
    }

    /// Bytes of weights held on the device (what a decode step reads).
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
    pub fn sequence(&self, positions: usize, traced: bool) -> Result<CudaSequence> {
        let c = &self.model.config;
        if positions > c.max_seq {
            return Err(Error::model(format!(
                "{positions} positions exceed the model's context of {}",
                c.max_seq
            )));
        }
        let n = positions.max(1) * c.kv_dim();
        let zeros = |_| self.gpu.alloc(n);
        Ok(CudaSequence {
            pos: 0,
            capacity: positions.max(1),
            keys: (0..c.n_layers).map(zeros).collect::<Result<_>>()?,
            values: (0..c.n_layers).map(zeros).collect::<Result<_>>()?,
            trace: traced.then(Vec::new),
        })
    }

    /// Rows of one pass that every buffer can hold.
    fn max_rows(&self, span: usize) -> usize {
        let c = &self.model.config;
        let widest = c.dim.max(c.hidden_dim).max(c.n_heads * (span.max(1) + 2));
        (MAX_PASS_VALUES / widest).clamp(1, 4096)
    }

    /// Feeds `tokens[i]` to `seqs[i]` and returns, for each sequence fed at
    /// least one token, the logits after its last token: what
    /// [`crate::model::Engine::forward`] returns, bit for bit. Long inputs
    /// run in several passes (exact: a row's bits do not depend on what
    /// else is in its pass).
    pub fn forward(
        &self,
        seqs: &mut [&mut CudaSequence],
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

    /// One pass: every row on the device, launches in order on one stream,
    /// one read-back.
    fn pass(
        &self,
        seqs: &mut [&mut CudaSequence],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let gpu = self.gpu;
        let stream = gpu.stream();
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
        let traced = seqs.iter().any(|s| s.trace.is_some());
        // Device allocations are never empty.
        let buf = |n: usize| gpu.alloc(n.max(1));
        let mut x = gpu.upload_f32(&x0)?;
        let (cos_b, sin_b) = (gpu.upload_f32(&cos)?, gpu.upload_f32(&sin)?);
        let mut xb = buf(r * dim)?;
        let mut q = buf(r * dim)?;
        let mut k = buf(r * kvd)?;
        let mut v = buf(r * kvd)?;
        let mut att = buf(r * dim)?;
        let mut o = buf(r * dim)?;
        let mut g = buf(r * hidden)?;
        let mut u = buf(r * hidden)?;
        let mut h = buf(r * hidden)?;
        let mut scores = buf(attention_scratch(c.attention(), most, span))?;
        let mut trace = buf(if traced { c.n_layers * r * dim } else { 0 })?;
        let copy = |what| dev_err(what);
        for (li, layer) in self.layers.iter().enumerate() {
            gpu.encode_rmsnorm(&x, &layer.attn_norm, &mut xb, dim, r, c.norm_eps)?;
            gpu.encode_qmatmul(&layer.wq, &xb, &mut q, r)?;
            gpu.encode_qmatmul(&layer.wk, &xb, &mut k, r)?;
            gpu.encode_qmatmul(&layer.wv, &xb, &mut v, r)?;
            gpu.encode_rope(&mut q, &cos_b, &sin_b, dim, hd, r)?;
            gpu.encode_rope(&mut k, &cos_b, &sin_b, kvd, hd, r)?;
            let mut row0 = 0;
            for (seq, toks) in seqs.iter_mut().zip(tokens) {
                let n = toks.len();
                if n == 0 {
                    continue;
                }
                let (from, to) = (
                    row0 * kvd..(row0 + n) * kvd,
                    seq.pos * kvd..(seq.pos + n) * kvd,
                );
                stream
                    .memcpy_dtod(
                        &k.slice(from.clone()),
                        &mut seq.keys[li].slice_mut(to.clone()),
                    )
                    .map_err(copy("copy keys"))?;
                stream
                    .memcpy_dtod(&v.slice(from), &mut seq.values[li].slice_mut(to))
                    .map_err(copy("copy values"))?;
                gpu.encode_attention(
                    c.attention(),
                    &q,
                    &seq.keys[li],
                    &seq.values[li],
                    &mut scores,
                    &mut att,
                    row0,
                    seq.pos,
                    n,
                )?;
                row0 += n;
            }
            gpu.encode_qmatmul(&layer.wo, &att, &mut o, r)?;
            gpu.encode_residual(&mut x, &o, r * dim)?;
            gpu.encode_rmsnorm(&x, &layer.ffn_norm, &mut xb, dim, r, c.norm_eps)?;
            gpu.encode_qmatmul(&layer.w_gate, &xb, &mut g, r)?;
            gpu.encode_qmatmul(&layer.w_up, &xb, &mut u, r)?;
            gpu.encode_swiglu(&g, &u, &mut h, r * hidden)?;
            gpu.encode_qmatmul(&layer.w_down, &h, &mut o, r)?;
            gpu.encode_residual(&mut x, &o, r * dim)?;
            if traced {
                let at = li * r * dim;
                stream
                    .memcpy_dtod(&x.slice(..r * dim), &mut trace.slice_mut(at..at + r * dim))
                    .map_err(copy("copy trace"))?;
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
        let mut xl = buf(nl * dim)?;
        for (j, &i) in last.iter().enumerate() {
            stream
                .memcpy_dtod(
                    &x.slice(i * dim..(i + 1) * dim),
                    &mut xl.slice_mut(j * dim..(j + 1) * dim),
                )
                .map_err(copy("copy last rows"))?;
        }
        let mut xn = buf(nl * dim)?;
        gpu.encode_rmsnorm(&xl, &self.final_norm, &mut xn, dim, nl, c.norm_eps)?;
        let mut logits = buf(nl * c.vocab_size)?;
        gpu.encode_qmatmul(&self.classifier, &xn, &mut logits, nl)?;
        let words = gpu.download(&logits)?;
        let layer_outputs = if traced {
            gpu.download(&trace)?
        } else {
            Vec::new()
        };
        gpu.ctx.check_err().map_err(dev_err("kernel"))?;
        if traced {
            for (i, &(s, pos)) in rows.iter().enumerate() {
                if let Some(t) = seqs[s].trace.as_mut() {
                    if t.len() <= pos {
                        t.resize(pos + 1, Vec::new());
                    }
                    t[pos] = (0..c.n_layers)
                        .map(|li| {
                            let o = (li * r + i) * dim;
                            tensor_digest_f32(&[dim], &layer_outputs[o..o + dim])
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
                chunks.next().map(<[f32]>::to_vec)
            });
        }
        Ok(out)
    }
}

impl<'a> Forward for CudaModel<'a> {
    type Seq = CudaSequence;

    fn model(&self) -> &Model {
        self.model
    }

    fn describe(&self) -> String {
        use crate::Backend;
        let info = self.gpu.info();
        format!("cuda {} ({})", info.device, info.path)
    }

    fn sequence(&self, positions: usize, traced: bool) -> Result<Self::Seq> {
        CudaModel::sequence(self, positions, traced)
    }

    fn forward(
        &self,
        seqs: &mut [&mut Self::Seq],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        CudaModel::forward(self, seqs, tokens)
    }

    fn take_trace(seq: &mut Self::Seq) -> Option<Vec<Vec<Digest>>> {
        seq.trace.take()
    }
}
