//! # lockstep-kernels
//!
//! The compute core of lockstep: one arithmetic contract and several
//! implementations of it that agree bit for bit on any hardware.
//!
//! ## Layout
//! - [`contract`]: the contract's version and the scalar spec of every op
//!   (the executable form of `CONTRACT.md`).
//! - [`digest`]: SHA3-256 tensor digests over a canonical encoding.
//! - [`backend`]: the [`Backend`] trait every implementation follows, and
//!   detection of what this machine has.
//! - [`cpu`]: packed, blocked, SIMD, multi-threaded CPU path.
//! - [`wgpu`]: WGSL compute shaders (sources in `shaders/`), with a
//!   conformance probe and an exact integer soft-float fallback.
//! - [`cuda`]: CUDA kernels (sources in `kernels/cuda/*.cu`), compiled at run
//!   time by NVRTC with `--fmad=false`; absent without a driver.
//! - [`softfloat`]: the integer fma algorithm of the WGSL exact path,
//!   mirrored in Rust so it can be checked against hardware fma at speed.
//!
//! Adding a kernel: one source file (`shaders/x.wgsl` or `kernels/cuda/x.cu`)
//! plus one line in that backend's source registry.

pub mod backend;
pub mod contract;
pub mod cpu;
pub mod cuda;
pub mod digest;
mod error;
pub mod softfloat;
pub mod wgpu;

pub use backend::{detect_all, open, Backend, BackendInfo, BackendKind};
pub use contract::{matmul_spec, MatmulDims, CONTRACT_VERSION, K_CHUNK};
pub use digest::{tensor_digest_f32, Digest};
pub use error::{Error, ErrorKind, Result};
