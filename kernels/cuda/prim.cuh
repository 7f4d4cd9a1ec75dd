// Device helpers shared by every lockstep CUDA source: kernels/src/cuda/mod.rs
// (`PRELUDE`, `compile`) puts this text in front of each source before NVRTC
// compiles it, so no source includes a file.
//
// The contract's primitives (CONTRACT.md §3) are the single-rounding
// intrinsics __fmaf_rn, __fadd_rn, __fmul_rn, __fdiv_rn and __fsqrt_rn
// (NVRTC runs with --fmad=false --ftz=false --prec-div=true
// --prec-sqrt=true, and the _rn intrinsics are never contracted or
// approximated). Everything else here is exact: negation and NaN tests on
// the bits, small integers converted to float, f16 widened by integer work.
// e^x is the contract's fixed sequence (§8.1), step for step prim::exp in
// kernels/src/contract/prim.rs, with its constants as bit patterns; no libm
// function (expf, ...) is ever called.

#ifndef LOCKSTEP_PRIM_CUH
#define LOCKSTEP_PRIM_CUH

// Is x a NaN (any payload)?
__device__ __forceinline__ bool ls_is_nan(float x) {
    return (__float_as_uint(x) & 0x7FFFFFFFu) > 0x7F800000u;
}

// The contract's one NaN: any NaN becomes 0x7FC00000 (CONTRACT.md §2).
__device__ __forceinline__ float ls_canon(float x) {
    return ls_is_nan(x) ? __uint_as_float(0x7FC00000u) : x;
}

// -x, exactly (the sign bit flipped).
__device__ __forceinline__ float ls_neg(float x) {
    return __uint_as_float(__float_as_uint(x) ^ 0x80000000u);
}

// x - y, one rounding: add(x, -y).
__device__ __forceinline__ float ls_sub(float x, float y) {
    return __fadd_rn(x, ls_neg(y));
}

// 2^n for n in -126..=127, from its bits.
__device__ __forceinline__ float ls_pow2(int n) {
    return __uint_as_float((unsigned)(n + 127) << 23);
}

// e^x (CONTRACT.md §8.1), step for step prim::exp.
__device__ __forceinline__ float ls_exp(float x) {
    if (ls_is_nan(x)) return x;
    if (x > __uint_as_float(0x42B17217u)) return __uint_as_float(0x7F800000u); // EXP_MAX
    if (x < __uint_as_float(0xC2CFF1B5u)) return 0.0f;                         // EXP_MIN
    const float rounder = __uint_as_float(0x4B400000u); // 1.5·2^23
    // n = round(x·log2e), ties to even.
    const float n = ls_sub(__fadd_rn(__fmul_rn(x, __uint_as_float(0x3FB8AA3Bu)), rounder), rounder);
    float r = __fmaf_rn(ls_neg(n), __uint_as_float(0x3F317200u), x); // LN2_HI
    r = __fmaf_rn(ls_neg(n), __uint_as_float(0x35BFBE8Eu), r);       // LN2_LO
    float p = __uint_as_float(0x39506967u);                          // 1.9875691e-4
    p = __fmaf_rn(p, r, __uint_as_float(0x3AB743CEu));               // 1.3981999e-3
    p = __fmaf_rn(p, r, __uint_as_float(0x3C088908u));               // 8.333452e-3
    p = __fmaf_rn(p, r, __uint_as_float(0x3D2AA9C1u));               // 4.1665796e-2
    p = __fmaf_rn(p, r, __uint_as_float(0x3E2AAAAAu));               // 1.6666665e-1
    p = __fmaf_rn(p, r, __uint_as_float(0x3F000000u));               // 0.5
    const float y = __fadd_rn(__fmaf_rn(p, __fmul_rn(r, r), r), 1.0f);
    // n is an integer in -150..=128: the conversion is exact.
    const int k = (int)n;
    if (k > 127) return __fmul_rn(__fmul_rn(y, ls_pow2(127)), ls_pow2(k - 127));
    if (k < -126) return __fmul_rn(__fmul_rn(y, ls_pow2(k + 64)), ls_pow2(-64));
    return __fmul_rn(y, ls_pow2(k));
}

// SiLU (CONTRACT.md §8.4): div(x, add(1, exp(-x))).
__device__ __forceinline__ float ls_silu(float x) {
    return __fdiv_rn(x, __fadd_rn(1.0f, ls_exp(ls_neg(x))));
}

// An IEEE binary16 bit pattern as f32, exactly: quant.rs f16_to_f32 (a
// subnormal half becomes a normal single; ±inf kept; NaN quietened).
__device__ __forceinline__ float ls_f16(unsigned h) {
    const unsigned sign = (h & 0x8000u) << 16;
    const unsigned e = (h >> 10) & 0x1Fu;
    const unsigned m = h & 0x3FFu;
    if (e == 0u) {
        if (m == 0u) return __uint_as_float(sign);
        // m·2^-24 with m = 1.f·2^p.
        const unsigned p = 31u - (unsigned)__clz((int)m);
        return __uint_as_float(sign | ((p + 103u) << 23) | ((m << (23u - p)) & 0x7FFFFFu));
    }
    if (e == 0x1Fu) {
        if (m == 0u) return __uint_as_float(sign | 0x7F800000u);
        return __uint_as_float(sign | 0x7FC00000u | (m << 13));
    }
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

// A bfloat16 bit pattern as f32 (exact: the upper half of an f32).
__device__ __forceinline__ float ls_bf16(unsigned h) {
    return __uint_as_float((h & 0xFFFFu) << 16);
}

// A small integer as f32 (exact below 2^24).
__device__ __forceinline__ float ls_int(int q) {
    return __int2float_rn(q);
}

#endif // LOCKSTEP_PRIM_CUH
