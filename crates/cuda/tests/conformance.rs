//! Every op and fused op of the CUDA backend against the f64 reference under proptest, within
//! bf16 tolerance, with the KV cache in f32 (the default) and in bf16. Skips with a notice where
//! there is no GPU (unless QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::Tolerance;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};

qfuse_core::backend_tests!(
    backend: CudaBackend = CudaBackend::new(0),
    reference: CpuRef = CpuRef::new(),
    tolerance: Tolerance::BF16
);

mod kv_bf16 {
    use super::*;

    qfuse_core::backend_tests!(
        backend: CudaBackend = CudaBackend::with_options(0, CudaOptions { kv_dtype: qfuse_core::DType::BF16, ..Default::default() }),
        reference: CpuRef = CpuRef::new(),
        tolerance: Tolerance::BF16
    );
}
