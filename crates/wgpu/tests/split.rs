//! Matrices larger than a storage binding (Qwen3's 151,936-row embedding is 622 MB in f32, over
//! lavapipe's 128 MiB) are split by rows; matmul and row gathers over them match the reference.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{activations, device_or_skip, gains, rel_error, weights, Rng};
use qfuse_core::{Backend, DType, DeviceTensor};
use qfuse_cpu_ref::CpuRef;
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

#[test]
fn split_weights_multiply_and_gather_like_whole_ones() {
    // 4 KiB bindings: a [50, 40] f32 weight (8 KB) lands in parts of 25 rows.
    let options = WgpuOptions {
        binding_limit: Some(4096),
        ..WgpuOptions::default()
    };
    let Some(gpu) = device_or_skip("split tests", WgpuBackend::for_tests(0, &options)) else {
        return;
    };
    let mut rng = Rng::new(1);
    // f32 [50, 40] (8 KB, two parts) and bf16 [120, 40] (9.6 KB packed, three parts).
    for (rows, dtype) in [(50, DType::F32), (120, DType::BF16)] {
        let w = weights(&mut rng, rows, 40).unwrap().to_dtype(dtype);
        let x = activations(&mut rng, 3, 40, true).unwrap();
        let (wg, wr) = (
            gpu.upload_weight(&w).unwrap(),
            CpuRef.upload_weight(&w).unwrap(),
        );
        assert_eq!(wg.dtype(), dtype);
        let (xg, xr) = (gpu.upload(&x).unwrap(), CpuRef.upload(&x).unwrap());
        let got = gpu
            .download(&gpu.matmul(&xg, &wg).unwrap())
            .unwrap()
            .to_f64_vec();
        let want = CpuRef
            .download(&CpuRef.matmul(&xr, &wr).unwrap())
            .unwrap()
            .to_f64_vec();
        assert!(
            rel_error(&got, &want) < 1e-5,
            "{dtype}: {}",
            rel_error(&got, &want)
        );
        // The fused forms over split weights: norm + product (the tied lm_head) and product +
        // residual, each part its own dispatch.
        let gain = gains(&mut rng, 40, 3.0).unwrap();
        let res = activations(&mut rng, 3, rows, false).unwrap();
        let (gg, gr) = (gpu.upload(&gain).unwrap(), CpuRef.upload(&gain).unwrap());
        let (rg, rr) = (gpu.upload(&res).unwrap(), CpuRef.upload(&res).unwrap());
        let pairs = [
            (
                gpu.rms_norm_matmul(&xg, &gg, &wg, 1e-6).unwrap(),
                CpuRef.rms_norm_matmul(&xr, &gr, &wr, 1e-6).unwrap(),
            ),
            (
                gpu.matmul_add(&xg, &wg, &rg).unwrap(),
                CpuRef.matmul_add(&xr, &wr, &rr).unwrap(),
            ),
        ];
        for (i, (g, r)) in pairs.iter().enumerate() {
            let (got, want) = (
                gpu.download(g).unwrap().to_f64_vec(),
                CpuRef.download(r).unwrap().to_f64_vec(),
            );
            assert!(rel_error(&got, &want) < 1e-5, "{dtype} fused {i}");
        }
        let ids = [0, 24, 25, 49, 3, 26];
        let got = gpu
            .download(&gpu.gather_rows(&wg, &ids).unwrap())
            .unwrap()
            .to_f64_vec();
        let want = CpuRef
            .download(&CpuRef.gather_rows(&wr, &ids).unwrap())
            .unwrap()
            .to_f64_vec();
        assert_eq!(got, want, "{dtype}");
        // The split tensor downloads whole, and other ops refuse it clearly.
        assert_eq!(gpu.download(&wg).unwrap(), w, "{dtype}");
        let err = gpu.slice_columns(&wg, 0, 2).unwrap_err().to_string();
        assert!(
            err.contains("bindings is only usable as a matmul weight or embedding table"),
            "{err}"
        );
    }
}
