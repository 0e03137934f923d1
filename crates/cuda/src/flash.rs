//! Prompt attention that keeps its scores on chip (`kernels/flash.cu`, and on compute
//! capability 9.0 `kernels/flash_wgmma.cu`): the kinds of kernel, their builds, tiles and shared
//! memory, the per-sequence descriptor, and the launch (a gather of each group of sequences'
//! keys and values from the paged cache, then the attention).
use cudarc::driver::{DevicePtr, LaunchConfig};
use qfuse_core::{AttentionConfig, BatchInfo, Error, LayerKv, Result, SeqChunk};

use crate::error::CudaResultExt;
use crate::launch::Launch;
use crate::{i32_of, u32_of, CudaBackend, CudaBatch, CudaTensor};

/// Which prompt attention kernel replaces the GEMM path ([`crate::CudaOptions::flash_attention`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlashAttention {
    /// None: fp32 cuBLAS GEMMs around a softmax kernel.
    Off,
    /// fp32 FMAs on the CUDA cores, register-tiled (any GPU).
    Fp32,
    /// The tensor cores with fp32-accurate 3xTF32 products (sm_80 and later; elsewhere, and for
    /// head sizes whose build does not fit the GPU's shared memory, `Fp32`).
    Tf32x3,
    /// As `Tf32x3`, but the scores from fp16 tensor cores (twice tf32's rate): q and k rows
    /// scaled by powers of two into fp16's range, split into two fp16 parts each (to ~2^-22 of
    /// the row's largest element), three products; P·V stays 3xTF32. Where its build does not
    /// fit, `Tf32x3`, then `Fp32`.
    F16Scores,
    /// Scores as `F16Scores`, and P·V on fp16 tensor cores too, the values scaled per column of
    /// each 64-key tile (a power of two that brings the column's largest magnitude into fp16's
    /// range) and split in two parts, P (in [0, 1]) split as it is. On the H200 a 2,048-token
    /// prefill 18.0 ms against 3xTF32's 22.6, as accurate (docs/perf.md). Falls back like
    /// `F16Scores`.
    F16,
    /// The default: `F16`'s numbers on Hopper's warpgroup tensor-core instructions
    /// (`kernels/flash_wgmma.cu`, compute capability 9.0, head sizes of 65-128): the score and
    /// output tiles in the products' accumulators, the operands read from shared memory by the
    /// hardware, each key tile's halves one bulk copy each, a tile's softmax overlapping the
    /// previous tile's P·V. On the H200 a 2,048-token prefill 12.9 ms against `F16`'s 16.0, as
    /// accurate (docs/perf.md). Elsewhere, and for other head sizes, `F16` and its fallbacks.
    Wgmma,
}

/// The flash attention's builds, by padded head size.
pub(crate) const FLASH_BUILDS: [usize; 3] = [32, 64, 128];

/// Most device memory one launch of the flash attention takes for its gathered keys and values
/// (sequences are launched in groups that fit; one longer sequence takes what it needs).
pub const FLASH_SCRATCH_BYTES: usize = 256 << 20;
/// Keys per tile of the flash attention; each sequence's gathered keys are padded to a multiple.
pub(crate) const FLASH_KEY_TILE: usize = 64;
/// Query rows (tokens times the query heads of a KV head) per block of the flash attention.
pub(crate) const FLASH_ROW_TILE: usize = 128;
/// Threads per block of every flash kernel (`flash_wgmma.cu`'s prefill: two warpgroups).
pub(crate) const FLASH_THREADS: u32 = 256;
/// `kernels/flash_wgmma.cu`'s prefill dynamic shared memory (`FW_SMEM`) and the bytes of one
/// gathered key tile of one KV head (`FW_TILE_BYTES`).
const FLASH_WG_SMEM: usize = 201_728;
const FLASH_WG_TILE_BYTES: usize = 66_304;

/// A sequence's keys in the flash attention's gathered buffers: all of them, cached and new,
/// padded to whole key tiles.
pub(crate) fn flash_padded_keys(seq: &SeqChunk) -> usize {
    (seq.start_pos + seq.len).next_multiple_of(FLASH_KEY_TILE)
}

/// The flash attention's per-sequence descriptor, `[seqs, 4]`: first row, new tokens, first
/// position, and the first key column of the sequence in the gathered keys
/// ([`flash_padded_keys`] each).
pub(crate) fn flash_desc(info: &BatchInfo) -> Result<Vec<u32>> {
    let mut desc = Vec::with_capacity(info.seqs().len() * 4);
    let mut keys = 0usize;
    for (s, seq) in info.seqs().iter().enumerate() {
        for v in [info.rows(s).start, seq.len, seq.start_pos, keys] {
            desc.push(u32::try_from(v).map_err(|_| {
                Error::invalid("prepare_batch", format!("{v} does not fit 32 bits"))
            })?);
        }
        keys += flash_padded_keys(seq);
    }
    Ok(desc)
}

/// The flash attention build for head size `d` (its padded head size), if there is one.
pub(crate) fn flash_build(d: usize) -> Option<usize> {
    if !d.is_multiple_of(4) {
        return None;
    }
    FLASH_BUILDS.into_iter().find(|&p| d <= p)
}

/// The padded head sizes a flash attention kind has builds for.
pub(crate) fn flash_kind_builds(kind: FlashAttention) -> &'static [usize] {
    match kind {
        FlashAttention::Wgmma => &[128],
        _ => &FLASH_BUILDS,
    }
}

/// The prefill kernel of a flash attention kind for padded head size `dp`.
pub(crate) fn flash_prefill_entry(kind: FlashAttention, dp: usize) -> String {
    match kind {
        FlashAttention::Wgmma => format!("flash_wg_prefill_d{dp}"),
        FlashAttention::Tf32x3 => format!("flash_tc_prefill_d{dp}"),
        FlashAttention::F16Scores => format!("flash_h_prefill_d{dp}"),
        FlashAttention::F16 => format!("flash_hh_prefill_d{dp}"),
        _ => format!("flash_prefill_d{dp}"),
    }
}

/// The gather kernel of a flash attention kind for a cache type (`kv_suffix`) and padded head
/// size `dp`, with the keys each of its blocks gathers.
pub(crate) fn flash_gather_entry(
    kind: FlashAttention,
    kv_suffix: &str,
    dp: usize,
) -> (String, usize) {
    match kind {
        FlashAttention::Tf32x3 => (format!("flash_tc_gather_kv_{kv_suffix}_d{dp}"), 8),
        FlashAttention::F16Scores => (format!("flash_h_gather_kv_{kv_suffix}_d{dp}"), 8),
        FlashAttention::F16 => (format!("flash_hh_gather_kv_{kv_suffix}_d{dp}"), 8),
        FlashAttention::Wgmma => (format!("flash_wg_gather_{kv_suffix}"), FLASH_KEY_TILE),
        _ => (format!("flash_gather_kv_{kv_suffix}"), 32),
    }
}

/// The separate values gather of a flash attention kind, if it has one (`F16`: a block per
/// 64-key tile, which its column scales span).
pub(crate) fn flash_gather_v_entry(
    kind: FlashAttention,
    kv_suffix: &str,
    dp: usize,
) -> Option<String> {
    (kind == FlashAttention::F16).then(|| format!("flash_hh_gather_v_{kv_suffix}_d{dp}"))
}

/// The first of `kinds` (kernel, the shared memory its builds may take) with a build for head
/// size `d` that fits, and that build.
pub(crate) fn flash_choice(
    kinds: &[(FlashAttention, usize)],
    d: usize,
) -> Option<(FlashAttention, usize)> {
    let dp = flash_build(d)?;
    kinds
        .iter()
        .find(|&&(kind, smem_max)| {
            flash_kind_builds(kind).contains(&dp) && flash_smem_bytes(kind, dp) <= smem_max
        })
        .map(|&(kind, _)| (kind, dp))
}

/// Dynamic shared memory of a flash attention build for padded head size `dp`
/// (`kernels/flash.cu`): fp32 keeps Qᵀ, Kᵀ, V and Pᵀ tiles; 3xTF32 keeps q and the keys' and
/// values' split parts; the fp16 builds keep q, the keys' fp16 parts, the values' region as
/// 3xTF32's (the `F16` build uses half of it), and the key and q row scales.
pub(crate) fn flash_smem_bytes(kind: FlashAttention, dp: usize) -> usize {
    if kind == FlashAttention::Wgmma {
        return FLASH_WG_SMEM;
    }
    4 * match kind {
        FlashAttention::Tf32x3 => {
            FLASH_ROW_TILE * (dp + 8) + FLASH_KEY_TILE * (2 * dp + 16) + FLASH_KEY_TILE * 2 * dp
        }
        FlashAttention::F16Scores | FlashAttention::F16 => {
            FLASH_ROW_TILE * (dp + 8)
                + FLASH_KEY_TILE * (dp + 16)
                + FLASH_KEY_TILE * 2 * dp
                + FLASH_KEY_TILE
                + FLASH_ROW_TILE
        }
        _ => {
            dp * FLASH_ROW_TILE
                + dp * FLASH_KEY_TILE
                + FLASH_KEY_TILE * (dp + 4)
                + FLASH_KEY_TILE * (FLASH_ROW_TILE + 4)
        }
    }
}

impl CudaBackend {
    /// Prompt attention as `kernels/flash.cu` or `kernels/flash_wgmma.cu`: per group of
    /// sequences whose gathered keys and values fit [`FLASH_SCRATCH_BYTES`], one kernel (two for
    /// `F16`) gathers them from the paged cache in the layout its prefill reads, and one computes
    /// every query row's attention with the scores on chip. `kind` is the kernel
    /// ([`FlashAttention`]), `dp` the build: the head size padded to 32, 64 or 128.
    pub(crate) fn attention_flash(
        &self,
        q: &CudaTensor,
        cache: &LayerKv<CudaTensor>,
        batch: &CudaBatch,
        cfg: &AttentionConfig,
        kind: FlashAttention,
        dp: usize,
    ) -> Result<CudaTensor> {
        let tc = kind != FlashAttention::Fp32;
        let (h, kvh, d) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        let g = cfg.group_size();
        let t = batch.info.num_tokens();
        let q = q.f32("attention")?;
        let out = self.alloc_f32(t * h * d)?;
        let stream = self.stream();
        let scale_log2 = (cfg.scale() * std::f64::consts::LOG2_E) as f32;
        let seqs = batch.info.seqs();
        let padded: Vec<usize> = seqs.iter().map(flash_padded_keys).collect();
        // Gathered floats a key of one KV head: its key and value, or their split parts
        // (`Wgmma`: its tile record's share).
        let wg = kind == FlashAttention::Wgmma;
        let key_floats = if wg {
            FLASH_WG_TILE_BYTES / FLASH_KEY_TILE / 4
        } else if tc {
            4 * dp
        } else {
            2 * d
        };
        let per_key = kvh * key_floats * 4;
        let tables = batch.block_tables.device_ptr(stream).0;
        let desc = batch.flash_desc.device_ptr(stream).0;
        let (hi, kvhi, di) = (i32_of(h, "H")?, i32_of(kvh, "KV")?, i32_of(d, "d")?);
        let (gather, keys_a_block) = flash_gather_entry(kind, cache.k.kv_suffix(), dp);
        let gather_v = flash_gather_v_entry(kind, cache.k.kv_suffix(), dp);
        let prefill = flash_prefill_entry(kind, dp);
        let (mut s0, mut koff0) = (0, 0);
        while s0 < seqs.len() {
            let (mut s1, mut kp) = (s0 + 1, padded[s0]);
            while s1 < seqs.len() && (kp + padded[s1]) * per_key <= FLASH_SCRATCH_BYTES {
                kp += padded[s1];
                s1 += 1;
            }
            let n = s1 - s0;
            let most_keys = padded[s0..s1].iter().copied().max().unwrap_or(0);
            let most_tiles = seqs[s0..s1]
                .iter()
                .map(|s| (g * s.len).div_ceil(FLASH_ROW_TILE))
                .max()
                .unwrap_or(0);
            // `Wgmma`: one buffer of tile records (kt), no vt.
            let (kt, vt) = if wg {
                (self.alloc_f32(kvh * kp * key_floats)?, None)
            } else {
                let half = kvh * kp * key_floats / 2;
                (self.alloc_f32(half)?, Some(self.alloc_f32(half)?))
            };
            let (koff0i, kpi) = (i32_of(koff0, "keys")?, i32_of(kp, "keys")?);
            let group_desc = desc + (s0 * 16) as u64;
            // The gathers' parameters between the cache pools and the outputs.
            let group_args = |l: &mut Launch<'_>| -> Result<()> {
                l.ptr(tables + (s0 * batch.max_blocks * 4) as u64)
                    .i32(i32_of(batch.max_blocks, "blocks")?)
                    .i32(i32_of(batch.info.block_size(), "block size")?)
                    .ptr(group_desc)
                    .i32(koff0i)
                    .i32(kvhi)
                    .i32(di)
                    .i32(kpi);
                Ok(())
            };
            let mut l = self.launch(&gather)?;
            l.ptr(cache.k.ptr(stream)).ptr(cache.v.ptr(stream));
            group_args(&mut l)?;
            l.out(&kt);
            if let Some(vt) = &vt {
                l.out(vt);
            }
            // A gather's grid: blocks of `keys` keys, KV heads, sequences.
            let gather_grid = |keys: usize| -> Result<LaunchConfig> {
                Ok(LaunchConfig {
                    grid_dim: (
                        u32_of(most_keys / keys, "key groups")?,
                        u32_of(kvh, "KV")?,
                        u32_of(n, "sequences")?,
                    ),
                    block_dim: (FLASH_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            };
            let gather_cfg = gather_grid(keys_a_block)?;
            // SAFETY: rows s0..s1 of the tables and the descriptor belong to these sequences,
            // whose cache slots are inside the pools (checked by `attention`); each sequence's
            // keys and values go to its keys [koff - koff0, + padded) of kt and vt (fp32:
            // [kvh, d, kp] and [kvh, kp, d]; 3xTF32: [kvh, kp, 2 dp] each; fp16 builds: [kvh, kp,
            // dp] words and a scale per key or per 64-key tile's column after them; `Wgmma`: kt
            // [kvh, kp / 64] tile records), which hold them all; d <= dp <= 128 (the kernels'
            // staging tiles).
            unsafe { l.launch(gather_cfg) }.cuda()?;
            if let (Some(gather_v), Some(vt)) = (&gather_v, &vt) {
                let mut l = self.launch(gather_v)?;
                l.ptr(cache.v.ptr(stream));
                group_args(&mut l)?;
                l.out(vt);
                let cfg = gather_grid(FLASH_KEY_TILE)?;
                // SAFETY: as the gather above; the values of each 64-key tile of a sequence
                // (padded to whole tiles) go to its keys of vt, [kvh, kp, dp] words, and its
                // column scales after them, [kvh, kp / 64, dp] floats, inside vt's
                // kvh * kp * 2 dp floats.
                unsafe { l.launch(cfg) }.cuda()?;
            }
            let mut l = self.launch(&prefill)?;
            l.buf(q).out(&kt);
            if let Some(vt) = &vt {
                l.out(vt);
            }
            l.out(&out)
                .ptr(group_desc)
                .i32(koff0i)
                .i32(hi)
                .i32(kvhi)
                .i32(di)
                .i32(kpi)
                .f32(scale_log2);
            let prefill_cfg = LaunchConfig {
                grid_dim: (
                    u32_of(kvh, "KV")?,
                    u32_of(n, "sequences")?,
                    u32_of(most_tiles, "row tiles")?,
                ),
                block_dim: (FLASH_THREADS, 1, 1),
                shared_mem_bytes: u32_of(flash_smem_bytes(kind, dp), "shared memory")?,
            };
            // SAFETY: q and out are [t, h*d] and every sequence's rows are inside (descriptor);
            // kt and vt (`Wgmma`: kt's tile records, 16-byte aligned, one bulk copy per half)
            // were filled above for these sequences; d % 4 == 0 and d <= dp (the build), so rows
            // are 16-byte aligned; the shared memory is the build's layout, within what
            // `allow_optin_smem` allowed (checked by the caller).
            unsafe { l.launch(prefill_cfg) }.cuda()?;
            koff0 += kp;
            s0 = s1;
        }
        Ok(Self::f32_tensor([t, h * d], out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `kernels/flash.cu`'s tile sizes are the ones the launches and scratch sizes assume, and
    /// each build's shared memory fits the GPUs it is meant for (opt-in limits: 227 KiB on
    /// sm_90, 163 KiB on sm_80).
    #[test]
    fn flash_kernel_constants_and_shared_memory() {
        let src = include_str!("../../../kernels/flash.cu");
        let common = include_str!("../../../kernels/common.cuh");
        let define = |name: &str| crate::kernels::define(src, name);
        assert_eq!(crate::kernels::define(common, "FA_ROWS"), FLASH_ROW_TILE);
        assert_eq!(crate::kernels::define(common, "FA_KEYS"), FLASH_KEY_TILE);
        assert_eq!(define("FA_THREADS"), FLASH_THREADS as usize);
        let wg = include_str!("../../../kernels/flash_wgmma.cu");
        let wg_define = |name: &str| crate::kernels::define(wg, name);
        assert_eq!(wg_define("FW_THREADS"), FLASH_THREADS as usize);
        assert_eq!(wg_define("FW_SMEM"), FLASH_WG_SMEM);
        assert_eq!(wg_define("FW_TILE_BYTES"), FLASH_WG_TILE_BYTES);
        const {
            assert!(
                FLASH_WG_SMEM <= 232_448 - 1024,
                "sm_90's opt-in, static memory aside"
            )
        };
        // The wgmma kind has one build (d 65-128); for other head sizes the next kind takes over.
        let hopper = [
            (FlashAttention::Wgmma, 231_904),
            (FlashAttention::F16, 231_904),
        ];
        assert_eq!(
            flash_choice(&hopper, 128),
            Some((FlashAttention::Wgmma, 128))
        );
        assert_eq!(
            flash_choice(&hopper, 68),
            Some((FlashAttention::Wgmma, 128))
        );
        assert_eq!(flash_choice(&hopper, 64), Some((FlashAttention::F16, 64)));
        assert_eq!(flash_choice(&hopper, 20), Some((FlashAttention::F16, 32)));
        for dp in FLASH_BUILDS {
            assert!(
                flash_smem_bytes(FlashAttention::Tf32x3, dp) <= 232_448,
                "3xTF32 d{dp}"
            );
            assert!(
                flash_smem_bytes(FlashAttention::Fp32, dp) <= 166_912,
                "fp32 d{dp}"
            );
        }
        assert_eq!(flash_smem_bytes(FlashAttention::Tf32x3, 128), 204_800);
        assert_eq!(flash_smem_bytes(FlashAttention::F16Scores, 128), 172_800);
        let builds: Vec<_> = [4, 20, 32, 36, 64, 68, 128, 6, 130, 256]
            .map(flash_build)
            .into();
        let want = [
            Some(32),
            Some(32),
            Some(32),
            Some(64),
            Some(64),
            Some(128),
            Some(128),
        ];
        assert_eq!(builds[..7], want);
        assert_eq!(builds[7..], [None, None, None]);
        // sm_90 (227 KiB) takes 3xTF32; sm_80 (163 KiB) has no room for its d = 128 build and
        // takes the fp32 one there, 3xTF32 for d = 64; neither fits 48 KiB.
        let both = |smem| [(FlashAttention::Tf32x3, smem), (FlashAttention::Fp32, smem)];
        assert_eq!(
            flash_choice(&both(232_448), 128),
            Some((FlashAttention::Tf32x3, 128))
        );
        assert_eq!(
            flash_choice(&both(166_912), 128),
            Some((FlashAttention::Fp32, 128))
        );
        assert_eq!(
            flash_choice(&both(166_912), 64),
            Some((FlashAttention::Tf32x3, 64))
        );
        assert_eq!(flash_choice(&both(49_152), 128), None);
        assert_eq!(flash_choice(&both(232_448), 130), None);
        assert_eq!(flash_choice(&[], 128), None);
    }

    /// The flash descriptor: each sequence's first row, new tokens, first position, and its
    /// keys' first column with every sequence's keys padded to a whole key tile.
    #[test]
    fn flash_descriptor_pads_each_sequence_to_key_tiles() {
        let seqs = [(0usize, 100usize), (200, 64), (5, 1)]
            .map(|(start_pos, len)| SeqChunk {
                start_pos,
                len,
                block_table: vec![0; (start_pos + len).div_ceil(16)],
            })
            .into();
        let info = BatchInfo::new(16, seqs).unwrap();
        assert_eq!(
            flash_desc(&info).unwrap(),
            [0, 100, 0, 0, 100, 64, 200, 128, 164, 1, 5, 128 + 320]
        );
    }
}
