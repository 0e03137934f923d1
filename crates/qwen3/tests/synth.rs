//! Synthetic checkpoints: deterministic for a seed, shaped as their config says, with the
//! statistics the design asks for (gains near 1, k_norm gains reaching ~100, a few
//! residual-stream outlier channels).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::{Backend, DeviceTensor};
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{synthetic_checkpoint, write_synthetic, Qwen3, Stage, SynthShape};

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let (a, b, c) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    write_synthetic(a.path(), SynthShape::Tiny, 4).unwrap();
    write_synthetic(b.path(), SynthShape::Tiny, 4).unwrap();
    write_synthetic(c.path(), SynthShape::Tiny, 5).unwrap();
    let read = |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b));
    assert_ne!(read(&a), read(&c));
    // The written checkpoint loads through the ordinary path, every tensor checked.
    Qwen3::load(&CpuRef, a.path()).unwrap();
}

#[test]
fn statistics_resemble_a_trained_qwen3() {
    let (cfg, ckpt) = synthetic_checkpoint(SynthShape::Tiny, 0).unwrap();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let max = |v: &[f64]| v.iter().cloned().fold(f64::MIN, f64::max);
    for l in 0..cfg.num_hidden_layers {
        let g = |n: &str| {
            ckpt.tensor(&format!("model.layers.{l}.{n}.weight"))
                .unwrap()
                .to_f64_vec()
        };
        let input = g("input_layernorm");
        assert!(
            (mean(&input) - 1.0).abs() < 0.1,
            "RMSNorm gains around 1: {}",
            mean(&input)
        );
        let k = g("self_attn.k_norm");
        assert!(
            max(&k) >= 40.0 && max(&k) <= 100.0,
            "k_norm gains reach ~100: {}",
            max(&k)
        );
    }
    // A few residual channels carry far larger values than the rest, from the first layer on.
    let model = Qwen3::from_checkpoint(&CpuRef, cfg, &ckpt).unwrap();
    let tokens: Vec<u32> = (0..16).map(|i| 1000 + 37 * i).collect();
    let mut ratio = 0.0;
    model
        .score_inspect(&CpuRef, &tokens, &mut |_, stage, t| {
            if stage == Stage::LayerOutput {
                let v = CpuRef.download(t).unwrap().to_f64_vec();
                let rms = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
                ratio = v.iter().fold(0.0f64, |m, x| m.max(x.abs())) / rms;
                assert_eq!(t.shape().dims()[1], 64);
            }
            Ok(())
        })
        .unwrap();
    assert!(ratio > 5.0, "outlier channels: max/rms = {ratio}");
}
