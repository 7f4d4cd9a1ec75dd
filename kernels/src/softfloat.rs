//! IEEE-754 binary32 fused multiply-add, round-to-nearest-even, from 32-bit
//! integer operations only: the algorithm of the WGSL exact path
//! (`shaders/softfloat.wgsl`), written here line for line in Rust.
//!
//! WGSL has no 64-bit integers, so 64-bit values are `(hi, lo)` pairs of
//! `u32`, exactly as in the shader. The structure follows Berkeley SoftFloat
//! 3e's `softfloat_mulAddF32`, specialised to round-to-nearest-even, no
//! exception flags, and a canonical NaN result.
//!
//! This copy exists so the algorithm can be checked against hardware fma on
//! hundreds of millions of triples in seconds; the shader is checked against
//! hardware fma on the GPU (see the tests).

use crate::contract::CANONICAL_NAN_BITS;

/// A 64-bit unsigned value as two 32-bit halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct U64 {
    hi: u32,
    lo: u32,
}

const fn u64c(hi: u32, lo: u32) -> U64 {
    U64 { hi, lo }
}

fn add64(a: U64, b: U64) -> U64 {
    let lo = a.lo.wrapping_add(b.lo);
    let carry = (lo < a.lo) as u32;
    u64c(a.hi.wrapping_add(b.hi).wrapping_add(carry), lo)
}

fn sub64(a: U64, b: U64) -> U64 {
    let borrow = (a.lo < b.lo) as u32;
    u64c(
        a.hi.wrapping_sub(b.hi).wrapping_sub(borrow),
        a.lo.wrapping_sub(b.lo),
    )
}

fn neg64(a: U64) -> U64 {
    sub64(u64c(0, 0), a)
}

fn is_zero64(a: U64) -> bool {
    (a.hi | a.lo) == 0
}

/// Left shift by `d` in 0..64.
fn shl64(a: U64, d: u32) -> U64 {
    if d == 0 {
        a
    } else if d < 32 {
        u64c((a.hi << d) | (a.lo >> (32 - d)), a.lo << d)
    } else {
        u64c(a.lo << (d - 32), 0)
    }
}

/// Right shift by `d` (any value); the bits shifted out are OR-ed ("jammed")
/// into bit 0, so rounding still sees that the value was inexact.
fn shr64_jam(a: U64, d: u32) -> U64 {
    if d == 0 {
        a
    } else if d < 32 {
        let lost = (a.lo << (32 - d)) != 0;
        u64c(a.hi >> d, (a.lo >> d) | (a.hi << (32 - d)) | lost as u32)
    } else if d < 64 {
        let lost = a.lo != 0 || (d > 32 && (a.hi << (64 - d)) != 0);
        let lo = if d == 32 { a.hi } else { a.hi >> (d - 32) };
        u64c(0, lo | lost as u32)
    } else {
        u64c(0, !is_zero64(a) as u32)
    }
}

fn shr32_jam(a: u32, d: u32) -> u32 {
    if d == 0 {
        a
    } else if d < 32 {
        (a >> d) | ((a << (32 - d)) != 0) as u32
    } else {
        (a != 0) as u32
    }
}

fn clz64(a: U64) -> u32 {
    if a.hi != 0 {
        a.hi.leading_zeros()
    } else {
        32 + a.lo.leading_zeros()
    }
}

/// 32×32 → 64-bit product from 16-bit halves (operands below 2^31).
fn mul32(a: u32, b: u32) -> U64 {
    let (a0, a1) = (a & 0xFFFF, a >> 16);
    let (b0, b1) = (b & 0xFFFF, b >> 16);
    let p00 = a0 * b0;
    let mid = a0 * b1 + a1 * b0; // each < 2^31, so no overflow
    let lo = p00.wrapping_add(mid << 16);
    let carry = (lo < p00) as u32;
    u64c(a1 * b1 + (mid >> 16) + carry, lo)
}

fn pack(sign: u32, exp: u32, sig: u32) -> u32 {
    // Addition, not OR: a significand that rounded up to 2^24 carries into
    // the exponent, which is exactly right.
    (sign << 31).wrapping_add(exp << 23).wrapping_add(sig)
}

/// Rounds `sig · 2^(exp − 157)` (sig with its leading one at bit 30 and 7
/// rounding bits below the result's last place) to nearest-even and packs it.
fn round_pack(sign: u32, exp: i32, sig: u32) -> u32 {
    let mut exp = exp;
    let mut sig = sig;
    let mut round_bits = sig & 0x7F;
    if !(0..0xFD).contains(&exp) {
        if exp < 0 {
            sig = shr32_jam(sig, (-exp) as u32);
            exp = 0;
            round_bits = sig & 0x7F;
        } else if exp > 0xFD || sig.wrapping_add(0x40) >= 0x8000_0000 {
            return pack(sign, 0xFF, 0); // overflow to infinity
        }
    }
    sig = sig.wrapping_add(0x40) >> 7;
    if round_bits == 0x40 {
        sig &= !1; // tie: round to even
    }
    if sig == 0 {
        exp = 0;
    }
    pack(sign, exp as u32, sig)
}

/// Normalises a nonzero subnormal significand: returns (exponent, significand
/// with its leading one at bit 23).
fn norm_subnormal(sig: u32) -> (i32, u32) {
    let shift = sig.leading_zeros() - 8;
    (1 - shift as i32, sig << shift)
}

/// `fma(a, b, c)` on bit patterns: `a·b + c` rounded once, to nearest-even;
/// subnormals kept; any NaN result is the canonical NaN.
pub fn fma_bits(ua: u32, ub: u32, uc: u32) -> u32 {
    let (sign_a, mut exp_a, mut sig_a) = (ua >> 31, ((ua >> 23) & 0xFF) as i32, ua & 0x7F_FFFF);
    let (sign_b, mut exp_b, mut sig_b) = (ub >> 31, ((ub >> 23) & 0xFF) as i32, ub & 0x7F_FFFF);
    let (sign_c, mut exp_c, mut sig_c) = (uc >> 31, ((uc >> 23) & 0xFF) as i32, uc & 0x7F_FFFF);
    let sign_prod = sign_a ^ sign_b;

    // Infinities and NaNs.
    if exp_a == 0xFF || exp_b == 0xFF {
        let a_nan = exp_a == 0xFF && sig_a != 0;
        let b_nan = exp_b == 0xFF && sig_b != 0;
        let c_nan = exp_c == 0xFF && sig_c != 0;
        let zero_times_inf = (exp_a | sig_a as i32) == 0 || (exp_b | sig_b as i32) == 0;
        if a_nan || b_nan || c_nan || zero_times_inf {
            return CANONICAL_NAN_BITS;
        }
        if exp_c == 0xFF && sign_c != sign_prod {
            return CANONICAL_NAN_BITS; // inf − inf
        }
        return pack(sign_prod, 0xFF, 0);
    }
    if exp_c == 0xFF {
        return if sig_c != 0 { CANONICAL_NAN_BITS } else { uc };
    }

    // A zero product: the result is c, except that +0 + −0 is +0.
    if (exp_a == 0 && sig_a == 0) || (exp_b == 0 && sig_b == 0) {
        if exp_c == 0 && sig_c == 0 && sign_prod != sign_c {
            return 0;
        }
        return uc;
    }
    if exp_a == 0 {
        (exp_a, sig_a) = norm_subnormal(sig_a);
    }
    if exp_b == 0 {
        (exp_b, sig_b) = norm_subnormal(sig_b);
    }

    // The exact product, leading one at bit 61 of a 64-bit significand.
    let mut exp_prod = exp_a + exp_b - 0x7E;
    let mut sig_prod = mul32((sig_a | 0x80_0000) << 7, (sig_b | 0x80_0000) << 7);
    if sig_prod.hi < 0x2000_0000 {
        exp_prod -= 1;
        sig_prod = shl64(sig_prod, 1);
    }

    let mut sign_z = sign_prod;
    if exp_c == 0 {
        if sig_c == 0 {
            // c is zero: round the product alone.
            let sig_z = shr64_jam(sig_prod, 31).lo;
            return round_pack(sign_z, exp_prod - 1, sig_z);
        }
        (exp_c, sig_c) = norm_subnormal(sig_c);
    }
    let sig_c = (sig_c | 0x80_0000) << 6;
    let exp_diff = exp_prod - exp_c;
    let exp_z;
    let mut sig_z;
    if sign_prod == sign_c {
        // Magnitudes add.
        if exp_diff <= 0 {
            exp_z = exp_c;
            sig_z = sig_c.wrapping_add(shr64_jam(sig_prod, (32 - exp_diff) as u32).lo);
        } else {
            exp_z = exp_prod;
            let sum = add64(sig_prod, shr64_jam(u64c(sig_c, 0), exp_diff as u32));
            sig_z = shr64_jam(sum, 32).lo;
        }
        let mut exp_z = exp_z;
        if sig_z < 0x4000_0000 {
            exp_z -= 1;
            sig_z <<= 1;
        }
        round_pack(sign_z, exp_z, sig_z)
    } else {
        // Magnitudes subtract.
        let sig64_c = u64c(sig_c, 0);
        let mut exp_z;
        let mut sig64_z;
        if exp_diff < 0 {
            sign_z = sign_c;
            exp_z = exp_c;
            sig64_z = sub64(sig64_c, shr64_jam(sig_prod, (-exp_diff) as u32));
        } else if exp_diff == 0 {
            exp_z = exp_prod;
            sig64_z = sub64(sig_prod, sig64_c);
            if is_zero64(sig64_z) {
                return 0; // exact cancellation: +0 under round-to-nearest
            }
            if sig64_z.hi & 0x8000_0000 != 0 {
                sign_z ^= 1;
                sig64_z = neg64(sig64_z);
            }
        } else {
            exp_z = exp_prod;
            sig64_z = sub64(sig_prod, shr64_jam(sig64_c, exp_diff as u32));
        }
        let shift = clz64(sig64_z) as i32 - 1;
        exp_z -= shift;
        let shift = shift - 32;
        let sig_z = if shift < 0 {
            shr64_jam(sig64_z, (-shift) as u32).lo
        } else {
            sig64_z.lo << shift
        };
        round_pack(sign_z, exp_z, sig_z)
    }
}

/// `fma` on floats, through [`fma_bits`].
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    f32::from_bits(fma_bits(a.to_bits(), b.to_bits(), c.to_bits()))
}

/// `x + y` rounded once, as `fma(x, 1, y)`: the product `x·1` is exact, so
/// the single rounding is that of the sum (signs of zero included).
pub fn add_bits(x: u32, y: u32) -> u32 {
    fma_bits(x, 0x3F80_0000, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contract::canonicalize;

    fn check(a: u32, b: u32, c: u32) {
        let want =
            canonicalize(f32::from_bits(a).mul_add(f32::from_bits(b), f32::from_bits(c))).to_bits();
        let got = fma_bits(a, b, c);
        assert_eq!(got, want, "fma({a:#010x}, {b:#010x}, {c:#010x})");
    }

    #[test]
    fn edge_cases() {
        for [a, b, c] in crate::conformance::edge_triples(crate::conformance::EDGE_VALUES) {
            check(a, b, c);
        }
    }

    #[test]
    fn random_triples() {
        // Twenty million triples aimed at fma's hard cases (cancellation,
        // subnormal results, overflow, ties), checked at Rust speed.
        for [a, b, c] in
            crate::conformance::RandomTriples::new(0x9E37_79B9_7F4A_7C15).take(20_000_000)
        {
            check(a, b, c);
        }
    }

    #[test]
    fn add_is_correctly_rounded() {
        for &(x, y) in &[
            (0u32, 0x8000_0000u32),
            (0x8000_0000, 0x8000_0000),
            (1, 1),
            (0x3F80_0000, 0x3380_0000),
            (0x7F7F_FFFF, 0x7F7F_FFFF),
        ] {
            let want = canonicalize(f32::from_bits(x) + f32::from_bits(y)).to_bits();
            assert_eq!(add_bits(x, y), want);
        }
    }
}
