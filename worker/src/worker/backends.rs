//! Choosing and self-testing the backend a worker computes with.

use std::sync::Arc;

use anyhow::{bail, Result};
use lockstep_kernels::{conformance, Backend, BackendInfo, BackendKind};

/// Which backends a worker may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// The fastest backend that passes the self-test: CUDA, then a WGSL GPU
    /// (not a software rasteriser), then the CPU.
    Auto,
    Only(BackendKind),
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "auto" {
            Ok(BackendChoice::Auto)
        } else {
            s.parse()
                .map(BackendChoice::Only)
                .map_err(|e: String| format!("{e}, or auto"))
        }
    }
}

/// Opens the chosen backend(s) and self-tests each against the spec; returns
/// the one to compute with and the infos of all that passed.
pub fn open_backend(
    choice: BackendChoice,
    threads: usize,
) -> Result<(Arc<dyn Backend>, Vec<BackendInfo>)> {
    let kinds: Vec<BackendKind> = match choice {
        BackendChoice::Auto => vec![BackendKind::Cuda, BackendKind::Wgpu, BackendKind::Cpu],
        BackendChoice::Only(k) => vec![k],
    };
    let mut passing: Vec<(Arc<dyn Backend>, BackendInfo)> = Vec::new();
    for kind in kinds {
        match lockstep_kernels::open_with_threads(kind, threads).map(Arc::<dyn Backend>::from) {
            Ok(b) => match conformance::self_test(&*b) {
                Ok(()) => {
                    let info = b.info();
                    tracing::info!(backend = %kind, device = %info.device, path = %info.path, "self-test passed");
                    passing.push((b, info));
                }
                Err(e) => tracing::warn!(backend = %kind, "self-test FAILED, not advertised: {e}"),
            },
            Err(e) if choice == BackendChoice::Auto => {
                tracing::info!(backend = %kind, "absent: {e}")
            }
            Err(e) => bail!("backend {kind} is not usable: {e}"),
        }
    }
    if passing.is_empty() {
        bail!("no backend passed the self-test");
    }
    // A software Vulkan device is slower than the CPU backend: prefer the CPU then.
    let pick = passing
        .iter()
        .position(|(_, i)| !(i.kind == BackendKind::Wgpu && i.device.contains("Cpu")))
        .unwrap_or(0);
    let chosen = passing[pick].0.clone();
    Ok((chosen, passing.into_iter().map(|(_, i)| i).collect()))
}
