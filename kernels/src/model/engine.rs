//! The fast CPU forward pass: many sequences, many tokens each, in one
//! pass; weights read once per pass for all of them.
//!
//! Every row (one token of one sequence) follows the scalar spec
//! ([`super::spec`]) exactly: the matrix products are per row
//! ([`PackedMatrix::matmul`]), attention reads only the row's own
//! sequence's cache up to its position, and the elementwise steps are the
//! spec functions themselves. So a sequence's bits do not depend on the
//! other sequences in the batch, on how its prompt is split into chunks, on
//! the thread count or on the ISA.

use super::Model;
use crate::contract::elementwise::add_spec;
use crate::contract::rmsnorm::rmsnorm_spec;
use crate::contract::rope::{rope_frequencies, rope_spec, rope_table};
use crate::contract::swiglu::swiglu_spec;
use crate::cpu::attention::KvLayer;
use crate::cpu::qmatvec::matmuls;
use crate::cpu::team::{share, SendPtr, Team};
use crate::cpu::Isa;
use crate::digest::{tensor_digest_f32, Digest};
use crate::error::{Error, Result};

/// The elementwise steps of a layer, compiled with FMA instructions where
/// the CPU has them (`isa` other than portable). They are the spec functions themselves, inlined here; without this
/// every `mul_add` in them is a call into a software fma (same bits, about
/// a tenth of decode time).
pub mod steps {
    use super::*;

    macro_rules! fma_wrapped {
        ($($name:ident => $spec:ident ($($arg:ident: $ty:ty),*);)*) => {
            $(
                pub fn $name(isa: Isa, $($arg: $ty),*) {
                    #[cfg(target_arch = "x86_64")]
                    {
                        #[target_feature(enable = "avx2,fma")]
                        unsafe fn with_fma($($arg: $ty),*) {
                            $spec($($arg),*)
                        }
                        if matches!(isa, Isa::Avx512 | Isa::Avx2) && isa.is_supported() {
                            // SAFETY: this CPU has AVX-512 or AVX2+FMA.
                            return unsafe { with_fma($($arg),*) };
                        }
                    }
                    let _ = isa;
                    $spec($($arg),*)
                }
            )*
        };
    }

    fma_wrapped! {
        rmsnorm => rmsnorm_spec(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]);
        rope => rope_spec(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32]);
        swiglu => swiglu_spec(g: &[f32], u: &[f32], h: &mut [f32]);
        residual => add_spec(x: &mut [f32], y: &[f32]);
    }
}

/// One sequence's state: its KV cache, its position, and (when traced)
/// the digest of every layer's output at every position.
#[derive(Clone)]
pub struct Sequence {
    pub pos: usize,
    kv: Vec<KvLayer>,
    /// `trace[pos][layer]`, when tracing.
    pub trace: Option<Vec<Vec<Digest>>>,
    /// `(layer, inputs)`: when set, every pass appends that layer's input
    /// rows ([dim] per position) to `inputs`, for `lockstep replay-layer`
    /// and dispute queries; layer `n_layers` means the last layer's output
    /// (the final norm's input).
    pub capture: Option<(usize, Vec<f32>)>,
    /// Test only (a worker's hidden fault switch): flip the lowest bit of
    /// the first value of layer `.1`'s output at position `.0`, as a broken
    /// device would, before the trace digest is taken. Never set otherwise.
    pub fault: Option<(usize, usize)>,
}

impl Sequence {
    /// Positions this sequence has room for.
    pub fn capacity(&self) -> usize {
        self.kv.first().map_or(0, |l| l.capacity())
    }

    /// Bytes of KV cache held.
    pub fn kv_bytes(&self) -> usize {
        self.kv.iter().map(|l| l.bytes()).sum()
    }

    /// Layer `layer`'s cache (for replaying one layer).
    pub fn kv(&self, layer: usize) -> &KvLayer {
        &self.kv[layer]
    }
}

/// Per-(position, layer) digests and their root.
pub struct Trace;

impl Trace {
    /// SHA3-256 over `lockstep.trace\0`, the position count and layer count
    /// (u64 LE), then every digest in (position, layer) order.
    pub fn root(trace: &[Vec<Digest>]) -> Digest {
        use sha3::{Digest as _, Sha3_256};
        let mut h = Sha3_256::new();
        h.update(b"lockstep.trace\0");
        h.update((trace.len() as u64).to_le_bytes());
        h.update((trace.first().map_or(0, |l| l.len()) as u64).to_le_bytes());
        for d in trace.iter().flatten() {
            h.update(d.0);
        }
        Digest(h.finalize().into())
    }
}

/// Buffers of one pass over `r` rows.
struct Scratch {
    xb: Vec<f32>,
    q: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    h: Vec<f32>,
}

impl Scratch {
    fn new(c: &super::Config, r: usize) -> Self {
        let (dim, kvd, hidden) = (c.dim, c.kv_dim(), c.hidden_dim);
        Self {
            xb: vec![0f32; r * dim],
            q: vec![0f32; r * dim],
            att: vec![0f32; r * dim],
            o: vec![0f32; r * dim],
            k: vec![0f32; r * kvd],
            v: vec![0f32; r * kvd],
            g: vec![0f32; r * hidden],
            u: vec![0f32; r * hidden],
            h: vec![0f32; r * hidden],
        }
    }
}

/// The engine: a model, an ISA and a team of threads.
pub struct Engine<'m> {
    pub model: &'m Model,
    isa: Isa,
    team: Team,
    freqs: Vec<f32>,
}

/// One row of a pass: a token of a sequence at a position.
struct Row {
    seq: usize,
    pos: usize,
}

impl<'m> Engine<'m> {
    /// An engine on `threads` threads (0: all cores) with `isa`.
    pub fn new(model: &'m Model, threads: usize, isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            return Err(Error::unavailable(format!("this CPU lacks {}", isa.name())));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let team = Team::new(threads)
            .map_err(|e| Error::device(format!("cannot start {threads} threads: {e}")))?;
        let c = &model.config;
        Ok(Self {
            model,
            isa,
            team,
            freqs: rope_frequencies(c.rope_theta, c.head_dim()),
        })
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    pub fn threads(&self) -> usize {
        self.team.size()
    }

    /// A new, empty sequence with room for `positions` tokens (at most the
    /// model's context), traced or not.
    pub fn sequence(&self, positions: usize, traced: bool) -> Result<Sequence> {
        let c = &self.model.config;
        if positions > c.max_seq {
            return Err(Error::model(format!(
                "{positions} positions exceed the model's context of {}",
                c.max_seq
            )));
        }
        Ok(Sequence {
            pos: 0,
            kv: (0..c.n_layers)
                .map(|_| KvLayer::new(c.attention(), positions.max(1)))
                .collect(),
            trace: traced.then(Vec::new),
            capture: None,
            fault: None,
        })
    }

    /// Feeds `tokens[i]` to `seqs[i]` (each at its next positions) in one
    /// pass and returns, for each sequence fed at least one token, the
    /// logits after its last token.
    pub fn forward(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        assert_eq!(seqs.len(), tokens.len());
        self.forward_in_pool(seqs, tokens)
    }

    /// One layer over `rows`: `x` (their inputs, [rows, dim]) becomes their
    /// outputs; each row's key and value go into `kv[row.seq]`.
    fn layer_pass(
        &self,
        li: usize,
        rows: &[Row],
        kv: &mut [&mut KvLayer],
        tables: &[(Vec<f32>, Vec<f32>)],
        x: &mut [f32],
        s: &mut Scratch,
    ) {
        let c = &self.model.config;
        let (dim, kvd, hd) = (c.dim, c.kv_dim(), c.head_dim());
        let r = rows.len();
        let pool = Some(&self.team);
        let layer = &self.model.layers[li];
        let Scratch {
            xb,
            q,
            att,
            o,
            k,
            v,
            g,
            u,
            h,
        } = s;
        let (xb, mut q, att, o, mut k, mut v, mut g, mut u, h) = (
            &mut xb[..r * dim],
            &mut q[..r * dim],
            &mut att[..r * dim],
            &mut o[..r * dim],
            &mut k[..r * kvd],
            &mut v[..r * kvd],
            &mut g[..r * c.hidden_dim],
            &mut u[..r * c.hidden_dim],
            &mut h[..r * c.hidden_dim],
        );
        for (xr, xbr) in x.chunks_exact(dim).zip(xb.chunks_exact_mut(dim)) {
            steps::rmsnorm(self.isa, xr, &layer.attn_norm, c.norm_eps, xbr);
        }
        matmuls(
            &mut [
                (&layer.wq, xb, &mut q),
                (&layer.wk, xb, &mut k),
                (&layer.wv, xb, &mut v),
            ],
            r,
            self.isa,
            pool,
        );
        for (i, row) in rows.iter().enumerate() {
            let (cos, sin) = &tables[i];
            steps::rope(self.isa, &mut q[i * dim..(i + 1) * dim], hd, cos, sin);
            steps::rope(self.isa, &mut k[i * kvd..(i + 1) * kvd], hd, cos, sin);
            kv[row.seq].write(
                row.pos,
                &k[i * kvd..(i + 1) * kvd],
                &v[i * kvd..(i + 1) * kvd],
            );
        }
        {
            // One unit per (row, head), split over the team.
            let kv: Vec<&KvLayer> = kv.iter().map(|k| &**k).collect();
            let nh = c.n_heads;
            let out = SendPtr(att.as_mut_ptr());
            let q = &q;
            let units = |lo: usize, hi: usize| {
                let out = &out;
                for u in lo..hi {
                    let (i, h) = (u / nh, u % nh);
                    let row = &rows[i];
                    // SAFETY: unit (i, h) alone writes att[i][h·hd..(h+1)·hd].
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(out.0.add(i * dim + h * hd), hd) };
                    kv[row.seq].attend_heads(
                        &q[i * dim..(i + 1) * dim],
                        row.pos,
                        h..h + 1,
                        o,
                        self.isa,
                    );
                }
            };
            let n = r * nh;
            self.team.run(&|m| {
                let (lo, hi) = share(n, m, self.team.size());
                units(lo, hi)
            });
        }
        layer.wo.matmul(att, r, o, self.isa, pool);
        steps::residual(self.isa, x, o);
        for (xr, xbr) in x.chunks_exact(dim).zip(xb.chunks_exact_mut(dim)) {
            steps::rmsnorm(self.isa, xr, &layer.ffn_norm, c.norm_eps, xbr);
        }
        matmuls(
            &mut [(&layer.w_gate, xb, &mut g), (&layer.w_up, xb, &mut u)],
            r,
            self.isa,
            pool,
        );
        steps::swiglu(self.isa, g, u, h);
        layer.w_down.matmul(h, r, o, self.isa, pool);
        steps::residual(self.isa, x, o);
    }

    /// The final norm and the classifier over rows of the last layer's
    /// output ([rows, dim]): [rows, vocab] logits.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let c = &self.model.config;
        let n = x.len() / c.dim;
        let mut xn = vec![0f32; n * c.dim];
        for (xr, xnr) in x.chunks_exact(c.dim).zip(xn.chunks_exact_mut(c.dim)) {
            rmsnorm_spec(xr, &self.model.final_norm, c.norm_eps, xnr);
        }
        let mut logits = vec![0f32; n * c.vocab_size];
        self.model
            .classifier()
            .matmul(&xn, n, &mut logits, self.isa, Some(&self.team));
        logits
    }

    /// Layer `li` alone over one sequence's inputs at positions 0.. (`inputs`
    /// [positions, dim]): each position's output, by the kernels of
    /// [`Engine::forward`], so bit for bit what the scalar spec
    /// ([`super::spec::layer_spec`]) gives, in one batched pass. What a
    /// coordinator replays to settle a dispute.
    pub fn layer_alone(&self, li: usize, inputs: &[f32]) -> Result<Vec<f32>> {
        let c = &self.model.config;
        if li >= c.n_layers || inputs.is_empty() || !inputs.len().is_multiple_of(c.dim) {
            return Err(Error::shape(format!(
                "layer {li} of {} over {} values of width {}",
                c.n_layers,
                inputs.len(),
                c.dim
            )));
        }
        let n = inputs.len() / c.dim;
        if n > c.max_seq {
            return Err(Error::model(format!(
                "{n} positions exceed the model's context of {}",
                c.max_seq
            )));
        }
        let rows: Vec<Row> = (0..n).map(|pos| Row { seq: 0, pos }).collect();
        let tables: Vec<(Vec<f32>, Vec<f32>)> = rows
            .iter()
            .map(|row| rope_table(&self.freqs, row.pos))
            .collect();
        let mut kv = KvLayer::new(c.attention(), n);
        let mut x = inputs.to_vec();
        let mut scratch = Scratch::new(c, n);
        self.layer_pass(li, &rows, &mut [&mut kv], &tables, &mut x, &mut scratch);
        Ok(x)
    }

    fn forward_in_pool(
        &self,
        seqs: &mut [&mut Sequence],
        tokens: &[&[u32]],
    ) -> Result<Vec<Option<Vec<f32>>>> {
        let c = &self.model.config;
        let dim = c.dim;
        let mut rows = Vec::new();
        for (s, (seq, toks)) in seqs.iter().zip(tokens).enumerate() {
            if seq.pos + toks.len() > seq.capacity() {
                return Err(Error::model(format!(
                    "the sequence would reach {} positions; it has room for {}",
                    seq.pos + toks.len(),
                    seq.capacity()
                )));
            }
            for (i, &t) in toks.iter().enumerate() {
                if t as usize >= c.vocab_size {
                    return Err(Error::model(format!(
                        "token {t} is outside the vocabulary of {}",
                        c.vocab_size
                    )));
                }
                rows.push(Row {
                    seq: s,
                    pos: seq.pos + i,
                });
            }
        }
        let r = rows.len();
        let flat: Vec<u32> = tokens.iter().flat_map(|t| t.iter().copied()).collect();
        let mut x = vec![0f32; r * dim];
        for (row, &t) in x.chunks_exact_mut(dim).zip(&flat) {
            row.copy_from_slice(&self.model.embedding.dequantize_row(t as usize));
        }
        let tables: Vec<(Vec<f32>, Vec<f32>)> = rows
            .iter()
            .map(|row| rope_table(&self.freqs, row.pos))
            .collect();
        let mut scratch = Scratch::new(c, r);
        for li in 0..self.model.layers.len() {
            for (i, row) in rows.iter().enumerate() {
                if let Some((l, inputs)) = seqs[row.seq].capture.as_mut() {
                    if *l == li {
                        inputs.extend_from_slice(&x[i * dim..(i + 1) * dim]);
                    }
                }
            }
            {
                let mut kv: Vec<&mut KvLayer> = seqs.iter_mut().map(|s| &mut s.kv[li]).collect();
                self.layer_pass(li, &rows, &mut kv, &tables, &mut x, &mut scratch);
            }
            for (i, row) in rows.iter().enumerate() {
                if seqs[row.seq].fault == Some((row.pos, li)) {
                    let v = &mut x[i * dim];
                    *v = f32::from_bits(v.to_bits() ^ 1);
                }
                if let Some(trace) = seqs[row.seq].trace.as_mut() {
                    if trace.len() <= row.pos {
                        trace.resize(row.pos + 1, Vec::new());
                    }
                    let t = &mut trace[row.pos];
                    t.truncate(li);
                    t.push(tensor_digest_f32(&[dim], &x[i * dim..(i + 1) * dim]));
                }
            }
        }
        for (i, row) in rows.iter().enumerate() {
            if let Some((l, inputs)) = seqs[row.seq].capture.as_mut() {
                if *l == c.n_layers {
                    inputs.extend_from_slice(&x[i * dim..(i + 1) * dim]);
                }
            }
        }
        // Logits for each sequence's last row only.
        let mut last = Vec::new();
        let mut at = 0;
        for toks in tokens {
            at += toks.len();
            if !toks.is_empty() {
                last.push(at - 1);
            }
        }
        let rows: Vec<f32> = last
            .iter()
            .flat_map(|&i| x[i * dim..(i + 1) * dim].iter().copied())
            .collect();
        let logits = self.logits(&rows);
        let mut out = Vec::with_capacity(seqs.len());
        let mut chunks = logits.chunks_exact(c.vocab_size);
        for (seq, toks) in seqs.iter_mut().zip(tokens) {
            seq.pos += toks.len();
            out.push(if toks.is_empty() {
                None
            } else {
                chunks.next().map(|l| l.to_vec())
            });
        }
        Ok(out)
    }
}
