//! Products of prompt-sized row counts through every path that runs them, with each prologue and
//! epilogue, against the f64 reference: the Hopper kernel over the two or three bf16 parts
//! (`kernels/gemm_wgmma.cu`), and the cuBLAS paths (three parts stacked into one GEMM and summed,
//! or their GEMMs accumulated into one output: the default from `ACCUMULATE_FROM` rows, here
//! forced from 65; two parts accumulated). Skips with a notice where there is no GPU (unless
//! QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{activations, device_or_skip, gains, gemv_family, rel_error, weights};
use qfuse_core::{DType, Rng};
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions, PromptParts};

const NAMES: [&str; 5] = [
    "matmul",
    "rms_norm_matmul",
    "matmul_add",
    "matmul_silu_mul",
    "rms_norm_matmul_silu_mul",
];

/// A product family's inputs: x [t, k], bf16 weights w [n, k] and gate/up [2n, k] (`weights`
/// stores one matrix in four as f32, which takes the fp32 GEMM: these paths are the bf16 ones),
/// the norm's gain and matmul_add's [t, n] residual.
struct Inputs {
    x: qfuse_core::HostTensor,
    w: qfuse_core::HostTensor,
    gate_up: qfuse_core::HostTensor,
    gain: qfuse_core::HostTensor,
    residual: qfuse_core::HostTensor,
}

impl Inputs {
    fn new(rng: &mut Rng, t: usize, k: usize, n: usize) -> Self {
        Inputs {
            x: activations(rng, t, k, true).unwrap(),
            w: weights(rng, n, k).unwrap().to_dtype(DType::BF16),
            gate_up: weights(rng, 2 * n, k).unwrap().to_dtype(DType::BF16),
            gain: gains(rng, k, 3.0).unwrap(),
            residual: activations(rng, t, n, true).unwrap(),
        }
    }

    /// The five products of `NAMES` on backend `b`.
    fn family<B: qfuse_core::Backend>(&self, b: &B) -> Vec<Vec<f64>> {
        gemv_family(
            b,
            &self.x,
            &self.w,
            &self.gate_up,
            &self.gain,
            &self.residual,
        )
        .unwrap()
    }
}

/// The backend with `options`, or `None` (and a notice) where there is no GPU.
fn gpu_with(options: CudaOptions) -> Option<CudaBackend> {
    device_or_skip("product tests", CudaBackend::with_options(0, options))
}

#[test]
fn prompt_sized_products_match_reference() {
    let paths = [
        ("wgmma, three parts", true, usize::MAX, PromptParts::Three),
        ("wgmma, two parts", true, usize::MAX, PromptParts::Two),
        ("cuBLAS, accumulating", false, 65, PromptParts::Three),
        ("cuBLAS, stacked", false, usize::MAX, PromptParts::Three),
        ("cuBLAS, two parts", false, usize::MAX, PromptParts::Two),
    ];
    let mut gpus = Vec::new();
    for (what, wgmma, accumulate_from, prompt_parts) in paths {
        let options = CudaOptions {
            wgmma,
            accumulate_from,
            prompt_parts,
            ..CudaOptions::default()
        };
        let Some(gpu) = gpu_with(options) else {
            return;
        };
        gpus.push((what, wgmma, gpu));
    }
    let hopper = ["H100", "H200"]
        .iter()
        .any(|card| gpus[0].2.device_name().contains(card));
    let mut rng = Rng::new(3);
    // (rows, K, N): just past the threshold, an odd count (its N fits no wgmma block), a K that
    // is no whole number of 8-value groups (the split's scalar build), a
    // 2,048-token prompt's width cut down, a partial last row block over 16 rounds of K, a
    // down_proj's depth (48 rounds), and wide ones of one round and of four.
    for (t, k, n) in [
        (512, 256, 384),
        (777, 320, 200),
        (129, 100, 200),
        (2048, 128, 512),
        (333, 1024, 256),
        (300, 3072, 512),
        (2048, 64, 4096),
        (2048, 256, 4096),
    ] {
        let inputs = Inputs::new(&mut rng, t, k, n);
        let want = inputs.family(&CpuRef::new());
        for (path, wgmma, gpu) in &gpus {
            let ran = [
                gpu.uses_wgmma(t, k, n, false),
                gpu.uses_wgmma(t, k, 2 * n, true),
            ];
            if *wgmma && hopper && n != 200 {
                assert!(ran.iter().all(|&r| r), "{path}: {t} x {k} -> {n}: no wgmma");
            }
            let got = inputs.family(gpu);
            for (i, ((name, g), r)) in NAMES.iter().zip(&got).zip(&want).enumerate() {
                let err = rel_error(g, r);
                let path = if ran[usize::from(i >= 3)] || !*wgmma {
                    path
                } else {
                    "cuBLAS (no wgmma tile fits)"
                };
                let what = format!("{path}: {t} x {k} -> {n} {name}");
                eprintln!("{what}: {err:.3e}");
                assert!(err < 2e-5, "{what}: relative error {err:.3e}");
            }
        }
    }
}

/// Products of 9–64 rows that `gemm_wgmma.cu` runs: with `gemm_x3` off every fitting shape, and
/// with it on the lm_head-sized ones it refuses (N > 16,384). A plain store of at most 64 rows
/// takes the kernel's 64-row build, the other epilogues its 128-row tile.
#[test]
fn batch_sized_products_on_wgmma_match_reference() {
    let mut gpus = Vec::new();
    for gemm_x3 in [false, true] {
        let options = CudaOptions {
            gemm_x3,
            ..CudaOptions::default()
        };
        let Some(gpu) = gpu_with(options) else {
            return;
        };
        gpus.push((gemm_x3, gpu));
    }
    if gpus[0].1.compute_capability() != (9, 0) {
        eprintln!("batch-sized wgmma products: compute capability 9.0 only; skipped");
        return;
    }
    let mut rng = Rng::new(5);
    for (gemm_x3, t, k, n) in [
        (false, 64, 1024, 512),
        (false, 9, 256, 384),
        (false, 33, 128, 256),
        (true, 64, 256, 16_512),
        (true, 17, 128, 16_512),
    ] {
        let gpu = &gpus[usize::from(gemm_x3)].1;
        assert!(gpu.uses_wgmma(t, k, n, false), "{t} x {k} -> {n}: no wgmma");
        assert!(
            gpu.gemm_x3_plan(t, k, n, false).is_none(),
            "{t} x {k} -> {n} took gemm_x3"
        );
        let inputs = Inputs::new(&mut rng, t, k, n);
        let want = inputs.family(&CpuRef::new());
        let got = inputs.family(gpu);
        for ((name, g), r) in NAMES.iter().zip(&got).zip(&want) {
            let err = rel_error(g, r);
            let what = format!("gemm_x3 {gemm_x3}: {t} x {k} -> {n} {name}");
            eprintln!("{what}: {err:.3e}");
            assert!(err < 2e-5, "{what}: relative error {err:.3e}");
        }
    }
}
