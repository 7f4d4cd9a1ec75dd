//! # lockstep
//!
//! Workers, coordinator and command-line tool of lockstep, on top of the
//! compute core in `lockstep-kernels`.
//!
//! ## Layout
//! - [`protocol`]: every subject, stream, bucket and message on the wire
//!   (docs/PROTOCOL.md).
//! - [`nats`]: connecting, creating streams and buckets, the worker
//!   registry, blobs.
//! - [`store`]: limits of every stream, bucket and the object store, and the
//!   clean-up of a finished batch.
//! - [`batch`]: the JSON Lines batch format.
//! - [`tensors`]: reading and writing tensors as safetensors files, with
//!   clear errors for every way a file can be wrong.
//! - [`worker`]: `lockstep worker` (backends, registry and heartbeats, the
//!   job handler, the blob cache, test-only switches).
//! - [`coordinator`]: `lockstep submit` (plan and resume, scheduling,
//!   verdicts and disputes, the report).
//! - [`harness`]: a local nats-server and worker processes, for the demo,
//!   benchmarks and tests.
//! - [`demo`]: `lockstep demo`.
//! - [`bench`]: `lockstep bench matmul | dispatch`, lockstep against the
//!   baselines users would otherwise use, timed in the same run.
//! - [`cli`]: the `lockstep` command line (`main.rs` is one line).

pub mod admin;
pub mod auth;
pub mod batch;
pub mod bench;
pub mod cli;
pub mod coordinator;
pub mod demo;
pub mod deploy;
pub mod fuzz;
pub mod harness;
pub mod llm;
pub mod metrics;
pub mod nats;
pub mod protocol;
pub mod serve;
pub mod store;
pub mod tensors;
pub mod worker;
