//! Properties the reference must satisfy by construction.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use proptest::prelude::*;
use qfuse_core::testing::{activations, AttentionCase, Rng};
use qfuse_core::{AttentionConfig, Backend, BatchInfo, HostTensor, SeqChunk};
use qfuse_cpu_ref::{CpuRef, CpuTensor};

fn up(h: &HostTensor) -> CpuTensor {
    CpuRef.upload(h).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// With every value 1, attention returns 1 exactly when its softmax weights sum to one.
    #[test]
    fn softmax_weights_sum_to_one(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let case = AttentionCase::random(&mut rng, 200).unwrap();
        let b = CpuRef;
        let mut cache = case.cache(&b).unwrap();
        let (t, w) = (case.history.num_tokens(), case.cfg.num_kv_heads * case.cfg.head_dim);
        let k = up(&activations(&mut rng, t, w, true).unwrap());
        let ones = up(&HostTensor::from_f64([t, w], vec![1.0; t * w]).unwrap());
        b.write_kv(&mut cache, &k, &ones, &case.history).unwrap();
        let q = up(&activations(&mut rng, case.batch.num_tokens(), case.cfg.num_heads * case.cfg.head_dim, false).unwrap());
        let out = b.attention(&q, &cache, &case.batch, &case.cfg).unwrap();
        for x in out.values() {
            prop_assert!((x - 1.0).abs() < 1e-12, "{x}");
        }
    }

    /// RoPE is a rotation: every head keeps its norm.
    #[test]
    fn rope_preserves_head_norms(seed in any::<u64>()) {
        let mut rng = Rng::new(seed);
        let case = AttentionCase::random(&mut rng, 5000).unwrap();
        let d = case.cfg.head_dim;
        let x = up(&activations(&mut rng, case.batch.num_tokens(), case.cfg.num_heads * d, true).unwrap());
        let y = CpuRef.rope(&x, &case.batch, &case.cfg).unwrap();
        for (hx, hy) in x.values().chunks(d).zip(y.values().chunks(d)) {
            let (nx, ny) = (hx.iter().map(|v| v * v).sum::<f64>(), hy.iter().map(|v| v * v).sum::<f64>());
            prop_assert!((nx - ny).abs() <= 1e-12 * nx, "{nx} vs {ny}");
        }
    }

    /// RMSNorm with unit gains leaves every group with mean square m / (m + eps), m its input's.
    #[test]
    fn rms_norm_normalises(seed in any::<u64>(), groups in 1usize..4, g in 1usize..100) {
        let mut rng = Rng::new(seed);
        let x = up(&activations(&mut rng, 3, g * groups, true).unwrap());
        let w = up(&HostTensor::from_f64([g], vec![1.0; g]).unwrap());
        let eps = 1e-6;
        let y = CpuRef.rms_norm(&x, &w, eps).unwrap();
        let mean_sq = |v: &[f64]| v.iter().map(|v| v * v).sum::<f64>() / g as f64;
        for (gx, gy) in x.values().chunks(g).zip(y.values().chunks(g)) {
            let (m, ms) = (mean_sq(gx), mean_sq(gy));
            prop_assert!((ms - m / (m + eps)).abs() < 1e-12, "{ms} vs {}", m / (m + eps));
        }
    }
}

/// A query over a single key returns that key's value, whatever the score.
#[test]
fn attention_over_one_key_returns_its_value() {
    let cfg = AttentionConfig {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 6,
        rope_theta: 1e6,
        qk_norm_eps: 1e-6,
    };
    let batch = BatchInfo::new(
        2,
        vec![SeqChunk {
            start_pos: 0,
            len: 1,
            block_table: vec![1],
        }],
    )
    .unwrap();
    let mut cache = qfuse_core::KvCache::new(&CpuRef, 1, 2, 2, 2, 6)
        .unwrap()
        .layer(0)
        .clone();
    let mut rng = Rng::new(7);
    let k = up(&activations(&mut rng, 1, 12, true).unwrap());
    let v = up(&activations(&mut rng, 1, 12, false).unwrap());
    CpuRef.write_kv(&mut cache, &k, &v, &batch).unwrap();
    let q = up(&activations(&mut rng, 1, 24, true).unwrap());
    let out = CpuRef.attention(&q, &cache, &batch, &cfg).unwrap();
    for h in 0..4 {
        let kv = h / 2;
        assert_eq!(
            &out.values()[h * 6..(h + 1) * 6],
            &v.values()[kv * 6..(kv + 1) * 6]
        );
    }
}

/// Positions past the sequence's own are never read: a later key cannot change an earlier output.
#[test]
fn attention_is_causal() {
    let cfg = AttentionConfig {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 4,
        rope_theta: 1e4,
        qk_norm_eps: 1e-6,
    };
    let all = BatchInfo::new(
        4,
        vec![SeqChunk {
            start_pos: 0,
            len: 5,
            block_table: vec![0, 1],
        }],
    )
    .unwrap();
    let mut rng = Rng::new(3);
    let q = up(&activations(&mut rng, 5, 8, false).unwrap());
    let k = activations(&mut rng, 5, 4, false).unwrap();
    let v = activations(&mut rng, 5, 4, false).unwrap();
    let run = |k: &HostTensor| {
        let mut cache = qfuse_core::KvCache::new(&CpuRef, 1, 2, 4, 1, 4)
            .unwrap()
            .layer(0)
            .clone();
        CpuRef.write_kv(&mut cache, &up(k), &up(&v), &all).unwrap();
        CpuRef
            .attention(&q, &cache, &all, &cfg)
            .unwrap()
            .values()
            .to_vec()
    };
    let base = run(&k);
    let mut k2 = k.to_f64_vec();
    for x in &mut k2[16..20] {
        *x += 10.0;
    }
    let changed = run(&HostTensor::from_f64([5, 4], k2).unwrap());
    assert_eq!(
        &base[..32],
        &changed[..32],
        "rows 0..4 must not see position 4"
    );
    assert_ne!(&base[32..], &changed[32..]);
}
