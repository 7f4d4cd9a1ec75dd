//! The WGSL exact path's integer fma (shaders/softfloat.wgsl), run on the
//! real GPU/driver, against `f32::mul_add` on millions of random and
//! edge-case triples: subnormal results, overflow, ties, exact cancellation.

use lockstep_kernels::wgpu::{expected_arith, WgpuBackend, WgpuOptions, WgpuPath};
use lockstep_tests::open_wgpu;

fn backend() -> Option<WgpuBackend> {
    open_wgpu(WgpuOptions {
        force_path: Some(WgpuPath::Exact),
        ..Default::default()
    })
}

struct XorShift(u64);
impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn check(gpu: &WgpuBackend, triples: &[[u32; 3]]) {
    let got = gpu.eval_arith(WgpuPath::Exact, triples).expect("GPU run");
    let mut bad = 0;
    for (t, g) in triples.iter().zip(&got) {
        let want = expected_arith(*t);
        if *g != want {
            if bad < 5 {
                eprintln!("fma/add/mul{t:08x?}: got {g:08x?}, want {want:08x?}");
            }
            bad += 1;
        }
    }
    assert_eq!(bad, 0, "{bad} of {} triples differ", triples.len());
}

#[test]
fn edge_value_triples_exhaustive() {
    let Some(gpu) = backend() else { return };
    let edge: Vec<u32> = vec![
        0,
        0x8000_0000,
        1,
        0x8000_0001,
        2,
        0x007F_FFFF,
        0x807F_FFFF,
        0x0040_0000,
        0x0080_0000,
        0x0080_0001,
        0x3F80_0000,
        0xBF80_0000,
        0x3F80_0001,
        0x3F7F_FFFF,
        0x3F00_0000,
        0x3400_0000,
        0x3380_0000,
        0x3380_0001,
        0x4000_0000,
        0x7F7F_FFFF,
        0xFF7F_FFFF,
        0x7F00_0000,
        0x7F80_0000,
        0xFF80_0000,
        0x7FC0_0000,
        0x7F80_0001,
        0xFFFF_FFFF,
        0x1F80_0000,
        0x2000_0000,
        0x5F80_0000,
        0x0C00_0000,
        0x3FC0_0000,
    ];
    let mut triples = Vec::with_capacity(edge.len().pow(3));
    for &a in &edge {
        for &b in &edge {
            for &c in &edge {
                triples.push([a, b, c]);
            }
        }
    }
    check(&gpu, &triples);
}

#[test]
fn eight_million_random_triples() {
    let Some(gpu) = backend() else { return };
    let mut r = XorShift(0x1234_5678_9ABC_DEF1);
    let n = 8_000_000;
    let mut triples = Vec::with_capacity(n);
    for i in 0..n {
        let x = r.next();
        let (mut a, mut b) = (x as u32, (x >> 32) as u32);
        let c = match i % 6 {
            // Anything at all.
            0 => r.next() as u32,
            // c ≈ −a·b: cancellation, often exact to ±0.
            1 => {
                (f32::from_bits(a) * f32::from_bits(b)).to_bits()
                    ^ 0x8000_0000
                    ^ (r.next() as u32 & 3)
            }
            // Results in and near the subnormal range.
            2 => {
                a &= 0x9FFF_FFFF;
                b = (b & 0x807F_FFFF) | 0x0800_0000;
                r.next() as u32 & 0x80FF_FFFF
            }
            // Near overflow.
            3 => {
                a |= 0x7000_0000;
                a &= 0xFF7F_FFFF;
                b = (b & 0x80FF_FFFF) | 0x3F00_0000;
                (r.next() as u32 & 0x80FF_FFFF) | 0x7E80_0000
            }
            // Short significands: many exact results and exact ties.
            4 => {
                a &= 0xFFFF_0000;
                b &= 0xFFFF_0000;
                r.next() as u32 & 0xFFFF_C000
            }
            // Moderate magnitudes, as in real matmuls.
            _ => {
                a = (a & 0x81FF_FFFF) | 0x3E00_0000;
                b = (b & 0x81FF_FFFF) | 0x3E00_0000;
                (r.next() as u32 & 0x81FF_FFFF) | 0x3E00_0000
            }
        };
        triples.push([a, b, c]);
    }
    check(&gpu, &triples);
}
