//! Every kernel file compiles with NVRTC for Hopper and Ampere and exports the entry points the
//! backend looks up. Needs only libnvrtc (no GPU): CI installs it and sets QFUSE_REQUIRE_NVRTC=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_cuda::kernels::{cached_ptx_in, compile, SM90A_SOURCES, SOURCES};

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
    let builds = ["sm_90", "sm_80"]
        .into_iter()
        .flat_map(|arch| SOURCES.iter().map(move |f| (arch, f)))
        .chain(SM90A_SOURCES.iter().map(|f| ("sm_90a", f)));
    // QFUSE_KERNEL_CACHE_FILL=DIR leaves the Hopper builds in a PTX cache at DIR, as the backend
    // would (scripts/gpu-bundle ships it, so the GPU machine skips its first compile).
    let fill = std::env::var_os("QFUSE_KERNEL_CACHE_FILL").map(std::path::PathBuf::from);
    for (arch, (file, src, entries)) in builds {
        let ptx = match &fill {
            Some(dir) if arch.starts_with("sm_90") => {
                cached_ptx_in(Some(dir), file, src, arch).map(|(p, _)| p)
            }
            _ => compile(file, src, arch),
        }
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

/// The PTX cache: a miss compiles and stores, a hit returns the same text without compiling, a
/// file that is not PTX is compiled over, and another architecture or source is another entry.
#[test]
fn compiled_kernels_are_cached_on_disk() {
    // SAFETY: only tries to dlopen libnvrtc.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        eprintln!("skipping: libnvrtc.so.13 not found");
        return;
    }
    let dir = std::env::temp_dir().join(format!("qfuse-ptx-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (file, src, _) = SOURCES
        .iter()
        .find(|(f, _, _)| *f == "rms_norm.cu")
        .unwrap();
    let (first, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90").unwrap();
    assert!(!hit, "empty cache");
    let stored: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (second, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90").unwrap();
    assert!(hit);
    assert_eq!(first.to_src(), second.to_src());
    std::fs::write(&stored[0], "garbage").unwrap();
    let (third, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90").unwrap();
    assert!(!hit, "a file without an entry point is not PTX");
    assert_eq!(third.to_src(), first.to_src());
    let (_, hit) = cached_ptx_in(Some(&dir), file, src, "sm_80").unwrap();
    assert!(!hit, "another architecture");
    let (_, hit) = cached_ptx_in(Some(&dir), file, &format!("{src}\n"), "sm_90").unwrap();
    assert!(!hit, "another source");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 3);
    std::fs::remove_dir_all(&dir).unwrap();
}
