//! The primitives (CONTRACT.md §3) and the fixed transcendental algorithms
//! built from them (CONTRACT.md §8).
//!
//! Every rounding in every op is one of [`fma`], [`add`], [`mul`], [`div`]
//! or [`sqrt`]: IEEE-754 binary32, round to nearest even, subnormals kept.
//! Rust computes each of these exactly so (it never contracts or
//! reassociates float expressions; `mul_add` is a single rounding, in
//! software where the CPU has no fma). Everything else is exact: negation,
//! comparisons, conversions of small integers, and integer work on bit
//! patterns.
//!
//! The transcendentals ([`exp`], [`ln`], [`sin_cos`]) are fixed sequences
//! of those primitives: range reduction, a polynomial with the coefficients
//! written below evaluated by Horner's rule with fma, and exact scaling. No
//! libm is called. Their measured error against float64 is stated on each
//! function and checked by `tests/tests/transcendentals.rs`.

/// `a·b + c`, rounded once.
#[inline(always)]
pub fn fma(a: f32, b: f32, c: f32) -> f32 {
    a.mul_add(b, c)
}

/// `x + y`, rounded once.
#[inline(always)]
pub fn add(x: f32, y: f32) -> f32 {
    x + y
}

/// `x − y`, rounded once (`add(x, −y)`).
#[inline(always)]
pub fn sub(x: f32, y: f32) -> f32 {
    x - y
}

/// `x·y`, rounded once.
#[inline(always)]
pub fn mul(x: f32, y: f32) -> f32 {
    x * y
}

/// `x / y`, rounded once.
#[inline(always)]
pub fn div(x: f32, y: f32) -> f32 {
    x / y
}

/// `√x`, rounded once (`√−0 = −0`, negative → NaN).
#[inline(always)]
pub fn sqrt(x: f32) -> f32 {
    x.sqrt()
}

/// `2^n` for `n` in −126..=127, built from its bit pattern.
#[inline(always)]
fn pow2(n: i32) -> f32 {
    debug_assert!((-126..=127).contains(&n));
    f32::from_bits(((n + 127) as u32) << 23)
}

/// `1.5·2^23`: adding and subtracting it rounds an |t| < 2^22 to the
/// nearest integer, ties to even.
const ROUNDER: f32 = 12_582_912.0;

const LOG2E: f32 = f32::from_bits(0x3FB8_AA3B); // 1.44269504
const LN2_HI: f32 = f32::from_bits(0x3F31_7200); // 0.693145752 (15 significant bits)
const LN2_LO: f32 = f32::from_bits(0x35BF_BE8E); // 1.42860677e-6
/// Above this, `exp` is +inf (the largest x with a finite result is below it).
const EXP_MAX: f32 = f32::from_bits(0x42B1_7217); // 88.7228317
/// Below this, `exp` is +0.
const EXP_MIN: f32 = f32::from_bits(0xC2CF_F1B5); // -103.972076

/// e^x (CONTRACT.md §8.1). Cody–Waite reduction `x = n·ln2 + r`,
/// |r| ≤ ln2/2, with `n = round(x·log2e)` and ln2 split in two; Cephes'
/// degree-5 minimax polynomial `e^r ≈ 1 + r + r²·P(r)`; scaling by `2^n`
/// in one or two exact steps so that only the last multiplication rounds
/// (overflow gives +inf, subnormal results round once).
///
/// NaN → NaN, +inf → +inf, −inf → +0. Measured against e^x in float64,
/// rounded to f32: at most 1 ulp, over every f32 of the finite range
/// (`tests/tests/transcendentals.rs`, exhaustive with
/// `LOCKSTEP_EXHAUSTIVE=1`).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_MAX {
        return f32::INFINITY;
    }
    if x < EXP_MIN {
        return 0.0;
    }
    let n = sub(add(mul(x, LOG2E), ROUNDER), ROUNDER);
    let r = fma(-n, LN2_HI, x);
    let r = fma(-n, LN2_LO, r);
    let mut p = 1.987_569_1e-4_f32;
    p = fma(p, r, 1.398_199_9e-3);
    p = fma(p, r, 8.333_452e-3);
    p = fma(p, r, 4.166_579_6e-2);
    p = fma(p, r, 1.666_666_5e-1);
    p = fma(p, r, 0.5); // Cephes' 5.0000001201e-1, which rounds to 0.5 in f32
    let y = add(fma(p, mul(r, r), r), 1.0);
    let n = n as i32;
    if n > 127 {
        mul(mul(y, pow2(127)), pow2(n - 127))
    } else if n < -126 {
        mul(mul(y, pow2(n + 64)), pow2(-64))
    } else {
        mul(y, pow2(n))
    }
}

/// The natural logarithm (CONTRACT.md §8.2), Cephes' `logf`: `x = m·2^e`
/// with `m` in [√½, √2) taken from the bit pattern (subnormals normalised
/// first), `f = m − 1`, a degree-9 polynomial, and `e·ln2` added in two
/// parts. Used on the host only (the RoPE frequencies).
///
/// x < 0 or NaN → NaN; ±0 → −inf; +inf → +inf. Measured against float64:
/// at most 1 ulp over every positive finite f32, subnormals included.
pub fn ln(x: f32) -> f32 {
    if x.is_nan() || x < 0.0 {
        return f32::NAN;
    }
    if x == 0.0 {
        return f32::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let (mut bits, mut e) = (x.to_bits(), 0i32);
    if bits < 0x0080_0000 {
        // Subnormal: scale by 2^25 exactly.
        bits = mul(x, pow2(25)).to_bits();
        e -= 25;
    }
    e += ((bits >> 23) as i32) - 126;
    // m in [0.5, 1)
    let mut m = f32::from_bits((bits & 0x007F_FFFF) | 0x3F00_0000);
    if m < std::f32::consts::FRAC_1_SQRT_2 {
        e -= 1;
        m = sub(add(m, m), 1.0);
    } else {
        m = sub(m, 1.0);
    }
    let f = m;
    let z = mul(f, f);
    let mut p = 7.037_683_6e-2_f32;
    p = fma(p, f, -1.151_461e-1);
    p = fma(p, f, 1.167_699_9e-1);
    p = fma(p, f, -1.242_014_1e-1);
    p = fma(p, f, 1.424_932_3e-1);
    p = fma(p, f, -1.666_805_8e-1);
    p = fma(p, f, 2.000_071_4e-1);
    p = fma(p, f, -2.499_999_4e-1);
    p = fma(p, f, f32::from_bits(0x3EAA_AAAA)); // 3.3333331174e-1
    let ef = e as f32;
    let mut y = mul(mul(p, f), z);
    y = fma(ef, -2.121_944_4e-4, y);
    y = fma(-0.5, z, y);
    let r = add(f, y);
    fma(ef, 0.693_359_4, r)
}

const FOPI: f32 = f32::from_bits(0x3FA2_F983); // 4/π
const DP1: f32 = 0.785_156_25;
const DP2: f32 = 2.418_756_5e-4;
const DP3: f32 = 3.774_895e-8;
/// Largest |x| for which [`sin_cos`] is specified to be accurate.
pub const SIN_COS_MAX: f32 = 65536.0;

/// `(sin x, cos x)` (CONTRACT.md §8.3), Cephes' `sinf`/`cosf`: octant
/// `j = ⌊|x|·4/π⌋` rounded up to even, `r = |x| − j·π/4` with π/4 in three
/// parts (each product exact), then the sine or cosine polynomial on
/// |r| ≤ π/4 and the octant's signs.
///
/// Defined for every f32 (NaN or ±inf → NaN, NaN; when `|x|·4/π ≥ 2^24`
/// the octant is taken as 0, which keeps every conversion exact); accurate for
/// |x| ≤ [`SIN_COS_MAX`], which covers RoPE angles `pos·θ^(−2i/d)` for any
/// position below 65536. Measured against float64 on every f32 of
/// [0, 65536] (and their negatives, which are exactly odd/even): an absolute
/// error of at most 2^−23 · max(1, |x|/2^13), and 1 ulp on [0, π/4].
#[inline(always)]
pub fn sin_cos(x: f32) -> (f32, f32) {
    if !x.is_finite() {
        return (f32::NAN, f32::NAN);
    }
    let ax = x.abs();
    let t = mul(ax, FOPI);
    // The integer part (exact); angles this large (|x| ≥ 2^24·π/4, far
    // outside the accurate range) take j = 0, so every conversion is exact.
    let mut j = if t < 16_777_216.0 { t as u32 } else { 0 };
    let mut y = j as f32;
    if j & 1 == 1 {
        j += 1;
        y = add(y, 1.0);
    }
    let j = j & 7;
    let r = fma(-y, DP1, ax);
    let r = fma(-y, DP2, r);
    let r = fma(-y, DP3, r);
    let z = mul(r, r);
    let sin_poly = {
        let mut p = -1.951_529_6e-4_f32;
        p = fma(p, z, 8.332_161e-3);
        p = fma(p, z, -1.666_665_5e-1);
        fma(mul(p, z), r, r)
    };
    let cos_poly = {
        let mut p = 2.443_315_7e-5_f32;
        p = fma(p, z, -1.388_731_6e-3);
        p = fma(p, z, 4.166_664_6e-2);
        let t = mul(mul(p, z), z);
        add(fma(-0.5, z, t), 1.0)
    };
    // Octant j (mod 8, pairs already merged to 0, 2, 4, 6).
    let (s, c) = match j {
        0 => (sin_poly, cos_poly),
        2 => (cos_poly, -sin_poly),
        4 => (-sin_poly, -cos_poly),
        _ => (-cos_poly, sin_poly),
    };
    if x.is_sign_negative() {
        (-s, c)
    } else {
        (s, c)
    }
}

/// SiLU, `x·σ(x) = x / (1 + e^−x)` (CONTRACT.md §9.5):
/// `div(x, add(1, exp(−x)))`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    div(x, add(1.0, exp(-x)))
}

/// The ulp distance between two f32 of the same sign class (for tests and
/// the error reports): the number of representable values between them.
pub fn ulp_distance(a: f32, b: f32) -> u64 {
    fn key(x: f32) -> i64 {
        let b = x.to_bits() as i32 as i64;
        if b < 0 {
            i64::from(i32::MIN) - b
        } else {
            b
        }
    }
    (key(a) - key(b)).unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(f32::NEG_INFINITY).to_bits(), 0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(EXP_MAX).is_finite());
        // The smallest subnormal region.
        assert!(exp(-103.0) > 0.0 && exp(-103.0) < f32::MIN_POSITIVE);
        assert!(ulp_distance(exp(1.0), std::f32::consts::E) <= 1);
    }

    #[test]
    fn ln_edges() {
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert!(ln(-1.0).is_nan());
        assert!(ulp_distance(ln(std::f32::consts::E), 1.0) <= 1);
        assert!(ulp_distance(ln(1e5), 11.512_925) <= 1);
        assert!((ln(f32::from_bits(1)) - (-103.278_93)).abs() < 1e-4);
    }

    #[test]
    fn sin_cos_edges() {
        assert_eq!(sin_cos(0.0), (0.0, 1.0));
        let (s, c) = sin_cos(-0.0);
        assert!(s == 0.0 && s.is_sign_negative() && c == 1.0);
        let (s, c) = sin_cos(std::f32::consts::FRAC_PI_2);
        assert!(ulp_distance(s, 1.0) <= 1 && c.abs() < 1e-7);
        assert!(sin_cos(f32::NAN).0.is_nan());
    }
}
