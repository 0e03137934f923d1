//! `Unfused`: a backend wrapper that replaces chosen fused ops by their compositions of unfused
//! ops, so the end-to-end effect of every fused kernel can be measured (and any figure
//! reproduced) on the backend that has it.
use std::fmt;

use crate::{
    compose, AttentionConfig, Backend, BatchInfo, DType, Error, HostTensor, LayerKv, LayerWeights,
    Result, Shape,
};

/// The fused ops of the [`Backend`] trait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FusedOp {
    /// [`Backend::rms_norm_matmul`] (input norm + QKV; final norm + lm_head).
    RmsNormMatmul,
    /// [`Backend::qk_norm_rope_write_kv`].
    QkNormRopeWriteKv,
    /// [`Backend::qk_norm_rope_attention`] (the attention prologue inside the attention kernel).
    QkNormRopeAttention,
    /// [`Backend::matmul_add`] (o_proj and down_proj with their residual adds).
    MatmulAdd,
    /// [`Backend::matmul_silu_mul`].
    MatmulSiluMul,
    /// [`Backend::rms_norm_matmul_silu_mul`] (post-attention norm + gate/up + SiLU·up).
    RmsNormMatmulSiluMul,
    /// [`Backend::decoder_layer`] (a whole layer as one kernel where a backend has one).
    DecoderLayer,
}

impl FusedOp {
    /// Every fused op.
    pub const ALL: [FusedOp; 7] = [
        FusedOp::RmsNormMatmul,
        FusedOp::QkNormRopeWriteKv,
        FusedOp::QkNormRopeAttention,
        FusedOp::MatmulAdd,
        FusedOp::MatmulSiluMul,
        FusedOp::RmsNormMatmulSiluMul,
        FusedOp::DecoderLayer,
    ];

    /// The trait method's name, as `--unfused` takes it.
    pub fn name(self) -> &'static str {
        match self {
            FusedOp::RmsNormMatmul => "rms_norm_matmul",
            FusedOp::QkNormRopeWriteKv => "qk_norm_rope_write_kv",
            FusedOp::QkNormRopeAttention => "qk_norm_rope_attention",
            FusedOp::MatmulAdd => "matmul_add",
            FusedOp::MatmulSiluMul => "matmul_silu_mul",
            FusedOp::RmsNormMatmulSiluMul => "rms_norm_matmul_silu_mul",
            FusedOp::DecoderLayer => "decoder_layer",
        }
    }

    /// Parses `OP[,OP…]` or `all`.
    ///
    /// # Errors
    /// An unknown name, listing the known ones.
    pub fn parse_list(s: &str) -> Result<Vec<FusedOp>> {
        if s == "all" {
            return Ok(Self::ALL.to_vec());
        }
        s.split(',')
            .map(|n| {
                Self::ALL
                    .into_iter()
                    .find(|op| op.name() == n.trim())
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|op| op.name()).collect();
                        Error::invalid(
                            "--unfused",
                            format!("unknown fused op `{n}`; one of {} or all", names.join(", ")),
                        )
                    })
            })
            .collect()
    }
}

/// `inner` with the ops in `unfused` computed by their compositions ([`compose`]).
#[derive(Clone)]
pub struct Unfused<B: Backend> {
    inner: B,
    unfused: Vec<FusedOp>,
}

impl<B: Backend> fmt::Debug for Unfused<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Unfused({:?}, {:?})", self.inner, self.unfused)
    }
}

impl<B: Backend> Unfused<B> {
    /// `inner` with `ops` decomposed.
    pub fn new(inner: B, ops: Vec<FusedOp>) -> Self {
        Unfused {
            inner,
            unfused: ops,
        }
    }

    /// The wrapped backend.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    fn off(&self, op: FusedOp) -> bool {
        self.unfused.contains(&op)
    }
}

impl<B: Backend> Backend for Unfused<B> {
    type Tensor = B::Tensor;
    type Batch = B::Batch;
    type Graph = B::Graph;
    type Event = B::Event;
    const NAME: &'static str = B::NAME;

    fn upload(&self, host: &HostTensor) -> Result<B::Tensor> {
        self.inner.upload(host)
    }
    fn upload_weight(&self, host: &HostTensor) -> Result<B::Tensor> {
        self.inner.upload_weight(host)
    }
    fn download(&self, t: &B::Tensor) -> Result<HostTensor> {
        self.inner.download(t)
    }
    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<B::Tensor> {
        self.inner.zeros(shape, dtype)
    }
    fn kv_dtype(&self) -> DType {
        self.inner.kv_dtype()
    }
    fn prepare_batch(&self, info: &BatchInfo) -> Result<B::Batch> {
        self.inner.prepare_batch(info)
    }
    fn update_batch(&self, batch: &mut B::Batch, info: &BatchInfo) -> Result<bool> {
        self.inner.update_batch(batch, info)
    }
    fn embed(&self, table: &B::Tensor, batch: &B::Batch) -> Result<B::Tensor> {
        self.inner.embed(table, batch)
    }
    fn sample_greedy(&self, logits: &B::Tensor, batch: &mut B::Batch) -> Result<()> {
        self.inner.sample_greedy(logits, batch)
    }
    fn read_sampled(&self, batch: &B::Batch) -> Result<Vec<u32>> {
        self.inner.read_sampled(batch)
    }
    fn start_read_sampled(&self, batch: &B::Batch) -> Result<()> {
        self.inner.start_read_sampled(batch)
    }
    fn advance_batch(&self, batch: &mut B::Batch, info: &BatchInfo) -> Result<bool> {
        self.inner.advance_batch(batch, info)
    }
    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<B::Graph>> {
        self.inner.capture(f)
    }
    fn replay(&self, graph: &B::Graph) -> Result<()> {
        self.inner.replay(graph)
    }
    fn record_event(&self) -> Result<B::Event> {
        self.inner.record_event()
    }
    fn elapsed_s(&self, start: &B::Event, end: &B::Event) -> Result<f64> {
        self.inner.elapsed_s(start, end)
    }
    fn gather_rows(&self, table: &B::Tensor, ids: &[u32]) -> Result<B::Tensor> {
        self.inner.gather_rows(table, ids)
    }
    fn rms_norm(&self, x: &B::Tensor, w: &B::Tensor, eps: f64) -> Result<B::Tensor> {
        self.inner.rms_norm(x, w, eps)
    }
    fn matmul(&self, x: &B::Tensor, w: &B::Tensor) -> Result<B::Tensor> {
        self.inner.matmul(x, w)
    }
    fn add(&self, a: &B::Tensor, b: &B::Tensor) -> Result<B::Tensor> {
        self.inner.add(a, b)
    }
    fn silu_mul(&self, gate_up: &B::Tensor) -> Result<B::Tensor> {
        self.inner.silu_mul(gate_up)
    }
    fn slice_columns(&self, x: &B::Tensor, start: usize, len: usize) -> Result<B::Tensor> {
        self.inner.slice_columns(x, start, len)
    }
    fn rope(&self, x: &B::Tensor, batch: &B::Batch, cfg: &AttentionConfig) -> Result<B::Tensor> {
        self.inner.rope(x, batch, cfg)
    }
    fn write_kv(
        &self,
        cache: &mut LayerKv<B::Tensor>,
        k: &B::Tensor,
        v: &B::Tensor,
        batch: &B::Batch,
    ) -> Result<()> {
        self.inner.write_kv(cache, k, v, batch)
    }
    fn attention(
        &self,
        q: &B::Tensor,
        cache: &LayerKv<B::Tensor>,
        batch: &B::Batch,
        cfg: &AttentionConfig,
    ) -> Result<B::Tensor> {
        self.inner.attention(q, cache, batch, cfg)
    }
    fn argmax(&self, logits: &B::Tensor) -> Result<Vec<u32>> {
        self.inner.argmax(logits)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }

    fn rms_norm_matmul(
        &self,
        x: &B::Tensor,
        norm_w: &B::Tensor,
        w: &B::Tensor,
        eps: f64,
    ) -> Result<B::Tensor> {
        if self.off(FusedOp::RmsNormMatmul) {
            compose::rms_norm_matmul(self, x, norm_w, w, eps)
        } else {
            self.inner.rms_norm_matmul(x, norm_w, w, eps)
        }
    }
    fn rms_norm_logits(
        &self,
        x: &B::Tensor,
        norm_w: &B::Tensor,
        lm_head: &B::Tensor,
        eps: f64,
    ) -> Result<B::Tensor> {
        if self.off(FusedOp::RmsNormMatmul) {
            compose::rms_norm_matmul(self, x, norm_w, lm_head, eps)
        } else {
            self.inner.rms_norm_logits(x, norm_w, lm_head, eps)
        }
    }
    fn rms_norm_matmul_silu_mul(
        &self,
        x: &B::Tensor,
        norm_w: &B::Tensor,
        w: &B::Tensor,
        eps: f64,
    ) -> Result<B::Tensor> {
        if self.off(FusedOp::RmsNormMatmulSiluMul) {
            compose::rms_norm_matmul_silu_mul(self, x, norm_w, w, eps)
        } else {
            self.inner.rms_norm_matmul_silu_mul(x, norm_w, w, eps)
        }
    }
    fn qk_norm_rope_write_kv(
        &self,
        qkv: &B::Tensor,
        q_norm: &B::Tensor,
        k_norm: &B::Tensor,
        cache: &mut LayerKv<B::Tensor>,
        batch: &B::Batch,
        cfg: &AttentionConfig,
    ) -> Result<B::Tensor> {
        if self.off(FusedOp::QkNormRopeWriteKv) {
            compose::qk_norm_rope_write_kv(self, qkv, q_norm, k_norm, cache, batch, cfg)
        } else {
            self.inner
                .qk_norm_rope_write_kv(qkv, q_norm, k_norm, cache, batch, cfg)
        }
    }
    fn qk_norm_rope_attention(
        &self,
        qkv: &B::Tensor,
        q_norm: &B::Tensor,
        k_norm: &B::Tensor,
        cache: &mut LayerKv<B::Tensor>,
        batch: &B::Batch,
        cfg: &AttentionConfig,
    ) -> Result<B::Tensor> {
        if self.off(FusedOp::QkNormRopeAttention) {
            compose::qk_norm_rope_attention(self, qkv, q_norm, k_norm, cache, batch, cfg)
        } else {
            self.inner
                .qk_norm_rope_attention(qkv, q_norm, k_norm, cache, batch, cfg)
        }
    }
    fn fuses_decoder_layer(&self) -> bool {
        !self.off(FusedOp::DecoderLayer) && self.inner.fuses_decoder_layer()
    }
    fn decoder_layer(
        &self,
        x: &B::Tensor,
        w: &LayerWeights<'_, B::Tensor>,
        cache: &mut LayerKv<B::Tensor>,
        batch: &B::Batch,
        cfg: &AttentionConfig,
        eps: f64,
    ) -> Result<B::Tensor> {
        // Composed through `self`, so the other ops' settings still apply inside the layer.
        if self.off(FusedOp::DecoderLayer)
            || self.unfused.iter().any(|&op| op != FusedOp::DecoderLayer)
        {
            compose::decoder_layer(self, x, w, cache, batch, cfg, eps)
        } else {
            self.inner.decoder_layer(x, w, cache, batch, cfg, eps)
        }
    }
    fn matmul_add(&self, x: &B::Tensor, w: &B::Tensor, residual: &B::Tensor) -> Result<B::Tensor> {
        if self.off(FusedOp::MatmulAdd) {
            compose::matmul_add(self, x, w, residual)
        } else {
            self.inner.matmul_add(x, w, residual)
        }
    }
    fn matmul_silu_mul(&self, x: &B::Tensor, w: &B::Tensor) -> Result<B::Tensor> {
        if self.off(FusedOp::MatmulSiluMul) {
            compose::matmul_silu_mul(self, x, w)
        } else {
            self.inner.matmul_silu_mul(x, w)
        }
    }
}
