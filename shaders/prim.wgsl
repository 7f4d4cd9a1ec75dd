// The contract's other primitives (CONTRACT.md §3) and e^x (§8.1), on top of
// the path's mac(), add() and mul(). Division and square root are exact on
// every path: integer long division and a digit-by-digit square root,
// rounded once by softfloat.wgsl's sf_round_pack (WGSL lets a GPU's own `/`
// and sqrt() be off by ulps, so they are never used). e^x is the contract's
// fixed sequence of mul/add/fma, so it is exact wherever those are.
// Values are u32 bit patterns; any NaN result may be any NaN (ops
// canonicalise what they write).

const F_SIGN: u32 = 0x80000000u;
const F_ONE: u32 = 0x3F800000u;
const F_INF: u32 = 0x7F800000u;
const F_NEG_INF: u32 = 0xFF800000u;

fn is_nan(x: u32) -> bool {
    return (x & 0x7FFFFFFFu) > 0x7F800000u;
}

// x - y, one rounding: add(x, -y).
fn sub(x: u32, y: u32) -> u32 {
    return add(x, y ^ F_SIGN);
}

// A key whose integer order is the float order (-0 and +0 equal); not NaN.
fn f_key(x: u32) -> i32 {
    if ((x & F_SIGN) != 0u) { return -i32(x & 0x7FFFFFFFu); }
    return i32(x);
}

// x > y for non-NaN x, y.
fn f_gt(x: u32, y: u32) -> bool {
    return f_key(x) > f_key(y);
}

// u32 as f32, exact below 2^24.
fn f_from_u32(n: u32) -> u32 {
    return bitcast<u32>(f32(n));
}

fn sf_ge64(a: vec2<u32>, b: vec2<u32>) -> bool {
    return a.x > b.x || (a.x == b.x && a.y >= b.y);
}

// x / y, correctly rounded (IEEE-754 binary32, ties to even, subnormals kept).
fn fdiv(ux: u32, uy: u32) -> u32 {
    let sign = (ux ^ uy) >> 31u;
    var ex = i32((ux >> 23u) & 0xFFu);
    var sx = ux & 0x7FFFFFu;
    var ey = i32((uy >> 23u) & 0xFFu);
    var sy = uy & 0x7FFFFFu;
    if (ex == 0xFF) {
        if (sx != 0u || ey == 0xFF) { return SF_NAN; }
        return sf_pack(sign, 0xFFu, 0u);
    }
    if (ey == 0xFF) {
        if (sy != 0u) { return SF_NAN; }
        return sf_pack(sign, 0u, 0u);
    }
    if (ey == 0 && sy == 0u) {
        if (ex == 0 && sx == 0u) { return SF_NAN; }
        return sf_pack(sign, 0xFFu, 0u);
    }
    if (ex == 0) {
        if (sx == 0u) { return sf_pack(sign, 0u, 0u); }
        let n = sf_norm_subnormal(sx);
        ex = n.e;
        sx = n.sig;
    }
    if (ey == 0) {
        let n = sf_norm_subnormal(sy);
        ey = n.e;
        sy = n.sig;
    }
    var rem = sx | 0x800000u;
    let d = sy | 0x800000u;
    var e = ex - ey + 126;
    if (rem < d) {
        rem = rem << 1u;
        e = e - 1;
    }
    // 31 quotient bits, the leading one at bit 30; the rest jammed into bit 0.
    var q = 0u;
    for (var i = 0u; i < 31u; i = i + 1u) {
        q = q << 1u;
        if (rem >= d) {
            rem = rem - d;
            q = q | 1u;
        }
        rem = rem << 1u;
    }
    if (rem != 0u) { q = q | 1u; }
    return sf_round_pack(sign, e, q);
}

// √x, correctly rounded; √-0 = -0, x < 0 gives NaN.
fn fsqrt(ux: u32) -> u32 {
    let sign = ux >> 31u;
    var ex = i32((ux >> 23u) & 0xFFu);
    var sx = ux & 0x7FFFFFu;
    if (ex == 0xFF) {
        if (sx != 0u || sign == 1u) { return SF_NAN; }
        return ux;
    }
    if (ex == 0 && sx == 0u) { return ux; }
    if (sign == 1u) { return SF_NAN; }
    if (ex == 0) {
        let n = sf_norm_subnormal(sx);
        ex = n.e;
        sx = n.sig;
    }
    // x = m·2^s with m in [2^24, 2^26) and s even.
    let e = ex - 127;
    var m: u32;
    var s: i32;
    if ((e & 1) == 0) {
        m = (sx | 0x800000u) << 1u;
        s = e - 24;
    } else {
        m = (sx | 0x800000u) << 2u;
        s = e - 25;
    }
    // root = ⌊√(m·2^36)⌋ in [2^30, 2^31), two radicand bits per step.
    var root = 0u;
    var rem = vec2<u32>(0u, 0u);
    for (var i = 30; i >= 0; i = i - 1) {
        let p = 2 * i - 36;
        var two = 0u;
        if (p >= 0) { two = (m >> u32(p)) & 3u; }
        rem = sf_shl64(rem, 2u);
        rem.y = rem.y | two;
        var trial = sf_shl64(vec2<u32>(0u, root), 2u);
        trial.y = trial.y | 1u;
        if (sf_ge64(rem, trial)) {
            rem = sf_sub64(rem, trial);
            root = (root << 1u) | 1u;
        } else {
            root = root << 1u;
        }
    }
    if (!sf_is_zero64(rem)) { root = root | 1u; }
    return sf_round_pack(0u, s / 2 + 138, root);
}

// 2^n for n in -126..=127.
fn pow2(n: i32) -> u32 {
    return u32(n + 127) << 23u;
}

// e^x (CONTRACT.md §8.1), step for step prim::exp.
fn fexp(x: u32) -> u32 {
    if (is_nan(x)) { return SF_NAN; }
    if (f_gt(x, 0x42B17217u)) { return F_INF; }
    if (f_gt(0xC2CFF1B5u, x)) { return 0u; }
    let rounder = 0x4B400000u; // 1.5·2^23
    let n = sub(add(mul(x, 0x3FB8AA3Bu), rounder), rounder);
    var r = mac(n ^ F_SIGN, 0x3F317200u, x);
    r = mac(n ^ F_SIGN, 0x35BFBE8Eu, r);
    var p = 0x39506967u;
    p = mac(p, r, 0x3AB743CEu);
    p = mac(p, r, 0x3C088908u);
    p = mac(p, r, 0x3D2AA9C1u);
    p = mac(p, r, 0x3E2AAAAAu);
    p = mac(p, r, 0x3F000000u);
    let y = add(mac(p, mul(r, r), r), F_ONE);
    let k = i32(bitcast<f32>(n));
    if (k > 127) {
        return mul(mul(y, pow2(127)), pow2(k - 127));
    }
    if (k < -126) {
        return mul(mul(y, pow2(k + 64)), pow2(-64));
    }
    return mul(y, pow2(k));
}

// SiLU (CONTRACT.md §9.5): x / (1 + e^-x).
fn silu(x: u32) -> u32 {
    return fdiv(x, add(F_ONE, fexp(x ^ F_SIGN)));
}
