//! Conformance inputs and checks, shared by the WGSL probe, the worker's
//! start-up self-test and the tests: one table of f32 edge values, one
//! generator of awkward random triples, and one matmul self-test.

use crate::backend::Backend;
use crate::contract::{canonicalize, matmul_spec, Matmul, MatmulDims};
use crate::error::{Error, Result};

/// f32 edge values as bit patterns: zeros, subnormals, the normal boundary,
/// neighbours of 1, ulp-sized values, the largest finite values, infinities,
/// NaNs (quiet, signalling, negative), and powers of two whose products
/// overflow or underflow. The first [`PROBE_EDGE_VALUES`] are the WGSL
/// probe's set (kept small: the probe runs on every backend start).
pub const EDGE_VALUES: &[u32] = &[
    // The probe's set.
    0x0000_0000,
    0x8000_0000,
    0x0000_0001,
    0x807F_FFFF,
    0x0080_0000,
    0x3F80_0000,
    0xBF80_0001,
    0x3380_0000,
    0x7F7F_FFFF,
    0xFF7F_FFFF,
    0x7F80_0000,
    0xFF80_0000,
    0x7FC0_0000,
    0x4000_0001,
    0x1F80_0000,
    0x5F80_0000,
    // The rest.
    0x8000_0001,
    0x0000_0002,
    0x007F_FFFF,
    0x0040_0000,
    0x0080_0001,
    0xBF80_0000,
    0x3F80_0001,
    0x3F7F_FFFF,
    0x3F00_0000,
    0x3400_0000,
    0x3380_0001,
    0x4000_0000,
    0x7F00_0000,
    0x7F80_0001,
    0xFFFF_FFFF,
    0x2000_0000,
    0x0C00_0000,
    0x3FC0_0000,
];

/// Awkward values sprinkled into test operands (tests' `Values::Specials`,
/// the GPU check's `specials` operands): ±0, ±inf, a quiet NaN, a
/// signalling NaN with payload, the extreme subnormals, the smallest normal,
/// the largest finite value, 1 and −1 − ulp.
pub const SPECIAL_VALUES: [u32; 12] = [
    0x0000_0000,
    0x8000_0000,
    0x7F80_0000,
    0xFF80_0000,
    0x7FC0_0000,
    0x7FA0_0001,
    0x0000_0001,
    0x807F_FFFF,
    0x0080_0000,
    0x7F7F_FFFF,
    0x3F80_0000,
    0xBF80_0001,
];

/// How many of [`EDGE_VALUES`] the WGSL probe uses.
pub const PROBE_EDGE_VALUES: usize = 16;

/// Every triple `(a, b, c)` of the given values.
pub fn edge_triples(values: &[u32]) -> Vec<[u32; 3]> {
    let mut out = Vec::with_capacity(values.len().pow(3));
    for &a in values {
        for &b in values {
            for &c in values {
                out.push([a, b, c]);
            }
        }
    }
    out
}

/// Marsaglia's xorshift64: fast, dependency-free, and the same everywhere.
#[derive(Clone, Debug)]
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Random `(a, b, c)` triples aimed at the hard cases of fma, cycling
/// through eight classes: anything at all; `c ≈ −a·b` (cancellation, often
/// exact to ±0); results in and near the subnormal range; near overflow;
/// short significands (exact results and exact ties); moderate magnitudes,
/// as in real products; `c = +0` (the product alone, rounded once); tiny
/// products (`b` near 2^-79, `a` below 2^-60) against any `c`.
#[derive(Clone, Debug)]
pub struct RandomTriples {
    rng: XorShift,
    i: u64,
}

impl RandomTriples {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: XorShift(seed | 1),
            i: 0,
        }
    }
}

impl Iterator for RandomTriples {
    type Item = [u32; 3];

    fn next(&mut self) -> Option<[u32; 3]> {
        let r = &mut self.rng;
        let x = r.next_u64();
        let (mut a, mut b) = (x as u32, (x >> 32) as u32);
        let c = match self.i % 8 {
            0 => r.next_u64() as u32,
            1 => {
                (f32::from_bits(a) * f32::from_bits(b)).to_bits()
                    ^ 0x8000_0000
                    ^ (r.next_u64() as u32 & 3)
            }
            2 => {
                a &= 0x9FFF_FFFF;
                b = (b & 0x807F_FFFF) | 0x0800_0000;
                r.next_u64() as u32 & 0x80FF_FFFF
            }
            3 => {
                a |= 0x7000_0000;
                a &= 0xFF7F_FFFF;
                b = (b & 0x80FF_FFFF) | 0x3F00_0000;
                (r.next_u64() as u32 & 0x80FF_FFFF) | 0x7E80_0000
            }
            4 => {
                a &= 0xFFFF_0000;
                b &= 0xFFFF_0000;
                r.next_u64() as u32 & 0xFFFF_C000
            }
            5 => {
                a = (a & 0x81FF_FFFF) | 0x3E00_0000;
                b = (b & 0x81FF_FFFF) | 0x3E00_0000;
                (r.next_u64() as u32 & 0x81FF_FFFF) | 0x3E00_0000
            }
            6 => 0,
            _ => {
                a &= 0x87FF_FFFF;
                b = (b & 0x807F_FFFF) | 0x1800_0000;
                r.next_u64() as u32
            }
        };
        self.i += 1;
        Some([a, b, c])
    }
}

/// Correctly rounded `[fma(a,b,c), a+c, a·b]`, NaNs canonical: what the WGSL
/// probe shader must return for each triple.
pub fn expected_arith([a, b, c]: [u32; 3]) -> [u32; 3] {
    let (fa, fb, fc) = (f32::from_bits(a), f32::from_bits(b), f32::from_bits(c));
    [
        canonicalize(fa.mul_add(fb, fc)).to_bits(),
        canonicalize(fa + fc).to_bits(),
        canonicalize(fa * fb).to_bits(),
    ]
}

/// Products of the self-test: K across chunk boundaries, a matrix-vector
/// product, odd M and N.
pub const SELF_TEST_SHAPES: [MatmulDims; 3] = [
    MatmulDims { m: 9, k: 300, n: 7 },
    MatmulDims {
        m: 1,
        k: 513,
        n: 130,
    },
    MatmulDims {
        m: 70,
        k: 600,
        n: 65,
    },
];

/// Operands of a self-test product: moderate values (products neither
/// overflow nor vanish), every 7th a subnormal, every 23rd a −0.
pub fn self_test_operands(dims: MatmulDims, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = XorShift(seed | 1);
    let mut gen = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| {
                let bits = r.next_u64() as u32;
                if i % 23 == 1 {
                    -0.0
                } else if i % 7 == 0 {
                    f32::from_bits(bits & 0x807F_FFFF)
                } else {
                    f32::from_bits((bits & 0x83FF_FFFF) | 0x3C00_0000)
                }
            })
            .collect()
    };
    (gen(dims.m * dims.k), gen(dims.k * dims.n))
}

/// The matmul self-test through any function that multiplies: each of
/// [`SELF_TEST_SHAPES`] must equal [`matmul_spec`] bit for bit. `Ok(false)`
/// when a product differs; `Err` when `matmul` itself fails.
pub fn matmul_self_test(
    mut matmul: impl FnMut(&[f32], &[f32], MatmulDims) -> Result<Vec<f32>>,
) -> Result<bool> {
    for (i, dims) in SELF_TEST_SHAPES.into_iter().enumerate() {
        let (a, b) = self_test_operands(dims, 0x853C_49E6_748F_EA9B ^ i as u64);
        let got = matmul(&a, &b, dims)?;
        let want = matmul_spec(&a, &b, dims);
        if got.len() != want.len()
            || got
                .iter()
                .zip(&want)
                .any(|(g, w)| g.to_bits() != w.to_bits())
        {
            return Ok(false);
        }
    }
    Ok(true)
}

/// One op's self-test: `Ok(false)` when the backend differs from the spec.
pub type SelfTest = fn(&dyn Backend) -> Result<bool>;

/// The self-test of each op through [`Backend::run`], by op name: one line
/// per op (ARCHITECTURE.md, "Adding an op").
pub const SELF_TESTS: &[(&str, SelfTest)] = &[(Matmul::NAME, |backend| {
    matmul_self_test(|a, b, dims| crate::backend::matmul(backend, a, b, dims))
})];

/// The conformance self-test of a whole backend (a worker runs it at start
/// and advertises only backends that pass): every op of [`SELF_TESTS`]
/// against its spec, bit for bit.
pub fn self_test(backend: &dyn Backend) -> Result<()> {
    for (name, test) in SELF_TESTS {
        if !test(backend)? {
            return Err(Error::device(format!(
                "{name} differs from the contract's spec"
            )));
        }
    }
    Ok(())
}
