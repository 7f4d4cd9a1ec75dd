//! `Y = X·Wᵀ` for weights kept in their stored format (F32, F16, BF16, Q8_0,
//! Q4_1): the matrix–vector products of a language model, for one token
//! (decode) or many (prefill, a batch), exact to CONTRACT.md §9.2.
//!
//! Why it is exact: the contract fixes a sequential chain per output row.
//! So the SIMD lanes run across *rows*, never along one row: weights are
//! repacked at load in groups of 16 rows, interleaved so that one vector
//! load gives element k of 16 rows. Each lane then does exactly the scalar
//! spec's chain for its row. Several groups (decode) or several tokens
//! (prefill) are in flight at once so the chains overlap; threads own
//! disjoint groups. Nothing depends on the tile, the thread count or the
//! number of tokens.
//!
//! Packed layout, per group of 16 rows (the last group padded with zero
//! rows, whose outputs are dropped), block by block along the columns:
//! - Q4_1: 16 × f16 `d`, 16 × f16 `m`, then for j in 0..16 the 16 rows'
//!   byte j (low nibble: element j, high: element j+16): 320 bytes;
//! - Q8_0: 16 × f16 `d`, then for j in 0..32 the 16 rows' i8: 544 bytes;
//! - F32: for each column the 16 rows' values (64 bytes);
//! - F16, BF16: kept as stored, for each column the 16 rows' halves (32
//!   bytes), widened exactly in the kernel.

use crate::contract::canonicalize;
use crate::contract::prim::add;
use crate::contract::quant::{bf16_to_f32, f16_to_f32, Format, QK};
use crate::contract::K_CHUNK;
#[cfg(target_arch = "x86_64")]
use crate::cpu::lanes::x86;
use crate::cpu::lanes::{Lanes, Portable};
use crate::cpu::matmul::Isa;
use crate::cpu::team::{share, SendPtr, Team};
use crate::error::{Error, Result};

/// Rows per packed group (one AVX-512 vector of f32).
pub const GROUP: usize = 16;

/// A weight matrix [rows, cols] packed for [`PackedMatrix::matmul`].
pub struct PackedMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    groups: usize,
    data: Vec<u8>,
}

impl std::fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PackedMatrix({} [{}, {}])",
            self.format.name(),
            self.rows,
            self.cols
        )
    }
}

fn group_block_bytes(format: Format) -> usize {
    match format {
        Format::Q4_1 => 2 * GROUP * 2 + 16 * GROUP,
        Format::Q8_0 => GROUP * 2 + QK * GROUP,
        // One column of 16 values.
        Format::F32 => GROUP * 4,
        Format::F16 | Format::BF16 => GROUP * 2,
    }
}

impl PackedMatrix {
    /// Packs a row-major matrix stored in `format` (GGML's layout).
    pub fn pack(format: Format, rows: usize, cols: usize, raw: &[u8]) -> Result<Self> {
        let rb = format.row_bytes(cols).ok_or_else(|| {
            Error::shape(format!(
                "a {} row of {cols} values is not a whole number of blocks",
                format.name()
            ))
        })?;
        let need = rows
            .checked_mul(rb)
            .ok_or_else(|| Error::too_large("weight matrix size overflows"))?;
        if raw.len() != need {
            return Err(Error::shape(format!(
                "a {} [{rows}, {cols}] matrix takes {need} bytes, got {}",
                format.name(),
                raw.len()
            )));
        }
        let groups = rows.div_ceil(GROUP);
        let gb = group_block_bytes(format);
        let per_group = match format {
            Format::Q4_1 | Format::Q8_0 => cols / QK * gb,
            _ => cols * gb,
        };
        let mut data = vec![0u8; groups * per_group];
        for r in 0..rows {
            let (g, lane) = (r / GROUP, r % GROUP);
            let row = &raw[r * rb..(r + 1) * rb];
            let dst = &mut data[g * per_group..(g + 1) * per_group];
            match format {
                Format::Q4_1 => {
                    for (b, blk) in row.chunks_exact(20).enumerate() {
                        let o = b * gb;
                        dst[o + 2 * lane..o + 2 * lane + 2].copy_from_slice(&blk[0..2]);
                        dst[o + 32 + 2 * lane..o + 34 + 2 * lane].copy_from_slice(&blk[2..4]);
                        for j in 0..16 {
                            dst[o + 64 + j * GROUP + lane] = blk[4 + j];
                        }
                    }
                }
                Format::Q8_0 => {
                    for (b, blk) in row.chunks_exact(34).enumerate() {
                        let o = b * gb;
                        dst[o + 2 * lane..o + 2 * lane + 2].copy_from_slice(&blk[0..2]);
                        for j in 0..QK {
                            dst[o + 32 + j * GROUP + lane] = blk[2 + j];
                        }
                    }
                }
                Format::F32 => {
                    for k in 0..cols {
                        let o = k * gb + 4 * lane;
                        dst[o..o + 4].copy_from_slice(&row[4 * k..4 * k + 4]);
                    }
                }
                Format::F16 | Format::BF16 => {
                    for k in 0..cols {
                        let o = k * gb + 2 * lane;
                        dst[o..o + 2].copy_from_slice(&row[2 * k..2 * k + 2]);
                    }
                }
            }
        }
        Ok(Self {
            format,
            rows,
            cols,
            groups,
            data,
        })
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    fn per_group(&self) -> usize {
        self.data.len() / self.groups.max(1)
    }

    /// Row `r` in its stored format (GGML's layout; F16 and BF16 rows come
    /// back widened to F32, exactly, as the model digest and the GPUs take
    /// them): what the scalar spec reads.
    pub fn raw_row(&self, r: usize) -> Vec<u8> {
        let (g, lane) = (r / GROUP, r % GROUP);
        let src = &self.data[g * self.per_group()..(g + 1) * self.per_group()];
        let gb = group_block_bytes(self.format);
        match self.format {
            Format::Q4_1 => {
                let mut out = Vec::with_capacity(self.cols / QK * 20);
                for o in (0..src.len()).step_by(gb) {
                    out.extend_from_slice(&src[o + 2 * lane..o + 2 * lane + 2]);
                    out.extend_from_slice(&src[o + 32 + 2 * lane..o + 34 + 2 * lane]);
                    out.extend((0..16).map(|j| src[o + 64 + j * GROUP + lane]));
                }
                out
            }
            Format::Q8_0 => {
                let mut out = Vec::with_capacity(self.cols / QK * 34);
                for o in (0..src.len()).step_by(gb) {
                    out.extend_from_slice(&src[o + 2 * lane..o + 2 * lane + 2]);
                    out.extend((0..QK).map(|j| src[o + 32 + j * GROUP + lane]));
                }
                out
            }
            Format::F32 => (0..self.cols)
                .flat_map(|k| {
                    let o = k * gb + 4 * lane;
                    [src[o], src[o + 1], src[o + 2], src[o + 3]]
                })
                .collect(),
            // Widened exactly: F16 and BF16 rows read as the F32 they are.
            Format::F16 | Format::BF16 => (0..self.cols)
                .flat_map(|k| {
                    let o = k * gb + 2 * lane;
                    let h = u16::from_le_bytes([src[o], src[o + 1]]);
                    let v = match self.format {
                        Format::F16 => f16_to_f32(h),
                        _ => bf16_to_f32(h),
                    };
                    v.to_le_bytes()
                })
                .collect(),
        }
    }

    /// The format [`PackedMatrix::raw_row`] returns.
    pub fn raw_format(&self) -> Format {
        match self.format {
            Format::F16 | Format::BF16 => Format::F32,
            f => f,
        }
    }

    /// Row `r` dequantised (CONTRACT.md §9.1): an embedding lookup.
    pub fn dequantize_row(&self, r: usize) -> Vec<f32> {
        crate::contract::quant::dequantize(self.raw_format(), &self.raw_row(r), self.cols)
    }

    /// `y[t] = W·x[t]` for `tokens` rows of `x` ([tokens, cols]) into `y`
    /// ([tokens, rows]), canonicalised; groups split over `team`'s threads.
    pub fn matmul(&self, x: &[f32], tokens: usize, y: &mut [f32], isa: Isa, team: Option<&Team>) {
        matmuls(&mut [(self, x, y)], tokens, isa, team)
    }

    #[allow(clippy::too_many_arguments)]
    unsafe fn groups_range(
        &self,
        x: &[f32],
        xs: &[f32],
        tokens: usize,
        y: *mut f32,
        g0: usize,
        g1: usize,
        isa: Isa,
    ) {
        match isa {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => avx512_range(self, x, xs, tokens, y, g0, g1),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if std::arch::is_x86_feature_detected!("f16c") => {
                avx2_range(self, x, xs, tokens, y, g0, g1)
            }
            _ => tiles::<Portable>(self, x, xs, tokens, y, g0, g1),
        }
    }
}

/// Several independent products `y_i = W_i·x_i` on `tokens` rows each,
/// split over the team in one parallel step (one start of the threads
/// instead of one per product). Each product is exactly
/// [`PackedMatrix::matmul`]'s.
pub fn matmuls(
    jobs: &mut [(&PackedMatrix, &[f32], &mut [f32])],
    tokens: usize,
    isa: Isa,
    team: Option<&Team>,
) {
    // An ISA this CPU lacks runs the portable path (same bits).
    let isa = if isa.is_supported() {
        isa
    } else {
        Isa::Portable
    };
    let mut prepared = Vec::with_capacity(jobs.len());
    for (m, x, y) in jobs.iter_mut() {
        assert_eq!(x.len(), tokens * m.cols);
        assert_eq!(y.len(), tokens * m.rows);
        if tokens == 0 || m.rows == 0 {
            continue;
        }
        // Per-block sums of x for Q4_1's m term (CONTRACT.md §9.2), once.
        let xs: Vec<f32> = if m.format == Format::Q4_1 {
            x.chunks_exact(QK)
                .map(|c| c.iter().fold(0.0f32, |a, &v| add(a, v)))
                .collect()
        } else {
            Vec::new()
        };
        prepared.push((*m, *x, xs, SendPtr(y.as_mut_ptr())));
    }
    let run = |i: usize, g0: usize, g1: usize| {
        let (m, x, xs, out) = &prepared[i];
        // SAFETY: each call writes only the columns of groups g0..g1 of its
        // own output.
        unsafe { m.groups_range(x, xs, tokens, out.0, g0, g1, isa) }
    };
    match team {
        Some(team) if team.size() > 1 => team.run(&|member| {
            // Each member owns its share of every product's groups.
            for (i, (m, ..)) in prepared.iter().enumerate() {
                let (g0, g1) = share(m.groups, member, team.size());
                if g0 < g1 {
                    run(i, g0, g1);
                }
            }
        }),
        _ => {
            for (i, (m, ..)) in prepared.iter().enumerate() {
                run(i, 0, m.groups);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512_range(
    m: &PackedMatrix,
    x: &[f32],
    xs: &[f32],
    tokens: usize,
    y: *mut f32,
    g0: usize,
    g1: usize,
) {
    tiles::<x86::Avx512>(m, x, xs, tokens, y, g0, g1)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn avx2_range(
    m: &PackedMatrix,
    x: &[f32],
    xs: &[f32],
    tokens: usize,
    y: *mut f32,
    g0: usize,
    g1: usize,
) {
    tiles::<x86::Avx2>(m, x, xs, tokens, y, g0, g1)
}

/// Walks groups g0..g1 in tiles: 4 groups × 1 token (decode: four chains in
/// flight), or 1 group × 4 tokens (prefill).
#[inline(always)]
unsafe fn tiles<L: Lanes>(
    m: &PackedMatrix,
    x: &[f32],
    xs: &[f32],
    tokens: usize,
    y: *mut f32,
    g0: usize,
    g1: usize,
) {
    let mut t = 0;
    while t + 4 <= tokens {
        for g in g0..g1 {
            tile::<L, 1, 4>(m, x, xs, t, y, g);
        }
        t += 4;
    }
    while t < tokens {
        let mut g = g0;
        while g + 4 <= g1 {
            tile::<L, 4, 1>(m, x, xs, t, y, g);
            g += 4;
        }
        while g < g1 {
            tile::<L, 1, 1>(m, x, xs, t, y, g);
            g += 1;
        }
        t += 1;
    }
}

/// NG groups × TT tokens, starting at group `g` and token `t`.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices keep the tile's shape readable
unsafe fn tile<L: Lanes, const NG: usize, const TT: usize>(
    m: &PackedMatrix,
    x: &[f32],
    xs: &[f32],
    t: usize,
    y: *mut f32,
    g: usize,
) {
    let cols = m.cols;
    let pg = m.per_group();
    let base = m.data.as_ptr();
    let xp = x.as_ptr().add(t * cols);
    let mut total = [[L::zero(); TT]; NG];
    match m.format {
        Format::Q4_1 | Format::Q8_0 => {
            let gb = group_block_bytes(m.format);
            let nb = cols / QK;
            for b in 0..nb {
                let mut s = [[L::zero(); TT]; NG];
                let blk: [*const u8; NG] = std::array::from_fn(|i| base.add((g + i) * pg + b * gb));
                let xb = xp.add(b * QK);
                if m.format == Format::Q4_1 {
                    // Byte j of each row: element j (low nibble), then
                    // element j+16 (high nibble), as the spec's chain.
                    for j in 0..16 {
                        for i in 0..NG {
                            let (lo, hi) = L::nibbles(blk[i].add(64 + j * GROUP));
                            for k in 0..TT {
                                s[i][k] = L::fma(lo, L::splat(*xb.add(k * cols + j)), s[i][k]);
                                s[i][k] = L::fma(hi, L::splat(*xb.add(k * cols + 16 + j)), s[i][k]);
                            }
                        }
                    }
                    for i in 0..NG {
                        let d = L::f16(blk[i]);
                        let mm = L::f16(blk[i].add(32));
                        for k in 0..TT {
                            total[i][k] = L::fma(d, s[i][k], total[i][k]);
                            let xsum = *xs.get_unchecked((t + k) * nb + b);
                            total[i][k] = L::fma(mm, L::splat(xsum), total[i][k]);
                        }
                    }
                } else {
                    for j in 0..QK {
                        for i in 0..NG {
                            let w = L::i8(blk[i].add(32 + j * GROUP));
                            for k in 0..TT {
                                s[i][k] = L::fma(w, L::splat(*xb.add(k * cols + j)), s[i][k]);
                            }
                        }
                    }
                    for i in 0..NG {
                        let d = L::f16(blk[i]);
                        for k in 0..TT {
                            total[i][k] = L::fma(d, s[i][k], total[i][k]);
                        }
                    }
                }
            }
        }
        Format::F32 | Format::F16 | Format::BF16 => {
            let mut c0 = 0;
            while c0 < cols {
                let c1 = (c0 + K_CHUNK).min(cols);
                let mut s = [[L::zero(); TT]; NG];
                for c in c0..c1 {
                    for i in 0..NG {
                        let w = match m.format {
                            Format::F32 => L::f32(base.add((g + i) * pg + c * GROUP * 4)),
                            Format::F16 => L::f16(base.add((g + i) * pg + c * GROUP * 2)),
                            _ => L::bf16(base.add((g + i) * pg + c * GROUP * 2)),
                        };
                        for k in 0..TT {
                            s[i][k] = L::fma(w, L::splat(*xp.add(k * cols + c)), s[i][k]);
                        }
                    }
                }
                for i in 0..NG {
                    for k in 0..TT {
                        total[i][k] = L::add(total[i][k], s[i][k]);
                    }
                }
                c0 = c1;
            }
        }
    }
    let mut buf = [0f32; GROUP];
    for i in 0..NG {
        for k in 0..TT {
            total[i][k].store(buf.as_mut_ptr());
            let r0 = (g + i) * GROUP;
            let valid = m.rows.saturating_sub(r0).min(GROUP);
            let dst = y.add((t + k) * m.rows + r0);
            for (l, v) in buf[..valid].iter().enumerate() {
                *dst.add(l) = canonicalize(*v);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::quant::matvec_spec;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn packed_rows_round_trip() {
        let mut seed = 7;
        for format in [
            Format::Q4_1,
            Format::Q8_0,
            Format::F32,
            Format::F16,
            Format::BF16,
        ] {
            let (rows, cols) = (37, 64);
            let rb = format.row_bytes(cols).unwrap();
            let mut raw: Vec<u8> = (0..rows * rb).map(|_| lcg(&mut seed) as u8).collect();
            match format {
                // Keep the bit patterns finite.
                Format::F32 => raw.chunks_exact_mut(4).for_each(|c| c[3] &= 0x3F),
                Format::F16 | Format::BF16 => raw.chunks_exact_mut(2).for_each(|c| c[1] &= 0x3B),
                _ => {}
            }
            let m = PackedMatrix::pack(format, rows, cols, &raw).unwrap();
            // F16 and BF16 are held as stored: half of F32.
            if format == Format::F16 {
                assert_eq!(m.bytes(), rows.div_ceil(GROUP) * GROUP * cols * 2);
            }
            for r in 0..rows {
                let want = match format {
                    Format::F16 | Format::BF16 => {
                        crate::contract::quant::dequantize(format, &raw[r * rb..(r + 1) * rb], cols)
                            .iter()
                            .flat_map(|v| v.to_le_bytes())
                            .collect::<Vec<u8>>()
                    }
                    _ => raw[r * rb..(r + 1) * rb].to_vec(),
                };
                assert_eq!(m.raw_row(r), want, "{format:?} row {r}");
            }
            let x: Vec<f32> = (0..cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y = vec![0f32; rows];
            m.matmul(&x, 1, &mut y, Isa::Portable, None);
            let want = matvec_spec(format, &raw, rows, cols, &x);
            assert_eq!(
                y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
        }
    }
}
