//! Every kernel file compiles with NVRTC for Hopper and Ampere and exports the entry points the
//! backend looks up. Needs only libnvrtc (no GPU): CI installs it and sets QFUSE_REQUIRE_NVRTC=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_cuda::kernels::{compile, SOURCES};

#[test]
fn every_kernel_compiles_with_nvrtc() {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        assert_ne!(
            std::env::var("QFUSE_REQUIRE_NVRTC").as_deref(),
            Ok("1"),
            "QFUSE_REQUIRE_NVRTC=1 but libnvrtc.so.13 was not found"
        );
        eprintln!("skipping: libnvrtc.so.13 not found (set LD_LIBRARY_PATH to a CUDA 13 NVRTC)");
        return;
    }
    for arch in ["sm_90", "sm_80"] {
        for (file, src, entries) in SOURCES {
            let ptx = compile(file, src, arch)
                .unwrap_or_else(|e| panic!("{arch}: {e}"))
                .to_src();
            // QFUSE_DUMP_PTX=DIR keeps the PTX, e.g. for `ptxas -v` register and spill reports.
            if let Ok(dir) = std::env::var("QFUSE_DUMP_PTX") {
                std::fs::write(format!("{dir}/{file}.{arch}.ptx"), &ptx).unwrap();
            }
            for name in *entries {
                assert!(
                    ptx.contains(&format!(".entry {name}(")),
                    "{file} ({arch}) lacks entry point {name}"
                );
            }
        }
    }
}
