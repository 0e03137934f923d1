//! The flash prompt attention (`attention_flash.wgsl`) against the f64 reference, forced for
//! every batch that is not a decode step (by default only batches of 32 tokens or more take it):
//! the conformance suite's random batches, and prompts of Qwen3's head size with history.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{
    check_attention, check_attention_case, device_or_skip, AttentionCase, Rng, Tolerance,
};
use qfuse_core::AttentionConfig;
use qfuse_cpu_ref::CpuRef;
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

#[test]
fn flash_prompt_attention_matches_the_reference() {
    let options = WgpuOptions {
        flash_from: Some(1),
        ..WgpuOptions::default()
    };
    let Some(gpu) = device_or_skip("flash attention tests", WgpuBackend::for_tests(0, &options))
    else {
        return;
    };
    if !gpu.has_flash_attention() {
        eprintln!("skipped: {} lacks the workgroup memory", gpu.adapter_name());
        return;
    }
    for seed in 0..32 {
        check_attention(&gpu, &CpuRef, Tolerance::F32, seed).unwrap();
    }
    let mut rng = Rng::new(11);
    for kv_heads in [1, 2] {
        let cfg = AttentionConfig {
            num_heads: 2 * kv_heads,
            num_kv_heads: kv_heads,
            head_dim: 128,
            rope_theta: 1e6,
            qk_norm_eps: 1e-6,
        };
        // (history, new tokens) per sequence: partial query blocks, a block spanning tiles.
        let case = AttentionCase::prompts(&mut rng, cfg, 16, vec![(0, 70), (37, 21)]).unwrap();
        check_attention_case(&gpu, &CpuRef, Tolerance::F32, &mut rng, &case).unwrap();
    }
}
