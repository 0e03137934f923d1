//! Errors of the CUDA backend, and their conversion to `qfuse_core::Error`.
use cudarc::cublas::result::CublasError;
use cudarc::driver::DriverError;
use cudarc::nvrtc::CompileError;

/// A failure of the driver, NVRTC or cuBLAS.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA driver call failed.
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    /// NVRTC could not compile a kernel source.
    #[error("NVRTC compiling {file}: {err:?}")]
    Nvrtc {
        /// The kernel file.
        file: &'static str,
        /// The compiler's error (with its log).
        err: CompileError,
    },
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Cublas(#[from] CublasError),
    /// A thread compiling kernels panicked (NVRTC or the cache).
    #[error("a kernel compile thread panicked")]
    CompilerPanicked,
    /// A kernel entry point is missing from its compiled module.
    #[error("kernel `{name}` not found in its module")]
    MissingKernel {
        /// The entry point.
        name: String,
    },
}

impl From<CudaError> for qfuse_core::Error {
    fn from(e: CudaError) -> Self {
        qfuse_core::Error::Backend(Box::new(e))
    }
}

/// `?` on cudarc results inside the backend.
pub(crate) trait CudaResultExt<T> {
    fn cuda(self) -> qfuse_core::Result<T>;
}

impl<T, E: Into<CudaError>> CudaResultExt<T> for Result<T, E> {
    fn cuda(self) -> qfuse_core::Result<T> {
        self.map_err(|e| e.into().into())
    }
}
