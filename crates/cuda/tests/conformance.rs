//! Every op and fused op of the CUDA backend against the f64 reference under proptest, within
//! bf16 tolerance, with the KV cache in f32 (the default) and in bf16. Skips with a notice where
//! there is no GPU (unless QFUSE_REQUIRE_GPU=1).
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::Tolerance;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions, FlashAttention};

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

/// Prompt attention through the cuBLAS GEMM path (flash attention off) for every batch of more
/// than 8 rows (the default takes it only for chunks of 64+ tokens), in chunks of 3 query rows so
/// that chunking, causal key ranges that grow per chunk, and several sequences at once are all
/// drawn. Held to the f32 tolerance (the f32 cache leaves nothing in bf16 but the weights).
mod attention_gemm {
    use super::*;

    qfuse_core::backend_tests!(
        backend: CudaBackend = CudaBackend::with_options(0, CudaOptions { attention_gemm_min_rows: 1, attention_gemm_chunk_rows: 3, flash_attention: FlashAttention::Off, ..Default::default() }),
        reference: CpuRef = CpuRef::new(),
        tolerance: Tolerance::F32
    );
}

/// Prompt attention through the flash kernels (`kernels/flash.cu`; the default, fp16 scores on the
/// tensor cores) for every batch of more than 8 rows, wherever the head size allows (a multiple
/// of 4 up to 128; others take the GEMM path): several sequences with cached history, groups of
/// 1-8 query heads, odd head sizes padded to the 32/64/128 builds. Long prompts are in
/// `tests/flash.rs`.
mod attention_flash {
    use super::*;

    qfuse_core::backend_tests!(
        backend: CudaBackend = CudaBackend::with_options(0, CudaOptions { attention_gemm_min_rows: 1, ..Default::default() }),
        reference: CpuRef = CpuRef::new(),
        tolerance: Tolerance::F32
    );
}

/// The same with the scores in 3xTF32 too.
mod attention_flash_3xtf32 {
    use super::*;

    qfuse_core::backend_tests!(
        backend: CudaBackend = CudaBackend::with_options(0, CudaOptions { attention_gemm_min_rows: 1, flash_attention: FlashAttention::Tf32x3, ..Default::default() }),
        reference: CpuRef = CpuRef::new(),
        tolerance: Tolerance::F32
    );
}

/// The same through the fp32 flash kernel (CUDA cores).
mod attention_flash_fp32 {
    use super::*;

    qfuse_core::backend_tests!(
        backend: CudaBackend = CudaBackend::with_options(0, CudaOptions { attention_gemm_min_rows: 1, flash_attention: FlashAttention::Fp32, ..Default::default() }),
        reference: CpuRef = CpuRef::new(),
        tolerance: Tolerance::F32
    );
}
