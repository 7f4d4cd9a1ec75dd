//! Grouped-query causal attention over a KV cache, exact to
//! CONTRACT.md §9.8 ([`crate::contract::attention::attention_spec`]).
//!
//! Keys are cached transposed ([kv head][dim][position]) so that 16
//! positions' scores come out of one vector chain: lane t runs exactly the
//! spec's fma chain over the head's dims for position t. The weighted sum
//! of values runs lanes across the head's dims, each lane the spec's chain
//! over positions (256-chunks). The softmax is the scalar spec itself.

use crate::contract::attention::AttentionDims;
use crate::contract::canonicalize;
use crate::contract::prim::{add, fma, mul};
use crate::contract::softmax::softmax_spec;
use crate::contract::K_CHUNK;
#[cfg(target_arch = "x86_64")]
use crate::cpu::lanes::x86;
use crate::cpu::lanes::{Lanes, Portable};
use crate::cpu::matmul::Isa;

const L: usize = 16;

/// One layer's keys and values for one sequence, room for `cap` positions.
#[derive(Clone)]
pub struct KvLayer {
    dims: AttentionDims,
    cap: usize,
    /// [kv head][dim][cap]
    kt: Vec<f32>,
    /// [cap][kv_dim]
    v: Vec<f32>,
}

impl KvLayer {
    pub fn new(dims: AttentionDims, positions: usize) -> Self {
        let cap = positions.div_ceil(L) * L;
        let n = dims
            .kv_dim()
            .checked_mul(cap)
            .expect("KV cache size overflows (the engine bounds positions by the context)");
        Self {
            dims,
            cap,
            kt: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Positions this layer has room for.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        (self.kt.len() + self.v.len()) * 4
    }

    /// Stores position `pos`'s key and value ([kv_dim] each).
    pub fn write(&mut self, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            pos < self.cap,
            "position {pos} beyond the KV cache's {}",
            self.cap
        );
        let (hd, kvd) = (self.dims.head_dim, self.dims.kv_dim());
        for (i, &x) in k.iter().enumerate() {
            let (h, d) = (i / hd, i % hd);
            self.kt[(h * hd + d) * self.cap + pos] = x;
        }
        self.v[pos * kvd..(pos + 1) * kvd].copy_from_slice(v);
    }

    /// Position `pos`'s key, as written.
    pub fn key(&self, pos: usize) -> Vec<f32> {
        let kvd = self.dims.kv_dim();
        (0..kvd).map(|i| self.kt[i * self.cap + pos]).collect()
    }

    /// Position `pos`'s value, as written.
    pub fn value(&self, pos: usize) -> &[f32] {
        let kvd = self.dims.kv_dim();
        &self.v[pos * kvd..(pos + 1) * kvd]
    }

    /// `out` [q_dim] for query `q` at `pos` over positions `0..=pos`.
    pub fn attend(&self, q: &[f32], pos: usize, out: &mut [f32], isa: Isa) {
        self.attend_heads(q, pos, 0..self.dims.n_heads, out, isa)
    }

    /// [`KvLayer::attend`] for query heads `heads` only: `out` holds those
    /// heads' outputs ([heads.len()·head_dim]); each head's bits are the
    /// same however the heads are split.
    pub fn attend_heads(
        &self,
        q: &[f32],
        pos: usize,
        heads: std::ops::Range<usize>,
        out: &mut [f32],
        isa: Isa,
    ) {
        assert!(pos < self.cap);
        assert!(heads.end <= self.dims.n_heads);
        assert_eq!(q.len(), self.dims.q_dim());
        assert_eq!(out.len(), heads.len() * self.dims.head_dim);
        // An ISA this CPU lacks runs the portable path (same bits).
        let isa = if isa.is_supported() {
            isa
        } else {
            Isa::Portable
        };
        // SAFETY: the ISA is supported (checked above) and every index
        // stays within the cache (positions rounded up to 16).
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => attend_avx512(self, q, pos, heads, out),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 if std::arch::is_x86_feature_detected!("f16c") => {
                    attend_avx2(self, q, pos, heads, out)
                }
                _ => attend_with::<Portable>(self, q, pos, heads, out),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn attend_avx512(
    kv: &KvLayer,
    q: &[f32],
    pos: usize,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    attend_with::<x86::Avx512>(kv, q, pos, heads, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn attend_avx2(
    kv: &KvLayer,
    q: &[f32],
    pos: usize,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    attend_with::<x86::Avx2>(kv, q, pos, heads, out)
}

#[inline(always)]
unsafe fn attend_with<V: Lanes>(
    kv: &KvLayer,
    q: &[f32],
    pos: usize,
    heads: std::ops::Range<usize>,
    out: &mut [f32],
) {
    let h0 = heads.start;
    let dims = kv.dims;
    let (hd, kvd, cap) = (dims.head_dim, dims.kv_dim(), kv.cap);
    let group = dims.n_heads / dims.n_kv_heads;
    let scale = dims.scale();
    let n = pos + 1;
    let mut scores = vec![0f32; n.div_ceil(L) * L];
    let mut buf = [0f32; L];
    for h in heads {
        let kvh = h / group;
        let qh = &q[h * hd..(h + 1) * hd];
        let kt = kv.kt.as_ptr().add(kvh * hd * cap);
        for t0 in (0..n).step_by(L) {
            // The dot by the 256-chunk rule over the head's dims: each
            // chunk's sum added in order to +0 (so −0 becomes +0).
            let mut total = V::zero();
            for d0 in (0..hd).step_by(K_CHUNK) {
                let mut acc = V::zero();
                for (d, &qd) in qh.iter().enumerate().take((d0 + K_CHUNK).min(hd)).skip(d0) {
                    acc = V::fma(V::splat(qd), V::f32(kt.add(d * cap + t0) as *const u8), acc);
                }
                total = V::add(total, acc);
            }
            total.store(scores.as_mut_ptr().add(t0));
        }
        let row = &mut scores[..n];
        for s in row.iter_mut() {
            *s = mul(*s, scale);
        }
        softmax_spec(row);
        let o = &mut out[(h - h0) * hd..(h - h0 + 1) * hd];
        let vbase = kv.v.as_ptr().add(kvh * hd);
        if hd.is_multiple_of(L) {
            for d0 in (0..hd).step_by(L) {
                let mut total = V::zero();
                for c0 in (0..n).step_by(K_CHUNK) {
                    let mut acc = V::zero();
                    for (t, &p) in row.iter().enumerate().take((c0 + K_CHUNK).min(n)).skip(c0) {
                        acc = V::fma(
                            V::splat(p),
                            V::f32(vbase.add(t * kvd + d0) as *const u8),
                            acc,
                        );
                    }
                    total = V::add(total, acc);
                }
                total.store(buf.as_mut_ptr());
                for (o, &v) in o[d0..d0 + L].iter_mut().zip(&buf) {
                    *o = canonicalize(v);
                }
            }
        } else {
            for (d, o) in o.iter_mut().enumerate() {
                let mut total = 0.0f32;
                for c in row.chunks(K_CHUNK).enumerate() {
                    let (ci, pc) = c;
                    let mut acc = 0.0f32;
                    for (i, &p) in pc.iter().enumerate() {
                        let t = ci * K_CHUNK + i;
                        acc = fma(p, *vbase.add(t * kvd + d), acc);
                    }
                    total = add(total, acc);
                }
                *o = canonicalize(total);
            }
        }
    }
}
