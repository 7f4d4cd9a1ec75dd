//! The one interface every backend implements, and detection of the backends
//! present on this machine.

use crate::contract::MatmulDims;
use crate::error::{Error, Result};

/// Which implementation computes a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cpu,
    Wgpu,
    Cuda,
}

impl BackendKind {
    pub const ALL: [BackendKind; 3] = [BackendKind::Cpu, BackendKind::Wgpu, BackendKind::Cuda];

    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Cpu => "cpu",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for BackendKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(BackendKind::Cpu),
            "wgpu" => Ok(BackendKind::Wgpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!(
                "unknown backend `{other}` (expected cpu, wgpu or cuda)"
            )),
        }
    }
}

/// What a backend found out about its device: shown by `lockstep backends`,
/// advertised by workers, carried in results.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct BackendInfo {
    pub kind: BackendKind,
    /// Human-readable device, e.g. `llvmpipe (LLVM 15.0.6, 256 bits) via Vulkan`.
    pub device: String,
    /// The code path in use, e.g. `avx512`, `exact-softfloat`, `sm_90`.
    pub path: String,
    /// Conformance findings, one `name: value` line each.
    pub findings: Vec<String>,
}

/// A contract-following implementation of the ops.
pub trait Backend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// `C = A·B` under the contract. `a` is [M,K], `b` is [K,N], row-major.
    fn matmul(&self, a: &[f32], b: &[f32], dims: MatmulDims) -> Result<Vec<f32>>;
}

/// Checks that operand lengths match the dimensions, without overflow.
pub fn check_matmul_operands(a: &[f32], b: &[f32], dims: MatmulDims) -> Result<()> {
    let MatmulDims { m, k, n } = dims;
    let want_a = m
        .checked_mul(k)
        .ok_or_else(|| Error::too_large(format!("M*K overflows: {m}x{k}")))?;
    let want_b = k
        .checked_mul(n)
        .ok_or_else(|| Error::too_large(format!("K*N overflows: {k}x{n}")))?;
    m.checked_mul(n)
        .ok_or_else(|| Error::too_large(format!("M*N overflows: {m}x{n}")))?;
    if a.len() != want_a {
        return Err(Error::shape(format!(
            "A has {} values, but M*K = {m}*{k} = {want_a}",
            a.len()
        )));
    }
    if b.len() != want_b {
        return Err(Error::shape(format!(
            "B has {} values, but K*N = {k}*{n} = {want_b}",
            b.len()
        )));
    }
    Ok(())
}

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
