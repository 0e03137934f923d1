//! The batch-1 decode layer kernel (`kernels/layer.cu`): a whole decoder layer in one persistent
//! kernel, one block per SM, its weights streamed through a ring of shared-memory slots by bulk
//! asynchronous copies while the phases meet at grid-wide barriers. The file's header says why;
//! this module decides when it applies and launches it.
//!
//! Opt-in (`QFUSE_CUDA_LAYER_KERNEL=1`): on the H200 it is correct (the conformance suite's
//! decoder-layer check, the model tests) but slower than the composed step it replaces, 1.03 vs
//! 0.90 ms/step at 0.6B and 6.38 vs 6.09 at 8B. Its phase clocks (`QFUSE_CUDA_LAYER_TRACE=1`)
//! say why: the weights arrive in time (ring waits ~0.3 µs a layer), but each layer is a chain of
//! dependent on-chip round trips (stage, rows, barrier; attention's slices and their combine)
//! that grid barriers of ~1.6-2.5 µs each lengthen instead of hide (docs/perf.md).
use std::sync::Arc;

use cudarc::driver::{CudaContext, LaunchConfig};
use qfuse_core::{AttentionConfig, DeviceTensor, LayerKv, LayerWeights, Result};

use crate::error::CudaResultExt;
use crate::kernels::Kernels;
use crate::{i32_of, Buf, CudaBackend, CudaBatch, CudaTensor};

/// What `layer.cu` fixes at compile time: the ring's slot, the block, the head size.
const SLOT_BYTES: usize = 32_768;
/// Ring slots: at least two (one in use, one loading), at most what the shared memory holds
/// up to `MAX_SLOTS`, or `QFUSE_CUDA_LAYER_RING_SLOTS`.
const MIN_SLOTS: usize = 2;
const MAX_SLOTS: usize = 8;
const THREADS: u32 = 256;
const WARPS: usize = 8;
const HEAD_DIM: usize = 128;
/// The builds: most query heads per KV head (`GM`).
const GROUP_BUILDS: [usize; 3] = [2, 4, 8];
/// Its cache element types, as the kernel names spell them.
const KV_SUFFIXES: [&str; 2] = ["kvf32", "kvbf16"];

fn entry(kv_suffix: &str, group_build: usize) -> String {
    format!("decoder_layer_t1_{kv_suffix}_g{group_build}")
}

/// Lets every build of the kernel take the device's opt-in shared memory; returns the most
/// dynamic shared memory all of them may use, 0 below sm_90 (`major` of the compute capability;
/// no bulk copies there: never launched).
/// Called only when the kernel is asked for.
pub(crate) fn configure(ctx: &Arc<CudaContext>, kernels: &Kernels, major: i32) -> Result<usize> {
    if major < 9 {
        return Ok(0);
    }
    let names = KV_SUFFIXES
        .iter()
        .flat_map(|suffix| GROUP_BUILDS.iter().map(move |&g| entry(suffix, g)));
    kernels.allow_optin_smem(ctx, names)
}

/// One layer's launch geometry, from its sizes alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LayerShape {
    hidden: usize,
    inter: usize,
    /// The kernel build: `GM` >= the query heads per KV head.
    group_build: usize,
    /// The shared scratch: the largest staged vector, or attention's q and merge area.
    scratch_floats: usize,
    /// Shared room for the residual rows of o_proj and down a block owns.
    res_floats: usize,
    /// Ring slots of `SLOT_BYTES`.
    slots: usize,
    /// Dynamic shared memory: ring, scratch, RoPE table, reduction scratch, mbarriers.
    smem_bytes: usize,
    /// Most context slices per KV head (`gridDim.x / KV` in the kernel).
    max_splits: usize,
}

impl LayerShape {
    /// The geometry, or `None` where the kernel does not apply: head size other than 128, more
    /// than 8 query heads per KV head, more KV heads than blocks, sizes not whole 16-byte rows,
    /// or a weight row (a gate/up pair) larger than a ring slot, or shared memory (`smem_max`
    /// bytes) too small for two slots. The ring takes `slots` slots (default: as many as fit).
    fn new(
        cfg: &AttentionConfig,
        hidden: usize,
        inter: usize,
        blocks: usize,
        smem_max: usize,
        slots: Option<usize>,
    ) -> Option<Self> {
        let (h, kv, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if d != HEAD_DIM || kv == 0 || !h.is_multiple_of(kv) || kv > blocks {
            return None;
        }
        let g = h / kv;
        let group_build = *GROUP_BUILDS.iter().find(|&&b| b >= g)?;
        let attn = h * d;
        let aligned =
            hidden > 0 && inter > 0 && hidden.is_multiple_of(8) && inter.is_multiple_of(8);
        let row_bytes = [4 * hidden, 2 * attn, 2 * inter];
        if !aligned || row_bytes.iter().any(|&b| b > SLOT_BYTES) {
            return None;
        }
        let attention_floats = group_build * d + WARPS * g * (d + 2);
        let scratch_floats = hidden
            .max(attn)
            .max(inter)
            .max(attention_floats)
            .next_multiple_of(4);
        let res_floats = hidden.div_ceil(blocks).next_multiple_of(4);
        let fixed = 4 * (scratch_floats + d + 32 + res_floats);
        let fit = (smem_max.saturating_sub(fixed) / (SLOT_BYTES + 8)).min(MAX_SLOTS);
        let slots = slots.unwrap_or(fit).min(fit);
        if slots < MIN_SLOTS {
            return None;
        }
        let smem_bytes = slots * (SLOT_BYTES + 8) + fixed;
        Some(LayerShape {
            hidden,
            inter,
            group_build,
            scratch_floats,
            res_floats,
            slots,
            smem_bytes,
            max_splits: (blocks / kv).max(1),
        })
    }
}

impl CudaBackend {
    /// The layer kernel's geometry when it applies to this call: a batch-1 decode step (one
    /// sequence, one new token), bf16 weights of consistent shapes, a head size of 128, and
    /// shared memory enough; `None` sends the layer to its composition.
    fn layer_shape(
        &self,
        x: &CudaTensor,
        w: &LayerWeights<'_, CudaTensor>,
        cache: &LayerKv<CudaTensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
    ) -> Option<LayerShape> {
        let info = &batch.info;
        if self.inner.layer_smem_max == 0
            || info.num_tokens() != 1
            || info.seqs().len() != 1
            || !info.is_decode_step()
            || cache.k.dtype() != cache.v.dtype()
        {
            return None;
        }
        let (t, hidden) = x.shape.as_matrix("decoder_layer").ok()?;
        let (gu_rows, _) = w.gate_up.shape.as_matrix("decoder_layer").ok()?;
        let (inter, attn) = (gu_rows / 2, cfg.num_heads * cfg.head_dim);
        let bf16 = |m: &CudaTensor, rows: usize, cols: usize| {
            matches!(m.buf, Buf::Bf16(_)) && m.shape.dims() == [rows, cols]
        };
        let gains = |g: &CudaTensor| matches!(g.buf, Buf::F32(_)) && g.shape.dims() == [hidden];
        let fits = t == 1
            && matches!(x.buf, Buf::F32(_))
            && bf16(w.qkv, cfg.qkv_width(), hidden)
            && bf16(w.o_proj, hidden, attn)
            && bf16(w.gate_up, 2 * inter, hidden)
            && bf16(w.down, hidden, inter)
            && gains(w.input_norm)
            && gains(w.post_norm)
            && matches!((&w.q_norm.buf, &w.k_norm.buf), (Buf::F32(_), Buf::F32(_)))
            && cfg.fits_prologue(cfg.qkv_width(), &w.q_norm.shape, &w.k_norm.shape);
        if !fits {
            return None;
        }
        LayerShape::new(
            cfg,
            hidden,
            inter,
            self.inner.sm_count,
            self.inner.layer_smem_max,
            self.inner.layer_ring_slots,
        )
    }

    /// [`qfuse_core::Backend::decoder_layer`] as one kernel where [`Self::layer_shape`] allows;
    /// `None` otherwise (the caller composes).
    pub(crate) fn decoder_layer_kernel(
        &self,
        x: &CudaTensor,
        w: &LayerWeights<'_, CudaTensor>,
        cache: &mut LayerKv<CudaTensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
        eps: f64,
    ) -> Result<Option<CudaTensor>> {
        let Some(shape) = self.layer_shape(x, w, cache, batch, cfg) else {
            return Ok(None);
        };
        let op = "decoder_layer";
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let slots = cache.k.shape.cache_slots(kvh * d, op)?;
        batch.info.check_slots_within(slots, op)?;
        batch.info.check_blocks_within(slots, op)?;
        let stream = self.stream();
        let suffix = cache.k.kv_suffix();
        let kv = (cache.k.ptr_mut(stream, op)?, cache.v.ptr_mut(stream, op)?);
        let (hidden, inter) = (shape.hidden, shape.inter);
        let qkv = self.alloc_f32(cfg.qkv_width())?;
        let attn = self.alloc_f32(h * d)?;
        let resid = self.alloc_f32(hidden)?;
        let act = self.alloc_f32(inter)?;
        let out = self.alloc_f32(hidden)?;
        let part = self.alloc_f32(h * shape.max_splits * (d + 4))?;
        let counters = self.counters(2)?;
        let scale_log2 = (cfg.scale() * std::f64::consts::LOG2_E) as f32;
        let mut l = self.launch(&entry(suffix, shape.group_build))?;
        l.buf(x.f32(op)?);
        for m in [w.qkv, w.o_proj, w.gate_up, w.down] {
            l.ptr(m.ptr(stream));
        }
        for g in [w.input_norm, w.post_norm, w.q_norm, w.k_norm] {
            l.buf(g.f32(op)?);
        }
        l.ptr(kv.0).ptr(kv.1);
        l.buf(&batch.positions).buf(&batch.block_tables);
        l.i32(i32_of(batch.info.block_size(), "block size")?);
        l.out(&qkv)
            .out(&attn)
            .out(&resid)
            .out(&act)
            .out(&out)
            .out(&part);
        l.ptr(counters);
        l.i32(i32_of(hidden, "hidden")?)
            .i32(i32_of(inter, "intermediate")?)
            .i32(i32_of(h, "H")?)
            .i32(i32_of(kvh, "KV")?)
            .i32(i32_of(shape.slots, "ring slots")?)
            .i32(i32_of(shape.scratch_floats, "scratch")?)
            .i32(i32_of(shape.res_floats, "residual rows")?);
        l.f32(eps as f32)
            .f32(cfg.qk_norm_eps as f32)
            .f64(cfg.rope_theta.log2())
            .f32(scale_log2)
            .i32(self.inner.layer_trigger);
        match &self.inner.layer_trace {
            Some(trace) => l.buf(trace),
            None => l.ptr(0),
        };
        let launch = LaunchConfig {
            grid_dim: (self.inner.sm_count as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: shape.smem_bytes as u32,
        };
        // SAFETY: x is [1, hidden] f32; the four matrices are bf16 of the shapes layer_shape
        // checked ([qkv_width, hidden], [hidden, H d], [2 inter, hidden], [hidden, inter]), the
        // gains f32 [hidden] and [d]; the one sequence's slot and blocks lie inside the pools
        // (checked above), its table is row 0 of block_tables; every scratch buffer holds what
        // the kernel writes (part: H x max_splits x (d + 4)); counters holds 2 zeros, left
        // zero; trace is null or 13 u64 sums; shared memory is laid out as layer.cu says and within the configured maximum;
        // one block per SM, each fitting alone, so every block is resident for the grid barrier.
        unsafe { l.launch(launch) }.cuda()?;
        Ok(Some(Self::f32_tensor([1, hidden], out)))
    }
}

/// What the trace's sums are, in order (`layer.cu`).
const TRACE_INTERVALS: [&str; 10] = [
    "start, first weights requested, waiting on the previous kernel",
    "stage x + QKV rows",
    "grid barrier 1",
    "q/k-norm, RoPE, cache write, attention",
    "grid barrier 2",
    "stage attn + o_proj rows",
    "grid barrier 3",
    "stage h + gate/up rows",
    "grid barrier 4",
    "stage act + down rows",
];

/// Sums the layer kernel adds to with `QFUSE_CUDA_LAYER_TRACE=1`: ten phase durations, ring
/// waits and launches x blocks.
pub(crate) const TRACE_LEN: usize = 13;

impl CudaBackend {
    /// With `QFUSE_CUDA_LAYER_TRACE=1`: where the layer kernel's time went, per launch (mean of
    /// its blocks' thread-0 clocks, %globaltimer), since the backend was created.
    pub fn layer_trace_report(&self) -> Option<String> {
        let trace = self.inner.layer_trace.as_ref()?;
        let sums = self.stream().clone_dtoh(trace).ok()?;
        let n = sums[12];
        if n == 0 {
            return Some("layer kernel trace: the kernel never ran".into());
        }
        let us = |ns: u64| ns as f64 / n as f64 / 1e3;
        let mut out = format!(
            "layer kernel trace (mean over {n} block-launches, thread 0 of each block, µs):\n"
        );
        let mut total = 0.0;
        for (name, &ns) in TRACE_INTERVALS.iter().zip(&sums) {
            out += &format!("  {:>8.2}  {name}\n", us(ns));
            total += us(ns);
        }
        out += &format!(
            "  {total:>8.2}  total; of it waiting for ring slots {:.2}",
            us(sums[11])
        );
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(heads: usize, kv_heads: usize, head_dim: usize) -> AttentionConfig {
        AttentionConfig {
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            rope_theta: 1e6,
            qk_norm_eps: 1e-6,
        }
    }

    /// The opt-in shared memory of an H100/H200 SM's block (227 KiB).
    const HOPPER: usize = 227 * 1024;

    #[test]
    fn qwen3_shapes_take_the_slots_that_fit() {
        let s = LayerShape::new(&cfg(16, 8, 128), 1024, 3072, 132, HOPPER, None).unwrap();
        assert_eq!(
            (s.group_build, s.scratch_floats, s.max_splits),
            (2, 3072, 16)
        );
        assert_eq!(s.slots, 6);
        assert!(s.smem_bytes <= HOPPER, "{s:?}");
        // Three slots let two blocks (this layer's and the next one's) share an SM.
        let s = LayerShape::new(&cfg(16, 8, 128), 1024, 3072, 132, HOPPER, Some(3)).unwrap();
        assert!(2 * (s.smem_bytes + 1024) <= 228 * 1024, "{s:?}");
        // 8B: 32 query heads over 8 KV heads; 12,288-float staged vectors leave four slots.
        let s = LayerShape::new(&cfg(32, 8, 128), 4096, 12_288, 132, HOPPER, None).unwrap();
        assert_eq!((s.group_build, s.slots), (4, 5));
        assert!(s.smem_bytes <= HOPPER, "{s:?}");
        // 64 query heads over 8 KV heads (Qwen3-32B's) take the widest build.
        let s = LayerShape::new(&cfg(64, 8, 128), 5120, 12_288, 132, HOPPER, None).unwrap();
        assert_eq!(s.group_build, 8);
    }

    #[test]
    fn shapes_outside_the_kernel_compose() {
        let new = |c: AttentionConfig, hidden, inter, blocks, smem| {
            LayerShape::new(&c, hidden, inter, blocks, smem, None)
        };
        assert_eq!(new(cfg(16, 8, 64), 1024, 3072, 132, HOPPER), None);
        assert_eq!(new(cfg(32, 2, 128), 1024, 3072, 132, HOPPER), None);
        assert_eq!(new(cfg(16, 8, 128), 1020, 3072, 132, HOPPER), None);
        // A gate/up pair of 2 x 8192 bf16 weights is 32 KiB: fits; 8200 does not.
        assert!(new(cfg(16, 8, 128), 8192, 3072, 132, HOPPER).is_some());
        assert_eq!(new(cfg(16, 8, 128), 8200, 3072, 132, HOPPER), None);
        assert_eq!(new(cfg(16, 8, 128), 1024, 16_400, 132, HOPPER), None);
        assert_eq!(new(cfg(16, 16, 128), 1024, 3072, 8, HOPPER), None);
        // Below sm_90 (no shared memory granted) or too little for two slots.
        assert_eq!(new(cfg(16, 8, 128), 1024, 3072, 132, 0), None);
        assert_eq!(new(cfg(16, 8, 128), 1024, 3072, 132, 70_000), None);
    }

    #[test]
    fn every_build_is_declared() {
        let declared: Vec<&str> = crate::kernels::SOURCES
            .iter()
            .flat_map(|(_, _, names)| names.iter().copied())
            .collect();
        for suffix in KV_SUFFIXES {
            for g in GROUP_BUILDS {
                assert!(declared.contains(&entry(suffix, g).as_str()));
            }
        }
    }
}
