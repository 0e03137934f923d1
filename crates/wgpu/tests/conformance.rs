//! Every op and fused op of the wgpu backend against the f64 reference under proptest (f32
//! tolerance). On CPU machines this runs on Mesa's lavapipe; with CI=true a missing adapter fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::Tolerance;
use qfuse_cpu_ref::CpuRef;
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

qfuse_core::backend_tests!(
    backend: WgpuBackend = WgpuBackend::for_tests(0, &WgpuOptions::default()),
    reference: CpuRef = CpuRef::new(),
    tolerance: Tolerance::F32
);
