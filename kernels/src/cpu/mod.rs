//! CPU backend: one kernel module per op, each bit-identical to its spec in
//! [`crate::contract`]. Matmul ([`matmul`]) is packed, cache-blocked, SIMD
//! and multi-threaded.
//!
//! Why it is exact: the cache block along K is the contract's 256-chunk
//! itself. For each chunk the microkernel starts every accumulator at +0.0,
//! runs one fused multiply-add per k in increasing order (a lane per output
//! column, so no lane ever sums across k), and then adds the tile into C with
//! one rounding: `total = total + acc`. Threads own disjoint blocks of C and
//! each block is computed in the same order, so the bits do not depend on the
//! thread count, the blocking or the ISA.

pub mod attention;
mod lanes;
mod matmul;
pub mod qmatvec;
pub mod team;

pub use matmul::Isa;

use crate::backend::{Backend, BackendInfo, BackendKind};
use crate::contract::{Plan, TensorView};
use crate::error::{Error, Result};

/// The CPU backend: a thread pool and the best SIMD path this CPU supports.
pub struct CpuBackend {
    /// Owned pool so `--threads T` means T threads, whatever else runs.
    pool: rayon::ThreadPool,
    /// Threads in `pool`; blocks of C are split this many ways.
    threads: usize,
    /// Instruction set of the microkernel in use (detected, or forced by tests).
    isa: Isa,
}

impl CpuBackend {
    /// `threads == 0` means one per available core.
    pub fn new(threads: usize) -> Result<Self> {
        Self::with_isa(threads, Isa::detect())
    }

    /// A backend that uses the given ISA; `Err` if this CPU lacks it.
    pub fn with_isa(threads: usize, isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            return Err(Error::unavailable(format!(
                "this CPU does not support the {} path",
                isa.name()
            )));
        }
        let threads = if threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            threads
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("lockstep-cpu-{i}"))
            .build()
            .map_err(|e| Error::device(format!("cannot start CPU threads: {e}")))?;
        Ok(Self { pool, threads, isa })
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Runs `f` on this backend's pool (benchmarks use it to give baselines
    /// the same threads).
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Cpu,
            device: format!(
                "{} ({} thread{})",
                std::env::consts::ARCH,
                self.threads,
                if self.threads == 1 { "" } else { "s" }
            ),
            path: self.isa.name().to_string(),
            findings: Isa::ALL
                .iter()
                .map(|isa| {
                    format!(
                        "{}: {}",
                        isa.name(),
                        if isa.is_supported() { "yes" } else { "no" }
                    )
                })
                .collect(),
        }
    }

    fn launch(&self, plan: &Plan, inputs: &[TensorView<'_>]) -> Result<Vec<Vec<f32>>> {
        Ok(match *plan {
            Plan::Matmul(dims) => {
                let (a, b) = (inputs[0].data, inputs[1].data);
                vec![self
                    .pool
                    .install(|| matmul::matmul(a, b, dims, self.isa, self.threads))]
            }
            Plan::Generate(..) | Plan::GenerateTrace(..) | Plan::LayerInputs(..) => {
                return Err(crate::model::generate::not_a_backend_op())
            }
        })
    }
}
