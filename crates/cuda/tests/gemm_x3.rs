//! Products of 9-64 rows through the tensor-core kernel `gemm_x3` (the batched-decode shapes:
//! Qwen3-0.6B's four products, odd row counts, a partly filled last tile, every slice count),
//! with each of its fused prologues and epilogues, against the f64 reference and against the
//! cuBLAS path it replaces. Skips with a notice where there is no GPU (unless
//! QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{activations, gains, rel_error, weights, Rng};
use qfuse_core::{Backend, DType, Error, HostTensor};
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};

fn gpu(gemm_x3: bool) -> Option<CudaBackend> {
    let options = CudaOptions {
        gemm_x3,
        ..CudaOptions::default()
    };
    match CudaBackend::with_options(0, options) {
        Ok(b) => Some(b),
        Err(Error::NoDevice(why)) if std::env::var("QFUSE_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipping gemm_x3 tests: no device ({why})");
            None
        }
        Err(e) => panic!("cuda backend: {e}"),
    }
}

/// The five GEMV-family ops on `b` for x [t, k], w [n, k], gate/up [2n, k].
fn products<B: Backend>(
    b: &B,
    x: &HostTensor,
    w: &HostTensor,
    gu: &HostTensor,
    g: &HostTensor,
    r: &HostTensor,
) -> Vec<Vec<f64>> {
    let (x, g, r) = (
        b.upload(x).unwrap(),
        b.upload(g).unwrap(),
        b.upload(r).unwrap(),
    );
    let (w, gu) = (b.upload_weight(w).unwrap(), b.upload_weight(gu).unwrap());
    let eps = 1e-6;
    [
        b.matmul(&x, &w).unwrap(),
        b.rms_norm_matmul(&x, &g, &w, eps).unwrap(),
        b.matmul_add(&x, &w, &r).unwrap(),
        b.matmul_silu_mul(&x, &gu).unwrap(),
        b.rms_norm_matmul_silu_mul(&x, &g, &gu, eps).unwrap(),
    ]
    .iter()
    .map(|y| b.download(y).unwrap().to_f64_vec())
    .collect()
}

#[test]
fn gemm_x3_matches_reference_and_cublas_path() {
    let (Some(x3), Some(cublas)) = (gpu(true), gpu(false)) else {
        return;
    };
    let mut rng = Rng::new(11);
    // (rows, K, N): the 0.6B's K at 64 and odd row counts (N cut down: the f64 reference is
    // slow); K whose chunks take 8, 4, 2 or 1 slices; N not a whole number of 128-row tiles.
    for (t, k, n) in [
        (64, 1024, 512),
        (9, 2048, 256),
        (33, 3072, 256),
        (17, 1024, 384),
        (20, 128, 100),
        (64, 64, 200),
        (40, 96, 36),
        (12, 160, 130),
    ] {
        let x = activations(&mut rng, t, k, true).unwrap();
        let w = weights(&mut rng, n, k).unwrap().to_dtype(DType::BF16);
        let gu = weights(&mut rng, 2 * n, k).unwrap().to_dtype(DType::BF16);
        let g = gains(&mut rng, k, 3.0).unwrap();
        let r = activations(&mut rng, t, n, false).unwrap();
        let got = products(&x3, &x, &w, &gu, &g, &r);
        let old = products(&cublas, &x, &w, &gu, &g, &r);
        let want = products(&CpuRef, &x, &w, &gu, &g, &r);
        for (i, ((a, c), e)) in got.iter().zip(&old).zip(&want).enumerate() {
            let (err, err_cublas) = (rel_error(a, e), rel_error(c, e));
            eprintln!("T={t} K={k} N={n} op {i}: gemm_x3 {err:.2e}, cuBLAS path {err_cublas:.2e}");
            assert!(err < 1e-5, "T={t} K={k} N={n} op {i}: {err:e}");
            assert!(
                err < 4.0 * err_cublas.max(1e-7),
                "T={t} K={k} N={n} op {i}: {err:e} vs {err_cublas:e}"
            );
        }
    }
}
