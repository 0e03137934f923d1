//! Every vectorised bf16 GEMV build the adapter runs (`v8`, `wide`, `sg`, `tiled`, `wide_sg`), forced for
//! every size, gives each of the five GEMV fusions the reference's result: the conformance suite
//! only meets the build the backend picks for its shapes.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::{
    activations, device_or_skip, gains, gemv_family, rel_error, weights, Rng,
};
use qfuse_core::DType;
use qfuse_cpu_ref::CpuRef;
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

fn backend(gemv: Option<&str>) -> Option<WgpuBackend> {
    let options = WgpuOptions {
        gemv: gemv.map(str::to_string),
        ..WgpuOptions::default()
    };
    device_or_skip("GEMV build tests", WgpuBackend::for_tests(0, &options))
}

#[test]
fn every_gemv_build_matches_the_reference() {
    let Some(probe) = backend(None) else { return };
    let builds = probe.gemv_builds();
    eprintln!("{}: GEMV builds {builds:?}", probe.adapter_name());
    // lavapipe (CI's adapter) and NVIDIA's driver have subgroups of 8 and 32 consecutive
    // invocations: the subgroup builds must not be dropped by the layout check there.
    if ["llvmpipe", "NVIDIA"]
        .iter()
        .any(|a| probe.adapter_name().contains(a))
    {
        assert!(builds.contains(&"wide_sg"), "{builds:?}");
    }
    for build in builds {
        let gpu = backend(Some(build)).unwrap();
        let mut rng = Rng::new(7);
        // (rows T, K, output columns N): K = 8 · 17 leaves a remainder after the unrolled loop
        // turns (and half a 16-k step of the tiled build); odd N leaves a column pair half
        // full; 3 rows read each weight row thrice; 70 and 130 rows span partial row tiles.
        for (t, k, n) in [
            (1, 1024, 96),
            (1, 136, 37),
            (3, 264, 50),
            (2, 3072, 9),
            (70, 136, 130),
            (130, 1024, 67),
        ] {
            let x = activations(&mut rng, t, k, true).unwrap();
            let w = weights(&mut rng, n, k).unwrap().to_dtype(DType::BF16);
            let w2 = weights(&mut rng, 2 * n, k).unwrap().to_dtype(DType::BF16);
            let g = gains(&mut rng, k, 3.0).unwrap();
            let res = activations(&mut rng, t, n, false).unwrap();
            let got = gemv_family(&gpu, &x, &w, &w2, &g, &res).unwrap();
            let want = gemv_family(&CpuRef, &x, &w, &w2, &g, &res).unwrap();
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                let e = rel_error(g, r);
                assert!(
                    e < 1e-5,
                    "build {build}, fusion {i}, T={t} K={k} N={n}: {e:e}"
                );
            }
        }
    }
}
