// IEEE-754 binary32 fused multiply-add, round-to-nearest-even, from 32-bit
// integer operations only. Line for line the algorithm of
// kernels/src/softfloat.rs (after Berkeley SoftFloat 3e's softfloat_mulAddF32);
// 64-bit values are vec2<u32>(hi, lo). Any NaN result is the canonical NaN.

const SF_NAN: u32 = 0x7FC00000u;

fn sf_add64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let lo = a.y + b.y;
    let carry = select(0u, 1u, lo < a.y);
    return vec2<u32>(a.x + b.x + carry, lo);
}

fn sf_sub64(a: vec2<u32>, b: vec2<u32>) -> vec2<u32> {
    let borrow = select(0u, 1u, a.y < b.y);
    return vec2<u32>(a.x - b.x - borrow, a.y - b.y);
}

fn sf_is_zero64(a: vec2<u32>) -> bool {
    return (a.x | a.y) == 0u;
}

// Left shift by d in 0..64.
fn sf_shl64(a: vec2<u32>, d: u32) -> vec2<u32> {
    if (d == 0u) { return a; }
    if (d < 32u) { return vec2<u32>((a.x << d) | (a.y >> (32u - d)), a.y << d); }
    return vec2<u32>(a.y << (d - 32u), 0u);
}

// Right shift by d, OR-ing every bit shifted out into bit 0 ("jamming").
fn sf_shr64_jam(a: vec2<u32>, d: u32) -> vec2<u32> {
    if (d == 0u) { return a; }
    if (d < 32u) {
        let lost = select(0u, 1u, (a.y << (32u - d)) != 0u);
        return vec2<u32>(a.x >> d, (a.y >> d) | (a.x << (32u - d)) | lost);
    }
    if (d < 64u) {
        var lost = a.y != 0u;
        var lo = a.x;
        if (d > 32u) {
            lost = lost || ((a.x << (64u - d)) != 0u);
            lo = a.x >> (d - 32u);
        }
        return vec2<u32>(0u, lo | select(0u, 1u, lost));
    }
    return vec2<u32>(0u, select(0u, 1u, !sf_is_zero64(a)));
}

fn sf_shr32_jam(a: u32, d: u32) -> u32 {
    if (d == 0u) { return a; }
    if (d < 32u) { return (a >> d) | select(0u, 1u, (a << (32u - d)) != 0u); }
    return select(0u, 1u, a != 0u);
}

fn sf_clz64(a: vec2<u32>) -> u32 {
    if (a.x != 0u) { return countLeadingZeros(a.x); }
    return 32u + countLeadingZeros(a.y);
}

// 32x32 -> 64-bit product from 16-bit halves (operands below 2^31).
fn sf_mul32(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xFFFFu;
    let a1 = a >> 16u;
    let b0 = b & 0xFFFFu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let mid = a0 * b1 + a1 * b0;
    let lo = p00 + (mid << 16u);
    let carry = select(0u, 1u, lo < p00);
    return vec2<u32>(a1 * b1 + (mid >> 16u) + carry, lo);
}

fn sf_pack(sign: u32, e: u32, sig: u32) -> u32 {
    return (sign << 31u) + (e << 23u) + sig;
}

// Rounds sig * 2^(e - 157) (leading one at bit 30, 7 rounding bits) to
// nearest-even and packs it.
fn sf_round_pack(sign: u32, e_in: i32, sig_in: u32) -> u32 {
    var e = e_in;
    var sig = sig_in;
    var round_bits = sig & 0x7Fu;
    if (e < 0 || e >= 0xFD) {
        if (e < 0) {
            sig = sf_shr32_jam(sig, u32(-e));
            e = 0;
            round_bits = sig & 0x7Fu;
        } else if (e > 0xFD || sig + 0x40u >= 0x80000000u) {
            return sf_pack(sign, 0xFFu, 0u);
        }
    }
    sig = (sig + 0x40u) >> 7u;
    if (round_bits == 0x40u) { sig = sig & ~1u; }
    if (sig == 0u) { e = 0; }
    return sf_pack(sign, u32(e), sig);
}

struct SfExpSig { e: i32, sig: u32 }

fn sf_norm_subnormal(sig: u32) -> SfExpSig {
    let shift = countLeadingZeros(sig) - 8u;
    return SfExpSig(1 - i32(shift), sig << shift);
}

fn sf_fma(ua: u32, ub: u32, uc: u32) -> u32 {
    let sign_a = ua >> 31u;
    var exp_a = i32((ua >> 23u) & 0xFFu);
    var sig_a = ua & 0x7FFFFFu;
    let sign_b = ub >> 31u;
    var exp_b = i32((ub >> 23u) & 0xFFu);
    var sig_b = ub & 0x7FFFFFu;
    let sign_c = uc >> 31u;
    var exp_c = i32((uc >> 23u) & 0xFFu);
    var sig_c = uc & 0x7FFFFFu;
    let sign_prod = sign_a ^ sign_b;

    if (exp_a == 0xFF || exp_b == 0xFF) {
        let a_nan = exp_a == 0xFF && sig_a != 0u;
        let b_nan = exp_b == 0xFF && sig_b != 0u;
        let c_nan = exp_c == 0xFF && sig_c != 0u;
        let zero_times_inf = (exp_a == 0 && sig_a == 0u) || (exp_b == 0 && sig_b == 0u);
        if (a_nan || b_nan || c_nan || zero_times_inf) { return SF_NAN; }
        if (exp_c == 0xFF && sign_c != sign_prod) { return SF_NAN; }
        return sf_pack(sign_prod, 0xFFu, 0u);
    }
    if (exp_c == 0xFF) {
        if (sig_c != 0u) { return SF_NAN; }
        return uc;
    }
    if ((exp_a == 0 && sig_a == 0u) || (exp_b == 0 && sig_b == 0u)) {
        if (exp_c == 0 && sig_c == 0u && sign_prod != sign_c) { return 0u; }
        return uc;
    }
    if (exp_a == 0) {
        let n = sf_norm_subnormal(sig_a);
        exp_a = n.e;
        sig_a = n.sig;
    }
    if (exp_b == 0) {
        let n = sf_norm_subnormal(sig_b);
        exp_b = n.e;
        sig_b = n.sig;
    }

    var exp_prod = exp_a + exp_b - 0x7E;
    var sig_prod = sf_mul32((sig_a | 0x800000u) << 7u, (sig_b | 0x800000u) << 7u);
    if (sig_prod.x < 0x20000000u) {
        exp_prod = exp_prod - 1;
        sig_prod = sf_shl64(sig_prod, 1u);
    }

    var sign_z = sign_prod;
    if (exp_c == 0) {
        if (sig_c == 0u) {
            let sz = sf_shr64_jam(sig_prod, 31u).y;
            return sf_round_pack(sign_z, exp_prod - 1, sz);
        }
        let n = sf_norm_subnormal(sig_c);
        exp_c = n.e;
        sig_c = n.sig;
    }
    let sig_c6 = (sig_c | 0x800000u) << 6u;
    let exp_diff = exp_prod - exp_c;
    if (sign_prod == sign_c) {
        var exp_z: i32;
        var sig_z: u32;
        if (exp_diff <= 0) {
            exp_z = exp_c;
            sig_z = sig_c6 + sf_shr64_jam(sig_prod, u32(32 - exp_diff)).y;
        } else {
            exp_z = exp_prod;
            let sum = sf_add64(sig_prod, sf_shr64_jam(vec2<u32>(sig_c6, 0u), u32(exp_diff)));
            sig_z = sf_shr64_jam(sum, 32u).y;
        }
        if (sig_z < 0x40000000u) {
            exp_z = exp_z - 1;
            sig_z = sig_z << 1u;
        }
        return sf_round_pack(sign_z, exp_z, sig_z);
    }
    let sig64_c = vec2<u32>(sig_c6, 0u);
    var exp_z: i32;
    var sig64_z: vec2<u32>;
    if (exp_diff < 0) {
        sign_z = sign_c;
        exp_z = exp_c;
        sig64_z = sf_sub64(sig64_c, sf_shr64_jam(sig_prod, u32(-exp_diff)));
    } else if (exp_diff == 0) {
        exp_z = exp_prod;
        sig64_z = sf_sub64(sig_prod, sig64_c);
        if (sf_is_zero64(sig64_z)) { return 0u; }
        if ((sig64_z.x & 0x80000000u) != 0u) {
            sign_z = sign_z ^ 1u;
            sig64_z = sf_sub64(vec2<u32>(0u, 0u), sig64_z);
        }
    } else {
        exp_z = exp_prod;
        sig64_z = sf_sub64(sig_prod, sf_shr64_jam(sig64_c, u32(exp_diff)));
    }
    let shift = i32(sf_clz64(sig64_z)) - 1;
    exp_z = exp_z - shift;
    let shift32 = shift - 32;
    var sig_z: u32;
    if (shift32 < 0) {
        sig_z = sf_shr64_jam(sig64_z, u32(-shift32)).y;
    } else {
        sig_z = sig64_z.y << u32(shift32);
    }
    return sf_round_pack(sign_z, exp_z, sig_z);
}
