//! The conformance suite run on the reference against itself (it must hold exactly), and on a
//! planted bug (it must fail): the suite can tell a right backend from a wrong one.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{self, Perturbed, Tolerance};
use qfuse_cpu_ref::CpuRef;

qfuse_core::backend_tests!(
    backend: CpuRef = Ok(CpuRef::new()),
    reference: CpuRef = CpuRef::new(),
    tolerance: Tolerance { rel: 0.0 }
);

type Check = fn(&Perturbed<CpuRef>, &CpuRef, Tolerance, u64) -> qfuse_core::Result<()>;

#[test]
fn every_check_catches_a_perturbed_op() {
    let cases: [(&str, &str, Check); 10] = [
        ("gather_rows", "gather_rows", testing::check_gather_rows),
        ("rms_norm", "rms_norm", testing::check_rms_norm),
        ("matmul", "matmul", testing::check_matmul),
        ("silu_mul", "silu_mul", testing::check_elementwise),
        ("rope", "rope", testing::check_rope),
        ("attention", "attention", testing::check_attention),
        (
            "rope inside qk_norm_rope_write_kv",
            "rope",
            testing::check_qk_norm_rope_write_kv,
        ),
        (
            "rope inside a prompt's qk_norm_rope_write_kv",
            "rope",
            testing::check_qk_norm_rope_write_kv_prompt,
        ),
        (
            "matmul inside rms_norm_matmul",
            "matmul",
            testing::check_fused_matmuls,
        ),
        (
            "matmul inside rms_norm_logits",
            "matmul",
            testing::check_logits,
        ),
    ];
    for (what, op, check) in cases {
        for seed in 0..4 {
            let bad = Perturbed::new(CpuRef::new(), op, 0, 1e-3);
            let err = check(&bad, &CpuRef::new(), Tolerance::F32, seed).expect_err(&format!(
                "{what}: a 1e-3 perturbation passed at seed {seed}"
            ));
            assert!(err.to_string().contains("relative error"), "{what}: {err}");
        }
    }
}
