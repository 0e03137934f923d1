//! Planning for `gemm_x3` (`kernels/gemm_x3.cu`): products of 9-64 rows on the tensor cores, one
//! kernel from the fp32 activations (three-part bf16 split, norm prologue and epilogue fused).
//!
//! Each block holds its whole weight slice in shared memory (requested at once, before the PDL
//! wait), so a plan must keep every block of the grid resident at the same time: one wave, whole
//! clusters, at most the clusters the GPU can hold of that size.
use std::sync::Arc;

use cudarc::driver::sys::{self, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, DriverError};
use qfuse_core::Result;

use crate::error::CudaResultExt;
use crate::kernels::Kernels;
use crate::GEMV_MAX_ROWS;

/// The kernel's entry points: the five fusions over three bf16 parts, then the residual and SiLU
/// ones over two (`_p2`, [`CudaOptions::x3_two_parts`](crate::CudaOptions::x3_two_parts)).
pub(crate) const ENTRIES: [&str; 8] = [
    "gemm_x3_f32",
    "gemm_x3_add_f32",
    "gemm_x3_silu_mul_f32",
    "rms_norm_gemm_x3_f32",
    "rms_norm_gemm_x3_silu_mul_f32",
    "gemm_x3_add_f32_p2",
    "gemm_x3_silu_mul_f32_p2",
    "rms_norm_gemm_x3_silu_mul_f32_p2",
];

/// The same entry points of the build whose products run on `wgmma` (`gemm_x3.cu` compiled for
/// sm_90a with `X3_WGMMA` as `gemm_x3_wg.cu`), in the same order.
pub(crate) const WG_ENTRIES: [&str; 8] = [
    "gemm_x3_f32_wg",
    "gemm_x3_add_f32_wg",
    "gemm_x3_silu_mul_f32_wg",
    "rms_norm_gemm_x3_f32_wg",
    "rms_norm_gemm_x3_silu_mul_f32_wg",
    "gemm_x3_add_f32_p2_wg",
    "gemm_x3_silu_mul_f32_p2_wg",
    "rms_norm_gemm_x3_silu_mul_f32_p2_wg",
];

/// The phases `QFUSE_CUDA_X3_TRACE=1` times (thread 0 of each block; X3_PHASES in the kernel).
pub(crate) const TRACE_PHASES: [&str; 8] = [
    "weight copies issued",
    "PDL wait",
    "first round's activations loaded, split and staged",
    "first round's weights waited for, block barrier",
    "the products (every round after the first wait)",
    "partial tile stored, cluster barrier",
    "slices reduced, epilogue stored",
    "final cluster barrier",
];
/// u64 slots of one entry point's trace: its phases and a count of block-launches.
pub(crate) const TRACE_SLOTS: usize = 16;

/// Slice counts (cluster sizes) a plan may take, most first; 16 is a non-portable cluster size
/// (sm_90 allows it by function attribute).
const SLICES: [usize; 5] = [16, 8, 4, 2, 1];
const THREADS: u32 = 256;
/// Weight rows of a tile.
const TILE_ROWS: usize = 128;
/// Largest row count the kernel takes.
pub(crate) const MAX_ROWS: usize = 64;
/// Staged activations, in both builds: two rounds of [3 parts][64 rows][64 k] bf16. In the
/// `wgmma` build (X3W_STAGE_BYTES) that memory then holds the partial tile ([64][128] fp32) and
/// the rows' squares and 1/rms ([64] fp32 each).
const STAGE_BYTES: usize = 2 * 3 * 64 * 64 * 2;
/// The `wgmma` build's weight tile of one 64-k round, [128 rows][64] bf16: X3W_ROUND_BYTES.
const WG_ROUND_BYTES: usize = TILE_ROWS * 64 * 2;

/// Which build of the kernel runs the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Build {
    /// `mma.sync` from fragments staged in shared memory (sm_90).
    Mma,
    /// `wgmma` reading both operands from shared memory (sm_90a); slices of whole 64-k rounds.
    Wgmma,
}

impl Build {
    /// The build's entry points, in [`ENTRIES`]' order.
    pub(crate) fn entries(self) -> [&'static str; 8] {
        match self {
            Build::Mma => ENTRIES,
            Build::Wgmma => WG_ENTRIES,
        }
    }

    /// Dynamic shared memory of a block whose slice is `kc` 32-wide chunks of K: the weight
    /// slice ([128 rows][kc * 32] bf16) and the staged activations.
    pub(crate) fn smem_bytes(self, kc: usize) -> usize {
        match self {
            Build::Mma => kc * 32 * TILE_ROWS * 2 + STAGE_BYTES,
            Build::Wgmma => kc.div_ceil(2) * WG_ROUND_BYTES + STAGE_BYTES,
        }
    }

    /// Whether a slice of `kc` chunks suits the build.
    fn takes(self, kc: usize) -> bool {
        self == Build::Mma || kc.is_multiple_of(2)
    }
}

/// What the GPU can hold of the kernel at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// The build measured.
    pub build: Build,
    /// Largest slice (in 32-wide chunks) whose block fits the shared memory.
    pub kc_max: usize,
    /// Clusters resident at once by slice length and count: `clusters[kc - 1][i]` for slices of
    /// `kc` chunks (their shared memory decides how many blocks share an SM) in clusters of
    /// `SLICES[i]` blocks.
    pub clusters: Vec<[usize; SLICES.len()]>,
}

/// Lets the kernel's entry points take the device's opt-in shared memory and clusters of 16, and
/// measures how many clusters of each size and slice length the device holds at once;
/// `max_slices` caps the cluster size (a knob for comparing plans). `None` below sm_90 (no
/// clusters).
pub(crate) fn configure(
    ctx: &Arc<CudaContext>,
    stream: &CudaStream,
    kernels: &Kernels,
    major: i32,
    max_slices: usize,
    build: Build,
) -> Result<Option<Capacity>> {
    if major < 9 {
        return Ok(None);
    }
    let entries = build.entries();
    let dynamic = kernels.allow_optin_smem(ctx, entries)?;
    for name in entries {
        // Where a driver refuses clusters of 16, the occupancy query below finds none.
        let _ = kernels.get(name).cuda()?.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
            1,
        );
    }
    let kc_max = (1..=64)
        .take_while(|&kc| build.smem_bytes(kc) <= dynamic)
        .last()
        .unwrap_or(0);
    if kc_max == 0 {
        return Ok(None);
    }
    // The entry with the most registers and static shared memory bounds them all.
    let probe = kernels.get(entries[4]).cuda()?;
    let clusters = (1..=kc_max)
        .map(|kc| {
            let mut row = [0; SLICES.len()];
            for (slot, &s) in row.iter_mut().zip(&SLICES) {
                // Slice lengths the build does not take need no query (no plan reads them).
                if s <= max_slices && build.takes(kc) {
                    // A failed query (a size the device refuses) leaves no room for that size.
                    *slot =
                        max_active_clusters(probe, stream, s, build.smem_bytes(kc)).unwrap_or(0);
                }
            }
            row
        })
        .collect();
    Ok(Some(Capacity {
        build,
        kc_max,
        clusters,
    }))
}

/// Clusters of `slices` blocks, each with `smem` bytes of dynamic shared memory, that the device
/// holds at once.
fn max_active_clusters(
    f: &CudaFunction,
    stream: &CudaStream,
    slices: usize,
    smem: usize,
) -> std::result::Result<usize, DriverError> {
    // SAFETY: an all-zero attribute is a valid (empty) union; clusterDim is the field that
    // CLUSTER_DIMENSION names.
    let mut attr: sys::CUlaunchAttribute = unsafe { std::mem::zeroed() };
    attr.id = sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION;
    attr.value.clusterDim.x = 1;
    attr.value.clusterDim.y = slices as u32;
    attr.value.clusterDim.z = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: 1,
        gridDimY: slices as u32,
        gridDimZ: 1,
        blockDimX: THREADS,
        blockDimY: 1,
        blockDimZ: 1,
        sharedMemBytes: smem as u32,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    let mut n: std::ffi::c_int = 0;
    stream.context().bind_to_thread()?;
    // SAFETY: config and its one attribute outlive the call, the function is a loaded kernel of
    // this context, and the driver writes only `n`.
    unsafe { sys::cuOccupancyMaxActiveClusters(&mut n, f.cu_function(), &config) }.result()?;
    Ok(n.max(0) as usize)
}

/// How `gemm_x3` covers a product of 9-64 rows: `tiles` tiles of 128 weight rows (64 output
/// columns with SiLU·up), each split into `slices` slices of `kc` 32-wide chunks of K, one
/// thread-block cluster of `slices` blocks per tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Plan {
    pub tiles: usize,
    pub slices: usize,
    pub kc: usize,
    pub build: Build,
}

impl Plan {
    /// The most slices that divide K's chunks, keep a block's slice within shared memory and
    /// keep the whole grid resident; `None` outside 9-64 rows, for K not whole 32-element chunks,
    /// for lm_head-sized products (N > 16,384: each of the many tiles would re-read the
    /// activations) and where no slice count fits.
    pub fn choose(t: usize, k: usize, n: usize, silu: bool, cap: &Capacity) -> Option<Self> {
        if !(GEMV_MAX_ROWS + 1..=MAX_ROWS).contains(&t)
            || k == 0
            || !k.is_multiple_of(32)
            || n == 0
            || n > 16_384
            || (silu && !n.is_multiple_of(2))
        {
            return None;
        }
        let tiles = if silu {
            (n / 2).div_ceil(TILE_ROWS / 2)
        } else {
            n.div_ceil(TILE_ROWS)
        };
        let chunks = k / 32;
        SLICES
            .iter()
            .enumerate()
            .find(|&(i, &s)| {
                let kc = chunks / s;
                chunks.is_multiple_of(s)
                    && (1..=cap.kc_max).contains(&kc)
                    && cap.build.takes(kc)
                    && tiles <= cap.clusters[kc - 1][i]
            })
            .map(|(_, &slices)| Plan {
                tiles,
                slices,
                kc: chunks / slices,
                build: cap.build,
            })
    }

    /// Dynamic shared memory of each block.
    pub fn smem_bytes(&self) -> usize {
        self.build.smem_bytes(self.kc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model of an H100/H200: 227 KiB of opt-in shared memory (228 an SM, 1 KiB reserved a
    /// block), two blocks an SM by registers, 132 SMs in GPCs of 14-18 (clusters stay within one).
    fn hopper(build: Build) -> Capacity {
        const GPCS: [usize; 8] = [18, 18, 18, 18, 16, 16, 14, 14];
        let kc_max = (1..=64)
            .take_while(|&kc| build.smem_bytes(kc) <= 227 * 1024 - 512)
            .last()
            .unwrap();
        let clusters = (1..=kc_max)
            .map(|kc| {
                let per_sm = (228 * 1024 / (build.smem_bytes(kc) + 1024 + 512)).min(2);
                let mut row = [0; SLICES.len()];
                for (slot, &s) in row.iter_mut().zip(&SLICES) {
                    *slot = GPCS.iter().map(|g| g * per_sm / s).sum();
                }
                row
            })
            .collect();
        Capacity {
            build,
            kc_max,
            clusters,
        }
    }

    /// The kernel's layout constants are the ones the plans and the trace report assume.
    #[test]
    fn kernel_constants_match_the_plans() {
        let src = include_str!("../../../kernels/gemm_x3.cu");
        let define = |name: &str| crate::kernels::define(src, name);
        assert_eq!(define("X3_ROWS"), TILE_ROWS);
        assert_eq!(define("X3_TMAX"), MAX_ROWS);
        assert_eq!(define("X3_WARPS") * 32, THREADS as usize);
        assert_eq!(define("X3_PHASES"), TRACE_PHASES.len());
        assert!(TRACE_PHASES.len() < TRACE_SLOTS);
        // Two staged rounds of [3 parts][64 rows][X3_RK k] bf16.
        assert_eq!(STAGE_BYTES, 2 * 3 * define("X3_TMAX") * define("X3_RK") * 2);
        // The wgmma build: a round's weight tile, and two staged rounds, which can hold the
        // partial tile, then the rows' two statistics.
        assert_eq!(define("X3W_ROUND_BYTES"), WG_ROUND_BYTES);
        assert_eq!(define("X3W_STAGE_BYTES"), STAGE_BYTES);
        assert!(STAGE_BYTES >= (define("X3_TMAX") * TILE_ROWS + 2 * define("X3_TMAX")) * 4);
        for (mma, wg) in ENTRIES.iter().zip(WG_ENTRIES) {
            assert_eq!(format!("{mma}_wg"), wg);
        }
    }

    #[test]
    fn plans_cover_the_product_in_whole_chunks_and_one_wave() {
        for build in [Build::Mma, Build::Wgmma] {
            plans_cover(build);
        }
    }

    fn plans_cover(build: Build) {
        let hopper = hopper(build);
        for silu in [false, true] {
            for t in 1..=80 {
                for (k, n) in [
                    (1024, 4096),
                    (1024, 6144),
                    (2048, 1024),
                    (3072, 1024),
                    (96, 36),
                    (160, 130),
                ] {
                    let Some(p) = Plan::choose(t, k, n, silu, &hopper) else {
                        // The wgmma build takes slices of whole 64-k rounds only.
                        let odd = (k / 32) % 2 == 1;
                        assert!(
                            !(9..=64).contains(&t) || (build == Build::Wgmma && odd),
                            "no plan for t={t} k={k} n={n}"
                        );
                        continue;
                    };
                    assert_eq!(p.kc * 32 * p.slices, k, "{p:?}");
                    assert!(build == Build::Mma || p.kc % 2 == 0, "{p:?}");
                    assert!(p.kc <= hopper.kc_max, "{p:?}");
                    let i = SLICES.iter().position(|&s| s == p.slices).unwrap();
                    assert!(p.tiles <= hopper.clusters[p.kc - 1][i], "{p:?}");
                    let rows = if silu {
                        64 * p.tiles >= n / 2
                    } else {
                        128 * p.tiles >= n
                    };
                    assert!(rows, "{p:?} n={n}");
                    assert!(p.smem_bytes() <= 227 * 1024, "{p:?}");
                }
            }
        }
        // The 0.6B's products at 64 rows: QKV 32 tiles x 4 and gate/up 48 x 4 (slices of 8
        // chunks: two blocks an SM), o_proj and down 8 x 16; the lm_head stays on cuBLAS, and so
        // does a slice too long for shared memory.
        let tiles_slices =
            |k, n, silu| Plan::choose(64, k, n, silu, &hopper).map(|p| (p.tiles, p.slices));
        assert_eq!(tiles_slices(1024, 4096, false), Some((32, 4)));
        assert_eq!(tiles_slices(1024, 6144, true), Some((48, 4)));
        assert_eq!(tiles_slices(2048, 1024, false), Some((8, 16)));
        assert_eq!(tiles_slices(3072, 1024, false), Some((8, 16)));
        assert_eq!(tiles_slices(1024, 151_936, false), None);
        assert_eq!(tiles_slices(12_288, 4096, false), None);
        // Without clusters of 16 (a capped or refusing device) o_proj takes 8.
        let mut no16 = hopper.clone();
        for row in &mut no16.clusters {
            row[0] = 0;
        }
        assert_eq!(
            Plan::choose(64, 2048, 1024, false, &no16).map(|p| p.slices),
            Some(8)
        );
    }
}
