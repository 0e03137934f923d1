//! `CudaBackend`: qfuse on NVIDIA GPUs. Weights stay bf16 on the device; activations, the residual
//! stream, norm statistics, RoPE, softmax and every accumulation are fp32; the KV cache is fp32
//! (or bf16 by option). On sm_90+ every kernel is a programmatic dependent launch (`launch.rs`)
//! and activation buffers come from a pool (`pool.rs`), so a captured decode step holds kernels
//! only and each kernel's weight loads overlap the one before it.
//! Decode-sized products (T <= 8 rows) run in fused GEMV kernels that read each weight once;
//! 9-64 rows on sm_90 in one tensor-core kernel (`x3.rs`, `kernels/gemm_x3.cu`) that splits the
//! fp32 activations into three bf16 parts as it stages them, with the norm and the epilogue
//! fused; larger ones (prompts) are split into the three parts by one kernel (the norm fused)
//! and multiplied on compute capability 9.0 by a persistent, warp-specialized wgmma kernel fed
//! by TMA, its epilogue fused (`kernels/gemm_wgmma.cu`; a prompt's gate/up product writes its
//! SiLU·up as the parts of down's operand: `prompt_mlp`), elsewhere by cuBLAS and a sum kernel.
//! Decode attention is one kernel for every batch size, which for batched decode (9+ sequences)
//! also forms q and the new keys (`qk_norm_rope_attention`); a batch-1 decoder layer can run as one
//! persistent kernel (`layer.rs`, opt-in: measured slower than the composed step); prompt
//! attention (chunks of 64+ tokens) keeps its scores on chip: fp16 tensor-core products of
//! two-part operands scaled by powers of two, q and k per row, values per column of a key tile,
//! fp32-exact to ~2^-22, on compute capability 9.0 as `wgmma` products fed by bulk copies
//! (`kernels/flash_wgmma.cu`), elsewhere as `mma.sync` (`kernels/flash.cu`; also fp16 scores
//! with 3xTF32 P·V, 3xTF32 throughout, fp32 FMAs or cuBLAS SGEMMs around a softmax kernel by
//! option); shorter chunks run in a split-K kernel. Kernels
//! are CUDA C++ from `kernels/`, compiled by NVRTC for the GPU present when the backend is
//! created (in parallel, and cached on disk by source and NVRTC version: `kernels::cached_ptx`).
//! The crate builds without CUDA: libraries are loaded at run time, and their absence is
//! `Error::NoDevice`.

mod error;
mod flash;
pub mod kernels;
mod launch;
mod layer;
mod pool;
mod trace;
mod x3;

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{CudaContext, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchConfig};
use half::bf16;
use qfuse_core::{
    compose, AttentionConfig, Backend, BatchInfo, DType, DeviceTensor, Error, HostData, HostTensor,
    LayerKv, LayerWeights, Result, Shape,
};

pub use error::CudaError;
use error::CudaResultExt;
use flash::{flash_choice, flash_desc, flash_kind_builds, flash_prefill_entry};
pub use flash::{FlashAttention, FLASH_SCRATCH_BYTES};
use kernels::{KernelBuild, Kernels};
use launch::Launch;
use pool::{CaptureSet, Pool, PoolError, Pooled};
pub use trace::KernelTrace;

/// Default fewest keys in a decode attention context split.
const DECODE_MIN_CHUNK: usize = 32;
/// Largest T that takes the fused GEMV path (the kernels' MAX_T).
pub const GEMV_MAX_ROWS: usize = 8;
/// Most query heads per KV head the attention kernel handles (its MAX_G).
const ATTN_MAX_GROUP: usize = 8;
const ATTN_WARPS: u32 = 4;
/// Attention arrival counters allocated up front (enough for 8,192 tokens of 8 KV heads).
const ATTN_COUNTERS: usize = 65_536;

/// A tensor in device memory: bf16 (weight matrices, KV cache) or f32 (everything else).
#[derive(Clone)]
pub struct CudaTensor {
    shape: Shape,
    buf: Buf,
}

#[derive(Clone)]
enum Buf {
    Bf16(Arc<CudaSlice<u16>>),
    F32(Arc<Pooled>),
}

impl fmt::Debug for CudaTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaTensor({} {})", self.dtype(), self.shape)
    }
}

impl DeviceTensor for CudaTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
    fn dtype(&self) -> DType {
        match self.buf {
            Buf::Bf16(_) => DType::BF16,
            Buf::F32(_) => DType::F32,
        }
    }
}

impl CudaTensor {
    /// The kernel-name suffix of a cache pool's element type.
    fn kv_suffix(&self) -> &'static str {
        match self.buf {
            Buf::Bf16(_) => "kvbf16",
            Buf::F32(_) => "kvf32",
        }
    }

    /// The bf16 weights (used only after matching on `Buf::Bf16`).
    fn bf16(&self) -> Result<&CudaSlice<u16>> {
        match &self.buf {
            Buf::Bf16(s) => Ok(s),
            Buf::F32(_) => Err(Error::UnsupportedDType {
                op: "bf16 weights",
                dtype: DType::F32,
            }),
        }
    }

    fn f32(&self, op: &'static str) -> Result<&CudaSlice<f32>> {
        match &self.buf {
            Buf::F32(s) => Ok(s.slice()),
            Buf::Bf16(_) => Err(Error::UnsupportedDType {
                op,
                dtype: DType::BF16,
            }),
        }
    }

    fn matrix(&self, op: &'static str) -> Result<(usize, usize)> {
        self.shape.as_matrix(op)
    }

    /// The buffer's device address (either element type), as a kernel argument.
    fn ptr(&self, stream: &CudaStream) -> u64 {
        match &self.buf {
            Buf::Bf16(s) => s.device_ptr(stream).0,
            Buf::F32(s) => s.slice().device_ptr(stream).0,
        }
    }

    /// The address of a buffer a kernel will write: it must not be shared with another tensor.
    fn ptr_mut(&mut self, stream: &CudaStream, op: &'static str) -> Result<u64> {
        let shared = || {
            Error::invalid(
                op,
                "cache pool is shared; it must be uniquely owned to be written",
            )
        };
        Ok(match &mut self.buf {
            Buf::Bf16(s) => Arc::get_mut(s).ok_or_else(shared)?.device_ptr_mut(stream).0,
            Buf::F32(s) => {
                Arc::get_mut(s)
                    .ok_or_else(shared)?
                    .slice_mut()
                    .device_ptr_mut(stream)
                    .0
            }
        })
    }
}

/// A batch's positions, slots and block tables in device memory.
#[derive(Debug)]
pub struct CudaBatch {
    info: BatchInfo,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    token_seq: CudaSlice<u32>,
    token_ids: CudaSlice<u32>,
    /// `[seqs, max_blocks]`, each table padded with zeros.
    block_tables: CudaSlice<u32>,
    /// `[seqs, 4]`: each sequence's first row, new tokens, first position and first key column
    /// in the flash attention's gathered keys ([`flash_desc`]).
    flash_desc: CudaSlice<u32>,
    /// Ids written by `sample_greedy` (one per logits row, at most `T`).
    sampled: CudaSlice<u32>,
    sampled_rows: usize,
    /// Copies of `sampled` to the host that `start_read_sampled` started, oldest first, and
    /// idle ones to reuse.
    reading: Mutex<SampledCopies>,
    max_blocks: usize,
    /// Context the launch shapes are sized for (so a captured step stays valid as it grows).
    capacity: usize,
}

impl AsRef<BatchInfo> for CudaBatch {
    fn as_ref(&self) -> &BatchInfo {
        &self.info
    }
}

impl AsMut<BatchInfo> for CudaBatch {
    fn as_mut(&mut self) -> &mut BatchInfo {
        &mut self.info
    }
}

/// Page-locked host memory for a batch's sampled ids, and an event recorded after each copy into
/// it. The backend turns cudarc's own event tracking off, so the slice's built-in event is never
/// recorded: waiting on it would not wait for the copy.
#[derive(Debug)]
struct SampledCopy {
    host: cudarc::driver::PinnedHostSlice<u32>,
    copied: cudarc::driver::CudaEvent,
}

#[derive(Debug, Default)]
struct SampledCopies {
    in_flight: std::collections::VecDeque<SampledCopy>,
    idle: Vec<SampledCopy>,
}

/// What [`CudaBackend::cublas_bf16`] does to x before splitting it.
enum Prologue<'a> {
    /// Nothing.
    Rows(&'a CudaSlice<f32>),
    /// RMSNorm with a gain.
    Norm {
        x: &'a CudaSlice<f32>,
        gain: &'a CudaSlice<f32>,
        eps: f64,
    },
}

/// The bf16 parts of a product's activations ([`CudaBackend::split_parts`]): the pooled buffer
/// and each part's device address (lo with three parts only).
struct SplitParts {
    buf: Pooled,
    hi: u64,
    mid: u64,
    lo: Option<u64>,
}

/// What [`CudaBackend::cublas_bf16`] does with the product.
enum Epilogue<'a> {
    /// Stores it.
    Store,
    /// Adds a residual of the product's shape.
    Add(&'a CudaSlice<f32>),
    /// SiLU of the first half of the columns times the second half.
    SiluMul,
}

impl Epilogue<'_> {
    /// Columns of the result of a product `n` columns wide.
    fn out_cols(&self, n: usize) -> usize {
        match self {
            Epilogue::SiluMul => n / 2,
            _ => n,
        }
    }
}

/// A captured CUDA graph of one decode step, with the pooled buffers its kernels write (dropped
/// after the graph: fields drop in order).
pub struct CudaGraphExec {
    graph: cudarc::driver::CudaGraph,
    _buffers: Arc<CaptureSet>,
}

impl fmt::Debug for CudaGraphExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CudaGraphExec")
    }
}

struct Inner {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    kernels: Kernels,
    name: String,
    sm_count: usize,
    /// The GPU's compute capability (major, minor).
    capability: (i32, i32),
    /// Warps a decode GEMV (1-8 rows) aims to run as (see `GemvT1Plan::choose`): 16 an SM by
    /// default (measured on the H200 with the tight builds below: batch 2, 4 and 8 17-19%
    /// faster than at 8 an SM, batch 1 level to 1% faster; with the widest builds batch 1 is
    /// 25% slower at 16; docs/perf.md, 15th session).
    gemv_warps: usize,
    /// Fewest rows for which a decode GEMV takes the build with the fewest loads that holds its
    /// slice (see `GemvT1Plan::choose`): 1, every decode GEMV (measured on the H200 at 8 warps
    /// an SM: batch 2 1.25 against 1.38 ms/step, batch 4 1.55 against 1.66, batch 8 level, but
    /// batch 1 0.73 against 0.71; at 16 an SM batch 1 is level or faster with them);
    /// `QFUSE_CUDA_GEMV_T1_TIGHT_FROM` (1..=9; 9: never).
    gemv_t1_tight_from: usize,
    /// Whether the decode attention that forms q and the new keys itself (`attention_many_qkn`)
    /// requests its first cache rows before its wait, under the QKV projection (default), or
    /// after it (`QFUSE_CUDA_QKN_EARLY_ROWS=0`, for measuring which of its early rows and its
    /// early blocks slow that projection; docs/perf.md, next steps after the 14th session).
    qkn_early_rows: bool,
    /// Whether the decode attention over a bf16 cache reads each row in 16-byte loads, half a
    /// warp a row (`attention_many_w16`, for groups of at most 2 query heads and head sizes a
    /// multiple of 8), rather than 8-byte loads, a lane's four dims of eight rows: fewer loads
    /// and shuffles for a kernel Nsight found issue-bound at batch 64 (docs/perf.md, 15th
    /// session); `QFUSE_CUDA_ATTN_W16=0` turns it off.
    attn_w16: bool,
    /// Fewest one-token sequences that take the decode attention kernel, `attention_many`
    /// (default 1: every decode step; measured on the H200, batch 1 1.016 → 0.93 ms/step against
    /// the split-K kernel; `QFUSE_CUDA_MANY_ATTENTION_FROM` raises it for comparison).
    many_from: usize,
    /// Fewest one-token sequences whose decode attention also forms q and the new keys
    /// (`qk_norm_rope_attention` in one kernel; `QFUSE_CUDA_FUSED_ATTENTION_FROM`). Default 9,
    /// batched decode: on an H100 it made batch 64 3.63–3.69 → 3.53 ms/step (bf16 cache) and
    /// left the fp32 cache's unchanged, but batch 1 1.006 → 1.055: there the separate q/k-norm
    /// kernel hides behind the QKV projection (programmatic dependent launch), while in the
    /// attention kernel its loads, reductions and RoPE angles lengthen the critical path
    /// (Nsight: 13.4 µs fused vs 10.5 + 6.1 µs, run one by one).
    fused_attention_from: usize,
    /// Products of 9-64 rows take the tensor-core kernel `gemm_x3` (the option, on sm_90+):
    /// what the GPU holds of it at once.
    gemm_x3: Option<x3::Capacity>,
    /// The same for its `wgmma` build, which runs products of `x3_wgmma_from` rows or more.
    gemm_x3_wg: Option<x3::Capacity>,
    /// [`CudaOptions::x3_wgmma_from`].
    x3_wgmma_from: usize,
    /// Whether a `gemm_wgmma.cu` product of at most 64 rows that stores plainly (the lm_head of
    /// a batched decode step) takes the kernel's 64-row build, each warpgroup multiplying the
    /// 64 rows by half the tile's weight rows, rather than the 128-row tile
    /// (`QFUSE_CUDA_WGMMA_ROWS64=0`).
    wgmma_rows64: bool,
    /// Products of more than 64 rows take `kernels/gemm_wgmma.cu` where the shape allows (the
    /// option, on compute capability 9.0, its kernels loaded and allowed their shared memory).
    wgmma: bool,
    /// Most blocks of a `gemm_wgmma.cu` launch, each taking tiles in turn: the SM count (one
    /// block fits an SM), or `QFUSE_CUDA_WGMMA_BLOCKS` (a large value gives every tile its own
    /// block, as before the kernel was persistent).
    wgmma_blocks: usize,
    /// `gemm_x3`'s phase clocks, `x3::TRACE_SLOTS` per entry point (`QFUSE_CUDA_X3_TRACE=1`).
    x3_trace: Option<CudaSlice<u64>>,
    /// The prompt attention kernels that may replace the GEMM path, in order of preference, each
    /// with the dynamic shared memory its builds may take (none where the option is off; 3xTF32
    /// then fp32, so a head size whose 3xTF32 build does not fit, as d = 128 on sm_80, still
    /// gets the fp32 one).
    flash: Vec<(FlashAttention, usize)>,
    /// Blocks an SM the decode attention kernel fills when it splits contexts (0: no split; the
    /// default 4 is what its registers let an SM hold).
    attn_many_blocks_per_sm: usize,
    /// Fewest keys in a context split of the decode attention (`QFUSE_CUDA_DECODE_MIN_CHUNK`,
    /// default [`DECODE_MIN_CHUNK`]).
    decode_min_chunk: usize,
    /// Most splits the decode attention launches as one thread-block cluster, combining them
    /// in distributed shared memory (`kernels/attention.cu`, `finish_splits_cluster`); 0: no
    /// clusters (before sm_90, or `QFUSE_CUDA_ATTN_CLUSTER=0`), the splits combine through
    /// global memory and an arrival counter.
    attn_cluster: usize,
    /// The settings, among them the choices compiled into `kernels` (`kernel_build`).
    options: CudaOptions,
    /// Programmatic dependent launches in use (option on and the GPU is sm_90 or later).
    pdl: bool,
    /// Dynamic shared memory the batch-1 layer kernel may take (`layer.rs`); 0 where it cannot
    /// run (below sm_90) or is not asked for: off unless `QFUSE_CUDA_LAYER_KERNEL=1`, since on
    /// the H200 it lost to the composed step (0.6B: 1.03-1.06 vs 0.90 ms/step; 8B: 6.38 vs 6.09;
    /// docs/perf.md).
    layer_smem_max: usize,
    /// The layer kernel's phase clocks (`QFUSE_CUDA_LAYER_TRACE=1`; `layer.rs`).
    layer_trace: Option<CudaSlice<u64>>,
    /// The layer kernel's phase from which the next kernel may launch (`layer.cu`;
    /// `QFUSE_CUDA_LAYER_TRIGGER`, 0 at once ... 3 at the end). Default 2, before the down
    /// projection: on the H200 at batch 1, 1.074 / 1.035 / 1.008 / 1.013 ms/step for 0..3.
    layer_trigger: i32,
    /// The layer kernel's ring slots, if set (`QFUSE_CUDA_LAYER_RING_SLOTS`); else as many as fit.
    layer_ring_slots: Option<usize>,
    /// Activation buffers for reuse, so steps issue no allocations or frees.
    pool: Arc<Pool>,
    /// CUDA graph replays so far.
    replays: AtomicUsize,
    /// Attention's per-(token, KV head) arrival counters, all zero between kernels. Replaced by
    /// a larger buffer when a batch needs more; old ones are kept, since captured graphs may
    /// still point at them.
    counters: Mutex<Vec<CudaSlice<u32>>>,
}

/// Settings of a [`CudaBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaOptions {
    /// KV-cache element type: `F32` (default: attention scores exact to the keys' fp32 values, which
    /// matters with Qwen3's k_norm gains near 100) or `BF16` (half the cache memory and traffic).
    pub kv_dtype: DType,
    /// Capture decode steps as CUDA graphs and replay them (default), or launch every kernel.
    pub graphs: bool,
    /// Launch kernels as programmatic dependent launches on sm_90+ (default), so each one's
    /// weight loads overlap the previous kernel; off launches each after the last has drained.
    pub pdl: bool,
    /// Prompt attention runs as fp32 cuBLAS GEMMs (`attention_gemm`) when every sequence of a
    /// batch brings at least this many
    /// new tokens; shorter chunks take the split-K kernel. `usize::MAX` turns it off.
    pub attention_gemm_min_rows: usize,
    /// Query rows per chunk of the GEMM attention (fewer where the score scratch would pass
    /// [`ATTENTION_GEMM_SCRATCH_BYTES`]). Each chunk's GEMMs stop at its last row's keys, so
    /// smaller chunks skip more of the causal mask's zeros, in more launches.
    pub attention_gemm_chunk_rows: usize,
    /// Products of 9-64 rows (batched decode, short prompts) run as one tensor-core kernel from
    /// the fp32 activations, the split, norm and epilogue fused (`kernels/gemm_x3.cu`, sm_90 and
    /// later), rather than a split kernel, a cuBLAS GEMM and a sum kernel. On by default
    /// (`QFUSE_CUDA_GEMM_X3=0` turns it off): ~10x more accurate than the cuBLAS path, and on the
    /// H200 10-17% faster a step at batch 9-32, level at 64 (docs/perf.md).
    pub gemm_x3: bool,
    /// `gemm_x3`'s residual-adding and SiLU products (o_proj, down, gate/up) multiply two bf16
    /// parts of each activation instead of three (hi + mid: ~2^-17 of it), a third fewer
    /// tensor-core products; QKV keeps three, being the one product whose rounding the CPU
    /// emulation found the logits sensitive to (4.3e-2 with it, bound 2e-2). On by default
    /// (`QFUSE_CUDA_X3_TWO_PARTS=0` turns it off). On the H200 (docs/perf.md, 22nd session):
    /// batch 64 3.4% faster a step (3.43 against 3.55 ms), batch 32 3%, batch 16 4.6%; batched
    /// decode teacher-forced over 320 positions 2.2e-4 from the reference (1.2e-4 over three
    /// parts), `check` at 64 positions 4.4e-3 (3.2e-3), top-1 agreement 1.0 in both.
    pub x3_two_parts: bool,
    /// Fewest rows whose `gemm_x3` products run on `wgmma` (its sm_90a build, compute capability
    /// 9.0) rather than `mma.sync`; more than 64 never (`QFUSE_CUDA_X3_WGMMA_FROM`, default 33).
    /// The `wgmma` build multiplies all 64 rows whatever T is, where the `mma.sync` build skips m
    /// tiles wholly past T: on the H200 it made batch 64 3-4% faster a step, batch 32 level and
    /// batch 16 7% slower (docs/perf.md).
    pub x3_wgmma_from: usize,
    /// Prompt attention that takes the GEMM path (see `attention_gemm_min_rows`) runs instead as
    /// a kernel that keeps the scores on chip (`kernels/flash.cu`, `kernels/flash_wgmma.cu`)
    /// wherever the head size allows (a multiple of 4, at most 128) and the GPU has the shared
    /// memory (`QFUSE_CUDA_FLASH_ATTENTION=0|1|2|3|4|5` picks off, fp32, 3xTF32, fp16 scores, fp16
    /// scores and P·V, or the default: the latter on `wgmma` where the GPU has it).
    pub flash_attention: FlashAttention,
    /// Fewest rows whose cuBLAS products accumulate the three bf16 parts' GEMMs into one output
    /// instead of one stacked GEMM and a sum kernel (`QFUSE_CUDA_ACCUMULATE_FROM`). Default
    /// [`ACCUMULATE_FROM`]: on the H200 accumulating made a 64 x 512-token prefill (32k rows)
    /// 6% faster and a 2,048-token one 3% slower (docs/perf.md).
    pub accumulate_from: usize,
    /// Products of more than 64 rows (prompts) run as one Hopper tensor-core kernel over the
    /// three bf16 parts with the epilogue fused (`kernels/gemm_wgmma.cu`, compute capability 9.0
    /// only, shapes whose K is a multiple of 64 and whose output columns fill its tiles) instead
    /// of cuBLAS plus a sum kernel. On by default; `QFUSE_CUDA_WGMMA=0` turns it off.
    pub wgmma: bool,
    /// How many bf16 parts the fp32 activations of a split product (more than 64 rows, or any
    /// product `gemm_x3` does not take) are split into for the tensor cores
    /// (`QFUSE_CUDA_PROMPT_PARTS=2|3`). Default three: two made a 2,048-token prefill 16.3 ms
    /// against 18.6 on the H200, but moved the synthetic 0.6B's teacher-forced logits from
    /// 4.1e-3 to 5.2e-2 of the reference (top-1 0.977; the model test's bounds are 2e-2 and 0.99):
    /// its random weights amplify a 2^-18 change in every activation ~10^4-fold (docs/perf.md).
    pub prompt_parts: PromptParts,
    /// The choices compiled into the kernels (`kernels::KernelBuild`: when a kernel lets the next
    /// one launch, the trace build, a batch-1 product block's warps), from
    /// `QFUSE_CUDA_PDL_TRIGGER`, `QFUSE_CUDA_TRACE` and `QFUSE_CUDA_GEMV_T1_WARPS`
    /// ([`KernelBuild::from_env`]).
    pub kernel_build: KernelBuild,
}

/// The bf16 parts of fp32 activations on the tensor cores ([`CudaOptions::prompt_parts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromptParts {
    /// hi + mid: each activation to ~2^-18 of its magnitude (bf16 alone keeps 2^-9), for two
    /// thirds of the three-part products. Opt-in.
    Two,
    /// hi + mid + lo: the fp32 activations exactly. The default.
    Three,
}

impl PromptParts {
    /// How many parts.
    pub fn count(self) -> usize {
        match self {
            PromptParts::Two => 2,
            PromptParts::Three => 3,
        }
    }
}

/// Rows and weight rows of a `gemm_wgmma.cu` block (`WG_BM`, `WG_BN`), its threads
/// (`WG_THREADS`) and dynamic shared memory (`WG_SMEM`).
const WGMMA_ROWS: usize = 128;
const WGMMA_COLS: usize = 128;
const WGMMA_THREADS: u32 = 288;
const WGMMA_SMEM: usize = 197_632;

/// The decode attention kernel (`attention_many`) for `g` query heads a KV head of `d` dims,
/// fused with q/k-norm (`qkn`) or not: its 16-byte-load build (`w16`, where allowed) for a bf16
/// cache, at most 2 heads a group and d a multiple of 8; else the 8-byte build.
fn many_entry(qkn: bool, kv_suffix: &str, g: usize, d: usize, w16: bool) -> String {
    let gm = g.next_power_of_two();
    let fused = if qkn { "qkn_" } else { "" };
    if w16 && kv_suffix == "kvbf16" && gm <= 2 && d.is_multiple_of(8) {
        format!("attention_many_{fused}w16_{kv_suffix}_g{gm}")
    } else {
        format!("attention_many_{fused}{kv_suffix}_g{gm}")
    }
}

/// A TMA descriptor of a row-major `[rows, inner]` bf16 tensor at device address `ptr`, copied in
/// boxes of `box_rows` rows by 64 elements (128 bytes, the 128-byte swizzle `gemm_wgmma.cu`'s
/// descriptors expect); rows past the end read as zeros.
fn tma_map_bf16(
    ptr: u64,
    inner: usize,
    rows: usize,
    box_rows: usize,
) -> Result<cudarc::driver::sys::CUtensorMap> {
    use cudarc::driver::sys as cu;
    let dims = [inner as u64, rows as u64];
    let strides = [2 * inner as u64];
    let boxes = [64u32, u32_of(box_rows, "box rows")?];
    let element_strides = [1u32, 1];
    // SAFETY: an all-zero CUtensorMap is plain bytes that the call below overwrites.
    let mut map: cu::CUtensorMap = unsafe { std::mem::zeroed() };
    // SAFETY: the map and the four arrays outlive the call and have the rank's lengths (2, 1,
    // 2, 2); the caller's tensor holds rows * inner bf16 at ptr (16-byte aligned, the stride a
    // multiple of 16: inner is a multiple of 64); the call only encodes, it reads no memory.
    unsafe {
        cu::cuTensorMapEncodeTiled(
            &mut map,
            cu::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            2,
            ptr as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            element_strides.as_ptr(),
            cu::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            cu::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            cu::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    }
    .result()
    .cuda()?;
    Ok(map)
}

/// Blocks across the output columns of a `gemm_wgmma.cu` product of `t` rows, `k` deep and `n`
/// wide (gate and up rows together with `silu`), or `None` where the kernel does not fit: K not a
/// whole number of 64-element rounds, output columns not whole blocks.
fn wgmma_col_blocks(t: usize, k: usize, n: usize, silu: bool) -> Option<usize> {
    let per_block = if silu { WGMMA_COLS / 2 } else { WGMMA_COLS };
    let cols = if silu { n / 2 } else { n };
    let fits = t > 0
        && k > 0
        && k.is_multiple_of(64)
        && (!silu || n.is_multiple_of(2))
        && cols.is_multiple_of(per_block);
    fits.then_some(cols / per_block)
}

/// Default [`CudaOptions::accumulate_from`].
pub const ACCUMULATE_FROM: usize = 16384;

/// Most rows whose q/k-norm + RoPE + cache write runs a warp per (token, head); more take a block
/// per token, which forms each token's RoPE factors once instead of once per head.
const QK_NORM_PER_HEAD_MAX_ROWS: usize = 64;

/// Warps of the block-per-token q/k-norm + RoPE build (`QKN_ROWS_WARPS`, kernels/attention.cu).
const QKN_ROWS_WARPS: u32 = 4;

/// Default [`CudaOptions::attention_gemm_min_rows`].
pub const ATTENTION_GEMM_MIN_ROWS: usize = 64;
/// Most device memory one chunk of the GEMM attention takes for its scores (then probabilities,
/// in place: 4 bytes per query head, row and key); it stays in the buffer pool for the next
/// prompt.
pub const ATTENTION_GEMM_SCRATCH_BYTES: usize = 256 << 20;
impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            kv_dtype: DType::F32,
            graphs: true,
            pdl: true,
            attention_gemm_min_rows: ATTENTION_GEMM_MIN_ROWS,
            // `QFUSE_CUDA_ATTENTION_GEMM_CHUNK_ROWS` overrides it for measurements.
            attention_gemm_chunk_rows: qfuse_core::knobs::env_knob(
                "QFUSE_CUDA_ATTENTION_GEMM_CHUNK_ROWS",
                1..=1 << 16,
            )
            .unwrap_or(512),
            gemm_x3: qfuse_core::knobs::env_knob("QFUSE_CUDA_GEMM_X3", 0..=1) != Some(0),
            x3_two_parts: qfuse_core::knobs::env_knob("QFUSE_CUDA_X3_TWO_PARTS", 0..=1) != Some(0),
            x3_wgmma_from: qfuse_core::knobs::env_knob("QFUSE_CUDA_X3_WGMMA_FROM", 1..=1 << 20)
                .unwrap_or(33),
            flash_attention: match qfuse_core::knobs::env_knob("QFUSE_CUDA_FLASH_ATTENTION", 0..=5)
            {
                Some(0) => FlashAttention::Off,
                Some(1) => FlashAttention::Fp32,
                Some(2) => FlashAttention::Tf32x3,
                Some(3) => FlashAttention::F16Scores,
                Some(4) => FlashAttention::F16,
                _ => FlashAttention::Wgmma,
            },
            accumulate_from: qfuse_core::knobs::env_knob("QFUSE_CUDA_ACCUMULATE_FROM", 1..=1 << 30)
                .unwrap_or(ACCUMULATE_FROM),
            wgmma: qfuse_core::knobs::env_knob("QFUSE_CUDA_WGMMA", 0..=1) != Some(0),
            prompt_parts: match qfuse_core::knobs::env_knob("QFUSE_CUDA_PROMPT_PARTS", 2..=3) {
                Some(2) => PromptParts::Two,
                _ => PromptParts::Three,
            },
            kernel_build: KernelBuild::from_env(),
        }
    }
}

/// The CUDA backend: one device, one stream, its cuBLAS handle and compiled kernels.
#[derive(Clone)]
pub struct CudaBackend {
    inner: Arc<Inner>,
}

impl fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CudaBackend({})", self.inner.name)
    }
}

/// The parameters the tensor-core product kernels share after their operands: the residual (y
/// where there is none: the kernel never reads it in that role), y, T, K, N.
fn product_args(
    l: &mut Launch<'_>,
    residual: Option<&CudaSlice<f32>>,
    y: &Pooled,
    (t, k, n): (usize, usize, usize),
) -> Result<()> {
    match residual {
        Some(r) => l.buf(r),
        None => l.out(y),
    };
    l.out(y)
        .i32(i32_of(t, "T")?)
        .i32(i32_of(k, "K")?)
        .i32(i32_of(n, "N")?);
    Ok(())
}

fn i32_of(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x).map_err(|_| Error::invalid("cuda", format!("{what} = {x} exceeds i32")))
}

fn u32_of(x: usize, what: &str) -> Result<u32> {
    u32::try_from(x).map_err(|_| Error::invalid("cuda", format!("{what} = {x} exceeds u32")))
}

fn grid(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A `(x, y)` grid of `threads`-thread blocks.
fn grid2(x: usize, y: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x.max(1) as u32, y.max(1) as u32, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Blocks for a grid-stride elementwise kernel over `n` elements.
fn elementwise(n: usize) -> LaunchConfig {
    grid(n.div_ceil(256).clamp(1, 65_535), 256)
}

impl CudaBackend {
    /// Opens GPU `ordinal` and compiles every kernel for it (NVRTC, a second or so).
    ///
    /// # Errors
    /// [`Error::NoDevice`] when the driver, NVRTC or cuBLAS libraries or the GPU are missing.
    pub fn new(ordinal: usize) -> Result<Self> {
        Self::with_options(ordinal, CudaOptions::default())
    }

    /// [`CudaBackend::new`] with explicit settings.
    pub fn with_options(ordinal: usize, options: CudaOptions) -> Result<Self> {
        if !matches!(options.kv_dtype, DType::F32 | DType::BF16) {
            return Err(Error::UnsupportedDType {
                op: "kv cache",
                dtype: options.kv_dtype,
            });
        }
        // SAFETY: these only try to dlopen the libraries; cudarc panics on first use without them,
        // so they are checked here first.
        let (cuda, nvrtc, cublas) = unsafe {
            (
                cudarc::driver::sys::is_culib_present(),
                cudarc::nvrtc::sys::is_culib_present(),
                cudarc::cublas::sys::is_culib_present(),
            )
        };
        if !cuda {
            return Err(Error::NoDevice(
                "the CUDA driver library (libcuda.so) was not found".into(),
            ));
        }
        if !nvrtc {
            return Err(Error::NoDevice(
                "NVRTC (libnvrtc.so.13) was not found".into(),
            ));
        }
        if !cublas {
            return Err(Error::NoDevice(
                "cuBLAS (libcublas.so.13) was not found".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoDevice(format!("no usable CUDA device: {e}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "CUDA device {ordinal} requested, {count} present"
            )));
        }
        let ctx = CudaContext::new(ordinal).cuda()?;
        // SAFETY: every op runs on the one stream below, so cudarc's cross-stream event tracking
        // has nothing to order; turning it off also keeps events out of captured CUDA graphs.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().cuda()?;
        let blas = CudaBlas::new(stream.clone()).cuda()?;
        let kernels = Kernels::load(&ctx, &options.kernel_build.defines())?;
        let (major, minor) = ctx.compute_capability().cuda()?;
        let wgmma = options.wgmma
            && (major, minor) == (9, 0)
            && kernels.allow_optin_smem(&ctx, kernels::WGMMA_ENTRIES)? >= WGMMA_SMEM;
        let max_slices =
            qfuse_core::knobs::env_knob("QFUSE_CUDA_X3_MAX_SLICES", 1..=16).unwrap_or(16);
        let gemm_x3 = if options.gemm_x3 {
            x3::configure(&ctx, &stream, &kernels, major, max_slices, x3::Build::Mma)?
        } else {
            None
        };
        let gemm_x3_wg =
            if options.gemm_x3 && options.x3_wgmma_from <= x3::MAX_ROWS && (major, minor) == (9, 0)
            {
                x3::configure(&ctx, &stream, &kernels, major, max_slices, x3::Build::Wgmma)?
            } else {
                None
            };
        let x3_trace = if gemm_x3.is_some() && qfuse_core::knobs::env_flag("QFUSE_CUDA_X3_TRACE") {
            Some(
                stream
                    .alloc_zeros::<u64>(x3::ENTRIES.len() * x3::TRACE_SLOTS)
                    .cuda()?,
            )
        } else {
            None
        };
        // The chosen kernel, then the fallbacks for head sizes whose build does not fit: the
        // tensor-core kinds (sm_80 and later) fall back to 3xTF32, everything to fp32.
        let kinds: Vec<FlashAttention> = match options.flash_attention {
            FlashAttention::Off => vec![],
            FlashAttention::Fp32 => vec![FlashAttention::Fp32],
            _ if major < 8 => vec![FlashAttention::Fp32],
            FlashAttention::Tf32x3 => vec![FlashAttention::Tf32x3, FlashAttention::Fp32],
            FlashAttention::Wgmma => {
                let hopper = (major, minor) == (9, 0);
                let f16 = [
                    FlashAttention::F16,
                    FlashAttention::Tf32x3,
                    FlashAttention::Fp32,
                ];
                hopper
                    .then_some(FlashAttention::Wgmma)
                    .into_iter()
                    .chain(f16)
                    .collect()
            }
            fp16 => vec![fp16, FlashAttention::Tf32x3, FlashAttention::Fp32],
        };
        let flash = kinds
            .into_iter()
            .map(|kind| {
                let names = flash_kind_builds(kind)
                    .iter()
                    .map(|&dp| flash_prefill_entry(kind, dp));
                Ok((kind, kernels.allow_optin_smem(&ctx, names)?))
            })
            .collect::<Result<Vec<_>>>()?;
        let layer_smem_max = if qfuse_core::knobs::env_flag("QFUSE_CUDA_LAYER_KERNEL") {
            layer::configure(&ctx, &kernels, major)?
        } else {
            0
        };
        let layer_trace = if qfuse_core::knobs::env_flag("QFUSE_CUDA_LAYER_TRACE") {
            Some(stream.alloc_zeros::<u64>(layer::TRACE_LEN).cuda()?)
        } else {
            None
        };
        let attn_cluster = if major >= 9
            && qfuse_core::knobs::env_knob("QFUSE_CUDA_ATTN_CLUSTER", 0..=1) != Some(0)
        {
            decode_attention_clusters(&kernels)?
        } else {
            0
        };
        let counters = stream.alloc_zeros::<u32>(ATTN_COUNTERS).cuda()?;
        let name = ctx.name().cuda()?;
        let sm_count = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .cuda()? as usize;
        Ok(CudaBackend {
            inner: Arc::new(Inner {
                ctx,
                stream,
                blas,
                kernels,
                name,
                sm_count,
                gemv_warps: gemv_warps_per_sm() * sm_count,
                gemv_t1_tight_from: qfuse_core::knobs::env_knob(
                    "QFUSE_CUDA_GEMV_T1_TIGHT_FROM",
                    1..=GEMV_MAX_ROWS + 1,
                )
                .unwrap_or(1),
                qkn_early_rows: qfuse_core::knobs::env_knob("QFUSE_CUDA_QKN_EARLY_ROWS", 0..=1)
                    != Some(0),
                attn_w16: qfuse_core::knobs::env_knob("QFUSE_CUDA_ATTN_W16", 0..=1) != Some(0),
                many_from: qfuse_core::knobs::env_knob("QFUSE_CUDA_MANY_ATTENTION_FROM", 1..=4096)
                    .unwrap_or(1),
                fused_attention_from: qfuse_core::knobs::env_knob(
                    "QFUSE_CUDA_FUSED_ATTENTION_FROM",
                    1..=1 << 20,
                )
                .unwrap_or(GEMV_MAX_ROWS + 1),
                gemm_x3,
                gemm_x3_wg,
                x3_wgmma_from: options.x3_wgmma_from,
                wgmma_rows64: qfuse_core::knobs::env_knob("QFUSE_CUDA_WGMMA_ROWS64", 0..=1)
                    != Some(0),
                wgmma,
                wgmma_blocks: qfuse_core::knobs::env_knob("QFUSE_CUDA_WGMMA_BLOCKS", 1..=1 << 30)
                    .unwrap_or(sm_count),
                x3_trace,
                flash,
                decode_min_chunk: qfuse_core::knobs::env_knob(
                    "QFUSE_CUDA_DECODE_MIN_CHUNK",
                    32..=1 << 20,
                )
                .unwrap_or(DECODE_MIN_CHUNK),
                attn_cluster,
                attn_many_blocks_per_sm: qfuse_core::knobs::env_knob(
                    "QFUSE_CUDA_ATTN_MANY_BLOCKS_PER_SM",
                    0..=64,
                )
                .unwrap_or(4),
                options,
                pdl: options.pdl && major >= 9,
                capability: (major, minor),
                layer_smem_max,
                layer_trace,
                layer_trigger: qfuse_core::knobs::env_knob("QFUSE_CUDA_LAYER_TRIGGER", 0..=3)
                    .unwrap_or(2) as i32,
                layer_ring_slots: qfuse_core::knobs::env_knob("QFUSE_CUDA_LAYER_RING_SLOTS", 2..=8),
                counters: Mutex::new(vec![counters]),
                pool: Arc::new(Pool::default()),
                replays: AtomicUsize::new(0),
            }),
        })
    }

    /// The GPU's name.
    pub fn device_name(&self) -> &str {
        &self.inner.name
    }

    /// Bytes of device memory free and in total.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        self.inner.ctx.mem_get_info().cuda()
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.inner.stream
    }

    /// The GPU's compute capability, (major, minor).
    pub fn compute_capability(&self) -> (i32, i32) {
        self.inner.capability
    }

    /// How many captured decode steps have been replayed (a capture that fails falls back to
    /// plain launches silently, so tests and benchmarks check this).
    pub fn graph_replays(&self) -> usize {
        self.inner
            .replays
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether kernels are launched as programmatic dependent launches.
    pub fn uses_pdl(&self) -> bool {
        self.inner.pdl
    }

    /// A launch of kernel `name` on the backend's stream.
    fn launch(&self, name: &str) -> Result<Launch<'_>> {
        let f = self.inner.kernels.get(name).cuda()?;
        Ok(Launch::new(self.stream(), f, self.inner.pdl))
    }

    /// The address of at least `n` zeroed attention arrival counters.
    fn counters(&self, n: usize) -> Result<u64> {
        let mut all = self
            .inner
            .counters
            .lock()
            .map_err(|_| Error::invalid("attention", "counter lock poisoned"))?;
        if all.last().is_none_or(|c| c.len() < n) {
            all.push(
                self.stream()
                    .alloc_zeros::<u32>(n.next_power_of_two())
                    .cuda()?,
            );
        }
        let last = all
            .last()
            .ok_or_else(|| Error::invalid("attention", "no counters"))?;
        let ptr = last.device_ptr(self.stream()).0;
        Ok(ptr)
    }

    /// A buffer of at least `n` f32s from the pool; every caller launches a kernel that writes
    /// all `n` before any read.
    fn alloc_f32(&self, n: usize) -> Result<Pooled> {
        self.inner
            .pool
            .alloc(self.stream(), n)
            .map_err(|e| match e {
                PoolError::Driver(e) => CudaError::from(e).into(),
                PoolError::MissDuringCapture(len) => Error::invalid(
                    "cuda graph capture",
                    format!("a buffer of {len} floats was not pooled by the warm-up run"),
                ),
            })
    }

    fn f32_tensor(shape: impl Into<Shape>, s: Pooled) -> CudaTensor {
        CudaTensor {
            shape: shape.into(),
            buf: Buf::F32(Arc::new(s)),
        }
    }

    fn upload_u32(&self, v: &[u32]) -> Result<CudaSlice<u32>> {
        if v.is_empty() {
            return self.stream().alloc_zeros::<u32>(1).cuda();
        }
        self.stream().clone_htod(v).cuda()
    }

    /// `base` when its GEMV kernels serve `t` rows, `None` when cuBLAS should.
    fn gemv_kernel<'b>(&self, base: &'b str, t: usize) -> Option<&'b str> {
        (t <= GEMV_MAX_ROWS).then_some(base)
    }

    /// Launches one of the GEMV kernels for `base`: `y [T, out_cols]` from `x [T, K]`,
    /// `w [rows, K]`; the batch-1 `gemv_t1` build when the shape allows.
    #[allow(clippy::too_many_arguments)]
    fn launch_gemv(
        &self,
        base: &str,
        x: &CudaSlice<f32>,
        w: &CudaTensor,
        gain: Option<&CudaSlice<f32>>,
        residual: Option<&CudaSlice<f32>>,
        t: usize,
        k: usize,
        out_cols: usize,
        eps: f64,
    ) -> Result<Pooled> {
        let y = self.alloc_f32(t * out_cols)?;
        let (ti, ki, ni, eps) = (
            i32_of(t, "T")?,
            i32_of(k, "K")?,
            i32_of(out_cols, "N")?,
            eps as f32,
        );
        let silu = base.ends_with("silu_mul");
        let block_warps = usize::from(self.inner.options.kernel_build.gemv_t1_warps);
        let plan = (t <= GEMV_MAX_ROWS && w.dtype() == DType::BF16)
            .then(|| {
                GemvT1Plan::choose(
                    k,
                    out_cols,
                    silu,
                    self.inner.gemv_warps,
                    block_warps,
                    t >= self.inner.gemv_t1_tight_from,
                )
            })
            .flatten();
        let split = match plan {
            Some(p) => p.split,
            None => gemv_split(out_cols, k, self.inner.sm_count),
        };
        let (name, cols_per_block, threads) = match plan {
            Some(p) => (
                p.entry(base, t),
                p.cols_per_block(block_warps),
                32 * block_warps as u32,
            ),
            None => (gemv_entry(base, w.dtype(), k, t), 8 / split, 256),
        };
        let cfg = grid(out_cols.div_ceil(cols_per_block), threads);
        let mut l = self.launch(&name)?;
        // Absent gain/residual: pass x, which the kernel never reads in that role.
        l.buf(x).ptr(w.ptr(self.stream()));
        l.buf(gain.unwrap_or(x)).buf(residual.unwrap_or(x)).out(&y);
        l.i32(ti).i32(ki).i32(ni).i32(split as i32);
        if let Some(p) = plan {
            l.i32(p.kc as i32);
        }
        l.f32(eps);
        // SAFETY: x is [t, k] f32, w has at least out_cols (x2 for silu) rows of k elements of the
        // type the kernel name says, gain is [k], residual and y are [t, out_cols]; t is within the
        // entry point's bound; the split divides the block's warps (8, or gemv_t1's compiled
        // GEMV_T1_WARPS) and k into whole 16-byte loads per lane (kc of them for gemv_t1, within
        // its compile-time bound; 1-element loads for the `any` layout); the grid covers
        // out_cols.
        unsafe { l.launch(cfg) }.cuda()?;
        Ok(y)
    }

    /// `y [T, N] = x [T, K] · w [N, K]ᵀ` on cuBLAS with fp32 accumulation, for products too tall
    /// for the GEMV kernels: bf16 weights through [`Self::cublas_bf16`], fp32 weights (fp32
    /// checkpoints) in one fp32 GEMM.
    fn cublas_matmul(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaTensor,
        t: usize,
        k: usize,
        n: usize,
    ) -> Result<Pooled> {
        match &w.buf {
            Buf::F32(ws) => {
                let mut y = self.alloc_f32(t * n)?;
                let f32t = cublas_sys::cudaDataType::CUDA_R_32F;
                self.gemm(ws.slice(), f32t, x, f32t, y.slice_mut(), (t, k, n), 0.0)?;
                Ok(y)
            }
            Buf::Bf16(ws) => self.cublas_bf16(Prologue::Rows(x), ws, (t, k, n), Epilogue::Store),
        }
    }

    /// `matmul(rms_norm(x, norm_w, eps), w)` as `op`: a decode GEMV up to 8 rows, else on the
    /// tensor cores with x split into `parts` bf16 parts where it is split apart from the product.
    fn norm_product(
        &self,
        x: &CudaTensor,
        norm_w: &CudaTensor,
        w: &CudaTensor,
        eps: f64,
        op: &'static str,
        parts: usize,
    ) -> Result<CudaTensor> {
        let (t, k) = x.matrix(op)?;
        let (n, k2) = w.matrix(op)?;
        match self.gemv_kernel("rms_norm_gemv", t) {
            Some(kernel) if k == k2 && norm_w.shape.dims() == [k] => {
                let y = self.launch_gemv(
                    kernel,
                    x.f32(op)?,
                    w,
                    Some(norm_w.f32(op)?),
                    None,
                    t,
                    k,
                    n,
                    eps,
                )?;
                Ok(Self::f32_tensor([t, n], y))
            }
            None if k == k2 && norm_w.shape.dims() == [k] && matches!(w.buf, Buf::Bf16(_)) => {
                let prologue = Prologue::Norm {
                    x: x.f32(op)?,
                    gain: norm_w.f32(op)?,
                    eps,
                };
                let y =
                    self.cublas_bf16_parts(prologue, w.bf16()?, (t, k, n), Epilogue::Store, parts)?;
                Ok(Self::f32_tensor([t, n], y))
            }
            _ => compose::rms_norm_matmul(self, x, norm_w, w, eps),
        }
    }

    /// `epilogue(prologue(x) [T, K] · w [N, K]ᵀ)` for bf16 weights on the tensor cores. x (after
    /// the prologue's RMSNorm, if any) is split into bf16 parts, stacked as the rows of one
    /// `[parts T, K]` operand: three (hi + mid + lo, exact; the default) or two (hi + mid, each
    /// activation to ~2^-18 of itself; [`CudaOptions::prompt_parts`]). On Hopper one `gemm_wgmma.cu`
    /// kernel takes the parts' products and the epilogue. Elsewhere cuBLAS does: with three
    /// parts one GEMM (the weights read once, one launch) gives the three partial products, and
    /// the epilogue kernel sums them, smallest first, before its residual add or SiLU·up; with
    /// two, or many rows, the parts' GEMMs accumulate into one output. Products of 9-64 rows take
    /// `gemm_x3` instead (where it applies), one tensor-core kernel for a three-part split, the
    /// products and the epilogue. The norm and the epilogue cost no pass of their own over the
    /// activations.
    fn cublas_bf16(
        &self,
        x: Prologue<'_>,
        w: &CudaSlice<u16>,
        shape: (usize, usize, usize),
        epilogue: Epilogue<'_>,
    ) -> Result<Pooled> {
        let count = self.inner.options.prompt_parts.count();
        self.cublas_bf16_parts(x, w, shape, epilogue, count)
    }

    /// [`CudaBackend::cublas_bf16`] with x split into `count` parts (2 or 3) where it is split
    /// apart from the product (not in `gemm_x3`, whose split is always the exact three).
    fn cublas_bf16_parts(
        &self,
        x: Prologue<'_>,
        w: &CudaSlice<u16>,
        (t, k, n): (usize, usize, usize),
        epilogue: Epilogue<'_>,
        count: usize,
    ) -> Result<Pooled> {
        if let Some(y) = self.gemm_x3(&x, w, (t, k, n), &epilogue)? {
            return Ok(y);
        }
        let parts = self.split_parts(x, t, k, count)?;
        if let Some(y) =
            self.wgmma_parts(parts.buf.slice(), count, w, (t, k, n), &epilogue, false)?
        {
            return Ok(y);
        }
        let bf16 = cublas_sys::cudaDataType::CUDA_R_16BF;
        let Some(lo) = parts.lo else {
            return self.cublas_bf16_accumulate(w, &[parts.mid, parts.hi], (t, k, n), epilogue);
        };
        if t >= self.inner.options.accumulate_from {
            return self.cublas_bf16_accumulate(w, &[lo, parts.mid, parts.hi], (t, k, n), epilogue);
        }
        let mut y3 = self.alloc_f32(3 * t * n)?;
        self.gemm(
            w,
            bf16,
            parts.buf.slice(),
            bf16,
            y3.slice_mut(),
            (3 * t, k, n),
            0.0,
        )?;
        drop(parts);
        let out_cols = epilogue.out_cols(n);
        let y = self.alloc_f32(t * out_cols)?;
        let mut l = match epilogue {
            Epilogue::Store => {
                let mut l = self.launch("sum3_f32")?;
                l.out(&y3).out(&y).usize(t * n);
                l
            }
            Epilogue::Add(residual) => {
                let mut l = self.launch("sum3_add_f32")?;
                l.out(&y3).buf(residual).out(&y).usize(t * n);
                l
            }
            Epilogue::SiluMul => {
                let mut l = self.launch("sum3_silu_mul_f32")?;
                l.out(&y3).out(&y).usize(t).usize(n / 2);
                l
            }
        };
        // SAFETY: y3 holds the three [t, n] partial products; the residual (when present) and y
        // are [t, out_cols] (n even for SiLU·up, checked by the callers); grid-stride loops.
        unsafe { l.launch(elementwise(t * out_cols)) }.cuda()?;
        Ok(y)
    }

    /// `prologue(x)` ([t, k]) as `count` (2 or 3) bf16 parts, `[count T, K]` in a pooled buffer.
    fn split_parts(&self, x: Prologue<'_>, t: usize, k: usize, count: usize) -> Result<SplitParts> {
        let total = t * k;
        // The bf16 parts, [count T, K], live in a pooled f32 buffer of half as many elements
        // (pooled buffers keep memory operations out of captured steps).
        let buf = self.alloc_f32((count * total).div_ceil(2))?;
        let base = buf.slice().device_ptr(self.stream()).0;
        let parts = SplitParts {
            hi: base,
            mid: base + 2 * total as u64,
            lo: (count == 3).then_some(base + 4 * total as u64),
            buf,
        };
        // A null lo asks the split kernels for two.
        let (hi, mid, lo) = (parts.hi, parts.mid, parts.lo.unwrap_or(0));
        // Eight values a thread (16-byte loads and stores) where rows are whole groups of eight
        // and x is 16-byte aligned (the parts then are too: pooled buffers are 256-byte aligned).
        let x_ptr = match &x {
            Prologue::Rows(x) | Prologue::Norm { x, .. } => x.device_ptr(self.stream()).0,
        };
        let v8 = k.is_multiple_of(8) && x_ptr.is_multiple_of(16);
        match x {
            Prologue::Rows(x) => {
                let mut l = self.launch(if v8 {
                    "split_f32_bf16x3_v8"
                } else {
                    "split_f32_bf16x3"
                })?;
                let items = if v8 { total / 8 } else { total };
                l.buf(x).ptr(hi).ptr(mid).ptr(lo).usize(items);
                // SAFETY: x holds t*k floats; the parts are consecutive t*k-element bf16 ranges
                // of `parts` (count*t*k bf16 fit its (count*t*k)/2 floats), lo null with two
                // (the kernel then writes hi and mid only); grid-stride loop over the elements,
                // or (v8) over total/8 groups with x and the parts 16-byte aligned.
                unsafe { l.launch(elementwise(items)) }.cuda()?;
            }
            Prologue::Norm { x, gain, eps } => {
                let mut l = self.launch(if v8 {
                    "rms_norm_split_bf16x3_v8"
                } else {
                    "rms_norm_split_bf16x3"
                })?;
                l.buf(x).buf(gain).ptr(hi).ptr(mid).ptr(lo);
                l.i32(i32_of(k, "K")?).f32(eps as f32);
                // SAFETY: x is [t, k] f32 and gain [k] (a weight: its own allocation, 256-byte
                // aligned); the parts as above (lo null with two); a block per row, (v8) k a
                // multiple of 8 and 128 threads.
                unsafe { l.launch(grid(t, if v8 { 128 } else { 256 })) }.cuda()?;
            }
        }
        Ok(parts)
    }

    /// The products of [`Self::cublas_bf16`] for many rows (and for any count with two parts):
    /// the parts' GEMMs accumulate into one fp32 output, smallest part first (as the sum kernel
    /// adds them), instead of writing a partial output per part for a sum kernel to read back;
    /// the residual add or SiLU·up follows as its own pass.
    fn cublas_bf16_accumulate(
        &self,
        w: &CudaSlice<u16>,
        parts_smallest_first: &[u64],
        (t, k, n): (usize, usize, usize),
        epilogue: Epilogue<'_>,
    ) -> Result<Pooled> {
        let bf16 = cublas_sys::cudaDataType::CUDA_R_16BF;
        let y = self.alloc_f32(t * n)?;
        let stream = self.stream();
        let wp = w.device_ptr(stream).0;
        let yp = y.slice().device_ptr(stream).0;
        for (i, &part) in parts_smallest_first.iter().enumerate() {
            let beta = if i == 0 { 0.0 } else { 1.0 };
            // SAFETY: w holds n*k bf16; each part is t*k bf16 inside the caller's parts buffer;
            // y holds t*n floats.
            unsafe { self.gemm_ptr((wp, bf16), (part, bf16), yp, (t, k, n), beta) }?;
        }
        match epilogue {
            Epilogue::Store => Ok(y),
            Epilogue::Add(residual) => {
                let out = self.alloc_f32(t * n)?;
                let mut l = self.launch("add_f32")?;
                l.out(&y).buf(residual).out(&out).usize(t * n);
                // SAFETY: y, the residual and out all hold t*n floats; grid-stride loop.
                unsafe { l.launch(elementwise(t * n)) }.cuda()?;
                Ok(out)
            }
            Epilogue::SiluMul => {
                let out = self.alloc_f32(t * (n / 2))?;
                let mut l = self.launch("silu_mul_f32")?;
                l.out(&y).out(&out).i32(i32_of(n / 2, "I")?);
                // SAFETY: y is [t, n] (gate then up, n even: checked by the callers), out
                // [t, n/2]; one block per row.
                unsafe { l.launch(grid(t, 256)) }.cuda()?;
                Ok(out)
            }
        }
    }

    /// The products of [`Self::cublas_bf16`] from its `count` parts (`[count T, K]` bf16 in
    /// `parts`) in one `gemm_wgmma.cu` kernel, the epilogue fused; `None` where it does not apply
    /// (not compute capability 9.0, switched off, or a shape its tiles do not fit). With
    /// `parts_out` (SiLU·up only) the result is its own `count` bf16 parts, `[count T, N/2]`
    /// (in a pooled buffer of half as many f32), the next product's operand.
    fn wgmma_parts(
        &self,
        parts: &CudaSlice<f32>,
        count: usize,
        w: &CudaSlice<u16>,
        (t, k, n): (usize, usize, usize),
        epilogue: &Epilogue<'_>,
        parts_out: bool,
    ) -> Result<Option<Pooled>> {
        let silu = matches!(epilogue, Epilogue::SiluMul);
        let Some(col_blocks) =
            wgmma_col_blocks(t, k, n, silu).filter(|_| self.inner.wgmma && (silu || !parts_out))
        else {
            return Ok(None);
        };
        let (suffix, residual) = match epilogue {
            Epilogue::Store => ("", None),
            Epilogue::Add(r) => ("_add", Some(*r)),
            Epilogue::SiluMul => ("_silu_mul", None),
        };
        // At most 64 rows storing plainly (a batched step's lm_head): the 64-row build.
        let rows64 = self.inner.wgmma_rows64
            && t <= WGMMA_ROWS / 2
            && matches!(epilogue, Epilogue::Store)
            && !parts_out;
        let stream = self.stream();
        // The parts as one [count T, K] tensor in 128-row boxes (64 in the 64-row build); the
        // weights in boxes of a block's rows (with SiLU two boxes, its gate rows and its up rows).
        let box_rows = if silu { WGMMA_COLS / 2 } else { WGMMA_COLS };
        let part_box = if rows64 { WGMMA_ROWS / 2 } else { WGMMA_ROWS };
        let parts_map = tma_map_bf16(parts.device_ptr(stream).0, k, count * t, part_box)?;
        let w_map = tma_map_bf16(w.device_ptr(stream).0, k, n, box_rows)?;
        let out = t * epilogue.out_cols(n);
        let (y, parts_suffix) = if parts_out {
            (self.alloc_f32((count * out).div_ceil(2))?, "_parts")
        } else {
            (self.alloc_f32(out)?, "")
        };
        let rows_suffix = if rows64 { "_rows64" } else { "" };
        let mut l = self.launch(&format!(
            "wgmma_x{count}{suffix}{parts_suffix}{rows_suffix}"
        ))?;
        l.tensor_map(parts_map).tensor_map(w_map);
        product_args(&mut l, residual, &y, (t, k, n))?;
        l.i32(i32_of(col_blocks, "column blocks")?);
        let tiles = col_blocks * t.div_ceil(WGMMA_ROWS);
        let cfg = LaunchConfig {
            grid_dim: (u32_of(tiles.min(self.inner.wgmma_blocks), "blocks")?, 1, 1),
            block_dim: (WGMMA_THREADS, 1, 1),
            shared_mem_bytes: WGMMA_SMEM as u32,
        };
        // SAFETY: the tensor maps describe the count [t, k] bf16 parts back to back and w, [n, k]
        // bf16, both alive until the kernel has run (the pool and the weights outlive it); the
        // residual (when read) and y are [t, epilogue.out_cols(n)] f32 (y with parts_out:
        // count bf16 arrays of that shape, which its (count*out)/2 floats hold); the plan makes k a
        // multiple of 64 and the column blocks cover the output columns exactly, the blocks
        // taking every (row block, column block) tile in turn, none past the last; the
        // dynamic shared memory is what the kernel needs and `allow_optin_smem` allowed; compute
        // capability 9.0 (the sm_90a module is loaded only there); the 64-row build only for
        // t <= 64 (one row block) with the parts' boxes of 64 rows, storing plainly.
        unsafe { l.launch(cfg) }.cuda()?;
        Ok(Some(y))
    }

    /// A prompt's MLP, `h + down(silu_mul(gate_up(rms_norm(h))))`, as three kernels: the norm and
    /// split of h, the gate/up product whose SiLU·up epilogue writes its result as bf16 parts,
    /// and the down product (residual fused) over those parts. The composed ops would write the
    /// SiLU·up result in fp32 and split it in a pass of its own (~17 µs a layer at a 2,048-token
    /// prompt of Qwen3-0.6B). `None` where both products do not take `gemm_wgmma.cu` (not
    /// Hopper, decode-sized or `gemm_x3`-sized row counts, shapes its tiles do not fit).
    fn prompt_mlp(
        &self,
        h: &CudaTensor,
        w: &LayerWeights<'_, CudaTensor>,
        eps: f64,
    ) -> Result<Option<CudaTensor>> {
        let op = "decoder_layer (MLP)";
        let (t, hidden) = h.matrix(op)?;
        let (n2, k) = w.gate_up.matrix(op)?;
        let (out, inter) = w.down.matrix(op)?;
        let (Buf::Bf16(gate_up), Buf::Bf16(down)) = (&w.gate_up.buf, &w.down.buf) else {
            return Ok(None);
        };
        let fits = self.inner.wgmma
            && t > x3::MAX_ROWS
            && k == hidden
            && out == hidden
            && n2 == 2 * inter
            && w.post_norm.shape.dims() == [hidden]
            && wgmma_col_blocks(t, hidden, n2, true).is_some()
            && wgmma_col_blocks(t, inter, hidden, false).is_some();
        if !fits {
            return Ok(None);
        }
        let hs = h.f32(op)?;
        let prologue = Prologue::Norm {
            x: hs,
            gain: w.post_norm.f32(op)?,
            eps,
        };
        let count = self.inner.options.prompt_parts.count();
        let parts = self.split_parts(prologue, t, hidden, count)?;
        let Some(act) = self.wgmma_parts(
            parts.buf.slice(),
            count,
            gate_up,
            (t, hidden, n2),
            &Epilogue::SiluMul,
            true,
        )?
        else {
            return Ok(None);
        };
        drop(parts);
        let shape = (t, inter, hidden);
        let y = self.wgmma_parts(act.slice(), count, down, shape, &Epilogue::Add(hs), false)?;
        Ok(y.map(|y| Self::f32_tensor([t, hidden], y)))
    }

    /// `epilogue(prologue(x) w^T)` for 9-64 rows in one tensor-core kernel
    /// (`kernels/gemm_x3.cu`: the three-part split, the norm and the epilogue fused) instead of a
    /// split kernel, a cuBLAS GEMM and a sum kernel; `None` where it does not apply (before
    /// sm_90, switched off, other shapes, a norm with a residual add).
    fn gemm_x3(
        &self,
        x: &Prologue<'_>,
        w: &CudaSlice<u16>,
        (t, k, n): (usize, usize, usize),
        epilogue: &Epilogue<'_>,
    ) -> Result<Option<Pooled>> {
        let silu = matches!(epilogue, Epilogue::SiluMul);
        let Some(plan) = self.x3_plan(t, k, n, silu) else {
            return Ok(None);
        };
        let (rows, gain, eps) = match x {
            Prologue::Rows(x) => (*x, None, 0.0),
            Prologue::Norm { x, gain, eps } => (*x, Some(*gain), *eps as f32),
        };
        let two = self.inner.options.x3_two_parts;
        let (name, residual) = match (gain.is_some(), epilogue) {
            (false, Epilogue::Store) => ("gemm_x3_f32", None),
            (false, Epilogue::Add(r)) if two => ("gemm_x3_add_f32_p2", Some(*r)),
            (false, Epilogue::Add(r)) => ("gemm_x3_add_f32", Some(*r)),
            (false, Epilogue::SiluMul) if two => ("gemm_x3_silu_mul_f32_p2", None),
            (false, Epilogue::SiluMul) => ("gemm_x3_silu_mul_f32", None),
            (true, Epilogue::Store) => ("rms_norm_gemm_x3_f32", None),
            (true, Epilogue::SiluMul) if two => ("rms_norm_gemm_x3_silu_mul_f32_p2", None),
            (true, Epilogue::SiluMul) => ("rms_norm_gemm_x3_silu_mul_f32", None),
            (true, Epilogue::Add(_)) => return Ok(None),
        };
        let entry = x3::ENTRIES.iter().position(|e| *e == name).unwrap_or(0);
        let name = plan.build.entries()[entry];
        let y = self.alloc_f32(t * epilogue.out_cols(n))?;
        let mut l = self.launch(name)?;
        // Absent gain: pass x, which the kernel never reads in that role.
        l.buf(rows).buf(gain.unwrap_or(rows)).buf(w);
        product_args(&mut l, residual, &y, (t, k, n))?;
        l.i32(plan.kc as i32).f32(eps);
        match &self.inner.x3_trace {
            Some(trace) => {
                let base = trace.device_ptr(self.stream()).0;
                l.ptr(base + (entry * x3::TRACE_SLOTS * 8) as u64)
            }
            None => l.ptr(0),
        };
        l.cluster(1, plan.slices as u32, 1);
        let cfg = LaunchConfig {
            grid_dim: (plan.tiles as u32, plan.slices as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: plan.smem_bytes() as u32,
        };
        // SAFETY: x is [t, k] f32, the gain (when read) [k]; w is [n, k] bf16 (n even for SiLU);
        // the trace (when passed) holds x3::TRACE_SLOTS u64 for this entry point;
        // the residual (when read) and y are [t, epilogue.out_cols(n)] f32; t <= 64, k % 32 == 0
        // and the slices divide k / 32 into kc chunks whose block fits the shared memory that
        // `x3::configure` allowed (the plan); one cluster of `slices` blocks per tile, the grid
        // resident at once, as the kernel's reduction expects; sm_90 (the capacity exists only
        // there); the wgmma build only on compute capability 9.0 with kc even (its capacity and
        // plan), its shared memory including the alignment it takes.
        unsafe { l.launch(cfg) }.cuda()?;
        Ok(Some(y))
    }

    /// The `gemm_x3` plan of a product of `t` rows (its `wgmma` build from `x3_wgmma_from` rows
    /// where that build has a plan), or `None` where another path runs it.
    fn x3_plan(&self, t: usize, k: usize, n: usize, silu: bool) -> Option<x3::Plan> {
        let wg = self
            .inner
            .gemm_x3_wg
            .as_ref()
            .filter(|_| t >= self.inner.x3_wgmma_from)
            .and_then(|cap| x3::Plan::choose(t, k, n, silu, cap));
        wg.or_else(|| x3::Plan::choose(t, k, n, silu, self.inner.gemm_x3.as_ref()?))
    }

    /// Whether `gemm_wgmma.cu` runs a product with bf16 weights of more than 64 rows (`t`, `k`
    /// deep, `n` wide, gate and up rows together with `silu`), rather than cuBLAS: for tests and
    /// probes that must know which path ran.
    pub fn uses_wgmma(&self, t: usize, k: usize, n: usize, silu: bool) -> bool {
        self.inner.wgmma && wgmma_col_blocks(t, k, n, silu).is_some()
    }

    /// How `gemm_x3` covers a bf16 product of `t` rows, `k` deep and `n` wide (gate and up rows
    /// together with `silu`), as (tiles, slices, kc), or `None` where another path runs it: for
    /// tests and probes that must know which path ran.
    pub fn gemm_x3_plan(
        &self,
        t: usize,
        k: usize,
        n: usize,
        silu: bool,
    ) -> Option<(usize, usize, usize)> {
        self.x3_plan(t, k, n, silu)
            .map(|p| (p.tiles, p.slices, p.kc))
    }

    /// Whether `gemm_x3`'s `wgmma` build runs that product (see [`Self::gemm_x3_plan`]).
    pub fn gemm_x3_on_wgmma(&self, t: usize, k: usize, n: usize, silu: bool) -> bool {
        self.x3_plan(t, k, n, silu)
            .is_some_and(|p| p.build == x3::Build::Wgmma)
    }

    /// `gemm_x3`'s phase clocks per entry point (`QFUSE_CUDA_X3_TRACE=1`), mean µs over its
    /// block-launches; `None` when not traced.
    pub fn gemm_x3_trace_report(&self) -> Option<String> {
        let trace = self.inner.x3_trace.as_ref()?;
        let sums = self.stream().clone_dtoh(trace).ok()?;
        let mut out = String::from("gemm_x3 trace (mean over block-launches, thread 0, µs):");
        for (entry, slots) in x3::ENTRIES.iter().zip(sums.chunks(x3::TRACE_SLOTS)) {
            let n = slots[x3::TRACE_PHASES.len()];
            if n == 0 {
                continue;
            }
            out += &format!("\n  {entry} ({n} block-launches)");
            let mut total = 0.0;
            for (phase, &ns) in x3::TRACE_PHASES.iter().zip(slots) {
                let us = ns as f64 / n as f64 / 1e3;
                total += us;
                out += &format!("\n    {us:>8.2}  {phase}");
            }
            out += &format!("\n    {total:>8.2}  total");
        }
        Some(out)
    }

    /// One cuBLAS GEMM `y [T, N] = x [T, K] · w [N, K]ᵀ + beta y` (row-major), fp32 compute.
    #[allow(clippy::too_many_arguments)]
    fn gemm<W, X>(
        &self,
        w: &CudaSlice<W>,
        w_type: cublas_sys::cudaDataType,
        x: &CudaSlice<X>,
        x_type: cublas_sys::cudaDataType,
        y: &mut CudaSlice<f32>,
        (t, k, n): (usize, usize, usize),
        beta: f32,
    ) -> Result<()> {
        let stream = self.stream();
        let (wp, _gw) = w.device_ptr(stream);
        let (xp, _gx) = x.device_ptr(stream);
        let (yp, _gy) = y.device_ptr_mut(stream);
        // SAFETY: w holds n*k, x t*k and y t*n elements of the types given.
        unsafe { self.gemm_ptr((wp, w_type), (xp, x_type), yp, (t, k, n), beta) }
    }

    /// [`Self::gemm`] on device addresses.
    ///
    /// # Safety
    /// `w` must hold n*k, `x` t*k elements of their types and `y` t*n floats.
    unsafe fn gemm_ptr(
        &self,
        (wp, w_type): (u64, cublas_sys::cudaDataType),
        (xp, x_type): (u64, cublas_sys::cudaDataType),
        yp: u64,
        (t, k, n): (usize, usize, usize),
        beta: f32,
    ) -> Result<()> {
        let (ni, ti, ki) = (i32_of(n, "N")?, i32_of(t, "T")?, i32_of(k, "K")?);
        let alpha = 1.0f32;
        // SAFETY: column-major view: Yᵀ[N, T] = W[K, N]ᵀ · Xᵀ[K, T]; the buffers hold what the
        // caller promises, with the leading dimensions given; the handle uses this stream; alpha
        // and beta outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_ex(
                *self.inner.blas.handle(),
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                ni,
                ti,
                ki,
                (&alpha as *const f32).cast(),
                wp as *const _,
                w_type,
                ki,
                xp as *const _,
                x_type,
                ki,
                (&beta as *const f32).cast(),
                yp as *mut _,
                cublas_sys::cudaDataType::CUDA_R_32F,
                ni,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .cuda()
    }

    /// A strided-batched fp32 cuBLAS GEMM in its own column-major terms (fp32 compute, no TF32):
    /// for each b < batch, `C_b [m, n] = op(A_b) · B_b [k, n]`, with op(A) = Aᵀ (A stored
    /// `[k, m]`) when `trans_a`, else A (stored `[m, k]`). Each operand is (device address,
    /// leading dimension, stride between batch entries) in elements.
    ///
    /// # Safety
    /// Every batch entry of every operand must lie inside a live device buffer of floats.
    unsafe fn gemm_strided_f32(
        &self,
        trans_a: bool,
        (m, n, k, batch): (usize, usize, usize, usize),
        (a, lda, stride_a): (u64, usize, usize),
        (b, ldb, stride_b): (u64, usize, usize),
        (c, ldc, stride_c): (u64, usize, usize),
    ) -> Result<()> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let f32t = cublas_sys::cudaDataType::CUDA_R_32F;
        let op = if trans_a {
            cublas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas_sys::cublasOperation_t::CUBLAS_OP_N
        };
        // SAFETY: the caller vouches for the operands; the handle uses this backend's stream;
        // alpha and beta outlive the call.
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *self.inner.blas.handle(),
                op,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                i32_of(m, "M")?,
                i32_of(n, "N")?,
                i32_of(k, "K")?,
                (&alpha as *const f32).cast(),
                a as *const _,
                f32t,
                i32_of(lda, "lda")?,
                stride_a as i64,
                b as *const _,
                f32t,
                i32_of(ldb, "ldb")?,
                stride_b as i64,
                (&beta as *const f32).cast(),
                c as *mut _,
                f32t,
                i32_of(ldc, "ldc")?,
                stride_c as i64,
                i32_of(batch, "batch")?,
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .cuda()
    }

    /// Row-wise argmax of `logits [rows, V]` into `out[..rows]` (u32::MAX for a row with a NaN),
    /// in two passes so a 151,936-wide row is spread over many blocks.
    fn argmax_into(&self, logits: &CudaTensor, out: &mut CudaSlice<u32>) -> Result<()> {
        let (rows, v) = logits.matrix("argmax")?;
        if v == 0 || out.len() < rows {
            return Err(Error::invalid(
                "argmax",
                format!("{rows} rows of {v} into {} ids", out.len()),
            ));
        }
        const CHUNK: usize = 2048;
        let parts = v.div_ceil(CHUNK);
        let part_v = self.alloc_f32(rows * parts)?;
        // The indices, u32s, live in a pooled f32 buffer (same size): pooled buffers keep memory
        // operations out of the step, which would stop the next kernel from launching early.
        let part_i = self.alloc_f32(rows * parts)?;
        let (vi, ci, pi) = (i32_of(v, "V")?, CHUNK as i32, i32_of(parts, "parts")?);
        let mut l = self.launch("argmax_partial_f32")?;
        l.buf(logits.f32("argmax")?)
            .out(&part_v)
            .out(&part_i)
            .i32(vi)
            .i32(ci);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, parts as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: logits is [rows, v]; the partials hold rows * parts entries, one per block.
        unsafe { l.launch(cfg) }.cuda()?;
        let mut l = self.launch("argmax_final_f32")?;
        l.out(&part_v).out(&part_i).buf(out).i32(pi);
        // SAFETY: reads the rows * parts partials just written; out holds at least rows ids.
        unsafe { l.launch(grid(rows, 256)) }.cuda()?;
        Ok(())
    }

    /// The attention kernels' launch, for [`Backend::attention`] (q `[T, H d]`) and, with
    /// `qkn`, for [`Backend::qk_norm_rope_attention`] (the QKV projection; `kv` the pools it
    /// writes). The caller has checked the shapes, the batch against the pools, and that the
    /// decode kernel (`many`) fits: d <= 128, d % 4 == 0 (d % 8 == 0 with `qkn`).
    #[allow(clippy::too_many_arguments)]
    fn launch_attention(
        &self,
        input: &CudaTensor,
        kv: (u64, u64),
        kv_suffix: &str,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
        many: bool,
        qkn: Option<(&CudaTensor, &CudaTensor)>,
    ) -> Result<CudaTensor> {
        let t = batch.info.num_tokens();
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let c = h * d;
        let bs = batch.info.block_size();
        // Both kernels split each token's context into chunks, a block each (`ContextSplit`),
        // sized by the batch's capacity, not its current context, so a captured step keeps valid
        // launch shapes as the sequences grow (splits past a token's position exit at once).
        let max_ctx = batch.capacity.max(batch.info.max_context()).max(1);
        let g = cfg.group_size();
        let (kernel, shared) = if many {
            let gm = g.next_power_of_two();
            let w16 = self.inner.attn_w16;
            let kernel = many_entry(qkn.is_some(), kv_suffix, g, d, w16);
            (kernel, ATTN_WARPS as usize * gm * (d + 2))
        } else {
            let kernel = attention_entry(kv_suffix, g, d, t);
            (kernel, ATTN_WARPS as usize * g * (d + 2))
        };
        let blocks = t * kvh;
        let split = if many {
            ContextSplit::decode(
                max_ctx,
                blocks,
                self.inner.attn_many_blocks_per_sm * self.inner.sm_count,
                self.inner.decode_min_chunk,
            )
        } else {
            ContextSplit::split_k(max_ctx, blocks, self.inner.sm_count)
        };
        let (chunk, splits) = (split.chunk, split.splits);
        // A decode context's splits as one cluster combine in shared memory.
        let cluster = many && splits > 1 && splits <= self.inner.attn_cluster;
        let global_combine = splits > 1 && !cluster;
        let out = self.alloc_f32(t * c)?;
        let part_o = self.alloc_f32(if global_combine {
            t * h * splits * d
        } else {
            1
        })?;
        let part_ml = self.alloc_f32(if global_combine {
            t * h * splits * 2
        } else {
            1
        })?;
        let counters = self.counters(t * kvh)?;
        let scale_log2 = (cfg.scale() * std::f64::consts::LOG2_E) as f32;
        let op = "attention";
        let mut l = self.launch(&kernel)?;
        l.buf(input.f32(op)?).ptr(kv.0).ptr(kv.1);
        l.buf(&batch.positions)
            .buf(&batch.token_seq)
            .buf(&batch.block_tables);
        l.i32(i32_of(batch.max_blocks, "blocks")?)
            .i32(i32_of(bs, "block size")?)
            .i32(i32_of(h, "H")?)
            .i32(i32_of(kvh, "KV")?)
            .i32(i32_of(d, "d")?)
            .f32(scale_log2)
            .i32(i32_of(chunk, "chunk")?);
        l.out(&out).out(&part_o).out(&part_ml).ptr(counters);
        if let Some((q_norm, k_norm)) = qkn {
            l.buf(q_norm.f32(op)?)
                .buf(k_norm.f32(op)?)
                .buf(&batch.slots)
                .f64(cfg.rope_theta.log2())
                .f32(cfg.qk_norm_eps as f32)
                .i32(i32::from(self.inner.qkn_early_rows));
        }
        if cluster {
            l.cluster(1, 1, splits as u32);
        }
        let cfg_launch = LaunchConfig {
            grid_dim: (t as u32, kvh as u32, splits as u32),
            block_dim: (32 * ATTN_WARPS, 1, 1),
            shared_mem_bytes: (shared * 4) as u32,
        };
        // SAFETY: the input is q [t, h*d], or with qkn the QKV projection [t, (h+2kvh)*d] with
        // norms [d] and every slot inside the pools (checked by the caller); pools are [slots,
        // kvh*d] and every block of every table is inside (checked); tables are [seqs,
        // max_blocks]; group <= MAX_G and d <= 256 (checked; the decode kernel only for d <= 128,
        // a multiple of 4 (8 with qkn): 16-byte aligned rows); shared memory as the kernel lays
        // it out; the partial buffers hold t*h*splits*(d | 2) floats when the splits combine
        // through them; counters holds t*kvh zeros, which the kernel leaves zero; a cluster
        // spans the z extent (2..=attn_cluster <= 16 blocks, allowed by
        // decode_attention_clusters), which it divides.
        unsafe { l.launch(cfg_launch) }.cuda()?;
        Ok(Self::f32_tensor([t, c], out))
    }

    /// Causal attention of prompt chunks as fp32 cuBLAS GEMMs, one sequence and one chunk of its
    /// query rows at a time: the scores as one strided-batched SGEMM per chunk (a batch entry
    /// per KV head, its G query heads stacked as rows), a softmax kernel in place (the division
    /// by each row's sum deferred), a second SGEMM of the weights and the values, and a kernel
    /// dividing and placing the rows in the output
    /// (kernels/attention.cu explains why fp32 and not bf16 tensor cores). Keys past a chunk's
    /// last row are never multiplied. Inputs were checked by `attention`.
    fn attention_gemm(
        &self,
        q: &CudaTensor,
        cache: &LayerKv<CudaTensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
    ) -> Result<CudaTensor> {
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let t = batch.info.num_tokens();
        let q = q.f32("attention")?;
        let out = self.alloc_f32(t * h * d)?;
        let stream = self.stream();
        let scale_log2 = (cfg.scale() * std::f64::consts::LOG2_E) as f32;
        let tables = batch.block_tables.device_ptr(stream).0;
        for (s, chunk) in batch.info.seqs().iter().enumerate() {
            let rows = batch.info.rows(s);
            let keys = chunk.start_pos + chunk.len;
            // Every key and value of the sequence once, contiguous: [KV][keys][d] each.
            let ks = self.alloc_f32(kvh * keys * d)?;
            let vs = self.alloc_f32(kvh * keys * d)?;
            let mut l =
                self.launch(&format!("attention_gemm_gather_kv_{}", cache.k.kv_suffix()))?;
            l.ptr(cache.k.ptr(stream))
                .ptr(cache.v.ptr(stream))
                .ptr(tables + (s * batch.max_blocks * 4) as u64)
                .i32(i32_of(batch.info.block_size(), "block size")?)
                .i32(i32_of(keys, "keys")?)
                .i32(i32_of(kvh, "KV")?)
                .i32(i32_of(d, "d")?)
                .out(&ks)
                .out(&vs);
            // SAFETY: the pools hold every slot of this sequence's table (checked by `attention`);
            // the table is row s of [seqs, max_blocks]; ks and vs hold kvh*keys*d floats.
            unsafe { l.launch(grid2(keys, kvh, 128)) }.cuda()?;
            let max_rows = ATTENTION_GEMM_SCRATCH_BYTES / (4 * h * keys.next_multiple_of(8));
            let step = self
                .inner
                .options
                .attention_gemm_chunk_rows
                .min(max_rows)
                .max(1);
            let mut a = 0;
            while a < chunk.len {
                let n = step.min(chunk.len - a);
                let sk = chunk.start_pos + a + n;
                self.attention_gemm_chunk(
                    q,
                    (&ks, &vs, keys),
                    &out,
                    (rows.start + a, n, chunk.start_pos + a, sk),
                    cfg,
                    scale_log2,
                )?;
                a += n;
            }
        }
        Ok(Self::f32_tensor([t, h * d], out))
    }

    /// One chunk of [`Self::attention_gemm`]: query rows `[row0, row0 + n)` at positions from
    /// `pos0`, against the sequence's first `sk` keys.
    fn attention_gemm_chunk(
        &self,
        q: &CudaSlice<f32>,
        (ks, vs, keys): (&Pooled, &Pooled, usize),
        out: &Pooled,
        (row0, n, pos0, sk): (usize, usize, usize, usize),
        cfg: &AttentionConfig,
        scale_log2: f32,
    ) -> Result<()> {
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let stream = self.stream();
        let (hi, di, ni) = (i32_of(h, "H")?, i32_of(d, "d")?, i32_of(n, "rows")?);
        let row0i = i32_of(row0, "row")?;
        let ldp = sk.next_multiple_of(8);
        let rows_g = cfg.group_size() * n;
        let ptr = |p: &Pooled| p.slice().device_ptr(stream).0;
        let qs = self.alloc_f32(h * n * d)?;
        let mut l = self.launch("attention_gemm_gather_q")?;
        l.buf(q).out(&qs).i32(row0i).i32(ni).i32(hi).i32(di);
        // SAFETY: q is [T, h*d] with row0 + n <= T; qs holds h*n*d floats.
        unsafe { l.launch(grid2(n, h, 128)) }.cuda()?;
        // Scores [H][n][ldp]: per KV head, [G n, sk] = qs [G n, d] · ks [sk, d]ᵀ.
        let scores = self.alloc_f32(h * n * ldp)?;
        // SAFETY: per KV head b < kvh: ks + b*keys*d holds sk <= keys rows of d floats, qs +
        // b*rows_g*d holds rows_g rows of d, scores + b*rows_g*ldp holds rows_g rows of ldp
        // floats (sk <= ldp); all inside their buffers.
        unsafe {
            self.gemm_strided_f32(
                true,
                (sk, rows_g, d, kvh),
                (ptr(ks), d, keys * d),
                (ptr(&qs), d, rows_g * d),
                (ptr(&scores), ldp, rows_g * ldp),
            )
        }?;
        let sums = self.alloc_f32(h * n)?;
        let mut l = self.launch("attention_gemm_softmax")?;
        l.out(&scores)
            .out(&sums)
            .i32(ni)
            .i32(i32_of(sk, "keys")?)
            .i32(i32_of(ldp, "keys")?)
            .i32(i32_of(pos0, "position")?)
            .f32(scale_log2);
        // SAFETY: scores is [h, n, ldp] f32 with its first sk columns written; sums holds h*n.
        unsafe { l.launch(grid2(n, h, 256)) }.cuda()?;
        // o [H][n][d]: per KV head, [G n, d] = p [G n, sk] · vs [sk, d].
        let o = qs;
        // SAFETY: per KV head b: vs + b*keys*d holds sk <= keys rows of d floats, scores +
        // b*rows_g*ldp holds rows_g rows of ldp (sk read), o + b*rows_g*d holds rows_g rows of d.
        unsafe {
            self.gemm_strided_f32(
                false,
                (d, rows_g, sk, kvh),
                (ptr(vs), d, keys * d),
                (ptr(&scores), ldp, rows_g * ldp),
                (ptr(&o), d, rows_g * d),
            )
        }?;
        let mut l = self.launch("attention_gemm_scatter")?;
        l.out(&o)
            .out(&sums)
            .out(out)
            .i32(row0i)
            .i32(ni)
            .i32(hi)
            .i32(di);
        // SAFETY: o is [h, n, d] and sums [h, n]; out is [T, h*d] with row0 + n <= T.
        unsafe { l.launch(grid2(n, h, 128)) }.cuda()
    }

    fn check_attention(&self, cfg: &AttentionConfig) -> Result<()> {
        let d = cfg.head_dim;
        if d == 0 || !d.is_multiple_of(2) || d > 256 {
            return Err(Error::invalid(
                "cuda attention",
                format!("head_dim {d} must be even and at most 256"),
            ));
        }
        if cfg.num_kv_heads == 0
            || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads)
            || cfg.group_size() > ATTN_MAX_GROUP
        {
            return Err(Error::invalid(
                "cuda attention",
                format!(
                    "{} query heads over {} kv heads: the group must divide evenly and be at most {ATTN_MAX_GROUP}",
                    cfg.num_heads, cfg.num_kv_heads
                ),
            ));
        }
        Ok(())
    }
}

impl Backend for CudaBackend {
    type Tensor = CudaTensor;
    type Batch = CudaBatch;
    type Graph = CudaGraphExec;
    type Event = cudarc::driver::CudaEvent;
    const NAME: &'static str = "cuda";

    fn upload(&self, host: &HostTensor) -> Result<CudaTensor> {
        let v: Vec<f32> = match host.data() {
            HostData::F32(v) => v.clone(),
            _ => host.to_f64_vec().into_iter().map(|x| x as f32).collect(),
        };
        let s = if v.is_empty() {
            self.stream().alloc_zeros::<f32>(1)
        } else {
            self.stream().clone_htod(&v)
        };
        Ok(Self::f32_tensor(
            host.shape().clone(),
            Pooled::unpooled(s.cuda()?),
        ))
    }

    fn upload_weight(&self, host: &HostTensor) -> Result<CudaTensor> {
        // Matrices stored in bf16 stay bf16; any wider storage (fp32 checkpoints, and f16, whose
        // values bf16 cannot all hold) is kept exactly in fp32.
        if host.shape().rank() != 2 || host.dtype() != DType::BF16 {
            return self.upload(host);
        }
        let bits: Vec<u16> = match host.to_dtype(DType::BF16).data() {
            HostData::BF16(v) => v.iter().map(|x| x.to_bits()).collect(),
            _ => return Err(Error::invalid("upload_weight", "bf16 conversion failed")),
        };
        let s = self.stream().clone_htod(&bits).cuda()?;
        Ok(CudaTensor {
            shape: host.shape().clone(),
            buf: Buf::Bf16(Arc::new(s)),
        })
    }

    fn download(&self, t: &CudaTensor) -> Result<HostTensor> {
        let n = t.shape.numel();
        match &t.buf {
            Buf::F32(s) => {
                let mut v = self.stream().clone_dtoh(s.slice()).cuda()?;
                v.truncate(n);
                HostTensor::new(t.shape.clone(), HostData::F32(v))
            }
            Buf::Bf16(s) => {
                let mut v = self.stream().clone_dtoh(s.as_ref()).cuda()?;
                v.truncate(n);
                HostTensor::new(
                    t.shape.clone(),
                    HostData::BF16(v.into_iter().map(bf16::from_bits).collect()),
                )
            }
        }
    }

    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<CudaTensor> {
        let n = shape.numel().max(1);
        Ok(match dtype {
            DType::BF16 | DType::F16 => CudaTensor {
                shape: shape.clone(),
                buf: Buf::Bf16(Arc::new(self.stream().alloc_zeros::<u16>(n).cuda()?)),
            },
            DType::F32 | DType::F64 => {
                let zeros = self.stream().alloc_zeros::<f32>(n).cuda()?;
                Self::f32_tensor(shape.clone(), Pooled::unpooled(zeros))
            }
        })
    }

    fn kv_dtype(&self) -> DType {
        self.inner.options.kv_dtype
    }

    fn prepare_batch(&self, info: &BatchInfo) -> Result<CudaBatch> {
        let capacity = info.capacity().max(info.max_context());
        let max_blocks = info
            .max_table_len()
            .max(capacity.div_ceil(info.block_size()))
            .max(1);
        // SAFETY: sample_greedy writes the rows it reports before read_sampled reads them.
        let sampled = unsafe { self.stream().alloc::<u32>(info.num_tokens().max(1)) }.cuda()?;
        Ok(CudaBatch {
            info: info.clone(),
            positions: self.upload_u32(info.positions())?,
            slots: self.upload_u32(info.slots())?,
            token_seq: self.upload_u32(info.token_seq())?,
            token_ids: self.upload_u32(info.token_ids())?,
            block_tables: self.upload_u32(&info.padded_block_tables(max_blocks))?,
            flash_desc: self.upload_u32(&flash_desc(info)?)?,
            sampled,
            sampled_rows: 0,
            reading: Mutex::new(SampledCopies::default()),
            max_blocks,
            capacity,
        })
    }

    fn update_batch(&self, batch: &mut CudaBatch, info: &BatchInfo) -> Result<bool> {
        let fits = info.num_tokens() == batch.info.num_tokens()
            && info.seqs().len() == batch.info.seqs().len()
            && info.block_size() == batch.info.block_size()
            && info.max_context() <= batch.capacity
            && info
                .seqs()
                .iter()
                .all(|s| s.block_table.len() <= batch.max_blocks);
        if !fits {
            return Ok(false);
        }
        let stream = self.stream();
        stream
            .memcpy_htod(info.positions(), &mut batch.positions)
            .cuda()?;
        stream.memcpy_htod(info.slots(), &mut batch.slots).cuda()?;
        stream
            .memcpy_htod(info.token_seq(), &mut batch.token_seq)
            .cuda()?;
        stream
            .memcpy_htod(info.token_ids(), &mut batch.token_ids)
            .cuda()?;
        stream
            .memcpy_htod(
                &info.padded_block_tables(batch.max_blocks),
                &mut batch.block_tables,
            )
            .cuda()?;
        stream
            .memcpy_htod(&flash_desc(info)?, &mut batch.flash_desc)
            .cuda()?;
        batch.info = info.clone();
        Ok(true)
    }

    fn advance_batch(&self, batch: &mut CudaBatch, info: &BatchInfo) -> Result<bool> {
        if !info.is_decode_step()
            || batch.sampled_rows != info.num_tokens()
            || !self.update_batch(batch, info)?
        {
            return Ok(false);
        }
        // After update_batch's copy of the placeholder ids, on the same stream.
        let CudaBatch {
            sampled, token_ids, ..
        } = batch;
        self.stream().memcpy_dtod(sampled, token_ids).cuda()?;
        Ok(true)
    }

    fn embed(&self, table: &CudaTensor, batch: &CudaBatch) -> Result<CudaTensor> {
        let (n, c) = table.matrix("embed")?;
        let t = batch.info.num_tokens();
        if let Some(&bad) = batch.info.token_ids().iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(
                "embed",
                format!("token id {bad} out of range 0..{n}"),
            ));
        }
        let out = self.alloc_f32(t * c)?;
        let mut l = self.launch(gather_entry(table))?;
        l.ptr(table.ptr(self.stream()))
            .buf(&batch.token_ids)
            .out(&out)
            .i32(i32_of(c, "cols")?)
            .i32(i32_of(n, "rows")?);
        // SAFETY: table is [n, c] and the kernel reads only rows of ids < n (the host's ids were
        // checked above; advance_batch's come from an argmax); out is [t, c].
        unsafe { l.launch(grid(t, 256)) }.cuda()?;
        Ok(Self::f32_tensor([t, c], out))
    }

    fn sample_greedy(&self, logits: &CudaTensor, batch: &mut CudaBatch) -> Result<()> {
        let (rows, v) = logits.matrix("sample_greedy")?;
        if rows > batch.info.num_tokens().max(1) || v == 0 {
            return Err(Error::invalid(
                "sample_greedy",
                format!("{rows} rows of {v} logits for this batch"),
            ));
        }
        self.argmax_into(logits, &mut batch.sampled)?;
        batch.sampled_rows = rows;
        Ok(())
    }

    fn start_read_sampled(&self, batch: &CudaBatch) -> Result<()> {
        let mut reading = batch
            .reading
            .lock()
            .map_err(|_| Error::invalid("start_read_sampled", "lock poisoned"))?;
        let mut copy = match reading.idle.pop() {
            Some(c) => c,
            None => {
                let ctx = &self.inner.ctx;
                // SAFETY: the slice is read only after a copy into it (below) completes.
                let host =
                    unsafe { ctx.alloc_pinned_with_flags::<u32>(batch.sampled.len(), 0) }.cuda()?;
                SampledCopy {
                    host,
                    copied: ctx.new_event(None).cuda()?,
                }
            }
        };
        let stream = self.stream();
        stream.memcpy_dtoh(&batch.sampled, &mut copy.host).cuda()?;
        copy.copied.record(stream).cuda()?;
        reading.in_flight.push_back(copy);
        Ok(())
    }

    fn read_sampled(&self, batch: &CudaBatch) -> Result<Vec<u32>> {
        let mut reading = batch
            .reading
            .lock()
            .map_err(|_| Error::invalid("read_sampled", "lock poisoned"))?;
        let mut ids = match reading.in_flight.pop_front() {
            Some(copy) => {
                copy.copied.synchronize().cuda()?;
                let ids = copy.host.as_slice().cuda()?.to_vec();
                reading.idle.push(copy);
                ids
            }
            None => self.stream().clone_dtoh(&batch.sampled).cuda()?,
        };
        ids.truncate(batch.sampled_rows);
        if let Some(r) = ids.iter().position(|&i| i == u32::MAX) {
            return Err(Error::invalid(
                "sample_greedy",
                format!("NaN logit in row {r}"),
            ));
        }
        Ok(ids)
    }

    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<CudaGraphExec>> {
        if !self.inner.options.graphs {
            return Ok(None);
        }
        // Run the step once eagerly (it is idempotent: the same cache entries and sampled ids get
        // written again by the replay) so the pool holds every buffer size it needs, and the
        // capture records kernels only, no memory operations.
        f()?;
        let stream = self.stream();
        let buffers = self.inner.pool.begin_capture();
        let began = stream
            .begin_capture(
                cudarc::driver::sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
            )
            .cuda();
        let recorded = began.and_then(|()| f());
        let graph = stream.end_capture(cudarc::driver::sys::CUgraphInstantiate_flags(0));
        self.inner.pool.end_capture();
        recorded?;
        let Some(graph) = graph.cuda()? else {
            return Ok(None);
        };
        graph.upload().cuda()?;
        Ok(Some(CudaGraphExec {
            graph,
            _buffers: buffers,
        }))
    }

    fn replay(&self, graph: &CudaGraphExec) -> Result<()> {
        graph.graph.launch().cuda()?;
        self.inner
            .replays
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn gather_rows(&self, table: &CudaTensor, ids: &[u32]) -> Result<CudaTensor> {
        let (n, c) = table.matrix("gather_rows")?;
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= n) {
            return Err(Error::invalid(
                "gather_rows",
                format!("id {bad} out of range 0..{n}"),
            ));
        }
        let out = self.alloc_f32(ids.len() * c)?;
        if ids.is_empty() {
            return Ok(Self::f32_tensor([0, c], out));
        }
        let dev_ids = self.upload_u32(ids)?;
        let mut l = self.launch(gather_entry(table))?;
        l.ptr(table.ptr(self.stream()))
            .buf(&dev_ids)
            .out(&out)
            .i32(i32_of(c, "cols")?)
            .i32(i32_of(n, "rows")?);
        // SAFETY: table is [n, c] with every id < n (checked above); out is [ids.len(), c].
        unsafe { l.launch(grid(ids.len(), 256)) }.cuda()?;
        Ok(Self::f32_tensor([ids.len(), c], out))
    }

    fn rms_norm(&self, x: &CudaTensor, w: &CudaTensor, eps: f64) -> Result<CudaTensor> {
        let (t, c) = x.matrix("rms_norm")?;
        let g = match w.shape.dims() {
            [g] if *g > 0 && c % *g == 0 => *g,
            _ => return Err(Error::shape("rms_norm", &x.shape, &w.shape)),
        };
        let y = self.alloc_f32(t * c)?;
        let threads = (g.div_ceil(32) * 32).min(256) as u32;
        let mut l = self.launch("rms_norm_f32")?;
        l.buf(x.f32("rms_norm")?)
            .buf(w.f32("rms_norm")?)
            .out(&y)
            .i32(i32_of(g, "G")?)
            .f32(eps as f32);
        // SAFETY: x and y are [t, c] with c % g == 0, so t*c/g blocks each own one group; w is [g].
        unsafe { l.launch(grid(t * c / g, threads)) }.cuda()?;
        Ok(Self::f32_tensor([t, c], y))
    }

    fn matmul(&self, x: &CudaTensor, w: &CudaTensor) -> Result<CudaTensor> {
        let (t, k) = x.matrix("matmul")?;
        let (n, k2) = w.matrix("matmul")?;
        if k != k2 {
            return Err(Error::shape("matmul", &x.shape, &w.shape));
        }
        let xs = x.f32("matmul")?;
        if w.dtype() == DType::BF16 && x.dtype() != DType::F32 {
            return Err(Error::UnsupportedDType {
                op: "matmul",
                dtype: x.dtype(),
            });
        }
        let y = match self.gemv_kernel("gemv", t) {
            Some(kernel) => self.launch_gemv(kernel, xs, w, None, None, t, k, n, 0.0)?,
            None => self.cublas_matmul(xs, w, t, k, n)?,
        };
        Ok(Self::f32_tensor([t, n], y))
    }

    fn add(&self, a: &CudaTensor, b2: &CudaTensor) -> Result<CudaTensor> {
        if a.shape != b2.shape {
            return Err(Error::shape("add", &a.shape, &b2.shape));
        }
        let n = a.shape.numel();
        let y = self.alloc_f32(n)?;
        let mut l = self.launch("add_f32")?;
        l.buf(a.f32("add")?).buf(b2.f32("add")?).out(&y).usize(n);
        // SAFETY: a, b and y all hold n elements; grid-stride loop.
        unsafe { l.launch(elementwise(n)) }.cuda()?;
        Ok(Self::f32_tensor(a.shape.clone(), y))
    }

    fn silu_mul(&self, gate_up: &CudaTensor) -> Result<CudaTensor> {
        let (t, c) = gate_up.matrix("silu_mul")?;
        if c % 2 != 0 {
            return Err(Error::invalid("silu_mul", format!("odd width {c}")));
        }
        let i = c / 2;
        let y = self.alloc_f32(t * i)?;
        let mut l = self.launch("silu_mul_f32")?;
        l.buf(gate_up.f32("silu_mul")?).out(&y).i32(i32_of(i, "I")?);
        // SAFETY: gate_up is [t, 2i], y is [t, i]; one block per row.
        unsafe { l.launch(grid(t, 256)) }.cuda()?;
        Ok(Self::f32_tensor([t, i], y))
    }

    fn slice_columns(&self, x: &CudaTensor, start: usize, len: usize) -> Result<CudaTensor> {
        let (t, c) = x.matrix("slice_columns")?;
        if start + len > c {
            return Err(Error::invalid(
                "slice_columns",
                format!("columns {start}..{} out of range 0..{c}", start + len),
            ));
        }
        let y = self.alloc_f32(t * len)?;
        let mut l = self.launch("slice_columns_f32")?;
        l.buf(x.f32("slice_columns")?)
            .out(&y)
            .i32(i32_of(c, "C")?)
            .i32(i32_of(start, "start")?)
            .i32(i32_of(len, "len")?);
        // SAFETY: x is [t, c], y is [t, len], start + len <= c; one block per row.
        unsafe { l.launch(grid(t, 256)) }.cuda()?;
        Ok(Self::f32_tensor([t, len], y))
    }

    fn rope(&self, x: &CudaTensor, batch: &CudaBatch, cfg: &AttentionConfig) -> Result<CudaTensor> {
        let (t, c) = x.matrix("rope")?;
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
        let y = self.alloc_f32(t * c)?;
        let mut l = self.launch("rope_f32")?;
        l.buf(x.f32("rope")?)
            .buf(&batch.positions)
            .out(&y)
            .i32(i32_of(c, "C")?)
            .i32(i32_of(d, "d")?)
            .f64(cfg.rope_theta.log2());
        let launch = LaunchConfig {
            shared_mem_bytes: (d * 4) as u32,
            ..grid(t, 128)
        };
        // SAFETY: x and y are [t, c] with c % d == 0, positions holds t entries; one block per row
        // with d floats of shared memory for the RoPE table.
        unsafe { l.launch(launch) }.cuda()?;
        Ok(Self::f32_tensor([t, c], y))
    }

    fn write_kv(
        &self,
        cache: &mut LayerKv<Self::Tensor>,
        k: &CudaTensor,
        v: &CudaTensor,
        batch: &CudaBatch,
    ) -> Result<()> {
        let (t, w) = k.matrix("write_kv")?;
        if v.shape != k.shape || t != batch.info.num_tokens() {
            return Err(Error::shape("write_kv", &k.shape, &v.shape));
        }
        let slots = cache.k.shape.cache_slots(w, "write_kv")?;
        batch.info.check_slots_within(slots, "write_kv")?;
        let (ks, vs) = (k.f32("write_kv")?, v.f32("write_kv")?);
        let LayerKv { k: kpool, v: vpool } = cache;
        let stream = self.stream();
        let mut l = self.launch(&format!("write_kv_{}", kpool.kv_suffix()))?;
        l.buf(ks).buf(vs).buf(&batch.slots);
        l.ptr(kpool.ptr_mut(stream, "write_kv")?)
            .ptr(vpool.ptr_mut(stream, "write_kv")?)
            .i32(i32_of(w, "W")?);
        // SAFETY: k, v are [t, w]; every slot < slots (checked) and pools are [slots, w] of the
        // element type the entry point's suffix names.
        unsafe { l.launch(grid(t, 256)) }.cuda()?;
        Ok(())
    }

    fn attention(
        &self,
        q: &CudaTensor,
        cache: &LayerKv<Self::Tensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
    ) -> Result<CudaTensor> {
        self.check_attention(cfg)?;
        let (t, c) = q.matrix("attention")?;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if c != h * d || t != batch.info.num_tokens() {
            return Err(Error::invalid(
                "attention",
                format!(
                    "q {} for {h} heads of {d} and {} tokens",
                    q.shape,
                    batch.info.num_tokens()
                ),
            ));
        }
        let slots = cache.k.shape.cache_slots(kvh * d, "attention")?;
        batch.info.check_blocks_within(slots, "attention")?;
        if cache.k.dtype() != cache.v.dtype() {
            return Err(Error::invalid(
                "attention",
                "key and value pools differ in dtype",
            ));
        }
        // Decode steps (every sequence one token): the coalesced 8-keys-a-warp kernel, from batch
        // 1 up. Measured on the H200 (docs/perf.md): batch 64 5.0 → 3.97 ms/step, batch 1 1.016
        // → 0.93 against the split-K kernel. Prompt chunks of 64+ tokens take the GEMMs, shorter
        // ones the split-K kernel.
        let decode_batch = batch.info.is_decode_step();
        let many = t >= self.inner.many_from && decode_batch && d.is_multiple_of(4) && d <= 128;
        let gemm_min = self.inner.options.attention_gemm_min_rows.max(1);
        if !many && t > GEMV_MAX_ROWS && batch.info.seqs().iter().all(|s| s.len >= gemm_min) {
            if let Some((kind, dp)) = flash_choice(&self.inner.flash, d) {
                return self.attention_flash(q, cache, batch, cfg, kind, dp);
            }
            return self.attention_gemm(q, cache, batch, cfg);
        }
        let kv = (cache.k.ptr(self.stream()), cache.v.ptr(self.stream()));
        self.launch_attention(q, kv, cache.k.kv_suffix(), batch, cfg, many, None)
    }

    fn argmax(&self, logits: &CudaTensor) -> Result<Vec<u32>> {
        let (t, v) = logits.matrix("argmax")?;
        if v == 0 {
            return Err(Error::invalid("argmax", "zero columns"));
        }
        // SAFETY: argmax_into writes one id per row.
        let mut ids = unsafe { self.stream().alloc::<u32>(t.max(1)) }.cuda()?;
        self.argmax_into(logits, &mut ids)?;
        let mut host = self.stream().clone_dtoh(&ids).cuda()?;
        host.truncate(t);
        if let Some(r) = host.iter().position(|&i| i == u32::MAX) {
            return Err(Error::invalid("argmax", format!("NaN logit in row {r}")));
        }
        Ok(host)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream().synchronize().cuda()
    }

    fn record_event(&self) -> Result<cudarc::driver::CudaEvent> {
        self.stream()
            .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
            .cuda()
    }

    fn elapsed_s(
        &self,
        start: &cudarc::driver::CudaEvent,
        end: &cudarc::driver::CudaEvent,
    ) -> Result<f64> {
        end.synchronize().cuda()?;
        Ok(f64::from(start.elapsed_ms(end).cuda()?) / 1e3)
    }

    fn rms_norm_matmul(
        &self,
        x: &CudaTensor,
        norm_w: &CudaTensor,
        w: &CudaTensor,
        eps: f64,
    ) -> Result<CudaTensor> {
        let parts = self.inner.options.prompt_parts.count();
        self.norm_product(x, norm_w, w, eps, "rms_norm_matmul", parts)
    }

    /// Two bf16 parts wherever the activations are split apart from the product (9 rows or
    /// more with the vocabulary's width, past `gemm_x3`): the logits' activations to ~2^-17 for
    /// two thirds of the tensor-core work.
    fn rms_norm_logits(
        &self,
        x: &CudaTensor,
        norm_w: &CudaTensor,
        lm_head: &CudaTensor,
        eps: f64,
    ) -> Result<CudaTensor> {
        self.norm_product(x, norm_w, lm_head, eps, "rms_norm_logits", 2)
    }

    fn rms_norm_matmul_silu_mul(
        &self,
        x: &CudaTensor,
        norm_w: &CudaTensor,
        w_gate_up: &CudaTensor,
        eps: f64,
    ) -> Result<CudaTensor> {
        let (t, k) = x.matrix("rms_norm_matmul_silu_mul")?;
        let (n2, k2) = w_gate_up.matrix("rms_norm_matmul_silu_mul")?;
        match self.gemv_kernel("rms_norm_gemv_silu_mul", t) {
            Some(kernel) if k == k2 && n2.is_multiple_of(2) && norm_w.shape.dims() == [k] => {
                let gain = norm_w.f32("rms_norm_matmul_silu_mul")?;
                let xs = x.f32("rms_norm_matmul_silu_mul")?;
                let y =
                    self.launch_gemv(kernel, xs, w_gate_up, Some(gain), None, t, k, n2 / 2, eps)?;
                Ok(Self::f32_tensor([t, n2 / 2], y))
            }
            None if k == k2
                && n2.is_multiple_of(2)
                && norm_w.shape.dims() == [k]
                && matches!(w_gate_up.buf, Buf::Bf16(_)) =>
            {
                let prologue = Prologue::Norm {
                    x: x.f32("rms_norm_matmul_silu_mul")?,
                    gain: norm_w.f32("rms_norm_matmul_silu_mul")?,
                    eps,
                };
                let w = w_gate_up.bf16()?;
                let y = self.cublas_bf16(prologue, w, (t, k, n2), Epilogue::SiluMul)?;
                Ok(Self::f32_tensor([t, n2 / 2], y))
            }
            _ => compose::rms_norm_matmul_silu_mul(self, x, norm_w, w_gate_up, eps),
        }
    }

    fn qk_norm_rope_write_kv(
        &self,
        qkv: &CudaTensor,
        q_norm: &CudaTensor,
        k_norm: &CudaTensor,
        cache: &mut LayerKv<Self::Tensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
    ) -> Result<CudaTensor> {
        self.check_attention(cfg)?;
        let (t, width) = qkv.matrix("qk_norm_rope_write_kv")?;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if !cfg.fits_prologue(width, &q_norm.shape, &k_norm.shape) || t != batch.info.num_tokens() {
            return Err(Error::invalid(
                "qk_norm_rope_write_kv",
                format!("qkv {} for {h}+2x{kvh} heads of {d}", qkv.shape),
            ));
        }
        let slots = cache
            .k
            .shape
            .cache_slots(kvh * d, "qk_norm_rope_write_kv")?;
        batch
            .info
            .check_slots_within(slots, "qk_norm_rope_write_kv")?;
        let q = self.alloc_f32(t * h * d)?;
        let (hi, kvi, di, eps) = (
            i32_of(h, "H")?,
            i32_of(kvh, "KV")?,
            i32_of(d, "d")?,
            cfg.qk_norm_eps as f32,
        );
        let LayerKv { k: kpool, v: vpool } = cache;
        let stream = self.stream();
        let op = "qk_norm_rope_write_kv";
        // Prompts with Qwen3's head size take the block-per-token build (the RoPE factors formed
        // once per token; the head size fixed at compile time).
        let rows = t > QK_NORM_PER_HEAD_MAX_ROWS && d == 128;
        let entry = if rows {
            "qk_norm_rope_write_kv_rows_d128"
        } else {
            op
        };
        let mut l = self.launch(&format!("{entry}_{}", kpool.kv_suffix()))?;
        l.buf(qkv.f32(op)?)
            .buf(q_norm.f32(op)?)
            .buf(k_norm.f32(op)?);
        l.buf(&batch.positions).buf(&batch.slots).out(&q);
        l.ptr(kpool.ptr_mut(stream, op)?)
            .ptr(vpool.ptr_mut(stream, op)?);
        l.i32(hi).i32(kvi);
        if !rows {
            l.i32(di);
        }
        l.f64(cfg.rope_theta.log2()).f32(eps);
        let launch = if rows {
            // A block per token (`QKN_ROWS_WARPS` warps).
            grid(t, 32 * QKN_ROWS_WARPS)
        } else {
            l.i32(i32_of(t, "T")?);
            // A warp per (token, head), four to a block: one-warp blocks capped a 2,048-token
            // prompt at 32 warps an SM (85 µs a layer on the H200, for ~65 MB of traffic).
            const WARPS: usize = 4;
            grid((t * (h + 2 * kvh)).div_ceil(WARPS), 32 * WARPS as u32)
        };
        // SAFETY: qkv is [t, (h+2kvh)d], q is [t, hd], norms are [d] with d <= 256 (checked),
        // every slot < slots (checked); one warp per (token, head), warps past the last exit,
        // or (rows) one block per token whose warps take its heads in turn.
        unsafe { l.launch(launch) }.cuda()?;
        Ok(Self::f32_tensor([t, h * d], q))
    }

    fn qk_norm_rope_attention(
        &self,
        qkv: &CudaTensor,
        q_norm: &CudaTensor,
        k_norm: &CudaTensor,
        cache: &mut LayerKv<Self::Tensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
    ) -> Result<CudaTensor> {
        // Batched decode steps in the decode kernel, which then forms q and the new keys itself
        // (one launch a layer fewer; `fused_attention_from` says why not at batch 1); anything
        // else as the two ops.
        let op = "qk_norm_rope_attention";
        let (t, width) = qkv.matrix(op)?;
        let (kvh, d) = (cfg.num_kv_heads, cfg.head_dim);
        let fusable = self.check_attention(cfg).is_ok()
            && cfg.fits_prologue(width, &q_norm.shape, &k_norm.shape)
            && t == batch.info.num_tokens()
            && t >= self.inner.many_from.max(self.inner.fused_attention_from)
            && batch.info.is_decode_step()
            && d.is_multiple_of(8)
            && d <= 128
            && cache.k.dtype() == cache.v.dtype();
        if !fusable {
            return compose::qk_norm_rope_attention(self, qkv, q_norm, k_norm, cache, batch, cfg);
        }
        let slots = cache.k.shape.cache_slots(kvh * d, op)?;
        batch.info.check_slots_within(slots, op)?;
        batch.info.check_blocks_within(slots, op)?;
        let suffix = cache.k.kv_suffix();
        let stream = self.stream();
        let kv = (cache.k.ptr_mut(stream, op)?, cache.v.ptr_mut(stream, op)?);
        self.launch_attention(qkv, kv, suffix, batch, cfg, true, Some((q_norm, k_norm)))
    }

    fn fuses_decoder_layer(&self) -> bool {
        self.inner.layer_smem_max > 0
    }

    fn decoder_layer(
        &self,
        x: &CudaTensor,
        w: &LayerWeights<'_, CudaTensor>,
        cache: &mut LayerKv<CudaTensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
        eps: f64,
    ) -> Result<CudaTensor> {
        // A batch-1 decode step as one kernel where asked for (layer.rs); else the fused ops,
        // with a prompt's MLP in three kernels where it can (`prompt_mlp`).
        if let Some(out) = self.decoder_layer_kernel(x, w, cache, batch, cfg, eps)? {
            return Ok(out);
        }
        let h = compose::attention_block(self, x, w, cache, batch, cfg, eps)?;
        match self.prompt_mlp(&h, w, eps)? {
            Some(out) => Ok(out),
            None => compose::mlp_block(self, &h, w, eps),
        }
    }

    fn matmul_add(
        &self,
        x: &CudaTensor,
        w: &CudaTensor,
        residual: &CudaTensor,
    ) -> Result<CudaTensor> {
        let (t, k) = x.matrix("matmul_add")?;
        let (n, k2) = w.matrix("matmul_add")?;
        match self.gemv_kernel("gemv_add", t) {
            Some(kernel) if k == k2 && residual.shape.dims() == [t, n] => {
                let y = self.launch_gemv(
                    kernel,
                    x.f32("matmul_add")?,
                    w,
                    None,
                    Some(residual.f32("matmul_add")?),
                    t,
                    k,
                    n,
                    0.0,
                )?;
                Ok(Self::f32_tensor([t, n], y))
            }
            None if k == k2 && residual.shape.dims() == [t, n] && matches!(w.buf, Buf::Bf16(_)) => {
                let x = Prologue::Rows(x.f32("matmul_add")?);
                let epilogue = Epilogue::Add(residual.f32("matmul_add")?);
                let y = self.cublas_bf16(x, w.bf16()?, (t, k, n), epilogue)?;
                Ok(Self::f32_tensor([t, n], y))
            }
            _ => compose::matmul_add(self, x, w, residual),
        }
    }

    fn matmul_silu_mul(&self, x: &CudaTensor, w_gate_up: &CudaTensor) -> Result<CudaTensor> {
        let (t, k) = x.matrix("matmul_silu_mul")?;
        let (n2, k2) = w_gate_up.matrix("matmul_silu_mul")?;
        match self.gemv_kernel("gemv_silu_mul", t) {
            Some(kernel) if k == k2 && n2 % 2 == 0 => {
                let y = self.launch_gemv(
                    kernel,
                    x.f32("matmul_silu_mul")?,
                    w_gate_up,
                    None,
                    None,
                    t,
                    k,
                    n2 / 2,
                    0.0,
                )?;
                Ok(Self::f32_tensor([t, n2 / 2], y))
            }
            None if k == k2 && n2 % 2 == 0 && matches!(w_gate_up.buf, Buf::Bf16(_)) => {
                let x = Prologue::Rows(x.f32("matmul_silu_mul")?);
                let w = w_gate_up.bf16()?;
                let y = self.cublas_bf16(x, w, (t, k, n2), Epilogue::SiluMul)?;
                Ok(Self::f32_tensor([t, n2 / 2], y))
            }
            _ => compose::matmul_silu_mul(self, x, w_gate_up),
        }
    }
}

/// The GEMV entry point `{base}_{weight dtype}_{vec|any}_t{1|8}`: `vec` reads 8 weights per
/// load and needs `k % 8 == 0`; `t1` is compiled for a single row (fewer registers).
fn gemv_entry(base: &str, w_dtype: DType, k: usize, t: usize) -> String {
    let layout = if k.is_multiple_of(8) { "vec" } else { "any" };
    let dtype = if w_dtype == DType::BF16 {
        "bf16"
    } else {
        "f32"
    };
    format!("{base}_{dtype}_{layout}_t{}", if t == 1 { 1 } else { 8 })
}

/// Warps sharing one output column (split-K): the most that still fit one wave of ~32 warps per
/// SM (so narrow outputs keep enough loads in flight without a second, tail wave), each warp's
/// K-chunk whole 8-element loads.
fn gemv_split(out_cols: usize, k: usize, sm_count: usize) -> usize {
    let capacity = 32 * sm_count;
    let mut s = 1;
    if k.is_multiple_of(8) {
        while s < 8 && out_cols * s * 2 <= capacity && k.is_multiple_of(s * 16) {
            s *= 2;
        }
    }
    s
}

/// Warps per SM the decode GEMV plans aim for: 16, or `QFUSE_CUDA_GEMV_WARPS_PER_SM` (1..=64), a
/// tuning knob for the trade between loads in flight per kernel and room on each SM for the next
/// kernel's blocks to start early (PDL).
fn gemv_warps_per_sm() -> usize {
    qfuse_core::knobs::env_knob("QFUSE_CUDA_GEMV_WARPS_PER_SM", 1..=64).unwrap_or(16)
}

/// How an attention launch cuts each token's context: `splits` blocks of `chunk` keys (a
/// multiple of 32, whole 8-key groups for each of the decode kernel's warps).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ContextSplit {
    chunk: usize,
    splits: usize,
}

/// Most splits of a decode context (`ATTN_MAX_SPLITS` in `kernels/attention.cu`, whose cluster
/// combine holds one register per split).
const DECODE_MAX_SPLITS: usize = 16;

/// The most splits the decode attention kernels may launch as one cluster: 16 where each entry
/// point is allowed that non-portable size (H100/H200), else the portable 8.
fn decode_attention_clusters(kernels: &Kernels) -> Result<usize> {
    let mut most = DECODE_MAX_SPLITS;
    for (_, _, names) in kernels::SOURCES {
        for name in names.iter().filter(|n| n.starts_with("attention_many")) {
            let allowed = kernels.get(name).cuda()?.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            );
            if allowed.is_err() {
                most = 8;
            }
        }
    }
    Ok(most)
}

impl ContextSplit {
    fn with_splits(max_ctx: usize, want: usize) -> Self {
        let chunk = max_ctx.div_ceil(want.max(1)).next_multiple_of(32);
        ContextSplit {
            chunk,
            splits: max_ctx.div_ceil(chunk),
        }
    }

    /// The decode kernel (`attention_many`) splits only as far as one wave of resident blocks
    /// holds (`wave` blocks, rounding down): measured on the H200 at batch 64 (docs/perf.md),
    /// every split past that lost (3.97 ms/step unsplit, 4.18 at 2 splits, 4.91 at 9), while
    /// few long sequences need splits to fill the GPU. At most [`DECODE_MAX_SPLITS`]: the
    /// largest cluster on sm_90, where a context's splits combine as one; elsewhere the last
    /// block's combine walks every split's partials in turn (batch 1 at 2,052 keys: 65 splits
    /// 2.46 ms/step, where the split-K kernel's 33 took 2.03).
    /// Each split takes at least `min_chunk` keys.
    fn decode(max_ctx: usize, blocks: usize, wave: usize, min_chunk: usize) -> Self {
        let want = (wave / blocks.max(1)).clamp(1, DECODE_MAX_SPLITS);
        Self::with_splits(max_ctx, want.min(max_ctx.div_ceil(min_chunk.max(1))))
    }

    /// The split-K kernel aims at two waves of blocks over the SMs (rounding up).
    fn split_k(max_ctx: usize, blocks: usize, sm_count: usize) -> Self {
        Self::with_splits(max_ctx, (2 * sm_count).div_ceil(blocks.max(1)))
    }
}

/// How `gemv_t1` (the decode bf16 GEMV in `kernels/gemv.cu`, built for 1 and for 2–8 rows)
/// covers one matrix: each warp owns
/// `rows` output columns over a K-slice of `kc` 16-byte loads per lane per weight row, `split`
/// warps sharing a column; `kcm` is the entry point's compile-time bound on `kc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct GemvT1Plan {
    rows: usize,
    kcm: usize,
    split: usize,
    kc: usize,
}

impl GemvT1Plan {
    /// The builds compiled: (rows, kcm), each warp holding at most 16 loads (64 registers).
    const PLAIN: [(usize, usize); 6] = [(4, 4), (2, 4), (2, 8), (1, 4), (1, 8), (1, 16)];
    const SILU: [(usize, usize); 3] = [(2, 4), (1, 4), (1, 8)];

    /// The first (fewest splits, then most rows a warp) with at least `target` warps (by default
    /// 8 per SM), so every load of the matrix is in flight at once in about one wave; else the
    /// one with most warps. Of the builds for those rows, the one with the fewest loads that
    /// still holds the slice when `tight` (ptxas sizes registers by the build's bound, and the
    /// registers decide how many blocks share an SM), else the most (batch 1's choice). `None`
    /// when K is not whole 256-element slices (the general kernels take it).
    fn choose(
        k: usize,
        n: usize,
        silu: bool,
        target: usize,
        block_warps: usize,
        tight: bool,
    ) -> Option<Self> {
        if k == 0 || !k.is_multiple_of(256) || n == 0 {
            return None;
        }
        let slices = k / 256;
        let builds: &[(usize, usize)] = if silu { &Self::SILU } else { &Self::PLAIN };
        let mut best: Option<(usize, Self)> = None;
        for split in [1, 2, 4, 8] {
            if !slices.is_multiple_of(split) || !block_warps.is_multiple_of(split) {
                continue;
            }
            let kc = slices / split;
            for rows in [4, 2, 1] {
                let holding = builds
                    .iter()
                    .filter(|&&(r, kcm)| r == rows && kc <= kcm)
                    .map(|&(_, kcm)| kcm);
                let Some(kcm) = (if tight { holding.min() } else { holding.max() }) else {
                    continue;
                };
                let plan = GemvT1Plan {
                    rows,
                    kcm,
                    split,
                    kc,
                };
                let warps = n.div_ceil(rows) * split;
                if warps >= target {
                    return Some(plan);
                }
                if best.is_none_or(|(w, _)| warps > w) {
                    best = Some((warps, plan));
                }
            }
        }
        best.map(|(_, p)| p)
    }

    /// Output columns one block of `block_warps` warps covers.
    fn cols_per_block(&self, block_warps: usize) -> usize {
        block_warps / self.split * self.rows
    }

    /// The build for `t` rows: `t1` (batch 1) or `t8` (2–8 rows).
    fn entry(&self, base: &str, t: usize) -> String {
        let mt = if t == 1 { 1 } else { 8 };
        format!("{base}_t{mt}_r{}_k{}", self.rows, self.kcm)
    }
}

/// The attention entry point compiled for at least `group` query heads per KV head and head
/// size `d` (in powers of two: group <= 8, d <= 256, checked by `check_attention`), with 8 keys
/// per warp in flight for decode-sized `t`, 2 for prefill.
fn attention_entry(kv_suffix: &str, group: usize, d: usize, t: usize) -> String {
    let g = group.next_power_of_two();
    let dpl = d.div_ceil(32).next_power_of_two();
    let kb = if t <= GEMV_MAX_ROWS { 8 } else { 2 };
    format!("attention_paged_{kv_suffix}_g{g}_d{dpl}_k{kb}")
}

/// The row-gather entry point for a table's element type.
fn gather_entry(table: &CudaTensor) -> &'static str {
    match table.buf {
        Buf::Bf16(_) => "gather_rows_bf16",
        Buf::F32(_) => "gather_rows_f32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flash::{flash_gather_entry, flash_gather_v_entry};

    fn known(name: &str) -> bool {
        kernels::SOURCES
            .iter()
            .chain(kernels::SM90A_SOURCES)
            .any(|(_, _, names)| names.contains(&name))
    }

    /// The splits' cap is what the kernel's cluster combine holds, and the cap is kept.
    #[test]
    fn decode_splits_fit_the_cluster_combine() {
        let attention = include_str!("../../../kernels/attention.cu");
        assert_eq!(
            crate::kernels::define(attention, "ATTN_MAX_SPLITS"),
            DECODE_MAX_SPLITS
        );
        for ctx in [1, 33, 288, 2_112, 40_000] {
            for blocks in [1, 8, 64 * 8] {
                let s = ContextSplit::decode(ctx, blocks, 4 * 132, 32);
                assert!(
                    (1..=DECODE_MAX_SPLITS).contains(&s.splits),
                    "{ctx} {blocks}"
                );
                assert!(s.splits * s.chunk >= ctx);
            }
        }
    }

    /// The block-per-token q/k-norm launch has the block the kernel is written for.
    #[test]
    fn qk_norm_rows_block_matches_kernel() {
        let attention = include_str!("../../../kernels/attention.cu");
        assert_eq!(
            crate::kernels::define(attention, "QKN_ROWS_WARPS"),
            QKN_ROWS_WARPS as usize
        );
    }

    /// `kernels/gemm_wgmma.cu`'s tile, thread and shared-memory constants are the launches' (and
    /// fit the 227 KiB sm_90 allows a block); the blocks cover the output columns exactly, and
    /// shapes that do not fit go to cuBLAS.
    #[test]
    fn wgmma_constants_and_blocks() {
        let src = include_str!("../../../kernels/gemm_wgmma.cu");
        let define = |name: &str| crate::kernels::define(src, name);
        assert_eq!(define("WG_BM"), WGMMA_ROWS);
        assert_eq!(define("WG_BN"), WGMMA_COLS);
        assert_eq!(define("WG_THREADS"), WGMMA_THREADS as usize);
        assert_eq!(define("WG_SMEM"), WGMMA_SMEM);
        const { assert!(WGMMA_SMEM <= 232_448) };
        // 0.6B: QKV, o_proj, gate/up, down.
        assert_eq!(wgmma_col_blocks(2048, 1024, 4096, false), Some(32));
        assert_eq!(wgmma_col_blocks(2048, 2048, 1024, false), Some(8));
        assert_eq!(wgmma_col_blocks(300, 1024, 6144, true), Some(48));
        assert_eq!(wgmma_col_blocks(65, 3072, 1024, false), Some(8));
        assert_eq!(wgmma_col_blocks(2048, 1000, 4096, false), None);
        assert_eq!(wgmma_col_blocks(2048, 1024, 200, false), None);
        assert_eq!(wgmma_col_blocks(2048, 1024, 192, true), None);
        assert_eq!(wgmma_col_blocks(2048, 1024, 129, true), None);
        assert_eq!(wgmma_col_blocks(0, 1024, 4096, false), None);
        for n in [128, 256, 384, 1024, 4096, 6144, 24576] {
            for silu in [false, true] {
                if let Some(blocks) = wgmma_col_blocks(100, 1024, n, silu) {
                    let per_block = if silu { WGMMA_COLS / 2 } else { WGMMA_COLS };
                    assert_eq!(blocks * per_block, if silu { n / 2 } else { n });
                }
            }
        }
        for count in [2, 3] {
            for suffix in ["", "_add", "_silu_mul", "_silu_mul_parts"] {
                let name = format!("wgmma_x{count}{suffix}");
                assert!(known(&name), "{name}");
            }
        }
    }

    /// Every kernel name the backend can ask for exists (checked without a GPU: a typo here
    /// would otherwise surface only on the device).
    const GEMV_BASES: [&str; 5] = [
        "gemv",
        "gemv_add",
        "gemv_silu_mul",
        "rms_norm_gemv",
        "rms_norm_gemv_silu_mul",
    ];

    #[test]
    fn gemv_t1_plans_cover_the_matrix_in_whole_slices() {
        for (silu, tight) in [(false, true), (true, true), (false, false), (true, false)] {
            for k in [256, 1024, 2048, 2560, 3072, 4096, 6144, 9728, 12288] {
                for n in [1, 7, 1024, 3072, 4096, 151_936] {
                    for (sms, block_warps) in [1, 78, 132].into_iter().zip([8, 4, 2]) {
                        let Some(p) = GemvT1Plan::choose(k, n, silu, 8 * sms, block_warps, tight)
                        else {
                            // None only where K is not whole slices, or no split a block
                            // allows leaves a slice its compiled loads.
                            let most = if silu { 8 } else { 16 };
                            let fits = (k % 256 == 0)
                                && [1, 2, 4, 8].iter().any(|&s| {
                                    block_warps % s == 0
                                        && (k / 256) % s == 0
                                        && k / 256 / s <= most
                                });
                            assert!(!fits, "no plan for k={k} n={n} block {block_warps}");
                            continue;
                        };
                        assert_eq!(p.kc * 256 * p.split, k, "{p:?} k={k}");
                        assert!(p.kc <= p.kcm && block_warps % p.split == 0, "{p:?}");
                        assert!(p.cols_per_block(block_warps) >= 1, "{p:?}");
                        let builds: &[(usize, usize)] = if silu {
                            &GemvT1Plan::SILU
                        } else {
                            &GemvT1Plan::PLAIN
                        };
                        assert!(builds.contains(&(p.rows, p.kcm)), "{p:?}");
                        // Tight or wide, the same cover; only the registers' bound differs, and
                        // the tight one is the least that holds the slice.
                        let other = GemvT1Plan::choose(k, n, silu, 8 * sms, block_warps, !tight);
                        let other = other.expect("a plan either way");
                        assert_eq!((p.rows, p.split, p.kc), (other.rows, other.split, other.kc));
                        let holding = builds
                            .iter()
                            .filter(|&&(r, m)| r == p.rows && p.kc <= m)
                            .map(|&(_, m)| m);
                        let want = if tight { holding.min() } else { holding.max() };
                        assert_eq!(Some(p.kcm), want, "{p:?} tight {tight}");
                    }
                }
            }
        }
        // Qwen3-0.6B on 132 SMs: the QKV projection takes 2 columns a warp in one K-slice, the
        // down projection splits its 3,072-long rows in two.
        let qkv = GemvT1Plan::choose(1024, 4096, false, 8 * 132, 8, true).unwrap();
        assert_eq!((qkv.rows, qkv.split, qkv.kc, qkv.kcm), (2, 1, 4, 4));
        let down = GemvT1Plan::choose(3072, 1024, false, 8 * 132, 8, true).unwrap();
        assert_eq!((down.rows, down.split, down.kc, down.kcm), (1, 2, 6, 8));
        let o_proj = GemvT1Plan::choose(2048, 1024, false, 8 * 132, 8, true).unwrap();
        assert_eq!(
            (o_proj.rows, o_proj.split, o_proj.kc, o_proj.kcm),
            (1, 2, 4, 4)
        );
        let wide = GemvT1Plan::choose(2048, 1024, false, 8 * 132, 8, false).unwrap();
        assert_eq!(wide.kcm, 16);
        assert_eq!(
            GemvT1Plan::choose(1000, 4096, false, 8 * 132, 8, true),
            None
        );
    }

    /// The context splits the H200 measurements chose (132 SMs, 4 decode blocks an SM).
    #[test]
    fn context_splits_follow_the_measured_rules() {
        let wave = 4 * 132;
        // Batch 64 x 8 KV heads already fills a wave: no split.
        assert_eq!(
            ContextSplit::decode(576, 64 * 8, wave, 32),
            ContextSplit {
                chunk: 576,
                splits: 1
            }
        );
        // Batch 1 at 288 keys: 16 splits wanted (the cap), chunks of the 32-key minimum.
        assert_eq!(
            ContextSplit::decode(288, 8, wave, 32),
            ContextSplit {
                chunk: 32,
                splits: 9
            }
        );
        // Batch 1 at 2,052 keys: capped at 16 wanted, 160-key chunks.
        assert_eq!(
            ContextSplit::decode(2052, 8, wave, 32),
            ContextSplit {
                chunk: 160,
                splits: 13
            }
        );
        // Splitting switched off (knob 0): one chunk of the whole context.
        assert_eq!(ContextSplit::decode(100, 8, 0, 32).splits, 1);
        // Split-K: two waves over the SMs, rounding up.
        assert_eq!(
            ContextSplit::split_k(2048, 2048 * 8, 132),
            ContextSplit {
                chunk: 2048,
                splits: 1
            }
        );
        assert_eq!(ContextSplit::split_k(288, 8, 132).splits, 9);
        for ctx in [1, 31, 32, 33, 1000, 40_000] {
            for split in [
                ContextSplit::decode(ctx, 3, wave, 32),
                ContextSplit::split_k(ctx, 3, 132),
            ] {
                assert!(split.chunk % 32 == 0 && split.chunk * split.splits >= ctx);
                assert!(
                    split.chunk * (split.splits - 1) < ctx,
                    "{ctx}: an empty split"
                );
            }
        }
    }

    /// The PDL contract (launch.rs): every kernel waits for the previous one before it reads
    /// its output. A kernel without a wait could read stale data when launched early.
    #[test]
    fn every_kernel_waits_for_its_predecessor() {
        for (file, src, _) in kernels::SOURCES.iter().chain(kernels::SM90A_SOURCES) {
            for piece in src.split("extern \"C\" __global__").skip(1) {
                let body_start = piece.find('{').unwrap();
                let name = piece[..body_start]
                    .split('(')
                    .next()
                    .unwrap()
                    .trim()
                    .to_string();
                let body = &piece[body_start..];
                let calls_template = body.lines().take(4).any(|l| {
                    l.contains("gemv<")
                        || l.contains("gemv_t1<")
                        || l.contains("attention_paged<")
                        || l.contains("attention_many<")
                        || l.contains("attention_many_w16<")
                        || l.contains("write_kv<")
                        || l.contains("qk_norm_rope_write_kv<")
                        || l.contains("qk_norm_rope_write_kv_rows<")
                        || l.contains("rms_norm_split<")
                        || l.contains("attention_gemm_gather_kv<")
                        || l.contains("decoder_layer_t1<")
                        || l.contains("gemm_x3<")
                        || l.contains("flash_gather_kv<")
                        || l.contains("flash_prefill<")
                        || l.contains("flash_tc_gather_kv<")
                        || l.contains("flash_tc_prefill<")
                        || l.contains("gemm_wgmma<")
                        || l.contains("flash_hh_gather_v<")
                        || l.contains("flash_wg_gather<")
                        || l.contains("flash_wg_prefill(")
                });
                assert!(
                    body.lines().take(4).any(|l| l.contains("pdl_begin()")) || calls_template,
                    "{file}: {name} neither waits nor calls a template kernel"
                );
            }
        }
        let attention = include_str!("../../../kernels/attention.cu");
        let gemv = include_str!("../../../kernels/gemv.cu");
        let layer = include_str!("../../../kernels/layer.cu");
        let gemm_x3 = include_str!("../../../kernels/gemm_x3.cu");
        let flash = include_str!("../../../kernels/flash.cu");
        let wgmma = include_str!("../../../kernels/gemm_wgmma.cu");
        let flash_wg = include_str!("../../../kernels/flash_wgmma.cu");
        for (name, src) in [
            ("gemm_wgmma", wgmma),
            ("flash_wg_gather", flash_wg),
            ("flash_wg_prefill", flash_wg),
            ("flash_hh_gather_v", flash),
            ("flash_gather_kv", flash),
            ("flash_prefill", flash),
            ("flash_tc_gather_kv", flash),
            ("flash_tc_prefill", flash),
            ("gemm_x3", gemm_x3),
            ("decoder_layer_t1", layer),
            ("gemv", gemv),
            ("gemv_t1", gemv),
            ("attention_paged", attention),
            ("attention_many", attention),
            ("qk_norm_rope_write_kv", attention),
            ("qk_norm_rope_write_kv_rows", attention),
            (
                "rms_norm_split",
                include_str!("../../../kernels/rms_norm.cu"),
            ),
            ("write_kv", attention),
            ("attention_gemm_gather_kv", attention),
        ] {
            let def = src.find(&format!("void {name}(")).unwrap();
            let body = &src[def..];
            let end = body.find("\n}\n").unwrap();
            assert!(
                body[..end].contains("pdl_begin()") || body[..end].contains("pdl_wait()"),
                "{name} never waits"
            );
        }
    }

    #[test]
    fn every_requested_kernel_is_declared() {
        let src = include_str!("lib.rs");
        let mut literal = 0;
        for piece in src.split("self.launch(\"").skip(1) {
            let name = &piece[..piece.find('"').unwrap()];
            assert!(known(name), "launch(\"{name}\") is not in kernels::SOURCES");
            literal += 1;
        }
        assert!(literal >= 8, "only {literal} literal launches found");
        for kind in [
            FlashAttention::Fp32,
            FlashAttention::Tf32x3,
            FlashAttention::F16Scores,
            FlashAttention::F16,
            FlashAttention::Wgmma,
        ] {
            for &dp in flash_kind_builds(kind) {
                assert!(known(&flash_prefill_entry(kind, dp)), "{kind:?} d{dp}");
                for suffix in ["kvf32", "kvbf16"] {
                    let (gather, _) = flash_gather_entry(kind, suffix, dp);
                    assert!(known(&gather), "{gather}");
                    if let Some(gather_v) = flash_gather_v_entry(kind, suffix, dp) {
                        assert!(known(&gather_v), "{gather_v}");
                    }
                }
            }
        }
        // Every build a plan may take (the plans' test keeps them to these lists), for each base
        // and both row bounds.
        let t1_builds = [
            (
                &GemvT1Plan::PLAIN[..],
                &["gemv", "gemv_add", "rms_norm_gemv"][..],
            ),
            (
                &GemvT1Plan::SILU[..],
                &["gemv_silu_mul", "rms_norm_gemv_silu_mul"][..],
            ),
        ];
        for (builds, bases) in t1_builds {
            for &(rows, kcm) in builds {
                let p = GemvT1Plan {
                    rows,
                    kcm,
                    split: 1,
                    kc: 1,
                };
                for base in bases {
                    for t in [1, 5] {
                        assert!(known(&p.entry(base, t)), "{}", p.entry(base, t));
                    }
                }
            }
        }
        for base in GEMV_BASES {
            for dtype in [DType::BF16, DType::F32] {
                for k in [1024, 1023] {
                    for t in [1, 5, 8] {
                        let name = gemv_entry(base, dtype, k, t);
                        assert!(known(&name), "{name}");
                    }
                }
            }
        }
        for suffix in ["kvf32", "kvbf16"] {
            for group in 1..=8usize {
                for qkn in [false, true] {
                    for w16 in [false, true] {
                        for d in [64, 100, 128] {
                            let name = many_entry(qkn, suffix, group, d, w16);
                            assert!(known(&name), "{name}");
                        }
                    }
                }
            }
            for base in ["write_kv", "qk_norm_rope_write_kv"] {
                assert!(known(&format!("{base}_{suffix}")), "{base}_{suffix}");
            }
            for group in 1..=8 {
                for d in [2, 30, 32, 64, 80, 128, 200, 256] {
                    for t in [1, 9] {
                        let name = attention_entry(suffix, group, d, t);
                        assert!(known(&name), "{name}");
                    }
                }
            }
        }
        for base in ["gemv", "rms_norm_gemv", "gemv_add", "gemv_silu_mul"] {
            assert!(
                src.contains(&format!("self.gemv_kernel(\"{base}\"")),
                "{base} unused"
            );
        }
    }
}
