//! `WgpuBackend`: qfuse on any GPU wgpu reaches (Vulkan, Metal, DX12), and on CPUs through a
//! software Vulkan driver (Mesa lavapipe). Shaders are WGSL from `kernels/wgsl/`; bf16 checkpoint
//! matrices stay bf16 (two to a u32 word), activations, the KV cache and all accumulation are f32.
//! Each op is one or two compute dispatches; the fused ops (norm + GEMV, GEMV + residual,
//! gate/up + SiLU·up, q/k-norm + RoPE + cache write) are builds of the same shaders chosen by
//! override constants. Dispatches are recorded per thread and submitted in bursts; outputs,
//! params and bind groups are reused, so a decode step creates no GPU objects; greedy decoding
//! reads back only the sampled ids.
use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use qfuse_core::knobs::env_knob;
use qfuse_core::reuse::{lock_unpoisoned as lock, size_class};
use qfuse_core::{
    compose, AttentionConfig, Backend, BatchInfo, DType, DeviceTensor, Error, HostData, HostTensor,
    LayerKv, LayerWeights, Result, Shape,
};
use wgpu::util::DeviceExt;

mod attention;
mod gemv;
mod timing;
use attention::*;
use gemv::*;
use timing::{DispatchStamps, GpuTimes, HostTimes, PassTimes};

/// A pipeline's override constants (name, value).
type Constants = &'static [(&'static str, f64)];

/// A pipeline: name, WGSL source, entry point, override constants.
type Pipeline = (&'static str, &'static str, &'static str, Constants);

/// The pipelines other than the GEMVs.
const SHADERS: &[Pipeline] = &[
    ("gather", GATHER_F32, "main", &[]),
    ("gather_bf16", GATHER_BF16, "main", &[]),
    (
        "rms_norm",
        include_str!("../../../kernels/wgsl/rms_norm.wgsl"),
        "main",
        &[],
    ),
    (
        "add",
        include_str!("../../../kernels/wgsl/elementwise.wgsl"),
        "add",
        &[],
    ),
    (
        "silu_mul",
        include_str!("../../../kernels/wgsl/silu_mul.wgsl"),
        "main",
        &[],
    ),
    (
        "slice",
        include_str!("../../../kernels/wgsl/slice.wgsl"),
        "main",
        &[],
    ),
    (
        "rope",
        include_str!("../../../kernels/wgsl/rope.wgsl"),
        "main",
        &[],
    ),
    (
        "write_kv",
        include_str!("../../../kernels/wgsl/write_kv.wgsl"),
        "main",
        &[],
    ),
    ("attention", ATTENTION, "main", &[]),
    ("attention_qkn", ATTENTION, "main", &[("QKN", 1.0)]),
    ("attention_qkn_pf", ATTENTION, "main_pf", &[("QKN", 1.0)]),
    ("attention_sg", ATTENTION_SG, "main", &[]),
    ("attention_qkn_sg", ATTENTION_SG, "main", &[("QKN", 1.0)]),
    (
        "attention_qkn_pf_sg",
        ATTENTION_SG,
        "main_pf",
        &[("QKN", 1.0)],
    ),
    // 256 threads, 8 a key (`attention.wgsl`'s WG and PARTS): subgroups of at least 8.
    (
        "attention_256_sg",
        ATTENTION_SG,
        "main",
        &[("WG", 256.0), ("PARTS", 8.0)],
    ),
    (
        "attention_qkn_256_sg",
        ATTENTION_SG,
        "main",
        &[("QKN", 1.0), ("WG", 256.0), ("PARTS", 8.0)],
    ),
    (
        "attention_qkn_pf_256_sg",
        ATTENTION_SG,
        "main_pf",
        &[("QKN", 1.0), ("WG", 256.0), ("PARTS", 8.0)],
    ),
    (
        "qk_norm_rope_write_kv",
        include_str!("../../../kernels/wgsl/qk_norm_rope_write_kv.wgsl"),
        "main",
        &[],
    ),
    (
        "attention_combine",
        include_str!("../../../kernels/wgsl/attention_combine.wgsl"),
        "main",
        &[],
    ),
    ("argmax_partial", ARGMAX, "partial", &[]),
    ("argmax_final", ARGMAX, "final_pass", &[]),
];

const ARGMAX: &str = include_str!("../../../kernels/wgsl/argmax.wgsl");
const GATHER_F32: &str = concat!(
    include_str!("../../../kernels/wgsl/gather.wgsl"),
    include_str!("../../../kernels/wgsl/gather_body.wgsl")
);
const GATHER_BF16: &str = concat!(
    include_str!("../../../kernels/wgsl/gather_bf16.wgsl"),
    include_str!("../../../kernels/wgsl/gather_body.wgsl")
);
/// A thread's dispatches not yet submitted: one open compute pass on one encoder, and the pooled
/// output buffers dropped meanwhile (see [`Inner::return_output`]).
struct Recording {
    pass: Option<wgpu::ComputePass<'static>>,
    enc: wgpu::CommandEncoder,
    dispatches: usize,
    /// Dispatches this burst takes before it is submitted.
    limit: usize,
    retired: Vec<wgpu::Buffer>,
    /// With `QFUSE_WGPU_GPU_TIMES=1`: a timestamp after each dispatch.
    stamps: Option<DispatchStamps>,
    /// With `QFUSE_WGPU_PASS_TIMES=1`: the pass's start and end.
    pass_stamps: Option<wgpu::QuerySet>,
}

/// Dispatches recorded before a command buffer is submitted (default; `QFUSE_WGPU_SUBMIT_EVERY`
/// overrides it for measurements). Each submission costs the host ~70–130 µs (wgpu processes
/// the pass then) and the device a ~24 µs gap. While decode steps were recorded one at a time,
/// small bursts let the GPU start on a step while the rest of it was recorded (4th session:
/// 16 best). Greedy decode steps are now queued one ahead (the device has the next step's
/// work while the host records the one after), so few large submissions win: on the H200
/// (docs/perf.md, 18th session) batch 1 went 1.565 (16, 16) → 1.373 (64, 256) → 1.357
/// (256, 256) ms/step; the first burst stays at 64 so an eagerly recorded pass (a sampled
/// step, a prompt) still starts early. A step queued behind the one the device is running
/// (`advance_batch`) has nothing to start early for: it starts at the largest burst.
const SUBMIT_EVERY: usize = 64;
/// The largest burst (`QFUSE_WGPU_SUBMIT_MAX`): bursts double from [`SUBMIT_EVERY`] up to it.
const SUBMIT_MAX: usize = 256;

/// Bind groups by pipeline name and bound buffers (params first).
type BindGroups = HashMap<(&'static str, Vec<wgpu::Buffer>), wgpu::BindGroup>;

/// How to open a [`WgpuBackend`] beyond the adapter's ordinal: settings that tests and
/// measurements vary.
#[derive(Clone, Debug, Default)]
pub struct WgpuOptions {
    /// Storage bindings capped below the adapter's limit (to test the splitting of large
    /// weights on small adapters).
    pub binding_limit: Option<u64>,
    /// One vectorised bf16 GEMV build for every size: `v8`, `wide`, `sg`, `tiled` or `wide_sg` (default:
    /// `QFUSE_WGPU_GEMV`, else chosen by size).
    pub gemv: Option<String>,
    /// Fewest tokens of a prompt batch whose attention takes the flash shader (default:
    /// `QFUSE_WGPU_FLASH_FROM`, else 32).
    pub flash_from: Option<usize>,
    /// Leave the adapter's subgroup operations unused (to test the builds for adapters without
    /// them; also `QFUSE_WGPU_SUBGROUPS=0`).
    pub no_subgroups: bool,
    /// Workgroups each decode attention adds to read the weights of the products after it
    /// (the layer's o_proj, gate/up and down; with `QFUSE_WGPU_PREFETCH_WEIGHTS`, the next
    /// layer's QKV) into L2, so those products find them there. Default:
    /// `QFUSE_WGPU_PREFETCH`, else 128 on NVIDIA's H100/H200/H800 (2.2% faster at batch 1 on
    /// the H200) and 0 (none) elsewhere. Needs 18 storage buffers a shader stage.
    pub prefetch_workgroups: Option<usize>,
    /// Fewer storage buffers a shader stage than the adapter allows (as on adapters that allow
    /// only WebGPU's 8 or Vulkan's common 16), so tests can check what such adapters build.
    pub storage_buffer_limit: Option<u32>,
    /// Which weights the prefetch reads, letters of `ogdq` (o_proj, gate/up, down, the next
    /// layer's QKV). Default: `QFUSE_WGPU_PREFETCH_WEIGHTS`, else `ogd`.
    pub prefetch_weights: Option<String>,
}

/// Workgroups per dispatch dimension (the WebGPU minimum limit).
const MAX_GROUPS: usize = 65_535;

/// A tensor in wgpu storage buffers (f32): one buffer, or for a matrix larger than the adapter's
/// storage binding limit, consecutive row ranges of `rows_per_part` rows each.
#[derive(Clone)]
pub struct WgpuTensor {
    shape: Shape,
    dtype: DType,
    parts: Arc<Vec<wgpu::Buffer>>,
    rows_per_part: usize,
    /// For an op's output: hands the buffer back to the pool when the last clone drops.
    _lease: Option<Arc<Lease>>,
}

struct Lease {
    buf: wgpu::Buffer,
    inner: Arc<Inner>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.inner.return_output(self.buf.clone());
    }
}

impl WgpuTensor {
    fn single(shape: Shape, buf: wgpu::Buffer) -> Self {
        let rows = shape.dims().first().copied().unwrap_or(1);
        WgpuTensor {
            shape,
            dtype: DType::F32,
            parts: Arc::new(vec![buf]),
            rows_per_part: rows,
            _lease: None,
        }
    }

    /// The one buffer of a tensor that is not split.
    fn buf(&self) -> Result<&wgpu::Buffer> {
        match self.parts.as_slice() {
            [b] if self.dtype == DType::F32 => Ok(b),
            [_] => Err(Error::invalid(
                "wgpu",
                format!("a bf16 {} weight is only usable as a matmul weight or embedding table", self.shape),
            )),
            _ => Err(Error::invalid(
                "wgpu",
                format!("a {} tensor split across {} bindings is only usable as a matmul weight or embedding table", self.shape, self.parts.len()),
            )),
        }
    }
}

impl fmt::Debug for WgpuTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuTensor({} {})", self.dtype, self.shape)
    }
}

impl DeviceTensor for WgpuTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
    fn dtype(&self) -> DType {
        self.dtype
    }
}

/// A batch's positions, slots and block tables in storage buffers.
#[derive(Debug)]
pub struct WgpuBatch {
    info: BatchInfo,
    positions: wgpu::Buffer,
    slots: wgpu::Buffer,
    token_seq: wgpu::Buffer,
    tables: wgpu::Buffer,
    max_blocks: usize,
    /// The RoPE table for these positions, made by the first op that needs it: (head_dim,
    /// theta bits, table). [`Backend::update_batch`] rewrites it in place, so a decode step's
    /// attention binds the same buffer every step (and finds its bind group cached).
    rope: std::sync::Mutex<Option<(usize, u64, WgpuTensor)>>,
    /// The flash prompt attention's query blocks ([first token, tokens] each, and their count),
    /// made by the first op that needs them.
    flash_blocks: std::sync::Mutex<Option<(usize, wgpu::Buffer)>>,
    /// The ids [`Backend::sample_greedy`] chose, one per logits row (`sampled_rows` of them),
    /// kept on the device: a step recorded ahead gathers its embeddings from them.
    sampled: wgpu::Buffer,
    sampled_rows: usize,
    /// The embedding reads `sampled` instead of the info's token ids
    /// ([`Backend::advance_batch`]).
    ids_on_device: bool,
    /// Copies of `sampled` on their way to the host, oldest first
    /// ([`Backend::start_read_sampled`]).
    reading: std::sync::Mutex<std::collections::VecDeque<Reading>>,
}

/// A buffer's copy into a mappable staging buffer, submitted but not yet waited for.
#[derive(Debug)]
struct Reading {
    staging: wgpu::Buffer,
    submission: wgpu::SubmissionIndex,
}

impl AsRef<BatchInfo> for WgpuBatch {
    fn as_ref(&self) -> &BatchInfo {
        &self.info
    }
}

impl AsMut<BatchInfo> for WgpuBatch {
    fn as_mut(&mut self) -> &mut BatchInfo {
        &mut self.info
    }
}

struct Inner {
    device: wgpu::Device,
    queue: wgpu::Queue,
    /// Dispatches each thread recorded since its last submission: one command buffer per burst of
    /// ops, sent when that thread reads a result or synchronises.
    pending: std::sync::Mutex<HashMap<std::thread::ThreadId, Recording>>,
    bind_groups: std::sync::Mutex<BindGroups>,
    pipelines: HashMap<&'static str, wgpu::ComputePipeline>,
    adapter: String,
    max_binding: u64,
    /// Idle output buffers by size: creating a buffer per op costs more than most ops on a GPU
    /// (a decode step runs hundreds), so dropped outputs are reused.
    /// Each size's set is ordered and hands out its first buffer, so which buffer an op gets
    /// depends only on which are free, not on the order they came back in: a decode step then
    /// binds the same buffers every step and finds its bind groups cached (a stack's order
    /// drifted from step to step and made ~18 bind groups a step on the 0.6B model).
    free_outputs: std::sync::Mutex<HashMap<u64, std::collections::BTreeSet<wgpu::Buffer>>>,
    /// Idle mappable buffers for reading results back, by size (a decode step reads its ids).
    free_staging: std::sync::Mutex<HashMap<u64, Vec<wgpu::Buffer>>>,
    params: std::sync::Mutex<HashMap<Vec<u32>, wgpu::Buffer>>,
    /// One bf16 GEMV build for every size (`QFUSE_WGPU_GEMV=v8|wide|sg|tiled|wide_sg`, for
    /// measurements).
    gemv_build: Option<GemvBuild>,
    /// Fewest rows (tokens) whose bf16 products take the tiled GEMM
    /// (`QFUSE_WGPU_TILED_FROM`).
    tiled_from: usize,
    /// The device's subgroup operations (the `_sg` pipelines need them).
    subgroups: Subgroups,
    /// A thread's first burst after a readback or flush (`QFUSE_WGPU_SUBMIT_EVERY`); each next
    /// burst is twice the last, up to `submit_max` (`QFUSE_WGPU_SUBMIT_MAX`).
    submit_every: usize,
    submit_max: usize,
    /// Each thread's next burst size, while it grows.
    next_burst: std::sync::Mutex<HashMap<std::thread::ThreadId, usize>>,
    /// Workgroups attention aims for by splitting contexts (`QFUSE_WGPU_ATTENTION_WORKGROUPS`,
    /// default 256; at most the heads × tokens means one split and no combine dispatch).
    attention_workgroups: usize,
    /// Fewest keys in a split of the context (`QFUSE_WGPU_ATTENTION_MIN_CHUNK`).
    attention_min_chunk: usize,
    /// Whether the subgroup build of the decode attention may run 256 threads a workgroup (8 a
    /// key; the halves of a tile's keys add their values apart where d <= 128) rather than 128,
    /// where the context's splits are fewer than the workgroup target
    /// (`QFUSE_WGPU_ATTENTION_THREADS=128|256`; needs subgroups of 8 to 32). On an H100
    /// (docs/perf.md, 19th session) batch 1 1.39–1.59 → 1.36 ms/step, batch 4 2.63–2.76 →
    /// 2.56–2.87.
    attention_256: bool,
    /// Fewest tokens of a prompt batch whose attention takes `attention_flash.wgsl`
    /// (`QFUSE_WGPU_FLASH_FROM`; `None` where the adapter lacks the workgroup memory).
    flash_from: Option<usize>,
    /// Workgroups a decode attention adds for [`Prefetch`] (0: off).
    prefetch_workgroups: usize,
    /// Which of o_proj, gate/up, down and the next layer's QKV it reads
    /// (`QFUSE_WGPU_PREFETCH_WEIGHTS`, letters of `ogdq`; default all four).
    prefetch_weights: [bool; 4],
    prefetch: std::sync::Mutex<Prefetch>,
    host_times: Option<HostTimes>,
    gpu_times: Option<GpuTimes>,
    pass_times: Option<PassTimes>,
}

impl Inner {
    /// Takes back a dropped output buffer. wgpu orders the uses of a buffer in submission order,
    /// so the one hazard is a buffer dropped while dispatches that use it are still recorded on
    /// this thread, unsubmitted: another thread could take it and submit a write first. Such a
    /// buffer waits in the thread's recording until that is submitted.
    fn return_output(&self, buf: wgpu::Buffer) {
        let mut pending = lock(&self.pending);
        match pending.get_mut(&std::thread::current().id()) {
            Some(rec) => rec.retired.push(buf),
            None => {
                drop(pending);
                self.free(vec![buf]);
            }
        }
    }

    /// Puts `bufs` back in the output pool.
    fn free(&self, bufs: Vec<wgpu::Buffer>) {
        let mut free = lock(&self.free_outputs);
        for buf in bufs {
            free.entry(buf.size()).or_default().insert(buf);
        }
    }

    /// Submits a thread's recording; the buffers retired during it are free from then on.
    fn submit(&self, mut rec: Recording) -> wgpu::SubmissionIndex {
        let start = Instant::now();
        let retired = std::mem::take(&mut rec.retired);
        drop(rec.pass.take()); // ends the pass, unlocking the encoder
        let stamps = rec
            .stamps
            .take()
            .map(|s| s.resolve(&self.device, &mut rec.enc));
        if let (Some(times), Some(set)) = (&self.pass_times, rec.pass_stamps.take()) {
            times.resolve(&self.device, &mut rec.enc, &set);
        }
        let submission = self.queue.submit([rec.enc.finish()]);
        if let Some(t) = &self.host_times {
            t.submit.add(start);
        }
        if let (Some(times), Some(stamps)) = (&self.gpu_times, stamps) {
            times.collect(&self.device, stamps);
        }
        self.free(retired);
        submission
    }
}

/// The wgpu backend: one adapter's device and queue with every shader compiled.
#[derive(Clone)]
pub struct WgpuBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for WgpuBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "WgpuBackend({})", self.inner.adapter)
    }
}

/// A multi-line wgpu error (its "Caused by" chain) as one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn wgpu_err(e: impl fmt::Display) -> Error {
    Error::Backend(e.to_string().into())
}

/// The adapter's subgroup operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Subgroups {
    None,
    /// Subgroups of 4 to 32 consecutive invocations (NVIDIA's 32, lavapipe's 8; checked when the
    /// device opens by [`subgroups_consecutive`]), which the builds that lay groups of threads
    /// out on subgroups (`wide_sg`, `attention_sg`) need.
    UpTo32,
    /// Possibly larger (64 on some AMD GPUs) or smaller ones.
    Other,
}

impl WgpuBackend {
    /// Opens adapter `ordinal` (in wgpu's enumeration order) and compiles every shader.
    ///
    /// # Errors
    /// [`Error::NoDevice`] when there is no such adapter (no Vulkan/Metal/DX12 driver).
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(ordinal, &WgpuOptions::default())
    }

    /// [`WgpuBackend::new`] with the settings tests and measurements vary.
    ///
    /// # Errors
    /// As [`WgpuBackend::new`]; a GEMV build this adapter cannot run is named in an
    /// [`Error::InvalidArgument`].
    pub fn with_options(ordinal: usize, options: &WgpuOptions) -> Result<Self> {
        let limit = options.binding_limit;
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapters = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()));
        let count = adapters.len();
        let adapter = adapters.into_iter().nth(ordinal).ok_or_else(|| {
            Error::NoDevice(format!(
                "wgpu adapter {ordinal} requested, {count} found (a Vulkan, Metal or DX12 driver is needed; on Linux CPUs, Mesa's lavapipe: mesa-vulkan-drivers)"
            ))
        })?;
        let info = adapter.get_info();
        let mut limits = adapter.limits();
        if let Some(n) = options.storage_buffer_limit {
            limits.max_storage_buffers_per_shader_stage =
                limits.max_storage_buffers_per_shader_stage.min(n);
        }
        let timed = qfuse_core::knobs::env_flag("QFUSE_WGPU_GPU_TIMES")
            && adapter.features().contains(GpuTimes::FEATURES);
        let pass_timed = qfuse_core::knobs::env_flag("QFUSE_WGPU_PASS_TIMES")
            && adapter.features().contains(PassTimes::FEATURES);
        // Subgroup operations where the adapter has them (the `_sg` GEMV builds need them).
        let has_subgroups = adapter.features().contains(wgpu::Features::SUBGROUP)
            && !options.no_subgroups
            && env_knob("QFUSE_WGPU_SUBGROUPS", 0..=1) != Some(0);
        let mut subgroups = match (
            has_subgroups,
            info.subgroup_min_size,
            info.subgroup_max_size,
        ) {
            (false, ..) => Subgroups::None,
            (true, 4.., ..=32) => Subgroups::UpTo32,
            (true, ..) => Subgroups::Other,
        };
        let mut features = wgpu::Features::empty();
        if timed {
            features |= GpuTimes::FEATURES;
        }
        if pass_timed {
            features |= PassTimes::FEATURES;
        }
        if has_subgroups {
            features |= wgpu::Features::SUBGROUP;
        }
        let desc = wgpu::DeviceDescriptor {
            label: Some("qfuse"),
            required_limits: limits.clone(),
            required_features: features,
            ..Default::default()
        };
        let (device, queue) =
            pollster::block_on(adapter.request_device(&desc)).map_err(wgpu_err)?;
        if subgroups == Subgroups::UpTo32 && !subgroups_consecutive(&device, &queue)? {
            subgroups = Subgroups::Other;
        }
        let env_gemv = std::env::var("QFUSE_WGPU_GEMV").ok();
        let gemv_build = match options.gemv.as_deref().or(env_gemv.as_deref()) {
            None => None,
            Some(name) => Some(gemv_build_named(name, subgroups)?),
        };
        let shader_checks =
            shader_checks(std::env::var("QFUSE_WGPU_SHADER_CHECKS").ok().as_deref());
        let mut pipelines = HashMap::new();
        let mut modules: HashMap<&str, wgpu::ShaderModule> = HashMap::new();
        let flash_fits = limits.max_compute_workgroup_storage_size >= FLASH_WORKGROUP_BYTES;
        let flash = flash_fits.then_some(&FLASH_PIPELINE);
        let prefetch_asked = options
            .prefetch_workgroups
            .or_else(|| env_knob("QFUSE_WGPU_PREFETCH", 0..=MAX_GROUPS));
        let prefetch_fits =
            limits.max_storage_buffers_per_shader_stage >= attention::PREFETCH_STORAGE_BUFFERS;
        let prefetch_workgroups = match prefetch_asked {
            Some(n) if n > 0 && !prefetch_fits => {
                return Err(Error::invalid(
                    "wgpu",
                    format!(
                        "QFUSE_WGPU_PREFETCH={n}: the prefetch binds {} storage buffers a shader stage; adapter {} allows {}",
                        attention::PREFETCH_STORAGE_BUFFERS,
                        info.name,
                        limits.max_storage_buffers_per_shader_stage
                    ),
                ))
            }
            Some(n) => n,
            None if prefetch_fits && attention::prefetch_by_default(&info.name) => {
                attention::PREFETCH_WORKGROUPS
            }
            None => 0,
        };
        // A shader this adapter cannot build (too few bindings a stage, say) is an error for the
        // caller, not wgpu's default handler's panic.
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        for (name, src, entry, constants) in
            SHADERS.iter().chain(GEMVS.iter().flatten()).chain(flash)
        {
            if (name.ends_with("_sg") && subgroups == Subgroups::None)
                || (name.contains("_pf") && prefetch_workgroups == 0)
            {
                continue;
            }
            let module = modules.entry(src).or_insert_with(|| {
                let desc = wgpu::ShaderModuleDescriptor {
                    label: Some(name),
                    source: wgpu::ShaderSource::Wgsl((*src).into()),
                };
                match shader_checks {
                    None => device.create_shader_module(desc),
                    // SAFETY: every loop in these shaders ends (each is bounded by sizes from
                    // params the host checked, far from u32 overflow) and every integer divisor
                    // is a size the host checked to be non-zero, which is what leaving out
                    // naga's loop bounding and division guards requires; the index clamps stay.
                    // Without them (`none`, a measurement setting) a buffer index out of range
                    // stays within the binding where the driver has robust buffer access, which
                    // wgpu enables on Vulkan.
                    Some(checks) => unsafe { device.create_shader_module_trusted(desc, checks) },
                }
            });
            let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(name),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
            pipelines.insert(*name, pipeline);
        }
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(Error::Backend(
                format!(
                    "wgpu adapter {} cannot build qfuse's shaders: {}",
                    info.name,
                    one_line(&e.to_string())
                )
                .into(),
            ));
        }
        let adapter_name = format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type);
        let env_weights = std::env::var("QFUSE_WGPU_PREFETCH_WEIGHTS").ok();
        let prefetch_weights = prefetch_weights(
            options
                .prefetch_weights
                .as_deref()
                .or(env_weights.as_deref()),
        )?;
        let max_binding = limit.map_or(limits.max_storage_buffer_binding_size, |l| {
            l.min(limits.max_storage_buffer_binding_size)
        });
        Ok(WgpuBackend {
            inner: Arc::new(Inner {
                device,
                pending: std::sync::Mutex::new(HashMap::new()),
                pipelines,
                adapter: adapter_name,
                max_binding,
                free_outputs: std::sync::Mutex::new(HashMap::new()),
                free_staging: std::sync::Mutex::new(HashMap::new()),
                params: std::sync::Mutex::new(HashMap::new()),
                subgroups,
                gemv_build,
                tiled_from: env_knob("QFUSE_WGPU_TILED_FROM", 1..=1 << 30).unwrap_or(TILED_FROM),
                submit_every: env_knob("QFUSE_WGPU_SUBMIT_EVERY", 1..=1 << 20)
                    .unwrap_or(SUBMIT_EVERY),
                submit_max: env_knob("QFUSE_WGPU_SUBMIT_MAX", 1..=1 << 20).unwrap_or(SUBMIT_MAX),
                next_burst: std::sync::Mutex::new(HashMap::new()),
                attention_workgroups: env_knob("QFUSE_WGPU_ATTENTION_WORKGROUPS", 1..=1 << 20)
                    .unwrap_or(256),
                attention_256: subgroups == Subgroups::UpTo32
                    && info.subgroup_min_size >= 8
                    && env_knob("QFUSE_WGPU_ATTENTION_THREADS", 128..=256).unwrap_or(256) == 256,
                attention_min_chunk: env_knob("QFUSE_WGPU_ATTENTION_MIN_CHUNK", 1..=1 << 20)
                    .unwrap_or(ATTENTION_MIN_CHUNK),
                flash_from: flash_fits.then(|| {
                    options
                        .flash_from
                        .or_else(|| env_knob("QFUSE_WGPU_FLASH_FROM", 1..=1 << 30))
                        .unwrap_or(FLASH_FROM)
                }),
                bind_groups: std::sync::Mutex::new(HashMap::new()),
                prefetch_workgroups,
                prefetch_weights,
                prefetch: std::sync::Mutex::new(Prefetch::default()),
                host_times: qfuse_core::knobs::env_flag("QFUSE_WGPU_HOST_TIMES")
                    .then(HostTimes::default),
                gpu_times: timed.then(|| GpuTimes::new(queue.get_timestamp_period())),
                pass_times: pass_timed.then(|| PassTimes::new(queue.get_timestamp_period())),
                queue,
            }),
        })
    }

    /// [`WgpuBackend::with_options`] for test suites: with `CI=true` a missing adapter is an
    /// error like any other (CI installs Mesa's lavapipe, so one must be there), elsewhere
    /// [`Error::NoDevice`] lets the suite skip with a notice.
    pub fn for_tests(ordinal: usize, options: &WgpuOptions) -> Result<Self> {
        match Self::with_options(ordinal, options) {
            Err(Error::NoDevice(why)) if std::env::var("CI").as_deref() == Ok("true") => Err(
                Error::Backend(format!("CI=true but no wgpu adapter: {why}").into()),
            ),
            other => other,
        }
    }

    /// Whether this adapter runs the flash prompt attention (enough workgroup memory).
    pub fn has_flash_attention(&self) -> bool {
        self.inner.flash_from.is_some()
    }

    /// The vectorised bf16 GEMV builds this adapter runs (names for [`WgpuOptions::gemv`]).
    pub fn gemv_builds(&self) -> Vec<&'static str> {
        GEMV_BUILD_NAMES
            .iter()
            .filter(|(_, build)| build.runs_with(self.inner.subgroups))
            .map(|(name, _)| *name)
            .collect()
    }

    /// The adapter's name, API and kind.
    pub fn adapter_name(&self) -> &str {
        &self.inner.adapter
    }

    /// Workgroups each decode attention adds to read the next products' weights into L2 (0:
    /// no prefetch; [`WgpuOptions::prefetch_workgroups`]).
    pub fn prefetch_workgroups(&self) -> usize {
        self.inner.prefetch_workgroups
    }

    /// What the timing knobs measured so far: with `QFUSE_WGPU_HOST_TIMES=1`, the host time
    /// spent recording dispatches, submitting and waiting; with `QFUSE_WGPU_GPU_TIMES=1` (where
    /// the adapter has timestamps inside passes), each pipeline's device time between the
    /// timestamps around its dispatches; with `QFUSE_WGPU_PASS_TIMES=1`, how long the device was
    /// busy with the submitted passes and idle between them. `None` with none set.
    pub fn timing_report(&self) -> Option<String> {
        let reports: Vec<String> = [
            self.inner.host_times.as_ref().map(HostTimes::report),
            self.inner.gpu_times.as_ref().map(GpuTimes::report),
            self.inner
                .pass_times
                .as_ref()
                .map(|t| t.report(&self.inner.device)),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!reports.is_empty()).then(|| reports.join("\n"))
    }

    /// A matrix's bytes (`dtype` elements, row-major) in one buffer, or split by rows into parts
    /// that each fit a storage binding and hold whole 32-bit words.
    fn matrix_parts(&self, shape: &Shape, dtype: DType, bytes: &[u8]) -> Result<WgpuTensor> {
        let (rows, cols) = shape.as_matrix("upload")?;
        let row_bytes = cols * dtype.size_in_bytes();
        let mut rows_per_part = rows.max(1);
        if bytes.len() as u64 > self.inner.max_binding {
            rows_per_part = (self.inner.max_binding as usize / row_bytes.max(1)).max(1);
            if !(rows_per_part * row_bytes).is_multiple_of(4) {
                rows_per_part = (rows_per_part & !1).max(2);
            }
        }
        let parts = (0..rows.max(1))
            .step_by(rows_per_part)
            .map(|r| {
                let end = ((r + rows_per_part).min(rows) * row_bytes).max(r * row_bytes);
                let mut part = bytes[r * row_bytes..end].to_vec();
                part.resize(part.len().div_ceil(4) * 4, 0);
                self.buffer(&part)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(WgpuTensor {
            shape: shape.clone(),
            dtype,
            parts: Arc::new(parts),
            rows_per_part,
            _lease: None,
        })
    }

    fn buffer(&self, bytes: &[u8]) -> Result<wgpu::Buffer> {
        if bytes.len() as u64 > self.inner.max_binding {
            return Err(Error::invalid(
                "wgpu",
                format!(
                    "a tensor of {} bytes exceeds the adapter's storage binding limit of {} bytes (splitting large weights is not implemented yet)",
                    bytes.len(),
                    self.inner.max_binding
                ),
            ));
        }
        let padded;
        let contents = if bytes.is_empty() {
            padded = [0u8; 4];
            &padded[..]
        } else {
            bytes
        };
        Ok(self
            .inner
            .device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents,
                usage: wgpu::BufferUsages::STORAGE
                    | wgpu::BufferUsages::COPY_SRC
                    | wgpu::BufferUsages::COPY_DST,
            }))
    }

    /// A new zero-filled f32 buffer for `shape`.
    fn fresh(&self, shape: Shape, bytes: u64) -> Result<WgpuTensor> {
        if bytes > self.inner.max_binding {
            return Err(Error::invalid(
                "wgpu",
                format!("an output of {bytes} bytes exceeds the adapter's storage binding limit"),
            ));
        }
        let buf = self.inner.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(WgpuTensor::single(shape, buf))
    }

    /// An op's output buffer for `shape`, from the pool (contents undefined: the op writes it).
    fn output(&self, shape: impl Into<Shape>) -> Result<WgpuTensor> {
        let shape = shape.into();
        let need = (shape.numel().max(1) * 4) as u64;
        let class = (size_class(shape.numel()) * 4) as u64;
        let class = class.min(self.inner.max_binding.max(need));
        let reused = self
            .inner
            .free_outputs
            .lock()
            .map_err(|_| Error::invalid("wgpu", "buffer pool lock poisoned"))?
            .get_mut(&class)
            .and_then(std::collections::BTreeSet::pop_first);
        let mut t = match reused {
            Some(buf) => WgpuTensor::single(shape, buf),
            None => self.fresh(shape, class)?,
        };
        t._lease = Some(Arc::new(Lease {
            buf: t.parts[0].clone(),
            inner: Arc::clone(&self.inner),
        }));
        Ok(t)
    }

    /// `words` in a buffer from the output pool, written by the queue: the same few buffers
    /// serve every decode step's small uploads, so the dispatches that bind them find their
    /// bind groups cached. A pooled buffer is free only once no unsubmitted dispatch uses it
    /// ([`Inner::return_output`]), and the write lands before any dispatch recorded after it.
    fn upload_pooled(&self, words: &[u32]) -> Result<WgpuTensor> {
        let t = self.output([words.len()])?;
        if !words.is_empty() {
            self.inner
                .queue
                .write_buffer(t.buf()?, 0, bytemuck::cast_slice(words));
        }
        Ok(t)
    }

    /// The params buffer holding `params`, made once per distinct list (a decode step's are the
    /// same every step).
    fn params(&self, params: &[u32]) -> Result<wgpu::Buffer> {
        let mut cache = self
            .inner
            .params
            .lock()
            .map_err(|_| Error::invalid("wgpu", "params cache lock poisoned"))?;
        if let Some(b) = cache.get(params) {
            return Ok(b.clone());
        }
        let b = self.u32s(params)?;
        if cache.len() < 4096 {
            cache.insert(params.to_vec(), b.clone());
        }
        Ok(b)
    }

    fn u32s(&self, v: &[u32]) -> Result<wgpu::Buffer> {
        self.buffer(&v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>())
    }

    /// One dispatch of `kernel` with `params` at binding 0 and `buffers` at bindings 1…
    fn run(
        &self,
        kernel: &'static str,
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: (usize, usize),
    ) -> Result<()> {
        self.run_3d(kernel, params, buffers, (groups.0, groups.1, 1))
    }

    /// [`WgpuBackend::run`] over a three-dimensional grid of workgroups.
    fn run_3d(
        &self,
        kernel: &'static str,
        params: &[u32],
        buffers: &[&wgpu::Buffer],
        groups: (usize, usize, usize),
    ) -> Result<()> {
        let start = Instant::now();
        let pipeline = self
            .inner
            .pipelines
            .get(kernel)
            .ok_or_else(|| Error::invalid("wgpu", format!("no shader `{kernel}`")))?;
        if groups.0 > MAX_GROUPS || groups.1 > MAX_GROUPS || groups.2 > MAX_GROUPS {
            return Err(Error::invalid(
                "wgpu",
                format!("{kernel}: {groups:?} workgroups exceed the dispatch limit"),
            ));
        }
        let params = self.params(params)?;
        let bind = self.bind_group(kernel, pipeline, params, buffers)?;
        let mut pending = self
            .inner
            .pending
            .lock()
            .map_err(|_| Error::invalid("wgpu", "command encoder lock poisoned"))?;
        let thread = std::thread::current().id();
        let limit = self.next_burst(thread);
        let rec = pending.entry(thread).or_insert_with(|| {
            let mut enc = self
                .inner
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
            let pass_stamps = self
                .inner
                .pass_times
                .as_ref()
                .map(|_| PassTimes::query_set(&self.inner.device));
            // One pass for the whole burst: wgpu still orders each dispatch after the ones
            // whose buffers it reads (a usage scope per dispatch), without a pass per op.
            let mut pass = enc
                .begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: None,
                    timestamp_writes: pass_stamps.as_ref().map(|set| {
                        wgpu::ComputePassTimestampWrites {
                            query_set: set,
                            beginning_of_pass_write_index: Some(0),
                            end_of_pass_write_index: Some(1),
                        }
                    }),
                })
                .forget_lifetime();
            let stamps = self
                .inner
                .gpu_times
                .as_ref()
                .map(|_| DispatchStamps::begin(&self.inner.device, &mut pass));
            Recording {
                pass: Some(pass),
                enc,
                dispatches: 0,
                limit,
                retired: Vec::new(),
                stamps,
                pass_stamps,
            }
        });
        if let Some(pass) = rec.pass.as_mut() {
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(
                groups.0.max(1) as u32,
                groups.1.max(1) as u32,
                groups.2.max(1) as u32,
            );
            if let Some(stamps) = rec.stamps.as_mut() {
                stamps.after(pass, kernel);
            }
        }
        rec.dispatches += 1;
        if let Some(t) = &self.inner.host_times {
            t.record.add(start);
        }
        // Submit in bursts, so the GPU starts on a step while the rest of it is recorded.
        let stamps_full = rec.stamps.as_ref().is_some_and(DispatchStamps::full);
        if rec.dispatches >= rec.limit || stamps_full {
            if let Some(rec) = pending.remove(&thread) {
                let next = (rec.limit * 2)
                    .min(self.inner.submit_max)
                    .max(self.inner.submit_every);
                lock(&self.inner.next_burst).insert(thread, next);
                self.inner.submit(rec);
            }
        }
        Ok(())
    }

    /// The bind group of `buffers` (after `params`) for `kernel`, made once per combination:
    /// pooled outputs, cached params and reused batches make a decode step's combinations
    /// recur every step.
    fn bind_group(
        &self,
        kernel: &'static str,
        pipeline: &wgpu::ComputePipeline,
        params: wgpu::Buffer,
        buffers: &[&wgpu::Buffer],
    ) -> Result<wgpu::BindGroup> {
        let mut key = Vec::with_capacity(buffers.len() + 1);
        key.push(params);
        key.extend(buffers.iter().map(|b| (*b).clone()));
        let key = (kernel, key);
        let mut cache = self
            .inner
            .bind_groups
            .lock()
            .map_err(|_| Error::invalid("wgpu", "bind group cache lock poisoned"))?;
        if let Some(b) = cache.get(&key) {
            return Ok(b.clone());
        }
        let start = Instant::now();
        let entries: Vec<wgpu::BindGroupEntry> = key
            .1
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let bind = self
            .inner
            .device
            .create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &pipeline.get_bind_group_layout(0),
                entries: &entries,
            });
        // The cache keeps its buffers alive: bound it (one-off buffers, e.g. uploads, churn).
        if cache.len() >= 8192 {
            cache.clear();
        }
        cache.insert(key, bind.clone());
        if let Some(t) = &self.inner.host_times {
            t.bind_groups.add(start);
        }
        Ok(bind)
    }

    /// `out[r] = table[ids[r]]` for the first `rows` ids of a device buffer, across the table's
    /// parts (an id in none of them leaves its row unwritten).
    fn gather(&self, table: &WgpuTensor, ids: &wgpu::Buffer, rows: usize) -> Result<WgpuTensor> {
        let (n, c) = matrix(table, "gather_rows")?;
        let out = self.output([rows, c])?;
        let kernel = if table.dtype == DType::BF16 {
            "gather_bf16"
        } else {
            "gather"
        };
        for (i, part) in table.parts.iter().enumerate() {
            let start = i * table.rows_per_part;
            let part_rows = table.rows_per_part.min(n - start);
            let params = [
                u32_of(rows)?,
                u32_of(c)?,
                u32_of(start)?,
                u32_of(part_rows)?,
            ];
            self.run(
                kernel,
                &params,
                &[part, ids, out.buf()?],
                (c.div_ceil(64), rows),
            )?;
        }
        Ok(out)
    }

    /// Queues the row-wise argmax of `logits [rows, V]` into `ids` (`u32::MAX` for a row with a
    /// NaN).
    fn argmax_into(&self, logits: &WgpuTensor, ids: &wgpu::Buffer) -> Result<()> {
        let (rows, cols) = matrix(logits, "argmax")?;
        if cols == 0 {
            return Err(Error::invalid("argmax", "zero columns"));
        }
        const CHUNK: usize = 4096;
        let parts = cols.div_ceil(CHUNK);
        let part_v = self.output([rows, parts])?;
        let part_i = self.output([rows, parts])?;
        let params = [u32_of(rows)?, u32_of(cols)?, u32_of(CHUNK)?, u32_of(parts)?];
        let bufs = [logits.buf()?, part_v.buf()?, part_i.buf()?, ids];
        self.run("argmax_partial", &params, &bufs, (parts, rows))?;
        self.run("argmax_final", &params, &bufs, (rows, 1))
    }

    /// Puts a staging buffer back in its pool.
    fn return_staging(&self, staging: wgpu::Buffer) {
        lock(&self.inner.free_staging)
            .entry(staging.size())
            .or_default()
            .push(staging);
    }

    /// The burst a new recording of `thread` starts with.
    fn next_burst(&self, thread: std::thread::ThreadId) -> usize {
        lock(&self.inner.next_burst)
            .get(&thread)
            .copied()
            .unwrap_or(self.inner.submit_every)
    }

    /// How many dispatches this thread's next submission may gather.
    #[cfg(test)]
    fn burst_limit(&self) -> usize {
        let thread = std::thread::current().id();
        match lock(&self.inner.pending).get(&thread) {
            Some(rec) => rec.limit,
            None => self.next_burst(thread),
        }
    }

    /// This thread's open recording, taken for submission; its next one starts with the first
    /// (small) burst again.
    fn take_recording(&self) -> Option<Recording> {
        let thread = std::thread::current().id();
        lock(&self.inner.next_burst).remove(&thread);
        lock(&self.inner.pending).remove(&thread)
    }

    fn read_bytes(&self, buf: &wgpu::Buffer) -> Result<Vec<u8>> {
        let reading = self.start_read(buf);
        self.finish_read(reading)
    }

    /// Submits the work recorded so far with a copy of `buf` into a staging buffer at its end.
    fn start_read(&self, buf: &wgpu::Buffer) -> Reading {
        let pooled = lock(&self.inner.free_staging)
            .get_mut(&buf.size())
            .and_then(Vec::pop);
        let staging = pooled.unwrap_or_else(|| staging_buffer(&self.inner.device, buf.size()));
        // The copy ends the thread's recording, in the same submission as the work it reads.
        let submission = match self.take_recording() {
            Some(mut rec) => {
                drop(rec.pass.take()); // ends the pass, unlocking the encoder
                rec.enc
                    .copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
                self.inner.submit(rec)
            }
            None => {
                let mut enc = self
                    .inner
                    .device
                    .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
                enc.copy_buffer_to_buffer(buf, 0, &staging, 0, buf.size());
                self.inner.queue.submit([enc.finish()])
            }
        };
        Reading {
            staging,
            submission,
        }
    }

    /// Waits for a [`WgpuBackend::start_read`]'s submission (not for any submitted after it)
    /// and returns the bytes copied.
    fn finish_read(&self, reading: Reading) -> Result<Vec<u8>> {
        let Reading {
            staging,
            submission,
        } = reading;
        let bytes = map_read(
            &self.inner.device,
            &staging,
            submission,
            self.inner.host_times.as_ref().map(|t| &t.wait),
        )?;
        self.return_staging(staging);
        Ok(bytes)
    }
}

/// Whether the device's subgroups are consecutive invocations of 4 to 32 threads in workgroups
/// of 128 and 256, which the builds laying groups of threads out on subgroups assume (the
/// Vulkan and WGSL specifications leave it to the implementation; NVIDIA's and lavapipe's are):
/// `subgroup_layout.wgsl` run once.
fn subgroups_consecutive(device: &wgpu::Device, queue: &wgpu::Queue) -> Result<bool> {
    const LAYOUT: &str = include_str!("../../../kernels/wgsl/subgroup_layout.wgsl");
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("subgroup_layout"),
        source: wgpu::ShaderSource::Wgsl(LAYOUT.into()),
    });
    let mut enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
    let mut outputs = Vec::new();
    for (entry, threads) in [("main128", 128u64), ("main256", 256)] {
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(entry),
            layout: None,
            module: &module,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions::default(),
            cache: None,
        });
        let out = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: threads * 4,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let staging = staging_buffer(device, threads * 4);
        let bind = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: out.as_entire_binding(),
            }],
        });
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind, &[]);
            pass.dispatch_workgroups(1, 1, 1);
        }
        enc.copy_buffer_to_buffer(&out, 0, &staging, 0, threads * 4);
        outputs.push(staging);
    }
    let submission = queue.submit([enc.finish()]);
    let mut all = true;
    for staging in &outputs {
        let bytes = map_read(device, staging, submission.clone(), None)?;
        all &= bytes
            .chunks_exact(4)
            .all(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == 1);
    }
    Ok(all)
}

/// A mappable buffer of `size` bytes that copies land in for the host to read.
fn staging_buffer(device: &wgpu::Device, size: u64) -> wgpu::Buffer {
    device.create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size,
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    })
}

/// The bytes of `staging` once `submission` (which copies into it) has completed, waiting for
/// nothing submitted after it; the wait's host time goes to `wait` where given. Unmaps it again.
fn map_read(
    device: &wgpu::Device,
    staging: &wgpu::Buffer,
    submission: wgpu::SubmissionIndex,
    wait: Option<&timing::Tally>,
) -> Result<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    staging.map_async(wgpu::MapMode::Read, .., move |r| {
        let _ = tx.send(r);
    });
    let start = Instant::now();
    device
        .poll(wgpu::PollType::Wait {
            submission_index: Some(submission),
            timeout: None,
        })
        .map_err(wgpu_err)?;
    if let Some(w) = wait {
        w.add(start);
    }
    rx.recv().map_err(wgpu_err)?.map_err(wgpu_err)?;
    let bytes = staging.get_mapped_range(..).map_err(wgpu_err)?.to_vec();
    staging.unmap();
    Ok(bytes)
}

/// naga's runtime checks for the shaders (`QFUSE_WGPU_SHADER_CHECKS=all|bounds|none`, for
/// measurements). The default, `bounds`, keeps the index clamps and drops the loop counter naga
/// adds to every loop and its division guards: on the H200 that made a decode step 2.86 →
/// 2.25 ms, and dropping the clamps too (`none`) gained nothing more (docs/perf.md). `all` is
/// wgpu's default (`None` here).
fn shader_checks(knob: Option<&str>) -> Option<wgpu::ShaderRuntimeChecks> {
    let mut checks = wgpu::ShaderRuntimeChecks::checked();
    match knob {
        Some("all") => return None,
        Some("none") => checks.bounds_checks = false,
        _ => {}
    }
    checks.force_loop_bounding = false;
    checks.int_div_checks = false;
    Some(checks)
}

/// The first `rows` ids of an argmax read back; a NaN row's id (`u32::MAX`) is an error.
fn ids_of(bytes: &[u8], rows: usize) -> Result<Vec<u32>> {
    let ids: Vec<u32> = bytes
        .chunks_exact(4)
        .take(rows)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if let Some(r) = ids.iter().position(|&i| i == u32::MAX) {
        return Err(Error::invalid("argmax", format!("NaN logit in row {r}")));
    }
    Ok(ids)
}

fn f32_bits(x: f64) -> u32 {
    (x as f32).to_bits()
}

fn u32_of(x: usize) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::invalid("wgpu", format!("{x} exceeds u32")))
}

fn matrix(t: &WgpuTensor, op: &'static str) -> Result<(usize, usize)> {
    t.shape.as_matrix(op)
}

impl Backend for WgpuBackend {
    type Tensor = WgpuTensor;
    type Batch = WgpuBatch;
    type Graph = ();
    type Event = std::time::Instant;
    const NAME: &'static str = "wgpu";

    fn upload(&self, host: &HostTensor) -> Result<WgpuTensor> {
        let v: Vec<f32> = match host.data() {
            HostData::F32(v) => v.clone(),
            _ => host.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        };
        if host.shape().rank() != 2 {
            return Ok(WgpuTensor::single(
                host.shape().clone(),
                self.buffer(bytemuck::cast_slice(&v))?,
            ));
        }
        self.matrix_parts(host.shape(), DType::F32, bytemuck::cast_slice(&v))
    }

    fn upload_weight(&self, host: &HostTensor) -> Result<WgpuTensor> {
        match host.data() {
            // bf16 matrices stay bf16 (exact), packed two to a word.
            HostData::BF16(v) if host.shape().rank() == 2 => {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
                self.matrix_parts(host.shape(), DType::BF16, &bytes)
            }
            _ => self.upload(host),
        }
    }

    fn download(&self, t: &WgpuTensor) -> Result<HostTensor> {
        let cols = t.shape.dims().last().copied().unwrap_or(1);
        let (rows, esize) = (t.shape.numel() / cols.max(1), t.dtype.size_in_bytes());
        let mut bytes = Vec::new();
        for (i, part) in t.parts.iter().enumerate() {
            let part_rows = t
                .rows_per_part
                .min(rows.saturating_sub(i * t.rows_per_part));
            let mut b = self.read_bytes(part)?;
            if t.parts.len() > 1 || t.dtype != DType::F32 {
                b.truncate(part_rows * cols * esize);
            }
            bytes.extend(b);
        }
        if t.dtype == DType::BF16 {
            let v = bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])))
                .collect();
            return HostTensor::new(t.shape.clone(), HostData::BF16(v));
        }
        let mut v: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        v.truncate(t.shape.numel());
        HostTensor::new(t.shape.clone(), HostData::F32(v))
    }

    fn zeros(&self, shape: &Shape, _dtype: DType) -> Result<WgpuTensor> {
        // wgpu zero-initialises new buffers (pooled ones would hold old data).
        self.fresh(shape.clone(), (shape.numel().max(1) * 4) as u64)
    }

    fn kv_dtype(&self) -> DType {
        DType::F32
    }

    fn update_batch(&self, batch: &mut WgpuBatch, info: &BatchInfo) -> Result<bool> {
        let fits = info.num_tokens() == batch.info.num_tokens()
            && info.seqs().len() == batch.info.seqs().len()
            && info.max_table_len() <= batch.max_blocks;
        if !fits {
            return Ok(false);
        }
        let tables = info.padded_block_tables(batch.max_blocks);
        // Work recorded against the old contents goes first; the writes land before anything
        // submitted after them.
        self.flush()?;
        let q = &self.inner.queue;
        q.write_buffer(&batch.positions, 0, bytemuck::cast_slice(info.positions()));
        q.write_buffer(&batch.slots, 0, bytemuck::cast_slice(info.slots()));
        q.write_buffer(&batch.token_seq, 0, bytemuck::cast_slice(info.token_seq()));
        q.write_buffer(&batch.tables, 0, bytemuck::cast_slice(&tables));
        batch.info = info.clone();
        // The RoPE table for the new positions, in the same buffer (same token count).
        if let Some((d, theta, table)) = lock(&batch.rope).as_ref() {
            let values = rope_table(info, *d, f64::from_bits(*theta));
            q.write_buffer(table.buf()?, 0, bytemuck::cast_slice(&values));
        }
        *lock(&batch.flash_blocks) = None;
        batch.ids_on_device = false;
        Ok(true)
    }

    fn advance_batch(&self, batch: &mut WgpuBatch, info: &BatchInfo) -> Result<bool> {
        let advanced = info.is_decode_step()
            && batch.sampled_rows == info.num_tokens()
            && self.update_batch(batch, info)?;
        batch.ids_on_device = advanced;
        if advanced {
            // The device is busy with the step this one follows: submit it in the fewest bursts.
            let thread = std::thread::current().id();
            lock(&self.inner.next_burst).insert(thread, self.inner.submit_max);
        }
        Ok(advanced)
    }

    fn embed(&self, table: &WgpuTensor, batch: &WgpuBatch) -> Result<WgpuTensor> {
        if batch.ids_on_device {
            // Ids from the device's argmax: below the vocabulary, or all ones for a NaN row,
            // which the gather skips (and read_sampled reports).
            self.gather(table, &batch.sampled, batch.sampled_rows)
        } else {
            self.gather_rows(table, batch.info.token_ids())
        }
    }

    fn sample_greedy(&self, logits: &WgpuTensor, batch: &mut WgpuBatch) -> Result<()> {
        let (rows, _) = matrix(logits, "sample_greedy")?;
        let need = (rows.max(1) * 4) as u64;
        if batch.sampled.size() < need {
            batch.sampled = self.fresh(Shape::from([rows]), need)?.buf()?.clone();
        }
        self.argmax_into(logits, &batch.sampled)?;
        batch.sampled_rows = rows;
        Ok(())
    }

    fn start_read_sampled(&self, batch: &WgpuBatch) -> Result<()> {
        let reading = self.start_read(&batch.sampled);
        lock(&batch.reading).push_back(reading);
        Ok(())
    }

    fn read_sampled(&self, batch: &WgpuBatch) -> Result<Vec<u32>> {
        if batch.sampled_rows == 0 {
            return Err(Error::invalid(
                "read_sampled",
                "no ids sampled on this batch",
            ));
        }
        let started = lock(&batch.reading).pop_front();
        let reading = match started {
            Some(r) => r,
            None => self.start_read(&batch.sampled),
        };
        ids_of(&self.finish_read(reading)?, batch.sampled_rows)
    }

    fn prepare_batch(&self, info: &BatchInfo) -> Result<WgpuBatch> {
        // Room for the tables to grow, so decode steps keep updating this batch in place
        // (the same buffers, the same cached bind groups) for many blocks.
        let max_blocks = info.max_table_len().max(1).next_power_of_two();
        let tables = info.padded_block_tables(max_blocks);
        Ok(WgpuBatch {
            info: info.clone(),
            positions: self.u32s(info.positions())?,
            slots: self.u32s(info.slots())?,
            token_seq: self.u32s(info.token_seq())?,
            tables: self.u32s(&tables)?,
            max_blocks,
            rope: std::sync::Mutex::new(None),
            flash_blocks: std::sync::Mutex::new(None),
            sampled: self
                .fresh(
                    Shape::from([info.num_tokens()]),
                    (info.num_tokens().max(1) * 4) as u64,
                )?
                .buf()?
                .clone(),
            sampled_rows: 0,
            ids_on_device: false,
            reading: std::sync::Mutex::new(std::collections::VecDeque::new()),
        })
    }

    fn gather_rows(&self, table: &WgpuTensor, ids: &[u32]) -> Result<WgpuTensor> {
        let (n, c) = matrix(table, "gather_rows")?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(
                "gather_rows",
                format!("id {bad} out of range 0..{n}"),
            ));
        }
        if ids.is_empty() {
            return self.output([0, c]);
        }
        let idb = self.upload_pooled(ids)?;
        self.gather(table, idb.buf()?, ids.len())
    }

    fn rms_norm(&self, x: &WgpuTensor, w: &WgpuTensor, eps: f64) -> Result<WgpuTensor> {
        let (t, c) = matrix(x, "rms_norm")?;
        let g = match w.shape.dims() {
            [g] if *g > 0 && c % *g == 0 => *g,
            _ => return Err(Error::shape("rms_norm", &x.shape, &w.shape)),
        };
        let out = self.output([t, c])?;
        let groups = t * c / g;
        self.run(
            "rms_norm",
            &[u32_of(groups)?, u32_of(g)?, f32_bits(eps)],
            &[x.buf()?, w.buf()?, out.buf()?],
            (groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS)),
        )?;
        Ok(out)
    }

    fn matmul(&self, x: &WgpuTensor, w: &WgpuTensor) -> Result<WgpuTensor> {
        self.gemv(Gemv::Plain, x, w, None, 0.0)?
            .ok_or_else(|| Error::shape("matmul", &x.shape, &w.shape))
    }

    fn add(&self, a: &WgpuTensor, b: &WgpuTensor) -> Result<WgpuTensor> {
        if a.shape != b.shape {
            return Err(Error::shape("add", &a.shape, &b.shape));
        }
        let n = a.shape.numel();
        let out = self.output(a.shape.clone())?;
        let groups = n.div_ceil(64);
        self.run(
            "add",
            &[u32_of(n)?],
            &[a.buf()?, b.buf()?, out.buf()?],
            (groups.min(MAX_GROUPS), groups.div_ceil(MAX_GROUPS)),
        )?;
        Ok(out)
    }

    fn silu_mul(&self, gate_up: &WgpuTensor) -> Result<WgpuTensor> {
        let (t, c) = matrix(gate_up, "silu_mul")?;
        if c % 2 != 0 {
            return Err(Error::invalid("silu_mul", format!("odd width {c}")));
        }
        let out = self.output([t, c / 2])?;
        self.run(
            "silu_mul",
            &[u32_of(t)?, u32_of(c / 2)?],
            &[gate_up.buf()?, out.buf()?],
            ((c / 2).div_ceil(64), t),
        )?;
        Ok(out)
    }

    fn slice_columns(&self, x: &WgpuTensor, start: usize, len: usize) -> Result<WgpuTensor> {
        let (t, c) = matrix(x, "slice_columns")?;
        if start + len > c {
            return Err(Error::invalid(
                "slice_columns",
                format!("columns {start}..{} out of range 0..{c}", start + len),
            ));
        }
        let out = self.output([t, len])?;
        self.run(
            "slice",
            &[u32_of(t)?, u32_of(c)?, u32_of(start)?, u32_of(len)?],
            &[x.buf()?, out.buf()?],
            (len.div_ceil(64), t),
        )?;
        Ok(out)
    }

    fn rope(&self, x: &WgpuTensor, batch: &WgpuBatch, cfg: &AttentionConfig) -> Result<WgpuTensor> {
        let (t, c) = matrix(x, "rope")?;
        let d = cfg.head_dim;
        if d == 0 || !d.is_multiple_of(2) || c % d != 0 || t != batch.info.num_tokens() {
            return Err(Error::invalid(
                "rope",
                format!(
                    "x {} with head_dim {d} and {} batch tokens",
                    x.shape,
                    batch.info.num_tokens()
                ),
            ));
        }
        let cs = self.rope_table(batch, cfg)?;
        let out = self.output([t, c])?;
        self.run(
            "rope",
            &[u32_of(t)?, u32_of(c)?, u32_of(d)?],
            &[x.buf()?, &cs, out.buf()?],
            ((c / 2).div_ceil(64), t),
        )?;
        Ok(out)
    }

    fn write_kv(
        &self,
        cache: &mut LayerKv<WgpuTensor>,
        k: &WgpuTensor,
        v: &WgpuTensor,
        batch: &WgpuBatch,
    ) -> Result<()> {
        let (t, w) = matrix(k, "write_kv")?;
        if v.shape != k.shape || t != batch.info.num_tokens() {
            return Err(Error::shape("write_kv", &k.shape, &v.shape));
        }
        let slots = cache.k.shape.cache_slots(w, "write_kv")?;
        batch.info.check_slots_within(slots, "write_kv")?;
        self.run(
            "write_kv",
            &[u32_of(t)?, u32_of(w)?],
            &[
                k.buf()?,
                v.buf()?,
                &batch.slots,
                cache.k.buf()?,
                cache.v.buf()?,
            ],
            (w.div_ceil(64), t),
        )
    }

    fn attention(
        &self,
        q: &WgpuTensor,
        cache: &LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
    ) -> Result<WgpuTensor> {
        let (t, c) = matrix(q, "attention")?;
        if c != cfg.num_heads * cfg.head_dim {
            return Err(Error::invalid(
                "attention",
                format!(
                    "q {} for {} heads of {}",
                    q.shape, cfg.num_heads, cfg.head_dim
                ),
            ));
        }
        if let Some(out) = self.flash_dispatch(q, t, cache, batch, cfg)? {
            return Ok(out);
        }
        self.attention_dispatch(q, t, cache, batch, cfg, None)
    }

    fn argmax(&self, logits: &WgpuTensor) -> Result<Vec<u32>> {
        let (rows, _) = matrix(logits, "argmax")?;
        let ids = self.output([rows])?;
        self.argmax_into(logits, ids.buf()?)?;
        ids_of(&self.read_bytes(ids.buf()?)?, rows)
    }

    fn rms_norm_matmul(
        &self,
        x: &WgpuTensor,
        norm_w: &WgpuTensor,
        w: &WgpuTensor,
        eps: f64,
    ) -> Result<WgpuTensor> {
        match self.gemv(Gemv::Norm, x, w, Some(norm_w), eps)? {
            Some(y) => Ok(y),
            None => compose::rms_norm_matmul(self, x, norm_w, w, eps),
        }
    }

    fn rms_norm_matmul_silu_mul(
        &self,
        x: &WgpuTensor,
        norm_w: &WgpuTensor,
        w_gate_up: &WgpuTensor,
        eps: f64,
    ) -> Result<WgpuTensor> {
        match self.gemv(Gemv::NormSiluMul, x, w_gate_up, Some(norm_w), eps)? {
            Some(y) => Ok(y),
            None => compose::rms_norm_matmul_silu_mul(self, x, norm_w, w_gate_up, eps),
        }
    }

    fn matmul_add(
        &self,
        x: &WgpuTensor,
        w: &WgpuTensor,
        residual: &WgpuTensor,
    ) -> Result<WgpuTensor> {
        match self.gemv(Gemv::Add, x, w, Some(residual), 0.0)? {
            Some(y) => Ok(y),
            None => compose::matmul_add(self, x, w, residual),
        }
    }

    fn matmul_silu_mul(&self, x: &WgpuTensor, w_gate_up: &WgpuTensor) -> Result<WgpuTensor> {
        match self.gemv(Gemv::SiluMul, x, w_gate_up, None, 0.0)? {
            Some(y) => Ok(y),
            None => compose::matmul_silu_mul(self, x, w_gate_up),
        }
    }

    fn qk_norm_rope_attention(
        &self,
        qkv: &WgpuTensor,
        q_norm: &WgpuTensor,
        k_norm: &WgpuTensor,
        cache: &mut LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
    ) -> Result<WgpuTensor> {
        // Decode steps (one token per sequence) in one dispatch: a prompt's tokens need each
        // other's keys in the cache first, so they take the two ops.
        let op = "qk_norm_rope_attention";
        let (t, width) = matrix(qkv, op)?;
        let d = cfg.head_dim;
        let decode_step = batch.info.is_decode_step();
        if !decode_step || !cfg.fits_prologue(width, &q_norm.shape, &k_norm.shape) {
            return compose::qk_norm_rope_attention(self, qkv, q_norm, k_norm, cache, batch, cfg);
        }
        let slots = cache.k.shape.cache_slots(cfg.num_kv_heads * d, op)?;
        batch.info.check_slots_within(slots, op)?;
        self.attention_dispatch(qkv, t, cache, batch, cfg, Some((q_norm, k_norm)))
    }

    fn qk_norm_rope_write_kv(
        &self,
        qkv: &WgpuTensor,
        q_norm: &WgpuTensor,
        k_norm: &WgpuTensor,
        cache: &mut LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
    ) -> Result<WgpuTensor> {
        let op = "qk_norm_rope_write_kv";
        let (t, width) = matrix(qkv, op)?;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if !cfg.fits_prologue(width, &q_norm.shape, &k_norm.shape) || t != batch.info.num_tokens() {
            return Err(Error::invalid(
                op,
                format!("qkv {} for {h}+2x{kvh} heads of {d}", qkv.shape),
            ));
        }
        let slots = cache.k.shape.cache_slots(kvh * d, op)?;
        batch.info.check_slots_within(slots, op)?;
        let q = self.output([t, h * d])?;
        let cs = self.rope_table(batch, cfg)?;
        self.run(
            op,
            &[
                u32_of(t)?,
                u32_of(h)?,
                u32_of(kvh)?,
                u32_of(d)?,
                f32_bits(cfg.qk_norm_eps),
            ],
            &[
                qkv.buf()?,
                q_norm.buf()?,
                k_norm.buf()?,
                &cs,
                &batch.slots,
                q.buf()?,
                cache.k.buf()?,
                cache.v.buf()?,
            ],
            (h + 2 * kvh, t),
        )?;
        Ok(q)
    }

    fn decoder_layer(
        &self,
        x: &WgpuTensor,
        w: &LayerWeights<'_, WgpuTensor>,
        cache: &mut LayerKv<WgpuTensor>,
        batch: &WgpuBatch,
        cfg: &AttentionConfig,
        eps: f64,
    ) -> Result<WgpuTensor> {
        if self.inner.prefetch_workgroups == 0 {
            return compose::decoder_layer(self, x, w, cache, batch, cfg, eps);
        }
        self.plan_prefetch(w);
        let out = compose::decoder_layer(self, x, w, cache, batch, cfg, eps);
        // A layer whose attention did not take its plan (a prompt's) leaves none behind.
        lock(&self.inner.prefetch)
            .plans
            .remove(&std::thread::current().id());
        out
    }

    /// Submits this thread's dispatches recorded so far as one command buffer.
    fn flush(&self) -> Result<()> {
        if let Some(rec) = self.take_recording() {
            self.inner.submit(rec);
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.flush()?;
        self.inner
            .device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(wgpu_err)
    }

    fn record_event(&self) -> Result<std::time::Instant> {
        // No timestamp queries here: wait for the queue, then read the host clock.
        self.synchronize()?;
        Ok(std::time::Instant::now())
    }

    fn elapsed_s(&self, start: &std::time::Instant, end: &std::time::Instant) -> Result<f64> {
        Ok(end.saturating_duration_since(*start).as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every default shader builds where a stage may bind 16 storage buffers (the prefetch's
    /// 18 are in pipelines of their own); asking for the prefetch there is a one-line error.
    #[test]
    fn default_shaders_fit_sixteen_storage_buffers_a_stage() -> Result<()> {
        let sixteen = WgpuOptions {
            storage_buffer_limit: Some(16),
            prefetch_workgroups: Some(0),
            ..WgpuOptions::default()
        };
        let Some(_) = qfuse_core::testing::device_or_skip(
            "the binding-count test",
            WgpuBackend::for_tests(0, &sixteen),
        ) else {
            return Ok(());
        };
        let with_prefetch = WgpuOptions {
            prefetch_workgroups: Some(8),
            ..sixteen
        };
        let err = WgpuBackend::for_tests(0, &with_prefetch)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("QFUSE_WGPU_PREFETCH=8") && !err.contains('\n'),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn a_step_queued_behind_another_is_submitted_in_the_largest_bursts() -> Result<()> {
        use qfuse_core::{HostTensor, SeqChunk};
        let Some(b) = qfuse_core::testing::device_or_skip("the burst test", WgpuBackend::new(0))
        else {
            return Ok(());
        };
        let (every, max) = (b.inner.submit_every, b.inner.submit_max);
        assert!(
            every < max,
            "defaults {every} and {max} leave nothing to tell apart"
        );
        let step = |pos: usize| {
            BatchInfo::new(
                16,
                vec![SeqChunk {
                    start_pos: pos,
                    len: 1,
                    block_table: vec![0],
                }],
            )
        };
        let mut batch = b.prepare_batch(&step(3)?)?;
        // Nothing sampled yet: the batch is rewritten from the host, an eager pass.
        assert!(!b.advance_batch(&mut batch, &step(4)?)?);
        assert_eq!(b.burst_limit(), every);
        let logits = b.upload(&HostTensor::from_f64(
            Shape::from([1, 5]),
            vec![0.0, 2.0, 1.0, 0.0, 0.0],
        )?)?;
        b.sample_greedy(&logits, &mut batch)?;
        b.start_read_sampled(&batch)?;
        assert_eq!(
            b.burst_limit(),
            every,
            "the read submits; the next pass starts small"
        );
        assert!(b.advance_batch(&mut batch, &step(4)?)?);
        assert_eq!(b.burst_limit(), max, "queued behind the running step");
        let table = b.upload(&HostTensor::from_f64(
            Shape::from([5, 2]),
            (0..10).map(f64::from).collect(),
        )?)?;
        let x = b.embed(&table, &batch)?;
        assert_eq!(
            b.burst_limit(),
            max,
            "the queued step's recording keeps the largest burst"
        );
        assert_eq!(b.read_sampled(&batch)?, vec![1]);
        assert_eq!(b.download(&x)?.to_f64_vec(), vec![2.0, 3.0]);
        Ok(())
    }
}
