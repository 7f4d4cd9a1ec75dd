//! # lockstep
//!
//! Workers, coordinator and command-line tool of lockstep, on top of the
//! compute core in `lockstep-kernels`.
//!
//! ## Layout
//! - [`tensors`]: reading and writing matmul operands as safetensors, with
//!   clear errors for every way a file can be wrong.
//! - [`bench`]: `lockstep bench matmul`, lockstep against the GEMMs users
//!   would otherwise use (faer and matrixmultiply on CPU, cuBLAS on CUDA),
//!   timed in the same run.
//! - `main.rs`: the `lockstep` CLI.

pub mod batch;
pub mod bench;
pub mod cli;
pub mod coordinator;
pub mod demo;
pub mod nats;
pub mod protocol;
pub mod server;
pub mod tensors;
pub mod worker;
