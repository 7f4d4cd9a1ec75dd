//! The arithmetic contract, executable: plain scalar functions that define
//! every op's result bit for bit. `CONTRACT.md` at the repository root is the
//! prose version; where they disagree, that is a bug in one of them.
//!
//! This module holds what every op shares (the version, the chunk length,
//! NaN canonicalisation, the tensor types) and [`Op`], the one list of ops.
//! Each op has its own module with its parameters, input validation, output
//! shapes and scalar spec ([`matmul`]).
//!
//! Every fast path (SIMD CPU, WGSL, CUDA) is tested bit for bit against the
//! specs here. They are written for clarity, not speed: one loop per rule.

pub mod argmax;
pub mod attention;
pub mod elementwise;
pub mod generate;
pub mod matmul;
pub mod prim;
pub mod quant;
pub mod rmsnorm;
pub mod rope;
pub mod sample;
pub mod softmax;
pub mod swiglu;

use crate::digest::{tensor_digest_f32, Digest};
use crate::error::{Error, Result};

pub use generate::{Generate, GenerateDims, GenerateTrace, LayerInputs, ReplayDims};
pub use matmul::{matmul_spec, Matmul, MatmulDims};

/// Version of the arithmetic contract. Every result carries it; any change to
/// the arithmetic of any op bumps it.
pub const CONTRACT_VERSION: u32 = 2;

/// Length of the fixed reduction chunks (CONTRACT.md §4). A sum is formed
/// chunk by chunk, so a GPU may hand different chunks to different threads
/// (split-K) without changing a bit, as long as it adds the chunk sums in
/// order. Kernels get this value from here (`-DK_CHUNK` for NVRTC, a
/// generated `const K_CHUNK` for WGSL); it is typed nowhere else.
pub const K_CHUNK: usize = 256;

/// The one NaN every op emits: quiet, positive, zero payload.
pub const CANONICAL_NAN_BITS: u32 = 0x7FC0_0000;

/// Replaces any NaN by the canonical NaN; every other value (subnormals, ±0,
/// ±inf) passes through unchanged.
#[inline]
pub fn canonicalize(x: f32) -> f32 {
    // On the bits: a float compare and select may be folded by LLVM into
    // returning `x` itself (any NaN being "a NaN" to it).
    if x.to_bits() & 0x7FFF_FFFF > 0x7F80_0000 {
        f32::from_bits(CANONICAL_NAN_BITS)
    } else {
        x
    }
}

/// An f32 tensor an op reads: row-major `data` of `shape`.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub shape: &'a [usize],
    pub data: &'a [f32],
}

impl<'a> TensorView<'a> {
    pub fn new(shape: &'a [usize], data: &'a [f32]) -> Self {
        Self { shape, data }
    }
}

/// Views of tensors whose shapes and data are held apart (as a job's are).
pub fn views<'a>(shapes: &'a [Vec<usize>], data: &'a [Vec<f32>]) -> Vec<TensorView<'a>> {
    shapes
        .iter()
        .zip(data)
        .map(|(s, d)| TensorView::new(s, d))
        .collect()
}

/// An f32 tensor an op writes.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl Tensor {
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Self {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView::new(&self.shape, &self.data)
    }

    /// The contract digest of this tensor (CONTRACT.md §5).
    pub fn digest(&self) -> Digest {
        tensor_digest_f32(&self.shape, &self.data)
    }
}

/// Elements of a tensor of `shape`, or `TooLarge` when the count overflows.
pub fn elements(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| Error::too_large(format!("shape {} overflows", short_shape(shape))))
}

/// A shape for a message: at most 8 dims written out, then the rank.
pub fn short_shape(shape: &[usize]) -> String {
    if shape.len() <= 8 {
        format!("{shape:?}")
    } else {
        format!("{:?}… (rank {})", &shape[..8], shape.len())
    }
}

/// Every op lockstep computes, with its parameters. This enum is the one
/// place that lists them: the backends, the wire format and the coordinator
/// all go through it.
///
/// On the wire an op is `"op": "<name>", "params": {…}`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", content = "params", rename_all = "snake_case")]
pub enum Op {
    /// `c = a·b` ([`matmul`]).
    Matmul(Matmul),
    /// Text from a model named by its digest ([`generate`]).
    Generate(Generate),
    /// Every (position, layer) digest of a model over given tokens: a
    /// dispute query ([`generate`]).
    GenerateTrace(GenerateTrace),
    /// One layer's inputs at every position: a dispute query ([`generate`]).
    LayerInputs(LayerInputs),
}

/// An op whose inputs were checked: everything a kernel needs to launch
/// (the op's parameters, if it has any, and its dimensions), and the shapes
/// of its outputs. An op with parameters carries them here, e.g.
/// `Plan::Rmsnorm(Rmsnorm, RmsnormDims)`.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    Matmul(MatmulDims),
    Generate(Generate, GenerateDims),
    GenerateTrace(GenerateTrace, ReplayDims),
    LayerInputs(LayerInputs, ReplayDims),
}

impl Op {
    /// The names of every op, as on the wire.
    pub const NAMES: &'static [&'static str] = &[
        Matmul::NAME,
        Generate::NAME,
        GenerateTrace::NAME,
        LayerInputs::NAME,
    ];

    /// The op's name on the wire.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Matmul(_) => Matmul::NAME,
            Op::Generate(_) => Generate::NAME,
            Op::GenerateTrace(_) => GenerateTrace::NAME,
            Op::LayerInputs(_) => LayerInputs::NAME,
        }
    }

    /// The op's inputs, by name, in order.
    pub fn input_names(&self) -> &'static [&'static str] {
        match self {
            Op::Matmul(_) => Matmul::INPUTS,
            Op::Generate(_) => Generate::INPUTS,
            Op::GenerateTrace(_) => GenerateTrace::INPUTS,
            Op::LayerInputs(_) => LayerInputs::INPUTS,
        }
    }

    /// The op's outputs, by name, in order (tensor names in output files).
    pub fn output_names(&self) -> &'static [&'static str] {
        match self {
            Op::Matmul(_) => Matmul::OUTPUTS,
            Op::Generate(_) => Generate::OUTPUTS,
            Op::GenerateTrace(_) => GenerateTrace::OUTPUTS,
            Op::LayerInputs(_) => LayerInputs::OUTPUTS,
        }
    }

    /// Checks the input shapes (count, ranks, agreement) and plans the op.
    /// Callers that have no data yet (the coordinator, a worker before it
    /// downloads inputs) use this; backends use [`Op::check`].
    pub fn plan(&self, shapes: &[&[usize]]) -> Result<Plan> {
        if shapes.len() != self.input_names().len() {
            return Err(Error::shape(format!(
                "{} takes {} inputs ({}), got {}",
                self.name(),
                self.input_names().len(),
                self.input_names().join(", "),
                shapes.len()
            )));
        }
        match self {
            Op::Matmul(m) => m.plan(shapes).map(Plan::Matmul),
            Op::Generate(g) => g.plan(shapes).map(|d| Plan::Generate(g.clone(), d)),
            Op::GenerateTrace(t) => t.plan(shapes).map(|d| Plan::GenerateTrace(t.clone(), d)),
            Op::LayerInputs(l) => l.plan(shapes).map(|d| Plan::LayerInputs(l.clone(), d)),
        }
    }

    /// [`Op::plan`], plus: every input holds exactly as many values as its
    /// shape says.
    pub fn check(&self, inputs: &[TensorView<'_>]) -> Result<Plan> {
        let shapes: Vec<&[usize]> = inputs.iter().map(|t| t.shape).collect();
        let plan = self.plan(&shapes)?;
        for (name, t) in self.input_names().iter().zip(inputs) {
            let want = elements(t.shape)?;
            if t.data.len() != want {
                return Err(Error::shape(format!(
                    "{name} has {} values, but its shape {} needs {want}",
                    t.data.len(),
                    short_shape(t.shape)
                )));
            }
        }
        Ok(plan)
    }

    /// The scalar spec: the contract's result, bit for bit, computed the
    /// slow and obvious way.
    pub fn spec(&self, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>> {
        let plan = self.check(inputs)?;
        let outputs = match plan {
            Plan::Matmul(dims) => vec![matmul_spec(inputs[0].data, inputs[1].data, dims)],
            Plan::Generate(..) | Plan::GenerateTrace(..) | Plan::LayerInputs(..) => {
                return Err(Error::unavailable(
                    "generate needs its model: it runs through model::generate, not a backend",
                ))
            }
        };
        Ok(plan
            .output_shapes()
            .into_iter()
            .zip(outputs)
            .map(|(shape, data)| Tensor::new(shape, data))
            .collect())
    }
}

impl Plan {
    /// The shape of each output.
    pub fn output_shapes(&self) -> Vec<Vec<usize>> {
        match self {
            Plan::Matmul(d) => vec![d.output_shape()],
            Plan::Generate(_, d) => vec![vec![d.max_tokens], vec![generate::TRACE_VALUES]],
            Plan::GenerateTrace(t, d) => vec![vec![d.positions, t.layers, generate::TRACE_VALUES]],
            Plan::LayerInputs(_, d) => vec![vec![d.positions, d.width]],
        }
    }

    /// Multiply-adds (or comparable element steps) the op performs: what
    /// worker limits and the choice to compute inline are based on.
    pub fn work(&self) -> u64 {
        match self {
            Plan::Matmul(d) => d.macs(),
            // Positions, not multiply-adds: the model decides the cost, and a
            // worker checks it against the model it holds.
            Plan::Generate(_, d) => d.positions() as u64,
            Plan::GenerateTrace(_, d) | Plan::LayerInputs(_, d) => d.positions as u64,
        }
    }
}

/// Digest of an op's outputs, the value replicas are compared by: the
/// tensor digest itself for one output; for several, SHA3-256 over a tag and
/// each output's digest in order.
pub fn outputs_digest(outputs: &[Digest]) -> Digest {
    use sha3::Digest as _;
    if let [one] = outputs {
        return *one;
    }
    let mut h = sha3::Sha3_256::new();
    h.update(b"lockstep.outputs\0");
    h.update((outputs.len() as u32).to_le_bytes());
    for d in outputs {
        h.update(d.0);
    }
    Digest(h.finalize().into())
}
