//! WGSL backend (wgpu): one shader per op in `shaders/` (matmul:
//! `shaders/matmul.wgsl`, launched by [`matmul`]), on whatever GPU (or CPU
//! Vulkan driver) wgpu finds. Pipelines are compiled once per (shader, path),
//! on first use, and cached by name.
//!
//! WGSL lets a driver fuse or split multiply-adds and flush subnormals, so
//! the backend does not trust the driver: at start it runs a conformance
//! probe (`shaders/probe.wgsl`) on the device's own float units and a small
//! matmul self-check, and uses the hardware path only if every answer is
//! exactly the contract's. Otherwise it uses the exact path, where every
//! value is a u32 bit pattern and each fma is done in integer arithmetic
//! (`shaders/softfloat.wgsl`). Both paths run the same matmul shader.

mod matmul;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{mpsc, Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::backend::{Backend, BackendInfo, BackendKind};
use crate::conformance::{self, expected_arith};
use crate::contract::{Op, Plan, Tensor, TensorView, K_CHUNK};
use crate::error::{Error, Result};

/// Every WGSL source, by name: the helpers every shader is built from
/// (`common`, `softfloat`, `arith_hw`, `arith_exact`) and one shader per op
/// or check. A new kernel is one file in `shaders/` and one line here.
pub const SOURCES: &[(&str, &str)] = &[
    ("common", include_str!("../../../shaders/common.wgsl")),
    ("softfloat", include_str!("../../../shaders/softfloat.wgsl")),
    ("arith_hw", include_str!("../../../shaders/arith_hw.wgsl")),
    (
        "arith_exact",
        include_str!("../../../shaders/arith_exact.wgsl"),
    ),
    ("matmul", include_str!("../../../shaders/matmul.wgsl")),
    ("probe", include_str!("../../../shaders/probe.wgsl")),
];

/// Constants every shader gets from Rust, so no shader retypes them.
pub fn generated_constants() -> String {
    format!("// Generated from kernels/src/contract.\nconst K_CHUNK: u32 = {K_CHUNK}u;\n")
}

fn source(name: &str) -> &'static str {
    SOURCES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, s)| *s)
        .unwrap_or_else(|| panic!("no WGSL source named {name}"))
}

/// How the shaders do their float arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WgpuPath {
    /// The GPU's float units: fast, used only where the probe passed.
    Hardware,
    /// Integer soft-float: exact on any conforming implementation.
    Exact,
}

impl WgpuPath {
    pub fn name(self) -> &'static str {
        match self {
            WgpuPath::Hardware => "hardware-fma",
            WgpuPath::Exact => "exact-softfloat",
        }
    }

    fn arith_source(self) -> &'static str {
        match self {
            WgpuPath::Hardware => "arith_hw",
            WgpuPath::Exact => "arith_exact",
        }
    }
}

/// Options of [`WgpuBackend::new`].
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Use this path instead of the probe's choice. Forcing `Hardware` on a
    /// device that failed the probe is refused.
    pub force_path: Option<WgpuPath>,
    /// Pretend the device binds at most this many bytes per buffer (tests use
    /// it to exercise the splitting of large products into row passes).
    pub max_binding_bytes: Option<u64>,
}

/// What the conformance probe found on a device.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// `fma(1+2^-23, 1-2^-23, -1)` is `-2^-46` only when fused.
    pub fma_fused: bool,
    /// Triples where hardware `fma()` differs from a correctly rounded fma.
    pub fma_mismatches: usize,
    pub add_mismatches: usize,
    pub mul_mismatches: usize,
    /// Triples checked per op.
    pub cases: usize,
    /// Subnormal inputs and results survive `fma`, `+` and `*`.
    pub subnormals_kept: bool,
    /// A small matmul on the hardware path equals the spec bit for bit
    /// (`None` when the op checks already failed).
    pub matmul_self_check: Option<bool>,
}

impl ProbeReport {
    pub fn passed(&self) -> bool {
        self.fma_fused
            && self.fma_mismatches == 0
            && self.add_mismatches == 0
            && self.mul_mismatches == 0
            && self.subnormals_kept
            && self.matmul_self_check == Some(true)
    }

    pub fn findings(&self) -> Vec<String> {
        let yn = |b: bool| if b { "yes" } else { "no" };
        vec![
            format!("fma() fused: {}", yn(self.fma_fused)),
            format!(
                "fma() correctly rounded: {} ({} of {} cases differ)",
                yn(self.fma_mismatches == 0),
                self.fma_mismatches,
                self.cases
            ),
            format!(
                "add correctly rounded: {} ({} differ)",
                yn(self.add_mismatches == 0),
                self.add_mismatches
            ),
            format!(
                "mul correctly rounded: {} ({} differ)",
                yn(self.mul_mismatches == 0),
                self.mul_mismatches
            ),
            format!("subnormals kept: {}", yn(self.subnormals_kept)),
            format!(
                "hardware matmul self-check: {}",
                match self.matmul_self_check {
                    Some(true) => "pass",
                    Some(false) => "FAIL",
                    None => "skipped",
                }
            ),
        ]
    }
}

pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// For messages and `lockstep backends`.
    adapter: wgpu::AdapterInfo,
    /// Largest buffer the device binds; bigger problems run in row passes.
    max_binding: u64,
    /// Workgroups per dispatch dimension.
    max_groups: u32,
    /// The path this backend computes with.
    path: WgpuPath,
    /// Compiled pipelines by (shader name, path).
    pipelines: Mutex<HashMap<(&'static str, WgpuPath), Arc<wgpu::ComputePipeline>>>,
    probe: ProbeReport,
}

impl WgpuBackend {
    /// Opens the first adapter wgpu finds, probes it, and picks the path.
    /// `Err(Unavailable)` when no adapter exists.
    pub fn new(options: WgpuOptions) -> Result<Self> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        });
        let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
            power_preference: wgpu::PowerPreference::HighPerformance,
            ..Default::default()
        }))
        .map_err(|e| Error::unavailable(format!("no WebGPU adapter (Vulkan/Metal/DX12): {e}")))?;
        let info = adapter.get_info();
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("lockstep"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            ..Default::default()
        }))
        .map_err(|e| Error::device(format!("cannot open {}: {e}", info.name)))?;
        device.on_uncaptured_error(std::sync::Arc::new(|e| {
            tracing::error!("wgpu error outside an error scope: {e}");
        }));
        let max_binding = (limits.max_storage_buffer_binding_size as u64)
            .min(limits.max_buffer_size)
            .min(1 << 31)
            .min(options.max_binding_bytes.unwrap_or(u64::MAX));
        let mut this = Self {
            pipelines: Mutex::new(HashMap::new()),
            device,
            queue,
            adapter: info,
            max_binding,
            max_groups: limits.max_compute_workgroups_per_dimension,
            path: WgpuPath::Hardware,
            probe: ProbeReport {
                fma_fused: false,
                fma_mismatches: 0,
                add_mismatches: 0,
                mul_mismatches: 0,
                cases: 0,
                subnormals_kept: false,
                matmul_self_check: None,
            },
        };
        this.probe = this.run_probe()?;
        let chosen = match options.force_path {
            Some(WgpuPath::Hardware) if !this.probe.passed() => {
                return Err(Error::unavailable(format!(
                    "{} failed the conformance probe; the hardware path cannot be forced ({})",
                    this.adapter.name,
                    this.probe.findings().join("; ")
                )))
            }
            Some(p) => p,
            None if this.probe.passed() => WgpuPath::Hardware,
            None => WgpuPath::Exact,
        };
        this.path = chosen;
        // Compile the op shaders now, so a driver that rejects one fails at
        // open rather than in the first job.
        for name in OP_SHADERS {
            this.pipeline(name, chosen)?;
        }
        tracing::info!(device = %this.adapter.name, path = chosen.name(), "wgpu backend ready");
        Ok(this)
    }

    pub fn path(&self) -> WgpuPath {
        self.path
    }

    pub fn probe_report(&self) -> &ProbeReport {
        &self.probe
    }

    /// Evaluates `[mac(a,b,c), add(a,c), mul(a,b)]` for each triple on the
    /// GPU with the given path's arithmetic (tests check the exact path
    /// against hardware fma with this).
    pub fn eval_arith(&self, path: WgpuPath, triples: &[[u32; 3]]) -> Result<Vec<[u32; 3]>> {
        if path == WgpuPath::Hardware && self.path != WgpuPath::Hardware {
            return Err(Error::unavailable(
                "the hardware path failed the probe on this device",
            ));
        }
        self.run_elementwise(&*self.pipeline("probe", path)?, triples)
    }

    /// The pipeline of shader `name` on `path`, compiled on first use.
    fn pipeline(&self, name: &'static str, path: WgpuPath) -> Result<Arc<wgpu::ComputePipeline>> {
        let mut cache = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(p) = cache.get(&(name, path)) {
            return Ok(p.clone());
        }
        let p = Arc::new(compile(&self.device, name, path)?);
        cache.insert((name, path), p.clone());
        Ok(p)
    }

    fn run_elementwise(
        &self,
        pipeline: &wgpu::ComputePipeline,
        triples: &[[u32; 3]],
    ) -> Result<Vec<[u32; 3]>> {
        let mut out = Vec::with_capacity(triples.len());
        // Keep each dispatch's buffers well under the binding limit.
        let per_pass = ((self.max_binding / 12) as usize).min(1 << 22);
        for part in triples.chunks(per_pass.max(1)) {
            let bytes: &[u8] = bytemuck::cast_slice(part);
            let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
            let input = self.storage_init("triples", bytes);
            let output = self.storage_empty("results", bytes.len() as u64);
            let bind = self.bind(pipeline, &[&input, &output]);
            let groups = part.len().div_ceil(64) as u32;
            let gx = groups.min(self.max_groups);
            let gy = groups.div_ceil(gx);
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &bind, &[]);
                pass.dispatch_workgroups(gx, gy, 1);
            }
            let words = self.read_back(enc, &output, bytes.len() as u64)?;
            self.check_scope(scope)?;
            out.extend(words.chunks_exact(3).map(|w| [w[0], w[1], w[2]]));
        }
        Ok(out)
    }

    fn run_probe(&self) -> Result<ProbeReport> {
        let cases = probe_cases();
        let got = self.run_elementwise(&*self.pipeline("probe", WgpuPath::Hardware)?, &cases)?;
        let mut report = ProbeReport {
            fma_fused: false,
            fma_mismatches: 0,
            add_mismatches: 0,
            mul_mismatches: 0,
            cases: cases.len(),
            subnormals_kept: true,
            matmul_self_check: None,
        };
        for (i, (t, g)) in cases.iter().zip(&got).enumerate() {
            let want = expected_arith(*t);
            let miss = [g[0] != want[0], g[1] != want[1], g[2] != want[2]];
            report.fma_mismatches += miss[0] as usize;
            report.add_mismatches += miss[1] as usize;
            report.mul_mismatches += miss[2] as usize;
            if i == 0 {
                report.fma_fused = !miss[0];
            }
            if (1..=SUBNORMAL_CASES).contains(&i) && miss.iter().any(|&m| m) {
                report.subnormals_kept = false;
            }
        }
        if report.fma_fused
            && report.fma_mismatches + report.add_mismatches + report.mul_mismatches == 0
            && report.subnormals_kept
        {
            report.matmul_self_check = Some(conformance::matmul_self_test(|a, b, dims| {
                self.matmul(WgpuPath::Hardware, a, b, dims)
            })?);
        }
        Ok(report)
    }

    pub(crate) fn storage_init(&self, label: &str, bytes: &[u8]) -> wgpu::Buffer {
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents: bytes,
                usage: wgpu::BufferUsages::STORAGE,
            })
    }

    pub(crate) fn storage_empty(&self, label: &str, size: u64) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(label),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        })
    }

    pub(crate) fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
    ) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// Submits `enc` plus a copy of `src` into a mapped staging buffer, waits,
    /// and returns the words.
    pub(crate) fn read_back(
        &self,
        mut enc: wgpu::CommandEncoder,
        src: &wgpu::Buffer,
        size: u64,
    ) -> Result<Vec<u32>> {
        let staging = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("staging"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(src, 0, &staging, 0, size);
        self.queue.submit([enc.finish()]);
        let (tx, rx) = mpsc::channel();
        staging.slice(..).map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| Error::device(format!("waiting for the GPU failed: {e}")))?;
        rx.recv()
            .map_err(|_| Error::device("the GPU never finished mapping the result"))?
            .map_err(|e| Error::device(format!("cannot read the result back: {e}")))?;
        let words = {
            let view = staging
                .slice(..)
                .get_mapped_range()
                .map_err(|e| Error::device(format!("cannot map the result: {e}")))?;
            bytemuck::cast_slice::<u8, u32>(&view).to_vec()
        };
        staging.unmap();
        Ok(words)
    }

    pub(crate) fn check_scope(&self, scope: wgpu::ErrorScopeGuard) -> Result<()> {
        match pollster::block_on(scope.pop()) {
            None => Ok(()),
            Some(e) => Err(Error::device(format!("wgpu: {e}"))),
        }
    }
}

/// Shaders that compute ops (compiled when the backend opens).
const OP_SHADERS: &[&str] = &["matmul"];

/// Compiles shader `main` for `path`: the generated constants, `common`, the
/// path's arithmetic (and the soft-float it needs), then the shader itself.
fn compile(
    device: &wgpu::Device,
    main: &'static str,
    path: WgpuPath,
) -> Result<wgpu::ComputePipeline> {
    let mut parts = vec!["common", path.arith_source()];
    if path == WgpuPath::Exact {
        parts.push("softfloat");
    }
    parts.push(main);
    let text = std::iter::once(generated_constants())
        .chain(parts.iter().map(|p| source(p).to_string()))
        .collect::<Vec<_>>()
        .join("\n");
    let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some(main),
        source: wgpu::ShaderSource::Wgsl(Cow::Owned(text)),
    });
    let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
        label: Some(main),
        layout: None,
        module: &module,
        entry_point: Some("main"),
        compilation_options: Default::default(),
        cache: None,
    });
    if let Some(e) = pollster::block_on(scope.pop()) {
        return Err(Error::device(format!(
            "WGSL `{main}` ({}) does not compile: {e}",
            path.name()
        )));
    }
    Ok(pipeline)
}

/// Number of subnormal cases right after the fused-fma detector.
const SUBNORMAL_CASES: usize = 6;

/// The probe's triples: `[0]` tells fused from split fma; `[1..=6]` need
/// subnormals kept; then every triple of the probe's edge values, then
/// random ones aimed at fma's hard cases.
fn probe_cases() -> Vec<[u32; 3]> {
    let one_up = f32::from_bits(0x3F80_0001).to_bits(); // 1 + 2^-23
    let one_down = (1.0f32 - 2f32.powi(-23)).to_bits(); // 1 - 2^-23
    let mut cases = vec![
        [one_up, one_down, (-1.0f32).to_bits()],
        // Subnormal results of fma, add, mul; subnormal inputs.
        [0x0080_0000, 0x3F00_0000, 0x0000_0000],
        [0x0000_0001, 0x3F80_0000, 0x0000_0001],
        [0x0040_0000, 0x4000_0000, 0x8000_0001],
        [0x0000_0003, 0x3F00_0000, 0x0000_0000],
        [0x0010_0000, 0x4B00_0000, 0x0000_0007],
        [0x807F_FFFF, 0x3F80_0000, 0x0000_0001],
    ];
    debug_assert_eq!(cases.len(), SUBNORMAL_CASES + 1);
    cases.extend(conformance::edge_triples(
        &conformance::EDGE_VALUES[..conformance::PROBE_EDGE_VALUES],
    ));
    cases.extend(conformance::RandomTriples::new(0x9E37_79B9_7F4A_7C15).take(8192));
    cases
}

impl Backend for WgpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            kind: BackendKind::Wgpu,
            device: format!(
                "{} ({:?}, {:?}{})",
                self.adapter.name,
                self.adapter.backend,
                self.adapter.device_type,
                if self.adapter.driver_info.is_empty() {
                    String::new()
                } else {
                    format!(", {}", self.adapter.driver_info)
                }
            ),
            path: self.path.name().to_string(),
            findings: self.probe.findings(),
        }
    }

    fn launch(&self, _op: &Op, plan: &Plan, inputs: &[TensorView<'_>]) -> Result<Vec<Tensor>> {
        Ok(match *plan {
            Plan::Matmul(dims) => vec![Tensor::new(
                dims.output_shape(),
                self.matmul(self.path, inputs[0].data, inputs[1].data, dims)?,
            )],
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn shaders_take_the_chunk_length_from_rust() {
        for (name, text) in super::SOURCES {
            assert!(
                !text.contains("K_CHUNK: u32 =") && !text.contains("CHUNK: u32 = 256"),
                "{name}.wgsl defines the chunk length itself"
            );
        }
        assert!(super::generated_constants()
            .contains(&format!("const K_CHUNK: u32 = {}u;", crate::K_CHUNK)));
    }
}
