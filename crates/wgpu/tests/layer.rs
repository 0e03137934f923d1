//! The batch-1 decode layer in one dispatch (`layer.wgsl`) against the same layer composed of
//! the backend's ops, at Qwen3's shapes (the conformance suite's random shapes reach it too), and
//! with the later products zeroed so a wrong phase is named.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{activations, gains, AttentionCase, Rng};
use qfuse_core::{compose, Backend, DType, HostTensor, LayerWeights, Result};
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

/// `[out, inp]` bf16 weights scaled like a trained projection, or zeros.
fn matrix(rng: &mut Rng, out: usize, inp: usize, zero: bool) -> Result<HostTensor> {
    let s = if zero { 0.0 } else { 1.0 / (inp as f64).sqrt() };
    HostTensor::from_f64(
        [out, inp],
        (0..out * inp).map(|_| rng.normal() * s).collect(),
    )
    .map(|t| t.to_dtype(DType::BF16))
}

/// Largest |fused - composed| relative to the largest |composed - x| (the layer's update).
fn layer_error(b: &WgpuBackend, seed: u64, hidden: usize, inter: usize, zero: [bool; 2]) -> f64 {
    let mut rng = Rng::new(seed);
    let case = AttentionCase::single_decode_step(&mut rng, 600).unwrap();
    let cfg = case.cfg;
    let mut again = rng.clone();
    let (mut fused, _) = case.filled_caches(&mut rng, b, b).unwrap();
    let (mut composed, _) = case.filled_caches(&mut again, b, b).unwrap();
    let up = |h: HostTensor| b.upload_weight(&h).unwrap();
    let qkv = up(matrix(&mut rng, cfg.qkv_width(), hidden, false).unwrap());
    let o_proj = up(matrix(&mut rng, hidden, cfg.num_heads * cfg.head_dim, zero[0]).unwrap());
    let gate_up = up(matrix(&mut rng, 2 * inter, hidden, false).unwrap());
    let down = up(matrix(&mut rng, hidden, inter, zero[1]).unwrap());
    let input_norm = up(gains(&mut rng, hidden, 3.0).unwrap());
    let post_norm = up(gains(&mut rng, hidden, 3.0).unwrap());
    let q_norm = up(gains(&mut rng, cfg.head_dim, 2.0).unwrap());
    let k_norm = up(gains(&mut rng, cfg.head_dim, 100.0).unwrap());
    let xh = activations(&mut rng, 1, hidden, true).unwrap();
    let x = b.upload(&xh).unwrap();
    let w = LayerWeights {
        input_norm: &input_norm,
        qkv: &qkv,
        q_norm: &q_norm,
        k_norm: &k_norm,
        o_proj: &o_proj,
        post_norm: &post_norm,
        gate_up: &gate_up,
        down: &down,
    };
    let batch = b.prepare_batch(&case.batch).unwrap();
    let eps = 1e-6;
    let f = b
        .decoder_layer(&x, &w, &mut fused, &batch, &cfg, eps)
        .unwrap();
    let c = compose::decoder_layer(b, &x, &w, &mut composed, &batch, &cfg, eps).unwrap();
    let (f, c) = (
        b.download(&f).unwrap().to_f64_vec(),
        b.download(&c).unwrap().to_f64_vec(),
    );
    let xv = xh.to_f64_vec();
    let scale = c
        .iter()
        .zip(&xv)
        .map(|(c, x)| (c - x).abs())
        .fold(1e-30, f64::max);
    let err = f
        .iter()
        .zip(&c)
        .map(|(f, c)| (f - c).abs())
        .fold(0.0, f64::max);
    assert!(f.iter().all(|v| v.is_finite()), "non-finite output");
    err / scale
}

#[test]
fn layer_dispatch_matches_composition() {
    let b = match WgpuBackend::for_tests(0, &WgpuOptions::default()) {
        Ok(b) => b,
        Err(qfuse_core::Error::NoDevice(why)) => {
            eprintln!("skipped: no wgpu adapter ({why})");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    if !b.fuses_decoder_layer() {
        eprintln!("skipped: this adapter cannot run the layer pipeline");
        return;
    }
    for (seed, hidden, inter) in [
        (1, 256, 384),
        (2, 1024, 3072),
        (3, 512, 200),
        (4, 1024, 3072),
    ] {
        for zero in [[true, true], [false, true], [false, false]] {
            let e = layer_error(&b, seed, hidden, inter, zero);
            assert!(
                e < 1e-4,
                "seed {seed} hidden {hidden} inter {inter} zeroed {zero:?}: {e:.3e}"
            );
        }
    }
}
