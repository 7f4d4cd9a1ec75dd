//! 16 f32 lanes on each ISA: the few operations the LLM kernels use
//! ([`super::qmatvec`], [`super::attention`]). Every operation is exact or
//! one IEEE rounding per lane; nothing sums across lanes.

use crate::contract::quant::f16_to_f32;

/// 16 f32 lanes on one ISA: the only operations the kernels use.
pub(crate) trait Lanes: Copy {
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    /// `a·b + c`, one rounding per lane.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn f16(p: *const u8) -> Self;
    /// 16 bfloat16 (the upper halves of f32), widened exactly.
    unsafe fn bf16(p: *const u8) -> Self;
    unsafe fn f32(p: *const u8) -> Self;
    unsafe fn i8(p: *const u8) -> Self;
    /// 16 bytes → (low nibbles, high nibbles) as f32.
    unsafe fn nibbles(p: *const u8) -> (Self, Self);
    unsafe fn store(self, p: *mut f32);
}

#[derive(Clone, Copy)]
pub(crate) struct Portable([f32; 16]);

impl Lanes for Portable {
    #[inline(always)]
    unsafe fn zero() -> Self {
        Portable([0.0; 16])
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        Portable([x; 16])
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        Portable(std::array::from_fn(|i| a.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        Portable(std::array::from_fn(|i| a.0[i] + b.0[i]))
    }
    #[inline(always)]
    unsafe fn f16(p: *const u8) -> Self {
        Portable(std::array::from_fn(|i| {
            f16_to_f32(u16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]))
        }))
    }
    #[inline(always)]
    unsafe fn bf16(p: *const u8) -> Self {
        Portable(std::array::from_fn(|i| {
            f32::from_bits((u16::from_le_bytes([*p.add(2 * i), *p.add(2 * i + 1)]) as u32) << 16)
        }))
    }
    #[inline(always)]
    unsafe fn f32(p: *const u8) -> Self {
        Portable(std::array::from_fn(|i| {
            (p as *const f32).add(i).read_unaligned()
        }))
    }
    #[inline(always)]
    unsafe fn i8(p: *const u8) -> Self {
        Portable(std::array::from_fn(|i| *p.add(i) as i8 as f32))
    }
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> (Self, Self) {
        (
            Portable(std::array::from_fn(|i| (*p.add(i) & 15) as f32)),
            Portable(std::array::from_fn(|i| (*p.add(i) >> 4) as f32)),
        )
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        for (i, v) in self.0.iter().enumerate() {
            *p.add(i) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::Lanes;
    use std::arch::x86_64::*;

    #[derive(Clone, Copy)]
    pub struct Avx512(__m512);

    impl Lanes for Avx512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx512(_mm512_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            Avx512(_mm512_set1_ps(x))
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx512(_mm512_fmadd_ps(a.0, b.0, c.0))
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx512(_mm512_add_ps(a.0, b.0))
        }
        #[inline(always)]
        unsafe fn f16(p: *const u8) -> Self {
            Avx512(_mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)))
        }
        #[inline(always)]
        unsafe fn bf16(p: *const u8) -> Self {
            let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(p as *const __m256i));
            Avx512(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)))
        }
        #[inline(always)]
        unsafe fn f32(p: *const u8) -> Self {
            Avx512(_mm512_loadu_ps(p as *const f32))
        }
        #[inline(always)]
        unsafe fn i8(p: *const u8) -> Self {
            Avx512(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(
                p as *const __m128i,
            ))))
        }
        #[inline(always)]
        unsafe fn nibbles(p: *const u8) -> (Self, Self) {
            let v = _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i));
            (
                Avx512(_mm512_cvtepi32_ps(_mm512_and_si512(
                    v,
                    _mm512_set1_epi32(15),
                ))),
                Avx512(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4))),
            )
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self.0)
        }
    }

    #[derive(Clone, Copy)]
    pub struct Avx2(__m256, __m256);

    impl Lanes for Avx2 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_ps(), _mm256_setzero_ps())
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            let v = _mm256_set1_ps(x);
            Avx2(v, v)
        }
        #[inline(always)]
        unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
            Avx2(
                _mm256_fmadd_ps(a.0, b.0, c.0),
                _mm256_fmadd_ps(a.1, b.1, c.1),
            )
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            Avx2(_mm256_add_ps(a.0, b.0), _mm256_add_ps(a.1, b.1))
        }
        #[inline(always)]
        unsafe fn f16(p: *const u8) -> Self {
            Avx2(
                _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i)),
                _mm256_cvtph_ps(_mm_loadu_si128(p.add(16) as *const __m128i)),
            )
        }
        #[inline(always)]
        unsafe fn bf16(p: *const u8) -> Self {
            let a = _mm256_cvtepu16_epi32(_mm_loadu_si128(p as *const __m128i));
            let b = _mm256_cvtepu16_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
            Avx2(
                _mm256_castsi256_ps(_mm256_slli_epi32(a, 16)),
                _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)),
            )
        }
        #[inline(always)]
        unsafe fn f32(p: *const u8) -> Self {
            Avx2(
                _mm256_loadu_ps(p as *const f32),
                _mm256_loadu_ps((p as *const f32).add(8)),
            )
        }
        #[inline(always)]
        unsafe fn i8(p: *const u8) -> Self {
            let a = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let b = _mm256_cvtepi8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
            Avx2(_mm256_cvtepi32_ps(a), _mm256_cvtepi32_ps(b))
        }
        #[inline(always)]
        unsafe fn nibbles(p: *const u8) -> (Self, Self) {
            let m = _mm256_set1_epi32(15);
            let a = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
            let b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(p.add(8) as *const __m128i));
            (
                Avx2(
                    _mm256_cvtepi32_ps(_mm256_and_si256(a, m)),
                    _mm256_cvtepi32_ps(_mm256_and_si256(b, m)),
                ),
                Avx2(
                    _mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)),
                    _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)),
                ),
            )
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self.0);
            _mm256_storeu_ps(p.add(8), self.1);
        }
    }
}
