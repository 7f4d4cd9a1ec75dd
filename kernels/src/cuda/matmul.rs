//! Matmul on CUDA: `kernels/cuda/matmul.cu` (128×128 tiles) for general
//! shapes, and for skinny products (M ≤ 8) the split-K pair in
//! `kernels/cuda/matmul_splitk.cu`, which computes each contract chunk's sum
//! in its own block and then adds the chunk sums in order.

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{dev_err, to_i32, CudaBackend};
use crate::contract::{MatmulDims, K_CHUNK};
use crate::error::{Error, Result};

/// Products with at most this many rows use the split-K kernels.
const SPLITK_MAX_M: usize = 8;

/// Launch geometry, passed to NVRTC as macros (see [`super::defines`]), so
/// the kernels and their launches cannot disagree.
/// `matmul.cu`: a block of `MATMUL_THREADS` threads computes a
/// `MATMUL_TILE`² tile of C.
pub(super) const MATMUL_TILE: usize = 128;
pub(super) const MATMUL_THREADS: usize = 256;
/// `matmul_splitk.cu`: threads per block (one output column each).
pub(super) const SPLITK_THREADS: usize = 256;

impl CudaBackend {
    /// `C = A·B` from host slices (already checked against `dims`).
    pub(super) fn matmul_host(&self, a: &[f32], b: &[f32], dims: MatmulDims) -> Result<Vec<f32>> {
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
                grid_dim: (n.div_ceil(SPLITK_THREADS) as u32, chunks as u32, m as u32),
                block_dim: (SPLITK_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let chunk_sums = self.kernel("lockstep_chunk_sums_f32")?;
            let mut l = self.stream.launch_builder(&chunk_sums);
            l.arg(a).arg(b).arg(&mut partial).arg(&mi).arg(&ki).arg(&ni);
            // SAFETY: argument types and counts match the kernel signature.
            unsafe { l.launch(cfg) }.map_err(dev_err("launch lockstep_chunk_sums_f32"))?;
            let ci = chunks as i32;
            let cfg = LaunchConfig::for_num_elems((m * n) as u32);
            let cfg = LaunchConfig {
                block_dim: (SPLITK_THREADS as u32, 1, 1),
                grid_dim: ((m * n).div_ceil(SPLITK_THREADS) as u32, 1, 1),
                ..cfg
            };
            let sum_chunks = self.kernel("lockstep_sum_chunks_f32")?;
            let mut l = self.stream.launch_builder(&sum_chunks);
            l.arg(&partial).arg(c).arg(&mi).arg(&ni).arg(&ci);
            // SAFETY: as above.
            unsafe { l.launch(cfg) }.map_err(dev_err("launch lockstep_sum_chunks_f32"))?;
        } else {
            let cfg = LaunchConfig {
                grid_dim: (
                    n.div_ceil(MATMUL_TILE) as u32,
                    m.div_ceil(MATMUL_TILE) as u32,
                    1,
                ),
                block_dim: (MATMUL_THREADS as u32, 1, 1),
                shared_mem_bytes: 0,
            };
            let tiled = self.kernel("lockstep_matmul_f32")?;
            let mut l = self.stream.launch_builder(&tiled);
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
}
