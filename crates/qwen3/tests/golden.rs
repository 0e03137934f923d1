//! cpu-ref against transformers' Qwen3ForCausalLM in float64 (with its three float32 islands
//! patched to float64, see tools/golden/make_golden.py): logits to ~1e-9, identical greedy ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::DeviceTensor;
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{
    generate, golden_dir as fixture, GoldenCase, LogitsDiff, Qwen3, Request,
    GOLDEN_MODELS as MODELS,
};
/// Largest allowed ‖ours − HF‖ / ‖HF‖ of any row of logits.
const LOGITS_REL: f64 = 1e-9;

#[test]
fn teacher_forced_logits_match_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen3::load(&CpuRef, &dir).unwrap();
        let vocab = model.config().vocab_size;
        for (i, case) in GoldenCase::load_all(&dir).unwrap().iter().enumerate() {
            let tokens = case.tokens();
            let logits = model.score(&CpuRef, &tokens).unwrap();
            assert_eq!(logits.shape().dims(), &[tokens.len(), vocab]);
            let diff = LogitsDiff::new(logits.values(), &case.logits, vocab);
            println!(
                "{name} case {i} ({} tokens): worst row relative error {:.2e}",
                tokens.len(),
                diff.worst_rel
            );
            assert!(
                diff.worst_rel <= LOGITS_REL,
                "{name} case {i}: {:.3e}",
                diff.worst_rel
            );
            assert_eq!(diff.top1_agreement, 1.0);
        }
    }
}

#[test]
fn cached_greedy_generation_matches_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen3::load(&CpuRef, &dir).unwrap();
        let vocab = model.config().vocab_size;
        let cases = GoldenCase::load_all(&dir).unwrap();
        let requests: Vec<Request> = cases.iter().map(|c| c.request(vocab)).collect();
        // All cases in one batch (batched prefill, then batched decode steps over the cache) ...
        let batched = generate(&model, &CpuRef, &requests).unwrap();
        for (i, (case, got)) in cases.iter().zip(&batched).enumerate() {
            assert_eq!(got.new_ids, case.greedy, "{name} case {i}: greedy ids");
            // ... and every decode step's logits against HF's teacher-forced row for that position.
            for (step, s) in got.steps.iter().enumerate() {
                let row = &case.logits[(case.prompt.len() - 1 + step) * vocab..][..vocab];
                let mut ours = vec![0.0; vocab];
                for (&id, &v) in s.top_ids.iter().zip(&s.top_logits) {
                    ours[id as usize] = v;
                }
                let err = LogitsDiff::new(&ours, row, vocab).worst_rel;
                assert!(err <= LOGITS_REL, "{name} case {i} step {step}: {err:.3e}");
            }
        }
        // ... and each alone gives the same result as in the batch.
        for (i, r) in requests.iter().enumerate() {
            let alone = generate(&model, &CpuRef, std::slice::from_ref(r)).unwrap();
            assert_eq!(
                alone[0].new_ids, batched[i].new_ids,
                "{name} case {i}: alone vs batched"
            );
            for (a, b) in alone[0].steps.iter().zip(&batched[i].steps) {
                assert!(qfuse_core::testing::rel_error(&a.top_logits, &b.top_logits) <= 1e-13);
            }
        }
    }
}

/// `score_decoding` (a prompt batch of every sequence, then a decode step of one token for all of
/// them per position) gives `score`'s rows for those positions; sequences of other lengths or a
/// prompt of none are refused.
#[test]
fn decoding_scores_equal_teacher_forced_scores() {
    let dir = fixture(MODELS[0]);
    let model = Qwen3::load(&CpuRef, &dir).unwrap();
    let vocab = model.config().vocab_size;
    let seqs: Vec<Vec<u32>> = (0..5u32)
        .map(|s| (0..13).map(|i| (s * 31 + i * 7) % vocab as u32).collect())
        .collect();
    let got = model.score_decoding(&CpuRef, &seqs, 9).unwrap();
    assert_eq!(got.len(), 5 * 4 * vocab);
    for (s, q) in seqs.iter().enumerate() {
        let want = model.score(&CpuRef, q).unwrap();
        let d = LogitsDiff::new(
            &got[s * 4 * vocab..][..4 * vocab],
            &want.values()[9 * vocab..],
            vocab,
        );
        assert!(d.worst_rel <= 1e-12, "sequence {s}: {:.3e}", d.worst_rel);
    }
    for (seqs, prompt) in [
        (vec![vec![1, 2, 3], vec![1, 2]], 1),
        (seqs.clone(), 0),
        (seqs, 13),
    ] {
        let err = model.score_decoding(&CpuRef, &seqs, prompt).unwrap_err();
        assert!(err.to_string().contains("score_decoding"), "{err}");
    }
}
