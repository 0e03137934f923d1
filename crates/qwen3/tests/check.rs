//! Backend diffing: zero error against itself, and a planted error located at the layer and op
//! where it was planted.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::Perturbed;
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{check_against, golden_dir, Qwen3, Stage};

fn tokens() -> Vec<u32> {
    (0..24).map(|i| (i * 37 % 160) as u32).collect()
}

#[test]
fn the_reference_against_itself_is_exact() {
    let model = Qwen3::load(&CpuRef, &golden_dir("gqa4-f16")).unwrap();
    let report = check_against(&CpuRef, &model, &CpuRef, &model, &tokens(), 1e-12).unwrap();
    assert!(report.passed());
    assert_eq!(report.first_divergence, None);
    // embedding + 6 stages per layer + logits
    assert_eq!(
        report.stages.len(),
        1 + 6 * model.config().num_hidden_layers + 1
    );
    assert!(report
        .stages
        .iter()
        .all(|s| s.rel_error == 0.0 && s.ours == s.reference));
    assert_eq!(report.logits.rel, 0.0);
}

#[test]
fn a_planted_error_is_found_where_it_was_planted() {
    let dir = golden_dir("gqa4-f16");
    let reference = Qwen3::load(&CpuRef, &dir).unwrap();
    // (op, call, the stage its output first shows in): matmul call 5 is layer 1's o_proj; rope
    // call 2 is layer 1's queries; attention call 0 is layer 0's.
    for (op, call, layer, stage) in [
        ("matmul", 5, 1, Stage::AttentionResidual),
        ("rope", 2, 1, Stage::QueryRope),
        ("attention", 0, 0, Stage::Attention),
    ] {
        let bad = Perturbed::new(CpuRef, op, call, 1e-4);
        let model = Qwen3::load(&bad, &dir).unwrap();
        let report = check_against(&bad, &model, &CpuRef, &reference, &tokens(), 1e-9).unwrap();
        let first = &report.stages[report.first_divergence.expect("a divergence")];
        assert_eq!(
            (first.layer, first.stage),
            (layer, stage),
            "{op} call {call}"
        );
        assert!(!report.passed(), "{op} call {call}");
    }
}
