//! The language-model ops on CUDA: one source per op in `kernels/cuda/`
//! (`qmatmul`, `rmsnorm`, `rope`, `attention`, `swiglu`, `residual`), each
//! bit for bit its scalar spec in `contract/` and the same operation order
//! as its WGSL shader. Each has an `encode_*` method that launches it on
//! device-resident buffers on the backend's one stream (what the model
//! engine, [`super::engine`], chains into a forward pass) and a host-slice
//! method that uploads, runs and reads back (what the op tests call).
//!
//! Launches are deliberately simple: one thread per output row and token
//! for the weight product, one per element or (row, head, position) for
//! the rest, every kernel striding over its grid so the launch shape never
//! changes a bit. Faster schedules that keep each value's operation order
//! (rows split across a warp's lanes with x in shared memory, several
//! tokens per weight read, the attention steps fused per (row, head)) are
//! future work.

use cudarc::driver::{CudaSlice, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg};

use super::{dev_err, to_i32, CudaBackend};
use crate::contract::attention::AttentionDims;
use crate::contract::quant::Format;
use crate::contract::K_CHUNK;
use crate::error::{Error, Result};

/// Threads per block of every language-model kernel (passed to NVRTC as
/// `-DLM_THREADS`, see [`super::defines`]; the kernels use it only as a
/// launch bound).
pub(super) const LM_THREADS: usize = 128;
/// The most blocks a launch puts along y (CUDA's limit) and, for the
/// one-dimensional grid-stride kernels, along x.
const MAX_GRID_Y: usize = 65_535;
const MAX_GRID_X: usize = 1 << 20;

/// The kernel's code for a weight format (`FMT_*` in qmatmul.cu).
fn format_code(f: Format) -> i32 {
    match f {
        Format::F32 => 0,
        Format::F16 => 1,
        Format::BF16 => 2,
        Format::Q8_0 => 3,
        Format::Q4_1 => 4,
    }
}

/// A weight matrix in device memory, packed as stored (row-major, GGML's
/// block layout), in one allocation.
pub struct CudaMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    data: CudaSlice<u8>,
}

impl CudaMatrix {
    /// Bytes of weights held (what one product reads).
    pub fn bytes(&self) -> u64 {
        (self.rows * self.format.row_bytes(self.cols).unwrap_or(0)) as u64
    }
}

/// Values of scratch [`CudaBackend::encode_attention`] needs for `rows`
/// rows whose last position is below `span`: the scores, then two stats per
/// (row, head).
pub fn attention_scratch(dims: AttentionDims, rows: usize, span: usize) -> usize {
    rows * dims.n_heads * (span + 2)
}

/// A grid of `LM_THREADS`-blocks covering `n` items along x.
fn blocks_x(n: usize) -> u32 {
    n.div_ceil(LM_THREADS).clamp(1, MAX_GRID_X) as u32
}

/// `n` along y, capped (the kernels stride over the rest).
fn blocks_y(n: usize) -> u32 {
    n.clamp(1, MAX_GRID_Y) as u32
}

fn config(grid: (u32, u32), shared_mem_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (grid.0, grid.1, 1),
        block_dim: (LM_THREADS as u32, 1, 1),
        shared_mem_bytes,
    }
}

/// Checks that a device buffer holds at least `n` values before a kernel
/// indexes it (a launch is `unsafe`: nothing checks it on the device).
fn holds<T>(what: &str, buf: &CudaSlice<T>, n: usize) -> Result<()> {
    if buf.len() < n {
        return Err(Error::shape(format!(
            "{what}: the device buffer holds {} values, the launch reads or writes {n}",
            buf.len()
        )));
    }
    Ok(())
}

impl CudaBackend {
    /// Uploads a [rows, cols] matrix stored in `format` (`raw` row-major,
    /// GGML's layout).
    pub fn upload_matrix(
        &self,
        format: Format,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Result<CudaMatrix> {
        let rb = format.row_bytes(cols).ok_or_else(|| {
            Error::shape(format!(
                "a {} row of {cols} values is not a whole number of blocks",
                format.name()
            ))
        })?;
        if raw.len() != rows * rb {
            return Err(Error::shape(format!(
                "a {} [{rows}, {cols}] matrix takes {} bytes, got {}",
                format.name(),
                rows * rb,
                raw.len()
            )));
        }
        to_i32(rows)?;
        to_i32(cols)?;
        // Zero-length device allocations are not allowed.
        let data = self
            .stream
            .clone_htod(if raw.is_empty() { &[0u8][..] } else { raw })
            .map_err(dev_err("upload weights"))?;
        Ok(CudaMatrix {
            format,
            rows,
            cols,
            data,
        })
    }

    /// `data` on the device (at least one value long).
    pub fn upload_f32(&self, data: &[f32]) -> Result<CudaSlice<f32>> {
        self.upload(if data.is_empty() { &[0.0] } else { data })
    }

    /// A device buffer of `n` f32 (at least one) filled with NaN bits
    /// `0xFFFFFFFF`, which no kernel writes (they write the canonical NaN):
    /// a kernel that skips an element cannot pass a test by accident.
    pub fn poisoned(&self, n: usize) -> Result<CudaSlice<f32>> {
        let mut buf = self.alloc(n.max(1))?;
        let bytes = buf.len() * 4;
        {
            let (ptr, _sync) = buf.device_ptr_mut(&self.stream);
            // SAFETY: ptr covers buf's bytes; the stream orders the memset
            // before any later use.
            unsafe {
                cudarc::driver::result::memset_d8_async(ptr, 0xFF, bytes, self.stream.cu_stream())
            }
            .map_err(dev_err("memset"))?;
        }
        Ok(buf)
    }

    /// The first `n` values of a device buffer.
    fn download_n(&self, buf: &CudaSlice<f32>, n: usize) -> Result<Vec<f32>> {
        let mut v = self.download(buf)?;
        v.truncate(n);
        Ok(v)
    }

    /// Fails if a launch on the stream went wrong.
    fn check_launches(&self) -> Result<()> {
        self.ctx.check_err().map_err(dev_err("kernel"))
    }

    /// `y[t] = W·x[t]` for `tokens` rows of `x` ([tokens, cols]) into `y`
    /// ([tokens, rows]).
    pub fn encode_qmatmul(
        &self,
        w: &CudaMatrix,
        x: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        tokens: usize,
    ) -> Result<()> {
        if w.rows == 0 || tokens == 0 {
            return Ok(());
        }
        holds("qmatmul x", x, tokens * w.cols)?;
        holds("qmatmul y", y, tokens * w.rows)?;
        let (rows, cols, toks) = (to_i32(w.rows)?, to_i32(w.cols)?, to_i32(tokens)?);
        let f = self.kernel("lockstep_qmatmul")?;
        let mut l = self.stream.launch_builder(&f);
        let code = format_code(w.format);
        l.arg(&w.data)
            .arg(x)
            .arg(y)
            .arg(&rows)
            .arg(&cols)
            .arg(&toks)
            .arg(&code);
        let grid = (blocks_x(w.rows), blocks_y(tokens));
        // SAFETY: argument types and order match the kernel; the buffers
        // hold what the dimensions index (checked above).
        unsafe { l.launch(config(grid, 0)) }.map_err(dev_err("launch lockstep_qmatmul"))?;
        Ok(())
    }

    /// RMSNorm of `rows` rows of `x` ([rows, dim]) with weights `w` into `y`.
    pub fn encode_rmsnorm(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        y: &mut CudaSlice<f32>,
        dim: usize,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        if rows == 0 || dim == 0 {
            return Ok(());
        }
        holds("rmsnorm x", x, rows * dim)?;
        holds("rmsnorm w", w, dim)?;
        holds("rmsnorm y", y, rows * dim)?;
        // One shared f32 per chunk of the row (48 KiB: rows of 3 M values).
        let shared = dim.div_ceil(K_CHUNK) * 4;
        if shared > 48 << 10 {
            return Err(Error::too_large(format!(
                "rmsnorm rows of {dim} values exceed the CUDA kernel's shared memory"
            )));
        }
        let (d, r) = (to_i32(dim)?, to_i32(rows)?);
        let f = self.kernel("lockstep_rmsnorm")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(w).arg(y).arg(&d).arg(&r).arg(&eps);
        let grid = (rows.clamp(1, MAX_GRID_X) as u32, 1);
        // SAFETY: as in encode_qmatmul.
        unsafe { l.launch(config(grid, shared as u32)) }
            .map_err(dev_err("launch lockstep_rmsnorm"))?;
        Ok(())
    }

    /// RoPE in place on `rows` rows of `x` ([rows, width], heads of
    /// `head_dim`), with per-row tables `cos`, `sin` ([rows, head_dim/2]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rope(
        &self,
        x: &mut CudaSlice<f32>,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        width: usize,
        head_dim: usize,
        rows: usize,
    ) -> Result<()> {
        if rows == 0 || width < 2 || head_dim < 2 {
            return Ok(());
        }
        if !width.is_multiple_of(head_dim) || !head_dim.is_multiple_of(2) {
            return Err(Error::shape(format!(
                "rope: rows of {width} values are not whole heads of an even {head_dim}"
            )));
        }
        holds("rope x", x, rows * width)?;
        holds("rope cos", cos, rows * head_dim / 2)?;
        holds("rope sin", sin, rows * head_dim / 2)?;
        let (w, hd, r) = (to_i32(width)?, to_i32(head_dim)?, to_i32(rows)?);
        let f = self.kernel("lockstep_rope")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(cos).arg(sin).arg(&w).arg(&hd).arg(&r);
        let grid = (blocks_x(width / 2), blocks_y(rows));
        // SAFETY: as in encode_qmatmul.
        unsafe { l.launch(config(grid, 0)) }.map_err(dev_err("launch lockstep_rope"))?;
        Ok(())
    }

    /// Attention for the `rows` rows of one sequence starting at row `row0`
    /// of `q`/`out` ([·, q_dim]) and at position `pos0`, over the cache
    /// `keys`/`values` ([positions, kv_dim], holding 0..pos0+rows).
    /// `scratch` holds at least [`attention_scratch`] values.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_attention(
        &self,
        dims: AttentionDims,
        q: &CudaSlice<f32>,
        keys: &CudaSlice<f32>,
        values: &CudaSlice<f32>,
        scratch: &mut CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        row0: usize,
        pos0: usize,
        rows: usize,
    ) -> Result<()> {
        if rows == 0 || dims.n_heads == 0 {
            return Ok(());
        }
        if dims.n_kv_heads == 0 || !dims.n_heads.is_multiple_of(dims.n_kv_heads) {
            return Err(Error::shape(format!(
                "attention: {} query heads do not share {} KV heads evenly",
                dims.n_heads, dims.n_kv_heads
            )));
        }
        let span = pos0 + rows;
        holds("attention q", q, (row0 + rows) * dims.q_dim())?;
        holds("attention out", out, (row0 + rows) * dims.q_dim())?;
        holds("attention keys", keys, span * dims.kv_dim())?;
        holds("attention values", values, span * dims.kv_dim())?;
        holds(
            "attention scratch",
            scratch,
            attention_scratch(dims, rows, span),
        )?;
        to_i32(attention_scratch(dims, rows, span))?;
        let (r0, p0, r) = (to_i32(row0)?, to_i32(pos0)?, to_i32(rows)?);
        let (nh, nkv, hd) = (
            to_i32(dims.n_heads)?,
            to_i32(dims.n_kv_heads)?,
            to_i32(dims.head_dim)?,
        );
        let sp = to_i32(span)?;
        let scale = dims.scale();
        let rh = rows * dims.n_heads;
        let per_t = config((blocks_x(span), blocks_y(rh)), 0);
        let per_rh = config((blocks_x(rh), 1), 0);
        let per_d = config((blocks_x(dims.head_dim), blocks_y(rh)), 0);
        fn launch(name: &str, l: &mut LaunchArgs<'_>, cfg: LaunchConfig) -> Result<()> {
            // SAFETY: argument types and order match the kernel; the
            // buffers hold what the dimensions index (checked above).
            unsafe { l.launch(cfg) }
                .map(|_| ())
                .map_err(|e| Error::device(format!("CUDA launch {name}: {e}")))
        }
        let f = self.kernel("lockstep_attention_scores")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(q)
            .arg(keys)
            .arg(&mut *scratch)
            .arg(&r0)
            .arg(&p0)
            .arg(&r)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&sp)
            .arg(&scale);
        launch("lockstep_attention_scores", &mut l, per_t)?;
        for (name, cfg) in [
            ("lockstep_attention_stats", per_rh),
            ("lockstep_attention_exps", per_t),
            ("lockstep_attention_sums", per_rh),
            ("lockstep_attention_probs", per_t),
        ] {
            let f = self.kernel(name)?;
            let mut l = self.stream.launch_builder(&f);
            l.arg(&mut *scratch).arg(&p0).arg(&r).arg(&nh).arg(&sp);
            launch(name, &mut l, cfg)?;
        }
        let f = self.kernel("lockstep_attention_mix")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(values)
            .arg(&*scratch)
            .arg(out)
            .arg(&r0)
            .arg(&p0)
            .arg(&r)
            .arg(&nh)
            .arg(&nkv)
            .arg(&hd)
            .arg(&sp);
        launch("lockstep_attention_mix", &mut l, per_d)?;
        Ok(())
    }

    /// `h = SiLU(g)·u` over `n` values.
    pub fn encode_swiglu(
        &self,
        g: &CudaSlice<f32>,
        u: &CudaSlice<f32>,
        h: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        holds("swiglu g", g, n)?;
        holds("swiglu u", u, n)?;
        holds("swiglu h", h, n)?;
        let nn = n as i64;
        let f = self.kernel("lockstep_swiglu")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(g).arg(u).arg(h).arg(&nn);
        // SAFETY: as in encode_qmatmul.
        unsafe { l.launch(config((blocks_x(n), 1), 0)) }
            .map_err(dev_err("launch lockstep_swiglu"))?;
        Ok(())
    }

    /// `x += y` over `n` values.
    pub fn encode_residual(
        &self,
        x: &mut CudaSlice<f32>,
        y: &CudaSlice<f32>,
        n: usize,
    ) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        holds("residual x", x, n)?;
        holds("residual y", y, n)?;
        let nn = n as i64;
        let f = self.kernel("lockstep_residual")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(x).arg(y).arg(&nn);
        // SAFETY: as in encode_qmatmul.
        unsafe { l.launch(config((blocks_x(n), 1), 0)) }
            .map_err(dev_err("launch lockstep_residual"))?;
        Ok(())
    }

    /// `W·x[t]` for each of `tokens` rows of `x`: the qmatmul kernel on
    /// host data ([tokens, rows] out).
    pub fn qmatmul(
        &self,
        format: Format,
        raw: &[u8],
        rows: usize,
        cols: usize,
        x: &[f32],
        tokens: usize,
    ) -> Result<Vec<f32>> {
        if x.len() != tokens * cols {
            return Err(Error::shape(format!(
                "qmatmul: x holds {} values, not {tokens} rows of {cols}",
                x.len()
            )));
        }
        let w = self.upload_matrix(format, rows, cols, raw)?;
        let xb = self.upload_f32(x)?;
        let mut y = self.poisoned(tokens * rows)?;
        self.encode_qmatmul(&w, &xb, &mut y, tokens)?;
        self.check_launches()?;
        self.download_n(&y, tokens * rows)
    }

    /// RMSNorm of each row of `x` ([rows, w.len()]).
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let dim = w.len();
        let rows = x.len() / dim.max(1);
        let (xb, wb) = (self.upload_f32(x)?, self.upload_f32(w)?);
        let mut y = self.poisoned(x.len())?;
        self.encode_rmsnorm(&xb, &wb, &mut y, dim, rows, eps)?;
        self.check_launches()?;
        self.download_n(&y, x.len())
    }

    /// RoPE of each row of `x` ([rows, width]) with its own tables.
    pub fn rope(
        &self,
        x: &[f32],
        width: usize,
        head_dim: usize,
        cos: &[f32],
        sin: &[f32],
    ) -> Result<Vec<f32>> {
        let rows = x.len() / width.max(1);
        let mut xb = self.upload_f32(x)?;
        let (c, s) = (self.upload_f32(cos)?, self.upload_f32(sin)?);
        self.encode_rope(&mut xb, &c, &s, width, head_dim, rows)?;
        self.check_launches()?;
        self.download_n(&xb, x.len())
    }

    /// Attention of `rows` query rows (`q` [rows, q_dim], positions
    /// pos0..pos0+rows) over a cache of at least pos0+rows positions.
    pub fn attention(
        &self,
        dims: AttentionDims,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        pos0: usize,
    ) -> Result<Vec<f32>> {
        let rows = q.len() / dims.q_dim().max(1);
        let (qb, kb, vb) = (
            self.upload_f32(q)?,
            self.upload_f32(keys)?,
            self.upload_f32(values)?,
        );
        let mut scratch = self.poisoned(attention_scratch(dims, rows, pos0 + rows))?;
        let mut out = self.poisoned(q.len())?;
        self.encode_attention(dims, &qb, &kb, &vb, &mut scratch, &mut out, 0, pos0, rows)?;
        self.check_launches()?;
        self.download_n(&out, q.len())
    }

    /// `SiLU(g)·u` elementwise.
    pub fn swiglu(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
        let (gb, ub) = (self.upload_f32(g)?, self.upload_f32(u)?);
        let mut h = self.poisoned(g.len())?;
        self.encode_swiglu(&gb, &ub, &mut h, g.len().min(u.len()))?;
        self.check_launches()?;
        self.download_n(&h, g.len())
    }

    /// `x + y` elementwise.
    pub fn residual(&self, x: &[f32], y: &[f32]) -> Result<Vec<f32>> {
        let (mut xb, yb) = (self.upload_f32(x)?, self.upload_f32(y)?);
        self.encode_residual(&mut xb, &yb, x.len().min(y.len()))?;
        self.check_launches()?;
        self.download_n(&xb, x.len())
    }

    /// `[div(a, b), sqrt(a), exp(c)]` for each triple of bit patterns, by
    /// `kernels/cuda/prim.cuh` (tests compare them with the CPU's).
    pub fn eval_prims(&self, triples: &[[u32; 3]]) -> Result<Vec<[u32; 3]>> {
        if triples.is_empty() {
            return Ok(Vec::new());
        }
        let flat: Vec<u32> = triples.iter().flatten().copied().collect();
        let input = self.stream.clone_htod(&flat).map_err(dev_err("upload"))?;
        let mut output = self
            .stream
            .alloc_zeros::<u32>(flat.len())
            .map_err(dev_err("alloc"))?;
        let n = triples.len() as i64;
        let f = self.kernel("lockstep_prim_check")?;
        let mut l = self.stream.launch_builder(&f);
        l.arg(&input).arg(&mut output).arg(&n);
        // SAFETY: 3n values in and out, as the kernel indexes.
        unsafe { l.launch(config((blocks_x(triples.len()), 1), 0)) }
            .map_err(dev_err("launch lockstep_prim_check"))?;
        self.check_launches()?;
        let words = self
            .stream
            .clone_dtoh(&output)
            .map_err(dev_err("download"))?;
        Ok(words.chunks_exact(3).map(|w| [w[0], w[1], w[2]]).collect())
    }

    /// Bytes per second a device-to-device copy of `bytes` moves (the best
    /// of a few timed rounds after a warm-up): the bandwidth a decode
    /// step's weight reads are measured against.
    pub fn copy_bandwidth(&self, bytes: u64) -> Result<f64> {
        let n = (bytes / 4).max(1) as usize;
        let a = self.alloc(n)?;
        let mut b = self.alloc(n)?;
        let copies = 4;
        let mut best = 0f64;
        for round in 0..4 {
            self.synchronize()?;
            let t = std::time::Instant::now();
            for _ in 0..copies {
                self.stream
                    .memcpy_dtod(&a, &mut b)
                    .map_err(dev_err("copy"))?;
            }
            self.synchronize()?;
            if round > 0 {
                best = best.max((n * 4 * copies) as f64 / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }
}
