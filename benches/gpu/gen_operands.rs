//! `lockstep-gen-operands`: writes the operands of one matmul, F32 tensors
//! `a` [M,K] and `b` [K,N] (row-major, little-endian), to a safetensors file:
//! exactly what `lockstep matmul --input` reads. Used by `benches/gpu/run.sh`
//! to feed the same product to every backend and compare digests.
//!
//! ```text
//! lockstep-gen-operands --m 4096 --k 4096 --n 4096 --values plain --seed 1 --out ab.safetensors
//! ```
//!
//! Value kinds:
//! - `plain`: uniform in [-1, 1) (24 random bits, so every value is exact).
//! - `magnitudes`: random sign and mantissa, exponent uniform in
//!   [-E, E] (E = `--exp-range`, default 60), so magnitudes span 2^-E..2^E.
//! - `specials`: mostly plain; about 1 value in 8 is one of ±0, ±inf, a quiet
//!   NaN, a signalling NaN with payload, the smallest subnormal, the largest
//!   negative subnormal, the smallest normal, the largest finite, 1, -1-ulp.
//!
//! The same arguments give the same file on any machine: `a` comes from
//! ChaCha8 stream 0 of the seed and `b` from stream 1.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Values {
    /// Uniform in [-1, 1).
    Plain,
    /// Random sign and mantissa, exponent uniform in [-E, E].
    Magnitudes,
    /// Mostly plain, about 1 in 8 values a special (±0, ±inf, NaNs, subnormals, extremes).
    Specials,
}

/// Writes random matmul operands `a` [M,K] and `b` [K,N] (F32) to a
/// safetensors file, the input format of `lockstep matmul --input`.
#[derive(Parser, Debug)]
#[command(name = "lockstep-gen-operands", version)]
struct Args {
    /// Rows of a (and of c).
    #[arg(long)]
    m: usize,
    /// Columns of a, rows of b (the reduction length).
    #[arg(long)]
    k: usize,
    /// Columns of b (and of c).
    #[arg(long)]
    n: usize,
    /// What the values look like.
    #[arg(long, value_enum, default_value = "plain")]
    values: Values,
    /// For `magnitudes`: exponents are drawn uniformly from [-E, E] (0..=127).
    #[arg(long, default_value_t = 60)]
    exp_range: u32,
    /// Seed of the random generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file (overwritten).
    #[arg(long)]
    out: PathBuf,
}

/// Bit patterns of the `specials` kind: the tests' own set.
const SPECIALS: [u32; 12] = lockstep_kernels::conformance::SPECIAL_VALUES;

/// Uniform in [-1, 1) from 24 random bits: x·2^-23 − 1 is exact in f32.
#[inline]
fn plain(bits24: u64) -> u32 {
    ((bits24 as f32) * (1.0 / (1u32 << 23) as f32) - 1.0).to_bits()
}

/// `x` scaled to [0, n) without division (multiply-shift on 32 bits; the
/// bias is below 2^-24 for the small `n` used here).
#[inline]
fn below(x: u64, n: u32) -> u32 {
    (((x & 0xFFFF_FFFF) * n as u64) >> 32) as u32
}

/// One value's bit pattern from 64 random bits.
#[inline]
fn value(kind: Values, exp_range: u32, r: u64) -> u32 {
    match kind {
        Values::Plain => plain(r >> 40),
        Values::Magnitudes => {
            let sign = ((r >> 23) as u32 & 1) << 31;
            let mant = r as u32 & 0x7F_FFFF;
            // Biased exponent uniform in [127 - E, 127 + E]; E <= 127, so it
            // stays in [0, 254]: 0 gives a subnormal, never inf or NaN.
            let exp = 127 - exp_range + below(r >> 32, 2 * exp_range + 1);
            sign | (exp << 23) | mant
        }
        Values::Specials => {
            if r & 7 == 0 {
                SPECIALS[below(r >> 8, SPECIALS.len() as u32) as usize]
            } else {
                plain(r >> 40)
            }
        }
    }
}

/// `len` values as little-endian F32 bytes, generated straight into the
/// buffer that is written out (no intermediate Vec<f32>).
fn tensor_bytes(len: usize, kind: Values, exp_range: u32, seed: u64, stream: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut bytes = vec![0u8; len * 4];
    for chunk in bytes.chunks_exact_mut(4) {
        let v = value(kind, exp_range, rng.next_u64());
        chunk.copy_from_slice(&v.to_le_bytes());
    }
    bytes
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let (m, k, n) = (args.m, args.k, args.n);
    if m == 0 || k == 0 || n == 0 {
        bail!("--m, --k and --n must be at least 1 (got {m}x{k}x{n})");
    }
    if args.exp_range > 127 {
        bail!(
            "--exp-range must be at most 127 (got {}): exponents must stay finite",
            args.exp_range
        );
    }
    let len_a = m
        .checked_mul(k)
        .filter(|l| l.checked_mul(4).is_some())
        .context("a is too large")?;
    let len_b = k
        .checked_mul(n)
        .filter(|l| l.checked_mul(4).is_some())
        .context("b is too large")?;

    let t = Instant::now();
    let a = tensor_bytes(len_a, args.values, args.exp_range, args.seed, 0);
    let b = tensor_bytes(len_b, args.values, args.exp_range, args.seed, 1);
    let gen_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let views = [
        ("a", TensorView::new(Dtype::F32, vec![m, k], &a)?),
        ("b", TensorView::new(Dtype::F32, vec![k, n], &b)?),
    ];
    // One buffered write of the header and both tensors; no further copies.
    safetensors::serialize_to_file(views, None, &args.out)
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let write_s = t.elapsed().as_secs_f64();

    println!(
        "wrote {}: a [{m}, {k}], b [{k}, {n}], {} values{}, seed {}, {:.1} MiB (generate {gen_s:.2} s, write {write_s:.2} s)",
        args.out.display(),
        args.values
            .to_possible_value()
            .map(|v| v.get_name().to_string())
            .unwrap_or_default(),
        if args.values == Values::Magnitudes {
            format!(" (exp range ±{})", args.exp_range)
        } else {
            String::new()
        },
        args.seed,
        (a.len() + b.len()) as f64 / (1024.0 * 1024.0),
    );
    Ok(())
}
