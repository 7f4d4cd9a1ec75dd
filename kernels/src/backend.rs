//! The one interface every backend implements. Opening and detecting
//! backends lives in [`crate::open`].

use crate::contract::{Matmul, MatmulDims, Op, Plan, Tensor, TensorView};
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
///
/// Callers use [`Backend::run`]; a backend implements [`Backend::launch`],
/// which matches on the checked [`Plan`] with one arm per op.
pub trait Backend: Send + Sync {
    fn info(&self) -> BackendInfo;

    /// Computes an op whose inputs [`Op::check`] has accepted (`plan` is its
    /// answer: the op's parameters and dimensions). Returns the data of each
    /// output, in order, NaNs canonical; [`Backend::run`] gives them their
    /// shapes.
    fn launch(&self, plan: &Plan, inputs: &[TensorView<'_>]) -> Result<Vec<Vec<f32>>>;

    /// Checks the inputs against the op's contract module, then computes it.
    /// Bad inputs are `Shape` or `TooLarge` errors, never panics.
    fn run(&self, op: &Op, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>> {
        let plan = op.check(inputs)?;
        let shapes = plan.output_shapes();
        let outputs = self.launch(&plan, inputs)?;
        if outputs.len() != shapes.len() {
            return Err(Error::device(format!(
                "{} on {} returned {} outputs, not {}",
                op.name(),
                self.info().kind,
                outputs.len(),
                shapes.len()
            )));
        }
        shapes
            .into_iter()
            .zip(outputs)
            .map(|(shape, data)| {
                if data.len() == shape.iter().product::<usize>() {
                    Ok(Tensor::new(shape, data))
                } else {
                    Err(Error::device(format!(
                        "{} on {} returned {} values for an output of shape {shape:?}",
                        op.name(),
                        self.info().kind,
                        data.len()
                    )))
                }
            })
            .collect()
    }
}

/// `C = A·B` on any backend, for callers that hold plain slices: a
/// shorthand for [`Backend::run`] with [`Op::Matmul`].
pub fn matmul(backend: &dyn Backend, a: &[f32], b: &[f32], dims: MatmulDims) -> Result<Vec<f32>> {
    let (sa, sb) = ([dims.m, dims.k], [dims.k, dims.n]);
    let mut out = backend.run(
        &Op::Matmul(Matmul {}),
        &[TensorView::new(&sa, a), TensorView::new(&sb, b)],
    )?;
    Ok(out.remove(0).data)
}
