//! The contract's fixed transcendental algorithms against float64: the
//! error bounds CONTRACT.md §8 states, on a dense sweep of every f32 that
//! matters (every `STRIDE`-th bit pattern; `LOCKSTEP_EXHAUSTIVE=1` checks
//! every one, as was done for the numbers in CONTRACT.md).

use lockstep_kernels::contract::prim::{exp, ln, sin_cos, ulp_distance, SIN_COS_MAX};

fn stride() -> usize {
    if std::env::var_os("LOCKSTEP_EXHAUSTIVE").is_some() {
        1
    } else {
        97
    }
}

/// Every f32 bit pattern from `lo` to `hi` (same sign), stepping.
fn sweep(lo: u32, hi: u32) -> impl Iterator<Item = f32> {
    (lo..=hi).step_by(stride()).chain([hi]).map(f32::from_bits)
}

#[test]
fn exp_is_within_1_ulp_of_float64() {
    let mut worst = (0u64, 0f32);
    // Positive then negative finite inputs in the range where exp is
    // neither 0 nor inf (outside it, the edges are exact: checked below).
    for x in sweep(0, 88.72283f32.to_bits()).chain(sweep(0x8000_0000, (-103.97f32).to_bits())) {
        let want = (x as f64).exp() as f32;
        let d = ulp_distance(exp(x), want);
        if d > worst.0 {
            worst = (d, x);
        }
    }
    println!("exp: worst {} ulp at {:e}", worst.0, worst.1);
    assert!(worst.0 <= 1, "exp: {} ulp at {:e}", worst.0, worst.1);
    assert_eq!(exp(89.0), f32::INFINITY);
    assert_eq!(exp(-104.0), 0.0);
}

#[test]
fn ln_is_within_1_ulp_of_float64() {
    let mut worst = (0u64, 0f32);
    for x in sweep(1, f32::MAX.to_bits()) {
        let want = (x as f64).ln() as f32;
        let d = ulp_distance(ln(x), want);
        if d > worst.0 {
            worst = (d, x);
        }
    }
    println!("ln: worst {} ulp at {:e}", worst.0, worst.1);
    assert!(worst.0 <= 1, "ln: {} ulp at {:e}", worst.0, worst.1);
}

#[test]
fn sin_cos_error_is_bounded() {
    let (mut worst_abs, mut worst_ulp_small) = (0f64, 0u64);
    for x in sweep(0, SIN_COS_MAX.to_bits()) {
        let (s, c) = sin_cos(x);
        let (ws, wc) = ((x as f64).sin(), (x as f64).cos());
        let scale = (x as f64 / 8192.0).max(1.0);
        worst_abs = worst_abs
            .max((s as f64 - ws).abs() / scale)
            .max((c as f64 - wc).abs() / scale);
        if x <= std::f32::consts::FRAC_PI_4 {
            worst_ulp_small = worst_ulp_small
                .max(ulp_distance(s, ws as f32))
                .max(ulp_distance(c, wc as f32));
        }
        let (ns, nc) = sin_cos(-x);
        assert_eq!(
            (ns.to_bits(), nc.to_bits()),
            ((-s).to_bits(), c.to_bits()),
            "odd/even at {x}"
        );
    }
    println!("sin_cos: worst scaled absolute error {worst_abs:e}; worst {worst_ulp_small} ulp on [0, π/4]");
    assert!(worst_abs <= 2f64.powi(-23), "{worst_abs:e}");
    assert!(worst_ulp_small <= 1, "{worst_ulp_small}");
}
