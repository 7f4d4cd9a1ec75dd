//! CUDA backend (cudarc): kernels in `kernels/cuda/*.cu`, compiled at run
//! time by NVRTC for the device's architecture with `--fmad=false`, so the
//! only roundings are the explicit `__fmaf_rn` / `__fadd_rn` in the source.
//! Each op's launch code is one module here ([`matmul`]; the language-model
//! ops in [`ops`], chained into a forward pass by [`engine`]); kernels are
//! fetched by name from a registry that compiles each source once, on first
//! use, and caches its functions. Every source is compiled with
//! [`PRELUDE`] (`kernels/cuda/prim.cuh`: NaN canonicalisation, exact f16
//! widening, the contract's e^x and SiLU) in front of it.
//!
//! Without a CUDA driver (or without NVRTC) the backend reports itself
//! unavailable; nothing here panics on a machine without a GPU.

pub mod engine;
mod matmul;
mod ops;

pub use engine::{CudaModel, CudaSequence};
pub use ops::{attention_scratch, CudaMatrix};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::backend::{Backend, BackendInfo, BackendKind};
use crate::contract::{Plan, TensorView, K_CHUNK};
use crate::error::{Error, Result};

/// One CUDA source file, `kernels/cuda/<name>.cu`, and the kernels it defines.
#[derive(Clone, Copy, Debug)]
pub struct Source {
    pub name: &'static str,
    pub text: &'static str,
    pub kernels: &'static [&'static str],
}

/// Device helpers every source is compiled with (put in front of its text
/// by [`compile`]): `kernels/cuda/prim.cuh`.
pub const PRELUDE: &str = include_str!("../../cuda/prim.cuh");

/// Every CUDA source. A new kernel is one `.cu` file and one line here.
pub const SOURCES: &[Source] = &[
    Source {
        name: "matmul",
        text: include_str!("../../cuda/matmul.cu"),
        kernels: &["lockstep_matmul_f32"],
    },
    Source {
        name: "matmul_splitk",
        text: include_str!("../../cuda/matmul_splitk.cu"),
        kernels: &["lockstep_chunk_sums_f32", "lockstep_sum_chunks_f32"],
    },
    Source {
        name: "qmatmul",
        text: include_str!("../../cuda/qmatmul.cu"),
        kernels: &["lockstep_qmatmul"],
    },
    Source {
        name: "rmsnorm",
        text: include_str!("../../cuda/rmsnorm.cu"),
        kernels: &["lockstep_rmsnorm"],
    },
    Source {
        name: "rope",
        text: include_str!("../../cuda/rope.cu"),
        kernels: &["lockstep_rope"],
    },
    Source {
        name: "attention",
        text: include_str!("../../cuda/attention.cu"),
        kernels: &[
            "lockstep_attention_scores",
            "lockstep_attention_stats",
            "lockstep_attention_exps",
            "lockstep_attention_sums",
            "lockstep_attention_probs",
            "lockstep_attention_mix",
        ],
    },
    Source {
        name: "swiglu",
        text: include_str!("../../cuda/swiglu.cu"),
        kernels: &["lockstep_swiglu"],
    },
    Source {
        name: "residual",
        text: include_str!("../../cuda/residual.cu"),
        kernels: &["lockstep_residual"],
    },
    Source {
        name: "prim_check",
        text: include_str!("../../cuda/prim_check.cu"),
        kernels: &["lockstep_prim_check"],
    },
];

/// Constants every source gets as macros (`-DNAME=value`): the contract's
/// chunk length and the launch geometry the launch code uses, so no source
/// retypes them.
pub fn defines() -> Vec<(&'static str, usize)> {
    vec![
        ("K_CHUNK", K_CHUNK),
        ("MATMUL_TILE", matmul::MATMUL_TILE),
        ("MATMUL_THREADS", matmul::MATMUL_THREADS),
        ("SPLITK_THREADS", matmul::SPLITK_THREADS),
        ("LM_THREADS", ops::LM_THREADS),
    ]
}

/// The NVRTC options every source is compiled with: no contraction of a*b+c
/// into fma, no flush-to-zero, IEEE division and square root; and the
/// [`defines`].
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--std=c++17".into(),
    ];
    options.extend(defines().into_iter().map(|(k, v)| format!("-D{k}={v}")));
    options
}

/// Is the NVRTC library loadable? (It is needed to compile the kernels.)
pub fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// Is the CUDA driver library loadable?
pub fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// Compiles one registered source to PTX for `arch` (e.g. `sm_90`), with
/// [`PRELUDE`] in front of it (`#line` keeps NVRTC's messages pointing at
/// the source's own lines).
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::unavailable("NVRTC (libnvrtc) is not installed"));
    }
    let text = format!("{PRELUDE}\n#line 1 \"{name}.cu\"\n{src}");
    cudarc::nvrtc::compile_ptx_with_opts(
        text,
        CompileOptions {
            options: nvrtc_options(arch),
            name: Some(format!("{name}.cu")),
            ..Default::default()
        },
    )
    .map_err(|e| Error::device(format!("NVRTC failed on {name}.cu for {arch}: {e}")))
}

pub struct CudaBackend {
    /// Kept alive for the kernels' modules and the stream.
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Device name and compute capability, for messages and results.
    name: String,
    arch: String,
    /// Kernels by name, filled a source at a time on first use.
    kernels: Mutex<HashMap<&'static str, CudaFunction>>,
}

pub(crate) fn dev_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
    move |e| Error::device(format!("CUDA {what}: {e}"))
}

impl CudaBackend {
    /// Opens device `ordinal` and compiles the kernels for it.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(Error::unavailable(
                "no CUDA driver (libcuda) on this machine",
            ));
        }
        if !nvrtc_present() {
            return Err(Error::unavailable(
                "CUDA driver found, but NVRTC (libnvrtc) is missing",
            ));
        }
        let count =
            CudaContext::device_count().map_err(|e| Error::unavailable(format!("CUDA: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::unavailable(format!(
                "no CUDA device {ordinal} ({count} present)"
            )));
        }
        let ctx = CudaContext::new(ordinal).map_err(dev_err("context"))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(dev_err("compute capability"))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().map_err(dev_err("device name"))?;
        let stream = ctx.default_stream();
        let this = Self {
            ctx,
            stream,
            name,
            arch,
            kernels: Mutex::new(HashMap::new()),
        };
        // Compile every source now, so a broken toolchain shows at open
        // rather than in the first job.
        for src in SOURCES {
            if let Some(k) = src.kernels.first() {
                this.kernel(k)?;
            }
        }
        tracing::info!(device = %this.name, arch = %this.arch, "cuda backend ready");
        Ok(this)
    }

    /// The kernel of that name, compiling and loading its source on first use.
    pub fn kernel(&self, name: &str) -> Result<CudaFunction> {
        let mut cache = self.kernels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = cache.get(name) {
            return Ok(f.clone());
        }
        let src = SOURCES
            .iter()
            .find(|s| s.kernels.contains(&name))
            .ok_or_else(|| Error::device(format!("no CUDA source defines kernel `{name}`")))?;
        let ptx = compile(src.name, src.text, &self.arch)?;
        let module = self.ctx.load_module(ptx).map_err(dev_err("module load"))?;
        for &k in src.kernels {
            let f = module.load_function(k).map_err(dev_err("function load"))?;
            cache.insert(k, f);
        }
        Ok(cache[name].clone())
    }

    /// The stream kernels run on (benchmarks time cuBLAS on it too).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn upload(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.stream.clone_htod(data).map_err(dev_err("upload"))
    }

    pub fn alloc(&self, len: usize) -> Result<CudaSlice<f32>> {
        self.stream.alloc_zeros(len).map_err(dev_err("alloc"))
    }

    pub fn download(&self, buf: &CudaSlice<f32>) -> Result<Vec<f32>> {
        self.stream.clone_dtoh(buf).map_err(dev_err("download"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err("synchronize"))
    }
}

pub(crate) fn to_i32(x: usize) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| Error::too_large(format!("dimension {x} exceeds the CUDA kernels' i32 range")))
}

impl Backend for CudaBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Cuda,
            device: self.name.clone(),
            path: format!("{} nvrtc --fmad=false", self.arch),
            findings: vec![format!(
                "kernels: {}",
                SOURCES
                    .iter()
                    .map(|s| s.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )],
        }
    }

    fn launch(&self, plan: &Plan, inputs: &[TensorView<'_>]) -> Result<Vec<Vec<f32>>> {
        Ok(match *plan {
            Plan::Matmul(dims) => vec![self.matmul_host(inputs[0].data, inputs[1].data, dims)?],
            Plan::Generate(..) | Plan::GenerateTrace(..) | Plan::LayerInputs(..) => {
                return Err(crate::model::generate::not_a_backend_op())
            }
        })
    }
}
