//! Products of prompt-sized row counts through both cuBLAS paths (the three bf16 parts stacked
//! into one GEMM and summed, or their GEMMs accumulated into one output: the default from
//! `ACCUMULATE_FROM` rows, here forced from 65), with each prologue and epilogue, against the
//! f64 reference. Skips with a notice where there is no GPU (unless
//! QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{activations, device_or_skip, gains, gemv_family, rel_error, weights};
use qfuse_core::Rng;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};

const NAMES: [&str; 5] = [
    "matmul",
    "rms_norm_matmul",
    "matmul_add",
    "matmul_silu_mul",
    "rms_norm_matmul_silu_mul",
];

#[test]
fn prompt_sized_products_match_reference() {
    for accumulate_from in [65, usize::MAX] {
        let options = CudaOptions {
            accumulate_from,
            ..CudaOptions::default()
        };
        let Some(gpu) = device_or_skip(
            "prefill product tests",
            CudaBackend::with_options(0, options),
        ) else {
            return;
        };
        check(&gpu, accumulate_from);
    }
}

fn check(gpu: &CudaBackend, accumulate_from: usize) {
    let mut rng = Rng::new(3);
    // (rows, K, N): just past the threshold, an odd count, and a 2,048-token prompt's QKV width
    // cut down (the f64 reference is the slow side).
    for (t, k, n) in [(512, 256, 384), (777, 320, 200), (2048, 128, 512)] {
        let x = activations(&mut rng, t, k, true).unwrap();
        let w = weights(&mut rng, n, k).unwrap();
        let gate_up = weights(&mut rng, 2 * n, k).unwrap();
        let gain = gains(&mut rng, k, 3.0).unwrap();
        // matmul_add adds a [t, n] residual.
        let residual = activations(&mut rng, t, n, true).unwrap();
        let got = gemv_family(gpu, &x, &w, &gate_up, &gain, &residual).unwrap();
        let want = gemv_family(&CpuRef::new(), &x, &w, &gate_up, &gain, &residual).unwrap();
        for ((name, g), r) in NAMES.iter().zip(&got).zip(&want) {
            let err = rel_error(g, r);
            let what = format!("accumulating from {accumulate_from}: {t} x {k} -> {n} {name}");
            eprintln!("{what}: {err:.3e}");
            assert!(err < 2e-5, "{what}: relative error {err:.3e}");
        }
    }
}
