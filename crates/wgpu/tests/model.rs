//! The wgpu backend at model level: teacher-forced logits against cpu-ref on every golden
//! checkpoint (relative error <= 1e-3, top-1 agreement 1), greedy ids equal to transformers'
//! where its top-1 margin exceeds 4x the measured error, batched equal to alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::device_or_skip;
use qfuse_core::Backend;
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{
    decode_ahead_runs, generate, golden_dir, GoldenCase, LogitsDiff, Qwen3, Request, GOLDEN_MODELS,
};
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

#[test]
fn golden_fixtures_match_reference_and_transformers() {
    let Some(gpu) = device_or_skip(
        "wgpu model tests",
        WgpuBackend::for_tests(0, &WgpuOptions::default()),
    ) else {
        return;
    };
    eprintln!("wgpu adapter: {}", gpu.adapter_name());
    for name in GOLDEN_MODELS {
        let dir = golden_dir(name);
        let (gm, cm) = (
            Qwen3::load(&gpu, &dir).unwrap(),
            Qwen3::load(&CpuRef, &dir).unwrap(),
        );
        let vocab = cm.config().vocab_size;
        let cases = GoldenCase::load_all(&dir).unwrap();
        let requests: Vec<Request> = cases.iter().map(|c| c.request(0)).collect();
        let batched = generate(&gm, &gpu, &requests).unwrap();
        for (i, case) in cases.iter().enumerate() {
            let tokens = case.tokens();
            let ours = gpu
                .download(&gm.score(&gpu, &tokens).unwrap())
                .unwrap()
                .to_f64_vec();
            let reference = CpuRef
                .download(&cm.score(&CpuRef, &tokens).unwrap())
                .unwrap()
                .to_f64_vec();
            let d = LogitsDiff::new(&ours, &reference, vocab);
            println!(
                "{name} case {i}: relative error {:.3e} (worst row {:.3e})",
                d.rel, d.worst_rel
            );
            assert!(
                d.rel <= 1e-3 && d.worst_rel <= 1e-3,
                "{name} case {i}: {:.3e}",
                d.worst_rel
            );
            assert_eq!(d.top1_agreement, 1.0, "{name} case {i}");
            for (step, &want) in case.greedy.iter().enumerate() {
                let r = case.prompt.len() - 1 + step;
                let mut row = case.logits[r * vocab..(r + 1) * vocab].to_vec();
                row.sort_by(|a, b| b.total_cmp(a));
                if row[0] - row[1] <= 4.0 * d.max_abs[r] {
                    break;
                }
                assert_eq!(
                    batched[i].new_ids[step], want,
                    "{name} case {i} step {step}"
                );
            }
            let alone = generate(&gm, &gpu, std::slice::from_ref(&requests[i])).unwrap();
            assert_eq!(
                alone[0].new_ids, batched[i].new_ids,
                "{name} case {i}: alone vs batched"
            );
        }
    }
}

#[test]
fn decode_steps_queued_ahead_give_the_same_ids() {
    let Some(gpu) = device_or_skip(
        "wgpu decode-ahead test",
        WgpuBackend::for_tests(0, &WgpuOptions::default()),
    ) else {
        return;
    };
    for name in GOLDEN_MODELS {
        let model = Qwen3::load(&gpu, &golden_dir(name)).unwrap();
        let runs = decode_ahead_runs(&model, &gpu).unwrap();
        println!("{name}: {} steps queued ahead and used", runs.used);
        if let Some(failure) = runs.failure() {
            panic!("{name}: {failure}");
        }
    }
}
