//! Shared setup for qfuse's benches: random inputs shaped like Qwen3-0.6B's decode step.
use qfuse_core::testing::{activations, gains, weights, Rng};
use qfuse_core::{Backend, DType, Result};

/// Qwen3-0.6B's widths.
const HIDDEN: usize = 1024;
const QKV: usize = 4096;
const ATTN: usize = 2048;
const INTERMEDIATE: usize = 3072;

/// The activations and norm gains of one decode step's fused GEMVs at `t` rows (their weights:
/// [`LayerWeights`]).
pub struct DecodeInputs<B: Backend> {
    /// Residual-stream activations `[t, 1024]`.
    pub x: B::Tensor,
    /// Attention output `[t, 2048]`.
    pub attn: B::Tensor,
    /// MLP activations `[t, 3072]`.
    pub mlp: B::Tensor,
    /// RMSNorm gains `[1024]`.
    pub norm: B::Tensor,
}

/// Layers of a back-to-back series: Qwen3-0.6B's 28, whose copies of each matrix (117–353 MB)
/// are several times the 50 MB L2 of an H100 or H200.
pub const LAYERS: usize = 28;

/// The decode step's matrices in bf16, as checkpoints store them, one copy per layer (the same
/// random values uploaded again: only the bytes each call reads matter).
pub struct LayerWeights<B: Backend> {
    /// `[4096, 1024]` per layer.
    pub w_qkv: Vec<B::Tensor>,
    /// `[2 x 3072, 1024]` per layer.
    pub w_gate_up: Vec<B::Tensor>,
    /// `[1024, 2048]` per layer.
    pub w_o: Vec<B::Tensor>,
    /// `[1024, 3072]` per layer.
    pub w_down: Vec<B::Tensor>,
}

impl<B: Backend> LayerWeights<B> {
    /// Random weights on `b`, `layers` copies of each.
    pub fn new(b: &B, layers: usize) -> Result<Self> {
        let mut rng = Rng::new(43);
        let mut copies = |out, inp| -> Result<Vec<B::Tensor>> {
            let host = weights(&mut rng, out, inp)?.to_dtype(DType::BF16);
            (0..layers).map(|_| b.upload_weight(&host)).collect()
        };
        Ok(LayerWeights {
            w_qkv: copies(QKV, HIDDEN)?,
            w_gate_up: copies(2 * INTERMEDIATE, HIDDEN)?,
            w_o: copies(HIDDEN, ATTN)?,
            w_down: copies(HIDDEN, INTERMEDIATE)?,
        })
    }
}

impl<B: Backend> DecodeInputs<B> {
    /// Random inputs on `b`.
    pub fn new(b: &B, t: usize) -> Result<Self> {
        let mut rng = Rng::new(7);
        Ok(DecodeInputs {
            x: b.upload(&activations(&mut rng, t, HIDDEN, true)?)?,
            attn: b.upload(&activations(&mut rng, t, ATTN, false)?)?,
            mlp: b.upload(&activations(&mut rng, t, INTERMEDIATE, false)?)?,
            norm: b.upload_weight(&gains(&mut rng, HIDDEN, 2.0)?)?,
        })
    }

    /// Bytes of bf16 weights each product reads once.
    pub fn qkv_bytes(&self) -> u64 {
        (2 * QKV * HIDDEN) as u64
    }

    pub fn gate_up_bytes(&self) -> u64 {
        (2 * 2 * INTERMEDIATE * HIDDEN) as u64
    }

    pub fn o_bytes(&self) -> u64 {
        (2 * HIDDEN * ATTN) as u64
    }

    pub fn down_bytes(&self) -> u64 {
        (2 * HIDDEN * INTERMEDIATE) as u64
    }
}
