//! Products of 9-64 rows through the tensor-core kernel `gemm_x3` (the batched-decode shapes:
//! Qwen3-0.6B's four products, odd row counts, a partly filled last tile, every slice count),
//! with each of its fused prologues and epilogues, against the f64 reference and against the
//! cuBLAS path it replaces; and its two-part products (the default for three of the fusions).
//! Skips with a notice where there is no GPU (unless QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{
    activations, device_or_skip, gains, gemv_family, rel_error, weights, Rng,
};
use qfuse_core::{Backend, DType, HostTensor};
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};

/// A backend with `gemm_x3` on (its products on `wgmma` from `wgmma_from` rows, the residual and
/// SiLU products over two parts with `two_parts`, else every product over three) or off.
fn gpu(gemm_x3: bool, wgmma_from: usize, two_parts: bool) -> Option<CudaBackend> {
    let options = CudaOptions {
        gemm_x3,
        x3_two_parts: two_parts,
        x3_wgmma_from: wgmma_from,
        ..CudaOptions::default()
    };
    device_or_skip("gemm_x3 tests", CudaBackend::with_options(0, options))
}

#[test]
fn gemm_x3_matches_reference_and_cublas_path() {
    let (Some(x3), Some(cublas)) = (gpu(true, 65, false), gpu(false, 65, false)) else {
        return;
    };
    check(&x3, &cublas, false);
}

/// The same products with the `wgmma` build from 9 rows: every shape whose slices are whole
/// 64-k rounds must take it on compute capability 9.0.
#[test]
fn gemm_x3_on_wgmma_matches_reference_and_cublas_path() {
    let (Some(x3), Some(cublas)) = (gpu(true, 9, false), gpu(false, 65, false)) else {
        return;
    };
    if x3.compute_capability() != (9, 0) {
        eprintln!("gemm_x3 on wgmma: compute capability 9.0 only; skipped");
        return;
    }
    check(&x3, &cublas, true);
}

fn check(x3: &CudaBackend, cublas: &CudaBackend, wgmma: bool) {
    // The plans of the 0.6B's four products at 64 rows on this GPU, (tiles, slices, kc).
    for (k, n, silu) in [
        (1024, 4096, false),
        (2048, 1024, false),
        (1024, 6144, true),
        (3072, 1024, false),
    ] {
        eprintln!(
            "plan K={k} N={n} silu={silu}: {:?}",
            x3.gemm_x3_plan(64, k, n, silu)
        );
    }
    let mut rng = Rng::new(11);
    // (rows, K, N): the 0.6B's K at 64 and odd row counts (N cut down: the f64 reference is
    // slow); K whose chunks take 16, 4, 2 or 1 slices, of even and odd chunk counts; N not a
    // whole number of 128-row tiles; the 0.6B's gate/up plan (48 tiles of 2 slices, 8 rounds).
    for (t, k, n) in [
        (64, 1024, 512),
        (9, 2048, 256),
        (33, 3072, 256),
        (17, 1024, 384),
        (20, 128, 100),
        (64, 64, 200),
        (40, 96, 36),
        (12, 160, 130),
        (16, 1024, 3072),
    ] {
        // Every shape here takes the kernel (the gate/up pair at twice n rows included), so no
        // case passes by falling back to the cuBLAS path.
        assert!(
            x3.gemm_x3_plan(t, k, n, false).is_some(),
            "T={t} K={k} N={n}"
        );
        assert!(
            x3.gemm_x3_plan(t, k, 2 * n, true).is_some(),
            "T={t} K={k} N=2x{n} SiLU"
        );
        let on_wgmma = x3.gemm_x3_on_wgmma(t, k, n, false);
        eprintln!("T={t} K={k} N={n}: wgmma build {on_wgmma}");
        if wgmma && k % 64 == 0 && k >= 1024 {
            assert!(on_wgmma, "T={t} K={k} N={n} did not take the wgmma build");
        }
        assert!(wgmma || !on_wgmma);
        let inputs = Inputs::new(&mut rng, t, k, n);
        let (got, old, want) = (
            inputs.family(x3),
            inputs.family(cublas),
            inputs.family(&CpuRef),
        );
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

/// With `x3_two_parts` the residual-adding and SiLU products take the kernel's two-part entry
/// points (mma.sync and wgmma builds): their results differ from the three-part kernel's and
/// stay near the f64 reference (each activation carried to ~2^-17); the plain and normed
/// products are the three-part kernel's, bit for bit.
#[test]
fn two_part_products_stay_near_the_reference_and_leave_qkv_alone() {
    for wgmma_from in [65, 9] {
        let (Some(three), Some(two)) = (gpu(true, wgmma_from, false), gpu(true, wgmma_from, true))
        else {
            return;
        };
        if wgmma_from == 9 && three.compute_capability() != (9, 0) {
            continue;
        }
        let mut rng = Rng::new(12);
        for (t, k, n) in [
            (64, 1024, 512),
            (33, 3072, 256),
            (16, 1024, 384),
            (9, 2048, 256),
        ] {
            let inputs = Inputs::new(&mut rng, t, k, n);
            let (three_parts, got) = (inputs.family(&three), inputs.family(&two));
            let want = inputs.family(&CpuRef);
            for (i, ((a, b), e)) in three_parts.iter().zip(&got).zip(&want).enumerate() {
                let err = rel_error(b, e);
                eprintln!("wgmma from {wgmma_from}, T={t} K={k} N={n} op {i}: two parts {err:.2e}");
                if i >= 2 {
                    assert_ne!(a, b, "T={t} K={k} N={n} op {i} ran over three parts");
                    assert!(err < 5e-5, "T={t} K={k} N={n} op {i}: {err:e}");
                } else {
                    assert_eq!(a, b, "T={t} K={k} N={n} op {i} changed");
                }
            }
        }
    }
}

/// A product's operands: activations x [t, k] (with outliers, carried past bf16), bf16 weights
/// w [n, k] and gate/up gu [2 n, k], a norm gain g [k] and a residual r [t, n].
struct Inputs {
    x: HostTensor,
    w: HostTensor,
    gu: HostTensor,
    g: HostTensor,
    r: HostTensor,
}

impl Inputs {
    fn new(rng: &mut Rng, t: usize, k: usize, n: usize) -> Self {
        Inputs {
            x: past_bf16(activations(rng, t, k, true).unwrap(), rng),
            w: weights(rng, n, k).unwrap().to_dtype(DType::BF16),
            gu: weights(rng, 2 * n, k).unwrap().to_dtype(DType::BF16),
            g: gains(rng, k, 3.0).unwrap(),
            r: activations(rng, t, n, false).unwrap(),
        }
    }

    /// The five GEMV-family ops on `b` ([`gemv_family`]'s order).
    fn family<B: Backend>(&self, b: &B) -> Vec<Vec<f64>> {
        gemv_family(b, &self.x, &self.w, &self.gu, &self.g, &self.r).unwrap()
    }
}

/// `x` with every value scaled by a factor near 1 and rounded to f32: `activations` are
/// bf16-exact, which would leave the split's mid and lo parts zero (a product over two parts
/// would then equal the three-part one, and the kernel's lower parts would go untested).
fn past_bf16(x: HostTensor, rng: &mut Rng) -> HostTensor {
    let v = x
        .to_f64_vec()
        .into_iter()
        .map(|a| a * (1.0 + 1e-2 * rng.normal()))
        .collect();
    HostTensor::from_f64(x.shape().clone(), v)
        .unwrap()
        .to_dtype(DType::F32)
}
