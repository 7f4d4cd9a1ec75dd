//! Weight formats, their dequantisation, and the matrix–vector product over
//! each (CONTRACT.md §9.1–9.2).
//!
//! A weight matrix `W` is [rows, cols], row-major, each row stored in the
//! format's blocks along `cols`. `y = W·x` gives one value per row, each the
//! format's dot product ([`dot`]) of that row with `x`: rows never interact,
//! so splitting rows across threads, or computing many `x` at once (a
//! prefill chunk, a batch), changes no bit.

use super::prim::{add, fma, mul};
use super::{canonicalize, K_CHUNK};

/// How a weight tensor is stored (GGML's type numbers in [`Format::ggml`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    F32,
    F16,
    BF16,
    /// Blocks of 32: an f16 scale `d`, 32 × i8 `q`; value `q·d`.
    Q8_0,
    /// Blocks of 32: f16 `d`, f16 `m`, 16 bytes of 4-bit `q` (element j in
    /// the low nibble of byte j, element j+16 in its high nibble); value
    /// `fma(q, d, m)`.
    Q4_1,
}

/// Elements per block of the quantised formats.
pub const QK: usize = 32;

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::F32 => "f32",
            Format::F16 => "f16",
            Format::BF16 => "bf16",
            Format::Q8_0 => "q8_0",
            Format::Q4_1 => "q4_1",
        }
    }

    /// GGML's type number.
    pub fn ggml(self) -> u32 {
        match self {
            Format::F32 => 0,
            Format::F16 => 1,
            Format::Q4_1 => 3,
            Format::Q8_0 => 8,
            Format::BF16 => 30,
        }
    }

    pub fn from_ggml(t: u32) -> Option<Format> {
        Some(match t {
            0 => Format::F32,
            1 => Format::F16,
            3 => Format::Q4_1,
            8 => Format::Q8_0,
            30 => Format::BF16,
            _ => return None,
        })
    }

    /// (elements, bytes) of one block.
    pub fn block(self) -> (usize, usize) {
        match self {
            Format::F32 => (1, 4),
            Format::F16 | Format::BF16 => (1, 2),
            Format::Q8_0 => (QK, 34),
            Format::Q4_1 => (QK, 20),
        }
    }

    /// Bytes of a row of `cols` elements, or `None` when `cols` is not a
    /// whole number of blocks (or overflows).
    pub fn row_bytes(self, cols: usize) -> Option<usize> {
        let (n, b) = self.block();
        if !cols.is_multiple_of(n) {
            return None;
        }
        (cols / n).checked_mul(b)
    }
}

/// An IEEE binary16 bit pattern as f32 (exact; subnormals, ±inf and NaN kept).
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h as u32) & 0x8000) << 16;
    let exp = ((h >> 10) & 0x1F) as u32;
    let man = (h & 0x3FF) as u32;
    let bits = match (exp, man) {
        (0, 0) => sign,
        (0, _) => {
            // Subnormal: man · 2^-24, exact in f32.
            let v = man as f32 * f32::from_bits(0x3380_0000);
            sign | v.to_bits()
        }
        (0x1F, 0) => sign | 0x7F80_0000,
        (0x1F, _) => sign | 0x7FC0_0000 | (man << 13),
        _ => sign | ((exp + 112) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// A bfloat16 bit pattern as f32 (the upper half of an f32; exact).
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

fn half(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// One block's scale(s) and quants: (d, m, q[32]) — `m` is 0 for Q8_0.
fn q_block(format: Format, blk: &[u8]) -> (f32, f32, [f32; QK]) {
    let mut q = [0f32; QK];
    match format {
        Format::Q8_0 => {
            for (j, v) in q.iter_mut().enumerate() {
                *v = blk[2 + j] as i8 as f32;
            }
            (f16_to_f32(half(blk, 0)), 0.0, q)
        }
        Format::Q4_1 => {
            for j in 0..QK / 2 {
                q[j] = (blk[4 + j] & 0x0F) as f32;
                q[j + QK / 2] = (blk[4 + j] >> 4) as f32;
            }
            (f16_to_f32(half(blk, 0)), f16_to_f32(half(blk, 2)), q)
        }
        _ => unreachable!("not a block format"),
    }
}

/// Dequantises `n` elements stored in `format` (CONTRACT.md §9.1): F16 and
/// BF16 widen exactly; Q8_0 is `mul(q, d)` (exact: 8 × 11 significant bits);
/// Q4_1 is `fma(q, d, m)`, one rounding.
pub fn dequantize(format: Format, bytes: &[u8], n: usize) -> Vec<f32> {
    match format {
        Format::F32 => bytes[..n * 4]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Format::F16 => (0..n).map(|i| f16_to_f32(half(bytes, 2 * i))).collect(),
        Format::BF16 => (0..n).map(|i| bf16_to_f32(half(bytes, 2 * i))).collect(),
        Format::Q8_0 | Format::Q4_1 => {
            let (_, bb) = format.block();
            let mut out = Vec::with_capacity(n);
            for blk in bytes[..n / QK * bb].chunks_exact(bb) {
                let (d, m, q) = q_block(format, blk);
                out.extend(q.iter().map(|&q| match format {
                    Format::Q8_0 => mul(q, d),
                    _ => fma(q, d, m),
                }));
            }
            out
        }
    }
}

/// The f32 dot product with the 256-chunk rule (as matmul, CONTRACT.md §4):
/// an fma chain from +0 per chunk of 256, the chunk sums added in order to
/// +0. Not canonicalised (callers are).
pub fn dot_f32(w: &[f32], x: &[f32]) -> f32 {
    debug_assert_eq!(w.len(), x.len());
    let mut total = 0.0f32;
    for (wc, xc) in w.chunks(K_CHUNK).zip(x.chunks(K_CHUNK)) {
        let mut acc = 0.0f32;
        for (&a, &b) in wc.iter().zip(xc) {
            acc = fma(a, b, acc);
        }
        total = add(total, acc);
    }
    total
}

/// The dot product of one stored row with `x` (CONTRACT.md §9.2), not
/// canonicalised:
/// - F32, F16, BF16: the row dequantised, then [`dot_f32`];
/// - Q8_0, per block in order: `s = Σ fma(q_j, x_j, s)` from +0 in element
///   order; `total = fma(d, s, total)` from +0;
/// - Q4_1, per block in order: `s = fma(q_j, x_j, s)` then
///   `s = fma(q_{j+16}, x_{j+16}, s)` for j = 0..15 (byte by byte: low nibble,
///   high nibble), from +0; `xs = Σ add(xs, x_j)` from +0 in element order;
///   `total = fma(d, s, total)`, then `total = fma(m, xs, total)`.
pub fn dot(format: Format, row: &[u8], x: &[f32]) -> f32 {
    match format {
        Format::F32 | Format::F16 | Format::BF16 => dot_f32(&dequantize(format, row, x.len()), x),
        Format::Q8_0 | Format::Q4_1 => {
            let (_, bb) = format.block();
            let mut total = 0.0f32;
            for (blk, xb) in row.chunks_exact(bb).zip(x.chunks_exact(QK)) {
                let (d, m, q) = q_block(format, blk);
                let mut s = 0.0f32;
                if format == Format::Q4_1 {
                    // Byte by byte: its low nibble (element j), then its
                    // high nibble (element j+16).
                    for j in 0..QK / 2 {
                        s = fma(q[j], xb[j], s);
                        s = fma(q[j + QK / 2], xb[j + QK / 2], s);
                    }
                } else {
                    for (&q, &x) in q.iter().zip(xb) {
                        s = fma(q, x, s);
                    }
                }
                total = fma(d, s, total);
                if format == Format::Q4_1 {
                    let mut xs = 0.0f32;
                    for &x in xb {
                        xs = add(xs, x);
                    }
                    total = fma(m, xs, total);
                }
            }
            total
        }
    }
}

/// `y = W·x` for a [rows, cols] matrix stored in `format`, canonicalised:
/// the scalar spec every fast matvec is tested against.
pub fn matvec_spec(format: Format, w: &[u8], rows: usize, cols: usize, x: &[f32]) -> Vec<f32> {
    let rb = format.row_bytes(cols).expect("whole blocks");
    (0..rows)
        .map(|r| canonicalize(dot(format, &w[r * rb..(r + 1) * rb], x)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_widening_is_exact() {
        assert_eq!(f16_to_f32(0x3C00), 1.0);
        assert_eq!(f16_to_f32(0xC000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        assert_eq!(f16_to_f32(0x7BFF), 65504.0);
        assert_eq!(f16_to_f32(0x7C00), f32::INFINITY);
        assert!(f16_to_f32(0x7E00).is_nan());
        assert_eq!(f16_to_f32(0x8000).to_bits(), 0x8000_0000);
        assert_eq!(bf16_to_f32(0x3F80), 1.0);
    }

    #[test]
    fn q4_1_dot_is_the_block_formula() {
        // d = 0.5, m = -1, q_j = j % 16.
        let mut blk = vec![0u8; 20];
        blk[0..2].copy_from_slice(&0x3800u16.to_le_bytes());
        blk[2..4].copy_from_slice(&0xBC00u16.to_le_bytes());
        for j in 0..16 {
            blk[4 + j] = (j as u8) | ((j as u8) << 4);
        }
        let x = vec![1.0f32; 32];
        let w = dequantize(Format::Q4_1, &blk, 32);
        assert_eq!(w[3], 0.5);
        assert_eq!(w[19], 0.5);
        let want: f32 = w.iter().sum();
        assert_eq!(dot(Format::Q4_1, &blk, &x), want);
    }
}
