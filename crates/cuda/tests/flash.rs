//! Long prompts through the flash attention kernels (`kernels/flash.cu`: fp32, 3xTF32, fp16
//! scores, fp16 scores and P·V; `kernels/flash_wgmma.cu`, the default on compute capability 9.0
//! for head sizes of 65-128) against the f64 reference: several 128-row tiles and 64-key tiles, the
//! causal diagonal inside a tile, tiles that straddle tokens (groups of 3), cached history before
//! the chunk, several sequences in one launch and in separate scratch groups, each of the 32, 64
//! and 128 builds (head sizes padded up to them), and both cache types. Skips with a notice where
//! there is no GPU (unless QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{check_attention_case, device_or_skip, AttentionCase, Tolerance};
use qfuse_core::AttentionConfig;
use qfuse_core::DType;
use qfuse_core::Rng;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions, FlashAttention};

/// fp32 end to end (the f32 cache): the fp32 kernel's only rounding is fp32's, and 3xTF32's
/// products are exact to ~2^-22.
const FP32_EXACT: Tolerance = Tolerance { rel: 1e-5 };

const KINDS: [FlashAttention; 5] = [
    FlashAttention::Fp32,
    FlashAttention::Tf32x3,
    FlashAttention::F16Scores,
    FlashAttention::F16,
    FlashAttention::Wgmma,
];

fn gpu(kv_dtype: DType, flash_attention: FlashAttention) -> Option<CudaBackend> {
    let options = CudaOptions {
        kv_dtype,
        flash_attention,
        ..CudaOptions::default()
    };
    device_or_skip(
        "flash attention tests",
        CudaBackend::with_options(0, options),
    )
}

fn cfg(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> AttentionConfig {
    AttentionConfig {
        num_heads,
        num_kv_heads,
        head_dim,
        rope_theta: 1e6,
        qk_norm_eps: 1e-6,
    }
}

/// (heads, KV heads, head size, block size, sequences as (cached, new) tokens).
type Shape = (usize, usize, usize, usize, Vec<(usize, usize)>);

fn shapes() -> Vec<Shape> {
    vec![
        // Qwen3-0.6B's heads, one 300-token prompt: 5 row tiles, 5 key tiles.
        (16, 8, 128, 16, vec![(0, 300)]),
        // A chunk after cached history, and a second prompt; 8 query heads per KV head.
        (8, 1, 128, 3, vec![(200, 100), (0, 77)]),
        // Groups of 3: tiles straddle tokens.
        (6, 2, 128, 16, vec![(5, 200)]),
        // The 128 builds padded (d = 96; the wgmma kernel's zero dims), several row tiles.
        (4, 2, 96, 16, vec![(30, 150)]),
        // The 64 build at its size and padded (d = 36), and the 32 build padded (d = 20).
        (8, 2, 64, 1, vec![(64, 130)]),
        (3, 3, 36, 16, vec![(10, 140), (0, 64)]),
        (4, 2, 20, 5, vec![(0, 96)]),
    ]
}

fn run(kv_dtype: DType, tol: Tolerance) {
    for kind in KINDS {
        let Some(gpu) = gpu(kv_dtype, kind) else {
            return;
        };
        let reference = CpuRef::new();
        let mut rng = Rng::new(5);
        for (h, kvh, d, block_size, lens) in shapes() {
            let case = AttentionCase::prompts(&mut rng, cfg(h, kvh, d), block_size, lens.clone())
                .expect("case");
            check_attention_case(&gpu, &reference, tol, &mut rng, &case).unwrap_or_else(|e| {
                panic!("{kind:?}: {h} heads / {kvh} KV / d {d}, {lens:?}: {e}")
            });
        }
    }
}

#[test]
fn flash_attention_matches_reference_f32_cache() {
    run(DType::F32, FP32_EXACT);
}

#[test]
fn flash_attention_matches_reference_bf16_cache() {
    run(DType::BF16, Tolerance::BF16);
}

/// Many sequences whose gathered keys overflow one scratch group (the 256 MiB bound), so the
/// launch splits into groups with their own key offsets.
#[test]
fn flash_attention_splits_long_batches_into_groups() {
    // 8 KV heads of 128: 8 KiB of gathered K and V a key (16 KiB split for 3xTF32), so 256 MiB
    // is 32k keys (16k); three sequences of 12k keys (the new 64 after cached history) need two
    // groups (three).
    let lens = vec![(12_000, 64), (12_000, 64), (12_000, 64)];
    for kind in KINDS {
        let Some(gpu) = gpu(DType::F32, kind) else {
            return;
        };
        let mut rng = Rng::new(9);
        let case =
            AttentionCase::prompts(&mut rng, cfg(16, 8, 128), 16, lens.clone()).expect("case");
        check_attention_case(&gpu, &CpuRef::new(), FP32_EXACT, &mut rng, &case)
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
    }
}
