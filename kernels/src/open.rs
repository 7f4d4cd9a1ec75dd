//! Opening the backend of a kind, and detecting every backend this machine
//! has. Kept apart from [`crate::backend`] so that the trait depends on no
//! implementation.

use crate::backend::{Backend, BackendKind};
use crate::error::Result;

/// Opens the backend of the given kind with default settings.
/// `Err` with [`crate::ErrorKind::Unavailable`] when its driver or device is missing.
pub fn open(kind: BackendKind) -> Result<Box<dyn Backend>> {
    open_with_threads(kind, 0)
}

/// [`open`], with the CPU backend on `cpu_threads` threads (0 = one per core).
pub fn open_with_threads(kind: BackendKind, cpu_threads: usize) -> Result<Box<dyn Backend>> {
    Ok(match kind {
        BackendKind::Cpu => Box::new(crate::cpu::CpuBackend::new(cpu_threads)?),
        BackendKind::Wgpu => Box::new(crate::wgpu::WgpuBackend::new(Default::default())?),
        BackendKind::Cuda => Box::new(crate::cuda::CudaBackend::new(0)?),
    })
}

/// Every backend present on this machine, with the reason for each absent one.
pub fn detect_all() -> Vec<(BackendKind, Result<Box<dyn Backend>>)> {
    BackendKind::ALL.iter().map(|&k| (k, open(k))).collect()
}
