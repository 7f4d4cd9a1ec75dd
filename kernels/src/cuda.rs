//! CUDA backend (cudarc): kernels in `kernels/cuda/*.cu`, compiled at run
//! time by NVRTC for the device's architecture with `--fmad=false`, so the
//! only roundings are the explicit `__fmaf_rn` / `__fadd_rn` in the source.
//!
//! Without a CUDA driver (or without NVRTC) the backend reports itself
//! unavailable; nothing here panics on a machine without a GPU.

use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::backend::{check_matmul_operands, Backend, BackendInfo, BackendKind};
use crate::contract::{MatmulDims, K_CHUNK};
use crate::error::{Error, Result};

/// Every CUDA source, by name, with the kernels it defines. A new kernel is
/// one `.cu` file and one line here.
pub const SOURCES: &[(&str, &str, &[&str])] = &[
    (
        "matmul",
        include_str!("../cuda/matmul.cu"),
        &["lockstep_matmul_f32"],
    ),
    (
        "matmul_splitk",
        include_str!("../cuda/matmul_splitk.cu"),
        &["lockstep_chunk_sums_f32", "lockstep_sum_chunks_f32"],
    ),
];

/// Products with at most this many rows use the split-K kernels.
const SPLITK_MAX_M: usize = 8;

/// The NVRTC options every source is compiled with: no contraction of a*b+c
/// into fma, no flush-to-zero, IEEE division and square root.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--fmad=false".into(),
        "--ftz=false".into(),
        "--prec-div=true".into(),
        "--prec-sqrt=true".into(),
        "--std=c++17".into(),
    ]
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

/// Compiles one registered source to PTX for `arch` (e.g. `sm_90`).
pub fn compile(name: &str, src: &str, arch: &str) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::unavailable("NVRTC (libnvrtc) is not installed"));
    }
    cudarc::nvrtc::compile_ptx_with_opts(
        src,
        CompileOptions {
            options: nvrtc_options(arch),
            name: Some(format!("{name}.cu")),
            ..Default::default()
        },
    )
    .map_err(|e| Error::device(format!("NVRTC failed on {name}.cu for {arch}: {e}")))
}

pub struct CudaBackend {
    /// Kept alive for the kernels' module and the stream.
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Device name and compute capability, for messages and results.
    name: String,
    arch: String,
    tiled: CudaFunction,
    chunk_sums: CudaFunction,
    sum_chunks: CudaFunction,
}

fn dev_err(what: &str) -> impl Fn(cudarc::driver::DriverError) -> Error + '_ {
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
        let mut funcs = Vec::new();
        for (src_name, src, kernels) in SOURCES {
            let ptx = compile(src_name, src, &arch)?;
            let module = ctx.load_module(ptx).map_err(dev_err("module load"))?;
            for k in *kernels {
                funcs.push(module.load_function(k).map_err(dev_err("function load"))?);
            }
        }
        let mut it = funcs.into_iter();
        let (tiled, chunk_sums, sum_chunks) =
            (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        tracing::info!(device = %name, %arch, "cuda backend ready");
        Ok(Self {
            ctx,
            stream,
            name,
            arch,
            tiled,
            chunk_sums,
            sum_chunks,
        })
    }

    /// The stream kernels run on (benchmarks time cuBLAS on it too).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// `C = A·B` on device buffers; `c` is poisoned with NaN bits first so a
    /// kernel that skips an element cannot pass a test by accident.
    pub fn matmul_device(
        &self,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        dims: MatmulDims,
    ) -> Result<()> {
        let MatmulDims { m, k, n } = dims;
        let (mi, ki, ni) = (to_i32(m)?, to_i32(k)?, to_i32(n)?);
        {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = c.device_ptr_mut(&self.stream);
            // SAFETY: ptr covers c's bytes; the stream orders it before the kernel.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    ptr,
                    0xFF,
                    m * n * 4,
                    self.stream.cu_stream(),
                )
            }
            .map_err(dev_err("memset"))?;
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        if m <= SPLITK_MAX_M && k > 0 {
            let chunks = k.div_ceil(K_CHUNK);
            let mut partial = self
                .stream
                .alloc_zeros::<f32>(chunks * m * n)
                .map_err(dev_err("alloc"))?;
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(256) as u32, chunks as u32, m as u32),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream.launch_builder(&self.chunk_sums);
            l.arg(a).arg(b).arg(&mut partial).arg(&mi).arg(&ki).arg(&ni);
            // SAFETY: argument types and counts match the kernel signature.
            unsafe { l.launch(cfg) }.map_err(dev_err("launch lockstep_chunk_sums_f32"))?;
            let ci = chunks as i32;
            let cfg = LaunchConfig::for_num_elems((m * n) as u32);
            let cfg = LaunchConfig {
                block_dim: (256, 1, 1),
                grid_dim: ((m * n).div_ceil(256) as u32, 1, 1),
                ..cfg
            };
            let mut l = self.stream.launch_builder(&self.sum_chunks);
            l.arg(&partial).arg(c).arg(&mi).arg(&ni).arg(&ci);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(dev_err("launch lockstep_sum_chunks_f32"))?;
        } else {
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(128) as u32, m.div_ceil(128) as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let mut l = self.stream.launch_builder(&self.tiled);
            l.arg(a).arg(b).arg(c).arg(&mi).arg(&ki).arg(&ni);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(dev_err("launch lockstep_matmul_f32"))?;
        }
        self.ctx.check_err().map_err(dev_err("kernel"))?;
        Ok(())
    }

    /// `C = A·B` with cuBLAS SGEMM (the baseline benchmarks compare with; its
    /// bits are *not* the contract's).
    pub fn cublas_sgemm(
        &self,
        blas: &cudarc::cublas::CudaBlas,
        a: &CudaSlice<f32>,
        b: &CudaSlice<f32>,
        c: &mut CudaSlice<f32>,
        dims: MatmulDims,
    ) -> Result<()> {
        use cudarc::cublas::{sys::cublasOperation_t, Gemm, GemmConfig};
        let MatmulDims { m, k, n } = dims;
        // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ.
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_N,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: to_i32(n)?,
            n: to_i32(m)?,
            k: to_i32(k)?,
            alpha: 1.0f32,
            lda: to_i32(n)?,
            ldb: to_i32(k)?,
            beta: 0.0f32,
            ldc: to_i32(n)?,
        };
        // SAFETY: buffer sizes match the dimensions (checked by callers).
        unsafe { blas.gemm(cfg, b, a, c) }.map_err(|e| Error::device(format!("cuBLAS: {e}")))
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

fn to_i32(x: usize) -> Result<i32> {
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
                SOURCES.iter().map(|s| s.0).collect::<Vec<_>>().join(", ")
            )],
        }
    }

    fn matmul(&self, a: &[f32], b: &[f32], dims: MatmulDims) -> Result<Vec<f32>> {
        check_matmul_operands(a, b, dims)?;
        if dims.m * dims.n == 0 {
            return Ok(Vec::new());
        }
        // Zero-length device buffers are not allowed; K = 0 still needs C.
        let da = self.upload(if a.is_empty() { &[0.0] } else { a })?;
        let db = self.upload(if b.is_empty() { &[0.0] } else { b })?;
        let mut dc = self.alloc(dims.m * dims.n)?;
        self.matmul_device(&da, &db, &mut dc, dims)?;
        self.download(&dc)
    }
}
