//! Matmul on WGSL: `shaders/matmul.wgsl`, 64×64 tiles of C per workgroup.
//! Products whose A or C exceed the device's binding limit run in row
//! passes (exact: every row of C is computed the same way whatever else is
//! in the pass); a B that cannot be bound is a `TooLarge` error.

use wgpu::util::DeviceExt;

use super::{WgpuBackend, WgpuPath};
use crate::contract::MatmulDims;
use crate::error::{Error, Result};

/// Rows and columns of C per workgroup (`MATMUL_TILE` in the shader, which
/// gets it from [`super::generated_constants`]): 16×16 threads, 4×4 each.
pub(super) const MATMUL_TILE: usize = 64;

impl WgpuBackend {
    pub(super) fn matmul(
        &self,
        path: WgpuPath,
        a: &[f32],
        b: &[f32],
        dims: MatmulDims,
    ) -> Result<Vec<f32>> {
        let MatmulDims { m, k, n } = dims;
        if m == 0 || n == 0 || k == 0 {
            return Ok(vec![0.0; m * n]);
        }
        let limit = self.max_binding;
        let b_bytes = (k * n * 4) as u64;
        if b_bytes > limit {
            return Err(Error::too_large(format!(
                "B is {k}x{n} ({} MiB) but {} binds at most {} MiB per buffer",
                b_bytes >> 20,
                self.adapter.name,
                limit >> 20
            )));
        }
        if n.div_ceil(MATMUL_TILE) > self.max_groups as usize {
            return Err(Error::too_large(format!(
                "N = {n} needs {} workgroups across, more than this device's {}",
                n.div_ceil(MATMUL_TILE),
                self.max_groups
            )));
        }
        // Rows of A and C per pass: each pass's buffers fit the binding limit.
        // Splitting rows is exact: every row of C is computed the same way
        // whatever else is in the batch.
        let row_bytes = (k.max(n) * 4) as u64;
        let rows_per_pass = ((limit / row_bytes) as usize)
            .min(self.max_groups as usize * MATMUL_TILE)
            .min(m);
        if rows_per_pass == 0 {
            return Err(Error::too_large(format!(
                "one row of A or C ({} MiB) exceeds this device's {} MiB binding limit",
                row_bytes >> 20,
                limit >> 20
            )));
        }
        let pipeline = self.pipeline("matmul", path)?;
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let b_buf = self.storage_init("b", bytemuck::cast_slice(b));
        let mut c = Vec::with_capacity(m * n);
        for r0 in (0..m).step_by(rows_per_pass) {
            let rows = rows_per_pass.min(m - r0);
            let a_buf = self.storage_init("a", bytemuck::cast_slice(&a[r0 * k..(r0 + rows) * k]));
            let c_bytes = (rows * n * 4) as u64;
            let c_buf = self.storage_empty("c", c_bytes);
            let dims_buf = self
                .device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("dims"),
                    contents: bytemuck::cast_slice(&[rows as u32, k as u32, n as u32, 0u32]),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
            let bind = self.bind(&pipeline, &[&a_buf, &b_buf, &c_buf, &dims_buf]);
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(
                    n.div_ceil(MATMUL_TILE) as u32,
                    rows.div_ceil(MATMUL_TILE) as u32,
                    1,
                );
            }
            let words = self.read_back(enc, &c_buf, c_bytes)?;
            c.extend(words.into_iter().map(f32::from_bits));
        }
        self.check_scope(scope)?;
        Ok(c)
    }
}
