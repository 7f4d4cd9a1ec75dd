//! The blocked GEMM driver and its microkernels.
//!
//! Loop nest (BLIS order), for the block of C a thread owns:
//! `pc` over K in contract chunks of 256 → `jc` over N in blocks of `NC`
//! (pack B) → `ic` over M in blocks of `MC` (pack A) → `jr` over `NR`-wide
//! panels → `ir` over `MR`-high panels → microkernel. Packed panels are
//! zero-padded; padded lanes are computed and never stored.

use crate::contract::{canonicalize, MatmulDims, K_CHUNK};

/// Instruction set of a microkernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// x86-64 AVX-512F: 12×32 tile in 24 zmm accumulators.
    Avx512,
    /// x86-64 AVX2 + FMA: 6×16 tile in 12 ymm accumulators.
    Avx2,
    /// aarch64 NEON: 8×12 tile in 24 q-register accumulators.
    Neon,
    /// Portable `f32::mul_add` (fused on every target; slow without FMA).
    Portable,
}

impl Isa {
    pub const ALL: [Isa; 4] = [Isa::Avx512, Isa::Avx2, Isa::Neon, Isa::Portable];

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2+fma",
            Isa::Neon => "neon",
            Isa::Portable => "portable",
        }
    }

    pub fn is_supported(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => std::arch::is_aarch64_feature_detected!("neon"),
            Isa::Portable => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The fastest ISA this CPU supports.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Portable)
    }

    fn kernel(self) -> Kernel {
        match self {
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => x86::AVX512,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::AVX2,
            #[cfg(target_arch = "aarch64")]
            Isa::Neon => arm::NEON,
            _ => portable::PORTABLE,
        }
    }
}

/// `ukernel(kc, a_panel, b_panel, c, ldc, rows, cols)`: for the MR×NR tile
/// at `c`, `acc = Σ_k fma(a, b, acc)` from +0.0 over `kc` packed steps, then
/// `c[r][j] = c[r][j] + acc[r][j]` for `r < rows`, `j < cols`.
type UKernel = unsafe fn(usize, *const f32, *const f32, *mut f32, usize, usize, usize);

#[derive(Clone, Copy)]
struct Kernel {
    mr: usize,
    nr: usize,
    /// Rows of A packed per block: sized so an A block stays in L2.
    mc: usize,
    /// Columns of B packed per block: sized so a B block stays in L3.
    nc: usize,
    run: UKernel,
}

/// A raw pointer to C that threads share; each writes a disjoint block.
#[derive(Clone, Copy)]
struct CPtr(*mut f32);
unsafe impl Send for CPtr {}
unsafe impl Sync for CPtr {}

/// Computes `C = A·B` under the contract, splitting C among `threads`
/// rayon tasks (call from inside the pool that should run them).
pub fn matmul(a: &[f32], b: &[f32], dims: MatmulDims, isa: Isa, threads: usize) -> Vec<f32> {
    let MatmulDims { m, k, n } = dims;
    let mut c = vec![0.0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return c;
    }
    let kern = isa.kernel();
    let cp = CPtr(c.as_mut_ptr());
    // Split the larger dimension into `threads` ranges aligned to the tile.
    let threads = threads.max(1);
    let split_rows = m.div_ceil(kern.mr) >= threads * 2 || m >= n;
    let (len, align) = if split_rows {
        (m, kern.mr)
    } else {
        (n, kern.nr)
    };
    let units = len.div_ceil(align);
    let parts = threads.min(units);
    let ranges: Vec<(usize, usize)> = (0..parts)
        .map(|t| {
            let lo = (units * t / parts * align).min(len);
            let hi = (units * (t + 1) / parts * align).min(len);
            (lo, hi)
        })
        .collect();
    let run = |(lo, hi): (usize, usize)| {
        let (rows, cols) = if split_rows {
            (lo..hi, 0..n)
        } else {
            (0..m, lo..hi)
        };
        // SAFETY: blocks of C are disjoint across ranges; `c` outlives the scope.
        unsafe { gemm_block(a, b, cp, dims, rows, cols, kern) };
    };
    if parts == 1 {
        run(ranges[0]);
    } else {
        rayon::scope(|s| {
            for &r in &ranges {
                s.spawn(move |_| run(r));
            }
        });
    }
    c
}

/// Computes the block `C[rows, cols]` sequentially.
///
/// # Safety
/// `c` points to an M×N matrix, zero-initialised, and no other thread touches
/// this block.
unsafe fn gemm_block(
    a: &[f32],
    b: &[f32],
    c: CPtr,
    dims: MatmulDims,
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
    kern: Kernel,
) {
    let MatmulDims { k, n, .. } = dims;
    let Kernel {
        mr,
        nr,
        mc,
        nc,
        run,
    } = kern;
    let nc = nc.min(cols.len().next_multiple_of(nr));
    let mc = mc.min(rows.len().next_multiple_of(mr));
    let mut bpack = vec![0.0f32; K_CHUNK * nc];
    let mut apack = vec![0.0f32; K_CHUNK * mc];
    for pc in (0..k).step_by(K_CHUNK) {
        let kc = K_CHUNK.min(k - pc);
        for jc in cols.clone().step_by(nc) {
            let ncur = nc.min(cols.end - jc);
            pack_b(b, n, pc, kc, jc, ncur, nr, &mut bpack);
            for ic in rows.clone().step_by(mc) {
                let mcur = mc.min(rows.end - ic);
                pack_a(a, k, ic, mcur, pc, kc, mr, &mut apack);
                for ir in (0..mcur).step_by(mr) {
                    let ap = apack.as_ptr().add(ir * kc);
                    for jr in (0..ncur).step_by(nr) {
                        let bp = bpack.as_ptr().add(jr * kc);
                        let cptr = c.0.add((ic + ir) * n + jc + jr);
                        run(kc, ap, bp, cptr, n, mr.min(mcur - ir), nr.min(ncur - jr));
                    }
                }
            }
        }
    }
    for i in rows {
        for j in cols.clone() {
            let p = c.0.add(i * n + j);
            *p = canonicalize(*p);
        }
    }
}

/// Packs `B[pc..pc+kc, jc..jc+ncur]` as NR-wide panels, each `kc` rows of NR
/// values, zero-padded to a whole panel.
#[allow(clippy::too_many_arguments)]
fn pack_b(
    b: &[f32],
    n: usize,
    pc: usize,
    kc: usize,
    jc: usize,
    ncur: usize,
    nr: usize,
    out: &mut [f32],
) {
    for (p, j0) in (0..ncur).step_by(nr).enumerate() {
        let w = nr.min(ncur - j0);
        let panel = &mut out[p * kc * nr..(p + 1) * kc * nr];
        for kk in 0..kc {
            let src = &b[(pc + kk) * n + jc + j0..][..w];
            let dst = &mut panel[kk * nr..(kk + 1) * nr];
            dst[..w].copy_from_slice(src);
            dst[w..].fill(0.0);
        }
    }
}

/// Packs `A[ic..ic+mcur, pc..pc+kc]` as MR-high panels, k-major (for each
/// k, the MR values of that column), zero-padded to a whole panel.
#[allow(clippy::too_many_arguments)]
fn pack_a(
    a: &[f32],
    k: usize,
    ic: usize,
    mcur: usize,
    pc: usize,
    kc: usize,
    mr: usize,
    out: &mut [f32],
) {
    match mr {
        12 => pack_a_mr::<12>(a, k, ic, mcur, pc, kc, out),
        8 => pack_a_mr::<8>(a, k, ic, mcur, pc, kc, out),
        6 => pack_a_mr::<6>(a, k, ic, mcur, pc, kc, out),
        4 => pack_a_mr::<4>(a, k, ic, mcur, pc, kc, out),
        _ => unreachable!("no microkernel has MR = {mr}"),
    }
}

/// [`pack_a`] for a fixed MR: walks k in the outer loop and reads the MR
/// rows as parallel streams, so the writes are contiguous.
fn pack_a_mr<const MR: usize>(
    a: &[f32],
    k: usize,
    ic: usize,
    mcur: usize,
    pc: usize,
    kc: usize,
    out: &mut [f32],
) {
    for (p, i0) in (0..mcur).step_by(MR).enumerate() {
        let h = MR.min(mcur - i0);
        let panel = &mut out[p * kc * MR..(p + 1) * kc * MR];
        // Rows past the edge of A read zeros, so one loop packs every panel.
        let rows: [&[f32]; MR] = std::array::from_fn(|r| {
            if r < h {
                &a[(ic + i0 + r) * k + pc..][..kc]
            } else {
                &ZERO_ROW[..kc]
            }
        });
        for (kk, dst) in panel.chunks_exact_mut(MR).enumerate() {
            for r in 0..MR {
                dst[r] = rows[r][kk];
            }
        }
    }
}

/// The zero padding of partial A panels (a chunk is at most `K_CHUNK` long).
static ZERO_ROW: [f32; K_CHUNK] = [0.0; K_CHUNK];

/// Stamps out a microkernel for one ISA: an `MR`×(`NV`·`LANES`) tile held in
/// `MR·NV` vector accumulators. `$fma(x, y, acc)` must be one fused
/// multiply-add, `x·y + acc`, rounded once.
macro_rules! ukernel {
    ($(#[$attr:meta])* $name:ident, $mr:literal, $nv:literal, $lanes:literal, $vt:ty,
     zero: $zero:expr, load: $load:path, store: $store:path, splat: $splat:path,
     fma: $fma:path, add: $add:path) => {
        $(#[$attr])*
        pub(super) unsafe fn $name(
            kc: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize,
            rows: usize, cols: usize,
        ) {
            const MR: usize = $mr;
            const NV: usize = $nv;
            const NR: usize = $nv * $lanes;
            let mut acc: [[$vt; NV]; MR] = [[$zero; NV]; MR];
            // One k step: every accumulator takes one fma, in k order.
            macro_rules! step {
                ($kk:expr) => {{
                    let bp = b.add($kk * NR);
                    let mut bv: [$vt; NV] = [$zero; NV];
                    for v in 0..NV {
                        bv[v] = $load(bp.add(v * $lanes));
                    }
                    let ap = a.add($kk * MR);
                    for r in 0..MR {
                        let av = $splat(*ap.add(r));
                        for v in 0..NV {
                            acc[r][v] = $fma(av, bv[v], acc[r][v]);
                        }
                    }
                }};
            }
            let mut kk = 0;
            while kk + 4 <= kc {
                step!(kk);
                step!(kk + 1);
                step!(kk + 2);
                step!(kk + 3);
                kk += 4;
            }
            while kk < kc {
                step!(kk);
                kk += 1;
            }
            if rows == MR && cols == NR {
                for r in 0..MR {
                    let cr = c.add(r * ldc);
                    for v in 0..NV {
                        let p = cr.add(v * $lanes);
                        $store(p, $add($load(p), acc[r][v]));
                    }
                }
            } else {
                let mut buf = [0.0f32; MR * NR];
                for r in 0..MR {
                    for v in 0..NV {
                        $store(buf.as_mut_ptr().add(r * NR + v * $lanes), acc[r][v]);
                    }
                }
                for r in 0..rows {
                    for j in 0..cols {
                        *c.add(r * ldc + j) += buf[r * NR + j];
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Kernel;
    use std::arch::x86_64::*;

    ukernel!(#[target_feature(enable = "avx512f")] avx512, 12, 2, 16, __m512,
        zero: _mm512_setzero_ps(), load: _mm512_loadu_ps, store: _mm512_storeu_ps,
        splat: _mm512_set1_ps, fma: _mm512_fmadd_ps, add: _mm512_add_ps);

    ukernel!(#[target_feature(enable = "avx2,fma")] avx2, 6, 2, 8, __m256,
        zero: _mm256_setzero_ps(), load: _mm256_loadu_ps, store: _mm256_storeu_ps,
        splat: _mm256_set1_ps, fma: _mm256_fmadd_ps, add: _mm256_add_ps);

    pub(super) const AVX512: Kernel = Kernel {
        mr: 12,
        nr: 32,
        mc: 144,
        nc: 1024,
        run: avx512,
    };
    pub(super) const AVX2: Kernel = Kernel {
        mr: 6,
        nr: 16,
        mc: 96,
        nc: 1024,
        run: avx2,
    };
}

#[cfg(target_arch = "aarch64")]
mod arm {
    use super::Kernel;
    use std::arch::aarch64::*;

    /// `vfmaq_f32(acc, x, y)` is `acc + x·y` fused; reorder to `fma(x, y, acc)`.
    #[inline(always)]
    unsafe fn fma(x: float32x4_t, y: float32x4_t, acc: float32x4_t) -> float32x4_t {
        vfmaq_f32(acc, x, y)
    }

    ukernel!(#[target_feature(enable = "neon")] neon, 8, 3, 4, float32x4_t,
        zero: vdupq_n_f32(0.0), load: vld1q_f32, store: vst1q_f32,
        splat: vdupq_n_f32, fma: fma, add: vaddq_f32);

    pub(super) const NEON: Kernel = Kernel {
        mr: 8,
        nr: 12,
        mc: 128,
        nc: 1024,
        run: neon,
    };
}

mod portable {
    use super::Kernel;

    #[inline(always)]
    unsafe fn load(p: *const f32) -> f32 {
        *p
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: f32) {
        *p = v
    }
    #[inline(always)]
    fn splat(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn fma(x: f32, y: f32, acc: f32) -> f32 {
        x.mul_add(y, acc)
    }
    #[inline(always)]
    fn add(x: f32, y: f32) -> f32 {
        x + y
    }

    ukernel!(portable, 4, 4, 1, f32,
        zero: 0.0, load: load, store: store, splat: splat, fma: fma, add: add);

    pub(super) const PORTABLE: Kernel = Kernel {
        mr: 4,
        nr: 4,
        mc: 64,
        nc: 1024,
        run: portable,
    };
}
