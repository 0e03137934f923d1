//! The conformance suite on the wgpu backend with the adapter's subgroup operations left unused:
//! the shader builds for adapters without them (the `_v8` GEMV, attention's reductions in
//! workgroup memory), which the default run does not meet where the adapter has subgroups.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::Tolerance;
use qfuse_cpu_ref::CpuRef;
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

qfuse_core::backend_tests!(
    backend: WgpuBackend = WgpuBackend::for_tests(
        0,
        &WgpuOptions {
            no_subgroups: true,
            ..WgpuOptions::default()
        }
    ),
    reference: CpuRef = CpuRef::new(),
    tolerance: Tolerance::F32
);
