//! The language-model ops on WGSL: one shader per op in `shaders/`
//! (`qmatmul`, `rmsnorm`, `rope`, `attention`, `swiglu`, `residual`), each
//! bit for bit its scalar spec in `contract/`. Each has an `encode_*`
//! method that records one dispatch on device-resident buffers (what the
//! model engine, [`super::engine`], chains into a forward pass) and a
//! host-slice method that uploads, runs and reads back (what the op tests
//! call).
//!
//! Division, square root and e^x are always the exact integer versions
//! (`shaders/prim.wgsl`): WGSL allows a GPU's own `/` and `sqrt()` to be
//! off by ulps. So an op's hardware path uses the GPU's float units only
//! for fma, add and mul, the primitives the conformance probe checks.

use wgpu::util::DeviceExt;

use super::WgpuBackend;
use crate::contract::attention::AttentionDims;
use crate::contract::quant::Format;
use crate::error::{Error, Result};

/// The shader's code for a weight format (`Dims.format` in qmatmul.wgsl).
fn format_code(f: Format) -> u32 {
    match f {
        Format::F32 => 0,
        Format::F16 => 1,
        Format::BF16 => 2,
        Format::Q8_0 => 3,
        Format::Q4_1 => 4,
    }
}

/// A weight matrix in device memory, packed as stored (row-major, GGML's
/// block layout), in parts of whole rows that each fit one binding.
pub struct GpuMatrix {
    pub format: Format,
    pub rows: usize,
    pub cols: usize,
    /// (first row, rows, buffer).
    parts: Vec<(usize, usize, wgpu::Buffer)>,
}

impl GpuMatrix {
    pub fn bytes(&self) -> u64 {
        self.parts.iter().map(|p| p.2.size()).sum()
    }

    /// Buffers it is held in.
    pub fn parts(&self) -> usize {
        self.parts.len()
    }
}

/// Bytes as a storage buffer's contents: padded to whole words.
fn padded(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len().is_multiple_of(4) && !bytes.is_empty() {
        bytes.into()
    } else {
        let mut v = bytes.to_vec();
        v.resize(bytes.len().div_ceil(4).max(1) * 4, 0);
        v.into()
    }
}

/// One dispatch of a multi-entry op: entry, bound buffers, workgroups.
type Step<'b> = (&'static str, Vec<(u32, &'b wgpu::Buffer)>, (u32, u32));

/// Values of scratch [`WgpuBackend::encode_attention`] needs for `rows`
/// rows whose last position is below `span`.
pub fn attention_scratch(dims: AttentionDims, rows: usize, span: usize) -> usize {
    rows * dims.n_heads * (span + 2)
}

fn words(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

impl WgpuBackend {
    /// Uploads a [rows, cols] matrix stored in `format` (`raw` row-major,
    /// GGML's layout), split into parts of whole rows under the binding
    /// limit.
    pub fn upload_matrix(
        &self,
        format: Format,
        rows: usize,
        cols: usize,
        raw: &[u8],
    ) -> Result<GpuMatrix> {
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
        let per_part = (self.max_binding as usize / rb.max(1)).min(rows.max(1));
        if per_part == 0 {
            return Err(Error::too_large(format!(
                "one {} row of {cols} values ({rb} bytes) exceeds {}'s binding limit of {} bytes",
                format.name(),
                self.adapter.name,
                self.max_binding
            )));
        }
        let mut parts = Vec::new();
        for r0 in (0..rows).step_by(per_part) {
            let n = per_part.min(rows - r0);
            let buf = self.storage_init("weights", &padded(&raw[r0 * rb..(r0 + n) * rb]));
            parts.push((r0, n, buf));
        }
        Ok(GpuMatrix {
            format,
            rows,
            cols,
            parts,
        })
    }

    /// A storage buffer of f32 values that can also be copied in and out.
    pub(crate) fn buffer_f32(&self, label: &str, v: &[f32]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: &padded(words(v)),
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            })
    }

    /// A zeroed storage buffer of `n` f32 (at least one word).
    pub(crate) fn scratch(&self, label: &str, n: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size: (n.max(1) * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Checks that a buffer of `n` f32 can be bound.
    pub(crate) fn fits(&self, what: &str, n: usize) -> Result<()> {
        let bytes = n as u64 * 4;
        if bytes > self.max_binding {
            return Err(Error::too_large(format!(
                "{what} needs {} MiB but {} binds at most {} MiB per buffer",
                bytes >> 20,
                self.adapter.name,
                self.max_binding >> 20
            )));
        }
        Ok(())
    }

    /// Records one dispatch of `shader` on this backend's path: `buffers` in
    /// binding order, then `params` (if any) as the uniform after them.
    fn dispatch(
        &self,
        enc: &mut wgpu::CommandEncoder,
        shader: &'static str,
        buffers: &[&wgpu::Buffer],
        params: &[u32],
        groups: (u32, u32),
    ) -> Result<()> {
        let bound: Vec<(u32, &wgpu::Buffer)> = (0..).zip(buffers.iter().copied()).collect();
        self.dispatch_at(enc, shader, &bound, (buffers.len() as u32, params), groups)
    }

    /// [`Self::dispatch`] with explicit binding numbers (an entry point
    /// binds only the globals it uses): the uniform `params.1` at binding
    /// `params.0`.
    fn dispatch_at(
        &self,
        enc: &mut wgpu::CommandEncoder,
        shader: &'static str,
        buffers: &[(u32, &wgpu::Buffer)],
        (param_binding, params): (u32, &[u32]),
        groups: (u32, u32),
    ) -> Result<()> {
        if groups.0 == 0 || groups.1 == 0 {
            return Ok(());
        }
        if groups.0 > self.max_groups || groups.1 > self.max_groups {
            return Err(Error::too_large(format!(
                "`{shader}` needs {}x{} workgroups; {} allows {} per dimension",
                groups.0, groups.1, self.adapter.name, self.max_groups
            )));
        }
        let pipeline = self.pipeline(shader, self.path)?;
        let uniform;
        let mut all: Vec<(u32, &wgpu::Buffer)> = buffers.to_vec();
        if !params.is_empty() {
            // Uniform structs are sized in multiples of 16 bytes.
            let mut p = params.to_vec();
            p.resize(params.len().div_ceil(4) * 4, 0);
            uniform = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("params"),
                    contents: bytemuck::cast_slice(&p),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            all.push((param_binding, &uniform));
        }
        let entries: Vec<wgpu::BindGroupEntry> = all
            .iter()
            .map(|(binding, b)| wgpu::BindGroupEntry {
                binding: *binding,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(shader),
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some(shader),
            timestamp_writes: None,
        });
        pass.set_pipeline(&pipeline);
        pass.set_bind_group(0, &bind, &[]);
        pass.dispatch_workgroups(groups.0, groups.1, 1);
        Ok(())
    }

    /// Workgroups of 64 covering `n` items, as (x, y) under the per-
    /// dimension limit (elementwise shaders index `x + y·nx·64`).
    fn flat_groups(&self, n: usize) -> (u32, u32) {
        let groups = n.div_ceil(64).max(1) as u32;
        let gx = groups.min(self.max_groups);
        (gx, groups.div_ceil(gx))
    }

    /// `y[t] = W·x[t]` for `tokens` rows of `x` ([tokens, cols]) into `y`
    /// ([tokens, rows]).
    pub fn encode_qmatmul(
        &self,
        enc: &mut wgpu::CommandEncoder,
        w: &GpuMatrix,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        tokens: usize,
    ) -> Result<()> {
        for (r0, n, buf) in &w.parts {
            self.dispatch(
                enc,
                "qmatmul",
                &[buf, x, y],
                &[
                    *n as u32,
                    w.cols as u32,
                    tokens as u32,
                    format_code(w.format),
                    *r0 as u32,
                    w.rows as u32,
                ],
                (n.div_ceil(64) as u32, tokens as u32),
            )?;
        }
        Ok(())
    }

    /// RMSNorm of `rows` rows of `x` ([rows, dim]) with weights `w` into `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rmsnorm(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        w: &wgpu::Buffer,
        y: &wgpu::Buffer,
        dim: usize,
        rows: usize,
        eps: f32,
    ) -> Result<()> {
        self.dispatch(
            enc,
            "rmsnorm",
            &[x, w, y],
            &[dim as u32, rows as u32, eps.to_bits()],
            (rows as u32, 1),
        )
    }

    /// RoPE in place on `rows` rows of `x` ([rows, width], heads of
    /// `head_dim`), with per-row tables `cos`, `sin` ([rows, head_dim/2]).
    #[allow(clippy::too_many_arguments)]
    pub fn encode_rope(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        cos: &wgpu::Buffer,
        sin: &wgpu::Buffer,
        width: usize,
        head_dim: usize,
        rows: usize,
    ) -> Result<()> {
        self.dispatch(
            enc,
            "rope",
            &[x, cos, sin],
            &[width as u32, head_dim as u32, rows as u32],
            ((width / 2).div_ceil(64) as u32, rows as u32),
        )
    }

    /// Attention for the `rows` rows of one sequence starting at row `row0`
    /// of `q`/`out` ([·, q_dim]) and at position `pos0`, over the cache
    /// `keys`/`values` ([positions, kv_dim], holding 0..pos0+rows).
    /// `scratch` holds at least [`attention_scratch`] values.
    #[allow(clippy::too_many_arguments)]
    pub fn encode_attention(
        &self,
        enc: &mut wgpu::CommandEncoder,
        dims: AttentionDims,
        q: &wgpu::Buffer,
        keys: &wgpu::Buffer,
        values: &wgpu::Buffer,
        scratch: &wgpu::Buffer,
        out: &wgpu::Buffer,
        row0: usize,
        pos0: usize,
        rows: usize,
    ) -> Result<()> {
        let span = pos0 + rows;
        let params = [
            row0 as u32,
            pos0 as u32,
            rows as u32,
            dims.n_heads as u32,
            dims.n_kv_heads as u32,
            dims.head_dim as u32,
            span as u32,
            dims.scale().to_bits(),
        ];
        let rh = (rows * dims.n_heads) as u32;
        let per_t = (span.div_ceil(64) as u32, rh);
        let per_rh = (rh.div_ceil(64), 1);
        let (qb, kb, vb, sb, ob) = ((0, q), (1, keys), (2, values), (3, scratch), (4, out));
        let steps: [Step<'_>; 6] = [
            ("attention.scores", vec![qb, kb, sb], per_t),
            ("attention.stats", vec![sb], per_rh),
            ("attention.exps", vec![sb], per_t),
            ("attention.sums", vec![sb], per_rh),
            ("attention.probs", vec![sb], per_t),
            (
                "attention.mix",
                vec![vb, sb, ob],
                (dims.head_dim.div_ceil(64) as u32, rh),
            ),
        ];
        for (entry, bound, groups) in steps {
            self.dispatch_at(enc, entry, &bound, (5, &params), groups)?;
        }
        Ok(())
    }

    /// `h = SiLU(g)·u` over `n` values.
    pub fn encode_swiglu(
        &self,
        enc: &mut wgpu::CommandEncoder,
        g: &wgpu::Buffer,
        u: &wgpu::Buffer,
        h: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        self.dispatch(enc, "swiglu", &[g, u, h], &[n as u32], self.flat_groups(n))
    }

    /// `x += y` over `n` values.
    pub fn encode_residual(
        &self,
        enc: &mut wgpu::CommandEncoder,
        x: &wgpu::Buffer,
        y: &wgpu::Buffer,
        n: usize,
    ) -> Result<()> {
        self.dispatch(enc, "residual", &[x, y], &[n as u32], self.flat_groups(n))
    }

    /// Runs `record` on a fresh encoder and reads `n` f32 back from `out`.
    fn run_and_read(
        &self,
        out: &wgpu::Buffer,
        n: usize,
        record: impl FnOnce(&mut wgpu::CommandEncoder) -> Result<()>,
    ) -> Result<Vec<f32>> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let mut enc = self.device.create_command_encoder(&Default::default());
        record(&mut enc)?;
        let got = self.read_back(enc, out, (n.max(1) * 4) as u64)?;
        self.check_scope(scope)?;
        Ok(got.into_iter().take(n).map(f32::from_bits).collect())
    }

    /// `W·x[t]` for each of `tokens` rows of `x`: the qmatmul shader on
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
        let w = self.upload_matrix(format, rows, cols, raw)?;
        let xb = self.buffer_f32("x", x);
        let y = self.scratch("y", tokens * rows);
        self.run_and_read(&y, tokens * rows, |enc| {
            self.encode_qmatmul(enc, &w, &xb, &y, tokens)
        })
    }

    /// RMSNorm of each row of `x` ([rows, w.len()]).
    pub fn rmsnorm(&self, x: &[f32], w: &[f32], eps: f32) -> Result<Vec<f32>> {
        let dim = w.len();
        let rows = x.len() / dim.max(1);
        let (xb, wb, y) = (
            self.buffer_f32("x", x),
            self.buffer_f32("w", w),
            self.scratch("y", x.len()),
        );
        self.run_and_read(&y, x.len(), |enc| {
            self.encode_rmsnorm(enc, &xb, &wb, &y, dim, rows, eps)
        })
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
        let (xb, c, s) = (
            self.buffer_f32("x", x),
            self.buffer_f32("cos", cos),
            self.buffer_f32("sin", sin),
        );
        self.run_and_read(&xb, x.len(), |enc| {
            self.encode_rope(enc, &xb, &c, &s, width, head_dim, rows)
        })
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
        let scores_n = attention_scratch(dims, rows, pos0 + rows);
        self.fits("attention scores", scores_n)?;
        let (qb, kb, vb) = (
            self.buffer_f32("q", q),
            self.buffer_f32("keys", keys),
            self.buffer_f32("values", values),
        );
        let (sb, out) = (
            self.scratch("scores", scores_n),
            self.scratch("out", q.len()),
        );
        self.run_and_read(&out, q.len(), |enc| {
            self.encode_attention(enc, dims, &qb, &kb, &vb, &sb, &out, 0, pos0, rows)
        })
    }

    /// `SiLU(g)·u` elementwise.
    pub fn swiglu(&self, g: &[f32], u: &[f32]) -> Result<Vec<f32>> {
        let (gb, ub, h) = (
            self.buffer_f32("g", g),
            self.buffer_f32("u", u),
            self.scratch("h", g.len()),
        );
        self.run_and_read(&h, g.len(), |enc| {
            self.encode_swiglu(enc, &gb, &ub, &h, g.len())
        })
    }

    /// `x + y` elementwise.
    pub fn residual(&self, x: &[f32], y: &[f32]) -> Result<Vec<f32>> {
        let (xb, yb) = (self.buffer_f32("x", x), self.buffer_f32("y", y));
        self.run_and_read(&xb, x.len(), |enc| {
            self.encode_residual(enc, &xb, &yb, x.len())
        })
    }

    /// Bytes per second a device-to-device copy of `bytes` moves (the best
    /// of a few timed rounds): the bandwidth a decode step's weight reads
    /// are measured against.
    pub fn copy_bandwidth(&self, bytes: u64) -> Result<f64> {
        let bytes = bytes.min(self.max_binding) / 4 * 4;
        let (a, b) = (
            self.scratch("copy-a", (bytes / 4) as usize),
            self.scratch("copy-b", (bytes / 4) as usize),
        );
        let mut best = 0f64;
        for round in 0..4 {
            let mut enc = self.device.create_command_encoder(&Default::default());
            let copies = 4;
            for _ in 0..copies {
                enc.copy_buffer_to_buffer(&a, 0, &b, 0, bytes);
            }
            let t = std::time::Instant::now();
            self.queue.submit([enc.finish()]);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::device(format!("waiting for the GPU failed: {e}")))?;
            if round > 0 {
                best = best.max((bytes * copies) as f64 / t.elapsed().as_secs_f64());
            }
        }
        Ok(best)
    }

    /// `[div(a, b), sqrt(a), exp(c)]` for each triple, by `shaders/prim.wgsl`
    /// on this backend's path (tests compare them with the CPU's).
    pub fn eval_prims(&self, triples: &[[u32; 3]]) -> Result<Vec<[u32; 3]>> {
        self.run_elementwise(&*self.pipeline("prim_check", self.path)?, triples)
    }
}
