//! # lockstep-kernels
//!
//! The compute core of lockstep: one arithmetic contract and several
//! implementations of it that agree bit for bit on any hardware.
//!
//! ## Layout
//! - [`contract`]: the contract's version, its shared rules (the 256-chunk,
//!   NaN canonicalisation), the tensor types, and [`Op`], the one list of
//!   ops; one module per op (`contract/matmul.rs`) with its parameters,
//!   input validation, output shapes and scalar spec (the executable form of
//!   `CONTRACT.md`).
//! - [`digest`]: SHA3-256 tensor digests over a canonical encoding.
//! - [`backend`]: the [`Backend`] trait every implementation follows.
//! - [`open`]: opening a backend by kind, detecting what this machine has.
//! - [`conformance`]: edge values, random fma triples and the matmul
//!   self-test, shared by the WGSL probe, the worker and the tests.
//! - [`cpu`]: packed, blocked, SIMD, multi-threaded CPU kernels.
//! - [`wgpu`]: WGSL compute shaders (sources in `shaders/`), with a
//!   conformance probe and an exact integer soft-float fallback.
//! - [`cuda`]: CUDA kernels (sources in `kernels/cuda/*.cu`), compiled at run
//!   time by NVRTC with `--fmad=false`; absent without a driver.
//! - [`softfloat`]: the integer fma algorithm of the WGSL exact path,
//!   mirrored in Rust so it can be checked against hardware fma at speed.
//!
//! Adding an op: see "Adding an op" in ARCHITECTURE.md.

pub mod backend;
pub mod conformance;
pub mod contract;
pub mod cpu;
pub mod cuda;
pub mod digest;
mod error;
pub mod model;
pub mod open;
pub mod softfloat;
pub mod wgpu;

pub use backend::{Backend, BackendInfo, BackendKind};
pub use contract::{
    matmul_spec, outputs_digest, Matmul, MatmulDims, Op, Plan, Tensor, TensorView,
    CONTRACT_VERSION, K_CHUNK,
};
pub use digest::{tensor_digest_f32, Digest};
pub use error::{Error, ErrorKind, Result};
pub use open::{detect_all, open, open_with_threads};
