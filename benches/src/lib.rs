//! Shared setup for qfuse's benches: random inputs shaped like Qwen3-0.6B's decode step.
use qfuse_core::testing::{activations, gains, weights, Rng};
use qfuse_core::{Backend, Result};

/// Tensors for one fused RMSNorm + QKV projection: `x [t, hidden]`, gains, `w [out, hidden]`.
pub struct NormMatmulInputs<B: Backend> {
    /// Activations.
    pub x: B::Tensor,
    /// RMSNorm gains.
    pub norm: B::Tensor,
    /// Projection weight.
    pub w: B::Tensor,
}

impl<B: Backend> NormMatmulInputs<B> {
    /// Random inputs on `b`.
    pub fn new(b: &B, t: usize, hidden: usize, out: usize) -> Result<Self> {
        let mut rng = Rng::new(42);
        Ok(NormMatmulInputs {
            x: b.upload(&activations(&mut rng, t, hidden, true)?)?,
            norm: b.upload_weight(&gains(&mut rng, hidden, 2.0)?)?,
            w: b.upload_weight(&weights(&mut rng, out, hidden)?.to_dtype(qfuse_core::DType::BF16))?,
        })
    }
}
