//! Every kernel file compiles with NVRTC for Hopper and Ampere and exports the entry points the
//! backend looks up. Needs only libnvrtc (no GPU): CI installs it and sets QFUSE_REQUIRE_NVRTC=1.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_cuda::kernels::{cached_ptx_in, compile, KernelBuild, SM90A_SOURCES, SOURCES};

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
    // QFUSE_KERNEL_CACHE_FILL_BUILDS=0,2,t also leaves those KernelBuilds there
    // (KernelBuild::from_spec).
    let fill = std::env::var_os("QFUSE_KERNEL_CACHE_FILL").map(std::path::PathBuf::from);
    if let Some(dir) = &fill {
        let extra = std::env::var("QFUSE_KERNEL_CACHE_FILL_BUILDS").unwrap_or_default();
        for spec in extra.split(',').filter(|t| !t.is_empty()) {
            let defines = KernelBuild::from_spec(spec)
                .unwrap_or_else(|| panic!("`{spec}` names no KernelBuild"))
                .defines();
            for (arch, (file, src, _)) in builds.clone().filter(|(a, _)| a.starts_with("sm_90")) {
                cached_ptx_in(Some(dir), file, src, arch, &defines)
                    .unwrap_or_else(|e| panic!("{arch}, build {spec}: {e}"));
            }
        }
    }
    for (arch, (file, src, entries)) in builds {
        let ptx = match &fill {
            Some(dir) if arch.starts_with("sm_90") => {
                cached_ptx_in(Some(dir), file, src, arch, "").map(|(p, _)| p)
            }
            _ => compile(file, src, arch, ""),
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
    if !nvrtc_present() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("qfuse-ptx-cache-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (file, src, _) = SOURCES
        .iter()
        .find(|(f, _, _)| *f == "rms_norm.cu")
        .unwrap();
    let (first, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90", "").unwrap();
    assert!(!hit, "empty cache");
    let stored: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(stored.len(), 1, "{stored:?}");
    let (second, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90", "").unwrap();
    assert!(hit);
    assert_eq!(first.to_src(), second.to_src());
    std::fs::write(&stored[0], "garbage").unwrap();
    let (third, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90", "").unwrap();
    assert!(!hit, "a file without an entry point is not PTX");
    assert_eq!(third.to_src(), first.to_src());
    let (_, hit) = cached_ptx_in(Some(&dir), file, src, "sm_80", "").unwrap();
    assert!(!hit, "another architecture");
    let (_, hit) = cached_ptx_in(Some(&dir), file, &format!("{src}\n"), "sm_90", "").unwrap();
    assert!(!hit, "another source");
    let early = KernelBuild::from_spec("2").unwrap().defines();
    let (other, hit) = cached_ptx_in(Some(&dir), file, src, "sm_90", &early).unwrap();
    assert!(!hit, "other defines");
    assert_ne!(other.to_src(), first.to_src());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 4);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `pdl_trigger` 1 (the default) puts a launch of the dependents before the wait of the decode
/// products only, 2 before every kernel's wait, 0 after it.
#[test]
fn pdl_trigger_builds_launch_dependents_before_the_wait() {
    if !nvrtc_present() {
        return;
    }
    let src_of = |name| SOURCES.iter().find(|(f, _, _)| *f == name).unwrap().1;
    // How many launches of the dependents entry `entry` has before its first wait.
    let launches_before_wait = |file, entry: &str, pdl_trigger| {
        let build = KernelBuild {
            pdl_trigger,
            ..KernelBuild::default()
        };
        let ptx = compile(file, src_of(file), "sm_90", &build.defines())
            .unwrap()
            .to_src();
        let body = &ptx[ptx.find(&format!(".entry {entry}(")).unwrap()..];
        let head = &body[..body.find("griddepcontrol.wait").unwrap()];
        head.matches("griddepcontrol.launch_dependents").count()
    };
    let gemv = "rms_norm_gemv_t1_r4_k4";
    assert_eq!(KernelBuild::default().defines(), "");
    assert_eq!(KernelBuild::default().pdl_trigger, 1);
    assert_eq!(launches_before_wait("gemv.cu", gemv, 0), 0);
    assert_eq!(launches_before_wait("gemv.cu", gemv, 1), 1);
    assert_eq!(launches_before_wait("rms_norm.cu", "rms_norm_f32", 1), 0);
    assert_eq!(launches_before_wait("rms_norm.cu", "rms_norm_f32", 2), 1);
}

/// The trace build gives every module its ring of stamps, taken around each wait; the default
/// build has neither.
#[test]
fn the_trace_build_stamps_every_wait() {
    if !nvrtc_present() {
        return;
    }
    let traced = KernelBuild::from_spec("t").unwrap();
    assert!(traced.trace);
    assert_eq!(traced.pdl_trigger, KernelBuild::default().pdl_trigger);
    for (file, src, _) in SOURCES
        .iter()
        .filter(|(f, _, _)| ["rms_norm.cu", "gemv.cu"].contains(f))
    {
        let ptx_of = |build: KernelBuild| {
            compile(file, src, "sm_90", &build.defines())
                .unwrap()
                .to_src()
        };
        let (with, without) = (ptx_of(traced), ptx_of(KernelBuild::default()));
        assert!(with.contains("qfuse_trace_records"), "{file}");
        assert!(with.contains("%globaltimer"), "{file}");
        assert!(!without.contains("qfuse_trace"), "{file}");
        assert!(!without.contains("%globaltimer"), "{file}");
    }
}

/// The batch-1 product blocks are as wide as the build says; the default is 8 warps.
#[test]
fn gemv_t1_blocks_take_the_builds_warps() {
    if !nvrtc_present() {
        return;
    }
    let (file, src, _) = SOURCES.iter().find(|(f, _, _)| *f == "gemv.cu").unwrap();
    for (spec, threads) in [("1", 256), ("w4", 128), ("w2", 64)] {
        let build = KernelBuild::from_spec(spec).unwrap();
        let ptx = compile(file, src, "sm_90", &build.defines())
            .unwrap()
            .to_src();
        let entry = &ptx[ptx.find(".entry rms_norm_gemv_t1_r4_k4(").unwrap()..];
        let head = &entry[..entry.find('{').unwrap()];
        assert!(
            head.contains(&format!(".maxntid {threads}")),
            "{spec}: {head}"
        );
    }
}

/// Whether libnvrtc can be loaded; prints the skip notice when not.
fn nvrtc_present() -> bool {
    // SAFETY: only tries to dlopen libnvrtc.
    let present = unsafe { cudarc::nvrtc::sys::is_culib_present() };
    if !present {
        eprintln!("skipping: libnvrtc.so.13 not found");
    }
    present
}
