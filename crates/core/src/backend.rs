//! The `Backend` trait: ops at fused-kernel granularity over device-resident tensors.
use std::fmt::Debug;

use crate::{compose, BatchInfo, DType, HostTensor, LayerKv, Result, Shape};

/// What every backend's tensor type tells about itself without a device round trip.
pub trait DeviceTensor {
    /// The shape.
    fn shape(&self) -> &Shape;
    /// The element type as stored on the device.
    fn dtype(&self) -> DType;
}

/// The attention geometry of a layer: heads, KV heads (GQA), head size, RoPE and q/k-norm settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionConfig {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; query head `h` reads KV head `h / (num_heads / num_kv_heads)`.
    pub num_kv_heads: usize,
    /// Size of one head (need not equal hidden / heads).
    pub head_dim: usize,
    /// RoPE base: `inv_freq[i] = theta^(-2i / head_dim)`, split-half layout.
    pub rope_theta: f64,
    /// Epsilon of the per-head q/k RMSNorm.
    pub qk_norm_eps: f64,
}

impl AttentionConfig {
    /// Width of the fused QKV projection's output: `(heads + 2 kv_heads) * head_dim`.
    pub fn qkv_width(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Whether a QKV projection `qkv_width` columns wide and q/k-norm gains of these shapes are
    /// this config's attention-prologue inputs (with a non-zero, even head_dim for RoPE).
    pub fn fits_prologue(&self, qkv_width: usize, q_norm: &Shape, k_norm: &Shape) -> bool {
        let d = self.head_dim;
        qkv_width == self.qkv_width()
            && d > 0
            && d.is_multiple_of(2)
            && q_norm.dims() == [d]
            && k_norm.dims() == [d]
    }

    /// Query heads per KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// The softmax scale, `head_dim^-0.5`.
    pub fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }
}

/// One decoder layer's weights, as [`Backend::decoder_layer`] takes them.
#[derive(Clone, Copy, Debug)]
pub struct LayerWeights<'a, T> {
    /// Gains of the pre-attention RMSNorm, `[hidden]`.
    pub input_norm: &'a T,
    /// The fused QKV projection, `[(heads + 2 kv_heads) * head_dim, hidden]`.
    pub qkv: &'a T,
    /// Per-head q RMSNorm gains, `[head_dim]`.
    pub q_norm: &'a T,
    /// Per-head k RMSNorm gains, `[head_dim]`.
    pub k_norm: &'a T,
    /// The attention output projection, `[hidden, heads * head_dim]`.
    pub o_proj: &'a T,
    /// Gains of the pre-MLP RMSNorm, `[hidden]`.
    pub post_norm: &'a T,
    /// Gate and up projections stacked, `[2 * intermediate, hidden]`.
    pub gate_up: &'a T,
    /// The down projection, `[hidden, intermediate]`.
    pub down: &'a T,
}

/// A compute backend. `self` is the device handle (context, stream, library handles, kernel cache).
///
/// Ops work on row-major tensors; "rows" are tokens of a flattened batch (`[T, width]`). Unfused
/// ops are required; fused ops have default bodies (in [`compose`]) built from the unfused ones,
/// so a backend without a fused kernel still works and a profiler can measure what each fused
/// kernel buys by calling the composition instead.
pub trait Backend: Clone + Send + Sync + Debug + 'static {
    /// A device-resident tensor owning (or sharing) its buffer.
    type Tensor: DeviceTensor + Clone + Send + Sync + Debug;
    /// A batch description in device memory (positions, slots, block tables), built once per
    /// forward pass by [`Backend::prepare_batch`] and shared by every layer.
    type Batch: AsRef<BatchInfo> + AsMut<BatchInfo> + Send + Sync + Debug;
    /// A recorded, replayable sequence of device work (a CUDA graph); `()` where unsupported.
    type Graph;
    /// A point in the backend's stream of work, for timing (a CUDA event; a host instant on the
    /// CPU).
    type Event;
    /// The backend's name as the CLI spells it (`"cpu-ref"`, `"cuda"`, `"wgpu"`).
    const NAME: &'static str;

    /// Copies a host tensor to the device, in the backend's storage dtype for it.
    ///
    /// # Errors
    /// Out of device memory, or a dtype the backend cannot store.
    fn upload(&self, host: &HostTensor) -> Result<Self::Tensor>;

    /// Copies a model weight to the device in the backend's weight format (the CUDA backend keeps
    /// matrices in bf16). The default is [`Backend::upload`].
    fn upload_weight(&self, host: &HostTensor) -> Result<Self::Tensor> {
        self.upload(host)
    }

    /// Copies a tensor back to the host, in its device dtype.
    fn download(&self, t: &Self::Tensor) -> Result<HostTensor>;

    /// A zero-filled tensor. Backends may store a wider dtype than asked (the reference stores f64).
    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<Self::Tensor>;

    /// The dtype this backend keeps KV-cache blocks in.
    fn kv_dtype(&self) -> DType;

    /// Moves a batch description to the device.
    fn prepare_batch(&self, info: &BatchInfo) -> Result<Self::Batch>;

    /// Rewrites `batch` in place for `info`, a later step of the same sequences, so that work
    /// captured on it stays valid. Returns `false` (leaving `batch` as it was) when it cannot:
    /// another sequence or token count, or beyond the capacity it was prepared for; the caller then
    /// prepares a new batch. The default never rewrites in place.
    fn update_batch(&self, batch: &mut Self::Batch, info: &BatchInfo) -> Result<bool> {
        let _ = (batch, info);
        Ok(false)
    }

    /// Embedding lookup of the batch's token ids: `table [V, C] -> [T, C]`.
    fn embed(&self, table: &Self::Tensor, batch: &Self::Batch) -> Result<Self::Tensor> {
        self.gather_rows(table, batch.as_ref().token_ids())
    }

    /// Greedy sampling: stores each row's argmax of `logits [rows, V]` in the batch, where
    /// [`Backend::read_sampled`] finds it. Device backends keep the ids on the device, so a
    /// captured decode step can include it.
    fn sample_greedy(&self, logits: &Self::Tensor, batch: &mut Self::Batch) -> Result<()> {
        let ids = self.argmax(logits)?;
        batch.as_mut().set_sampled(ids);
        Ok(())
    }

    /// The ids the last [`Backend::sample_greedy`] on this batch stored; where reads were
    /// started by [`Backend::start_read_sampled`] and not yet returned, the ids of the oldest
    /// (waiting for that copy only, not for work queued after it).
    fn read_sampled(&self, batch: &Self::Batch) -> Result<Vec<u32>> {
        Ok(batch.as_ref().sampled().to_vec())
    }

    /// Starts copying the ids of the last [`Backend::sample_greedy`] on `batch` to the host, for
    /// a later [`Backend::read_sampled`], which then waits for that copy only, not for work
    /// queued after this call (the next decode step, queued ahead, whose own sampling
    /// overwrites the ids on the device). Each call starts one more copy; reads return them
    /// oldest first. The default does nothing: `read_sampled` copies.
    fn start_read_sampled(&self, batch: &Self::Batch) -> Result<()> {
        let _ = batch;
        Ok(())
    }

    /// [`Backend::update_batch`] for `info`, the next decode step of the batch's sequences (one
    /// new token each), whose token ids are the ones the last [`Backend::sample_greedy`] on
    /// `batch` left on the device; `info`'s own ids are ignored. The step can then be queued
    /// before those ids reach the host. Returns `false` (leaving `batch` as it was) when it
    /// cannot, as `update_batch` does; the default never can.
    fn advance_batch(&self, batch: &mut Self::Batch, info: &BatchInfo) -> Result<bool> {
        let _ = (batch, info);
        Ok(false)
    }

    /// Records the device work `f` issues as a graph without running it, or returns `None` (and
    /// does not call `f`) where the backend has no graphs or they are switched off.
    fn capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<Self::Graph>> {
        let _ = f;
        Ok(None)
    }

    /// Runs a captured graph once.
    fn replay(&self, graph: &Self::Graph) -> Result<()> {
        let _ = graph;
        Err(crate::Error::invalid(
            "replay",
            format!("the {} backend has no graphs", Self::NAME),
        ))
    }

    /// Marks the current point of the queued work.
    fn record_event(&self) -> Result<Self::Event>;

    /// Seconds of device work between two recorded events (waits for `end` to complete).
    fn elapsed_s(&self, start: &Self::Event, end: &Self::Event) -> Result<f64>;

    /// Gathers rows: `out[t] = table[ids[t]]`, `table [N, C] -> [ids.len(), C]` (embedding lookup,
    /// or picking the last row of each sequence before `lm_head`).
    ///
    /// # Errors
    /// An id `>= N`, named in the message.
    fn gather_rows(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;

    /// RMSNorm over each contiguous group of `w.len()` elements of every row:
    /// `y = x * rsqrt(mean(x²) + eps) * w` with the statistic in fp32 or wider. `x [T, C]`,
    /// `w [G]` with `C % G == 0` (`G = C` for the hidden-state norms, `G = head_dim` for q/k-norm).
    fn rms_norm(&self, x: &Self::Tensor, w: &Self::Tensor, eps: f64) -> Result<Self::Tensor>;

    /// `x [T, in] · w [out, in]ᵀ -> [T, out]`.
    fn matmul(&self, x: &Self::Tensor, w: &Self::Tensor) -> Result<Self::Tensor>;

    /// Elementwise sum of two tensors of one shape.
    fn add(&self, a: &Self::Tensor, b: &Self::Tensor) -> Result<Self::Tensor>;

    /// `silu(gate) * up` where `gate_up [T, 2I]` holds gate in columns `0..I`, up in `I..2I`.
    fn silu_mul(&self, gate_up: &Self::Tensor) -> Result<Self::Tensor>;

    /// Columns `start..start + len` of `x [T, C]`.
    fn slice_columns(&self, x: &Self::Tensor, start: usize, len: usize) -> Result<Self::Tensor>;

    /// Split-half ("rotate_half") RoPE on every head of `x [T, n * head_dim]` at the batch's
    /// positions: for `i < head_dim / 2`, `(a, b) = (x[i], x[i + head_dim / 2])` becomes
    /// `(a cos θ - b sin θ, b cos θ + a sin θ)` with `θ = pos * theta^(-2i / head_dim)`.
    fn rope(
        &self,
        x: &Self::Tensor,
        batch: &Self::Batch,
        cfg: &AttentionConfig,
    ) -> Result<Self::Tensor>;

    /// Writes each token's `k, v [T, kv_heads * head_dim]` to its cache slot.
    fn write_kv(
        &self,
        cache: &mut LayerKv<Self::Tensor>,
        k: &Self::Tensor,
        v: &Self::Tensor,
        batch: &Self::Batch,
    ) -> Result<()>;

    /// Causal attention of `q [T, heads * head_dim]` over each token's sequence in the cache,
    /// positions `0..=pos` (the batch's keys must already be written), scores scaled by
    /// `head_dim^-0.5`, softmax in fp32 or wider. Returns `[T, heads * head_dim]`.
    fn attention(
        &self,
        q: &Self::Tensor,
        cache: &LayerKv<Self::Tensor>,
        batch: &Self::Batch,
        cfg: &AttentionConfig,
    ) -> Result<Self::Tensor>;

    /// Index of the largest value of each row of `logits [T, V]` (lowest index on ties).
    /// The default downloads the logits; device backends override it so greedy decoding copies
    /// only `T` ids to the host.
    fn argmax(&self, logits: &Self::Tensor) -> Result<Vec<u32>> {
        compose::argmax_on_host(self, logits)
    }

    /// Waits until all queued work has finished.
    fn synchronize(&self) -> Result<()>;

    /// Sends the work recorded so far to the device without waiting for it, where a backend
    /// records work before submitting it (wgpu's command buffers); the default does nothing.
    fn flush(&self) -> Result<()> {
        Ok(())
    }

    /// Fused `matmul(rms_norm(x, norm_w, eps), w)`: the pre-attention norm with the QKV
    /// projection (the final norm with `lm_head` is [`Backend::rms_norm_logits`]).
    fn rms_norm_matmul(
        &self,
        x: &Self::Tensor,
        norm_w: &Self::Tensor,
        w: &Self::Tensor,
        eps: f64,
    ) -> Result<Self::Tensor> {
        compose::rms_norm_matmul(self, x, norm_w, w, eps)
    }

    /// The final norm and the vocabulary projection, `matmul(rms_norm(x, norm_w, eps), lm_head)`:
    /// [`Backend::rms_norm_matmul`] for the one product whose output is never fed back into the
    /// network (it is only compared and sampled), so its error does not grow through later layers.
    /// A backend may carry its activations there to ~2^-17 of themselves instead of exactly
    /// (CUDA: two bf16 parts on the tensor cores instead of three), far below one bf16 rounding
    /// of the logits; the default is `rms_norm_matmul`.
    fn rms_norm_logits(
        &self,
        x: &Self::Tensor,
        norm_w: &Self::Tensor,
        lm_head: &Self::Tensor,
        eps: f64,
    ) -> Result<Self::Tensor> {
        self.rms_norm_matmul(x, norm_w, lm_head, eps)
    }

    /// Fused `silu_mul(matmul(rms_norm(x, norm_w, eps), w_gate_up))`: the pre-MLP norm with the
    /// gate/up projection and its activation.
    fn rms_norm_matmul_silu_mul(
        &self,
        x: &Self::Tensor,
        norm_w: &Self::Tensor,
        w_gate_up: &Self::Tensor,
        eps: f64,
    ) -> Result<Self::Tensor> {
        compose::rms_norm_matmul_silu_mul(self, x, norm_w, w_gate_up, eps)
    }

    /// Fused attention prologue on `qkv [T, (heads + 2 kv_heads) * head_dim]`: per-head q_norm and
    /// k_norm, RoPE on q and k, k and v written to the cache. Returns q `[T, heads * head_dim]`.
    fn qk_norm_rope_write_kv(
        &self,
        qkv: &Self::Tensor,
        q_norm: &Self::Tensor,
        k_norm: &Self::Tensor,
        cache: &mut LayerKv<Self::Tensor>,
        batch: &Self::Batch,
        cfg: &AttentionConfig,
    ) -> Result<Self::Tensor> {
        compose::qk_norm_rope_write_kv(self, qkv, q_norm, k_norm, cache, batch, cfg)
    }

    /// Fused attention with its prologue: [`Backend::qk_norm_rope_write_kv`] then
    /// [`Backend::attention`] on the q it returns, as one op, so a backend can form q (and the new
    /// keys) inside the attention kernel where every sequence adds one token (a decode step).
    /// Returns `[T, heads * head_dim]`.
    #[allow(clippy::too_many_arguments)]
    fn qk_norm_rope_attention(
        &self,
        qkv: &Self::Tensor,
        q_norm: &Self::Tensor,
        k_norm: &Self::Tensor,
        cache: &mut LayerKv<Self::Tensor>,
        batch: &Self::Batch,
        cfg: &AttentionConfig,
    ) -> Result<Self::Tensor> {
        compose::qk_norm_rope_attention(self, qkv, q_norm, k_norm, cache, batch, cfg)
    }

    /// Whether [`Backend::decoder_layer`] is more than its composition here (a layer kernel),
    /// so a profiler has something to compare; `false` by default.
    fn fuses_decoder_layer(&self) -> bool {
        false
    }

    /// A whole decoder layer on the residual stream `x [T, hidden]`: input norm + QKV, the
    /// attention prologue and attention ([`Backend::qk_norm_rope_attention`]), o_proj + residual,
    /// post-attention norm + gate/up + SiLU·up, down + residual. Returns the layer's output
    /// `[T, hidden]`. A backend may run it as one kernel where that pays (a batch-1 decode step).
    #[allow(clippy::too_many_arguments)]
    fn decoder_layer(
        &self,
        x: &Self::Tensor,
        w: &LayerWeights<'_, Self::Tensor>,
        cache: &mut LayerKv<Self::Tensor>,
        batch: &Self::Batch,
        cfg: &AttentionConfig,
        eps: f64,
    ) -> Result<Self::Tensor> {
        compose::decoder_layer(self, x, w, cache, batch, cfg, eps)
    }

    /// Fused `residual + matmul(x, w)`: o_proj and down_proj with their residual adds.
    fn matmul_add(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        residual: &Self::Tensor,
    ) -> Result<Self::Tensor> {
        compose::matmul_add(self, x, w, residual)
    }

    /// Fused `silu_mul(matmul(x, w_gate_up))`: the MLP's gate/up projection and activation.
    fn matmul_silu_mul(&self, x: &Self::Tensor, w_gate_up: &Self::Tensor) -> Result<Self::Tensor> {
        compose::matmul_silu_mul(self, x, w_gate_up)
    }
}
