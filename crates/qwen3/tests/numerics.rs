//! `check_numerics` stops at the first exploding or non-finite activation and names its layer
//! and op; a healthy model passes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::Perturbed;
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{check_numerics, generate_with, golden_dir, GoldenCase, Qwen3, NUMERICS_LIMIT};

#[test]
fn healthy_model_passes_and_a_planted_blow_up_is_located() {
    let dir = golden_dir("gqa4-f16");
    let request = GoldenCase::load_all(&dir).unwrap()[0].request(0);

    let model = Qwen3::load(&CpuRef, &dir).unwrap();
    let mut check = check_numerics(&CpuRef, NUMERICS_LIMIT);
    generate_with(
        &model,
        &CpuRef,
        std::slice::from_ref(&request),
        Some(&mut check),
        &mut |_, _| Ok(()),
    )
    .unwrap();

    // Per layer the model calls matmul four times (QKV, o_proj, gate/up, down): call 5 is layer
    // 1's o_proj. Scaling it by 1e9 must be reported there, not earlier and not later.
    let bad = Perturbed::new(CpuRef, "matmul", 5, 1e9);
    let model = Qwen3::load(&bad, &dir).unwrap();
    let mut check = check_numerics(&bad, NUMERICS_LIMIT);
    let err = generate_with(&model, &bad, &[request], Some(&mut check), &mut |_, _| {
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer 1, o_proj+residual: max |x| ="), "{err}");

    // NaN out of layer 0's attention is named as such.
    let bad = Perturbed::new(CpuRef, "attention", 0, f64::NAN);
    let model = Qwen3::load(&bad, &dir).unwrap();
    let mut check = check_numerics(&bad, NUMERICS_LIMIT);
    let request = GoldenCase::load_all(&dir).unwrap()[0].request(0);
    let err = generate_with(&model, &bad, &[request], Some(&mut check), &mut |_, _| {
        Ok(())
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("layer 0, attention:") && err.contains("non-finite values"),
        "{err}"
    );
}
