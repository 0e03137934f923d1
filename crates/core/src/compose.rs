//! Fused ops written as compositions of unfused ones: the trait's default bodies, and the
//! baseline a profiler times each fused kernel against.
use crate::{
    AttentionConfig, Backend, DeviceTensor, Error, HostData, LayerKv, LayerWeights, Result,
};

/// `matmul(rms_norm(x, norm_w, eps), w)`.
pub fn rms_norm_matmul<B: Backend>(
    b: &B,
    x: &B::Tensor,
    norm_w: &B::Tensor,
    w: &B::Tensor,
    eps: f64,
) -> Result<B::Tensor> {
    b.matmul(&b.rms_norm(x, norm_w, eps)?, w)
}

/// `silu_mul(matmul(rms_norm(x, norm_w, eps), w_gate_up))`.
pub fn rms_norm_matmul_silu_mul<B: Backend>(
    b: &B,
    x: &B::Tensor,
    norm_w: &B::Tensor,
    w_gate_up: &B::Tensor,
    eps: f64,
) -> Result<B::Tensor> {
    b.matmul_silu_mul(&b.rms_norm(x, norm_w, eps)?, w_gate_up)
}

/// `attention(qk_norm_rope_write_kv(qkv, …), …)`.
pub fn qk_norm_rope_attention<B: Backend>(
    b: &B,
    qkv: &B::Tensor,
    q_norm: &B::Tensor,
    k_norm: &B::Tensor,
    cache: &mut LayerKv<B::Tensor>,
    batch: &B::Batch,
    cfg: &AttentionConfig,
) -> Result<B::Tensor> {
    let q = b.qk_norm_rope_write_kv(qkv, q_norm, k_norm, cache, batch, cfg)?;
    b.attention(&q, cache, batch, cfg)
}

/// A decoder layer as the backend's fused ops, in the order the model runs them.
#[allow(clippy::too_many_arguments)]
pub fn decoder_layer<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w: &LayerWeights<'_, B::Tensor>,
    cache: &mut LayerKv<B::Tensor>,
    batch: &B::Batch,
    cfg: &AttentionConfig,
    eps: f64,
) -> Result<B::Tensor> {
    let h = attention_block(b, x, w, cache, batch, cfg, eps)?;
    mlp_block(b, &h, w, eps)
}

/// A decoder layer's first half: `x + o_proj(attention(qk_norm_rope(qkv(rms_norm(x)))))`.
#[allow(clippy::too_many_arguments)]
pub fn attention_block<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w: &LayerWeights<'_, B::Tensor>,
    cache: &mut LayerKv<B::Tensor>,
    batch: &B::Batch,
    cfg: &AttentionConfig,
    eps: f64,
) -> Result<B::Tensor> {
    let qkv = b.rms_norm_matmul(x, w.input_norm, w.qkv, eps)?;
    let o = b.qk_norm_rope_attention(&qkv, w.q_norm, w.k_norm, cache, batch, cfg)?;
    b.matmul_add(&o, w.o_proj, x)
}

/// A decoder layer's second half: `h + down(silu_mul(gate_up(rms_norm(h))))`.
pub fn mlp_block<B: Backend>(
    b: &B,
    h: &B::Tensor,
    w: &LayerWeights<'_, B::Tensor>,
    eps: f64,
) -> Result<B::Tensor> {
    let g = b.rms_norm_matmul_silu_mul(h, w.post_norm, w.gate_up, eps)?;
    b.matmul_add(&g, w.down, h)
}

/// Split `qkv`, per-head norms, RoPE, cache write; returns q.
pub fn qk_norm_rope_write_kv<B: Backend>(
    b: &B,
    qkv: &B::Tensor,
    q_norm: &B::Tensor,
    k_norm: &B::Tensor,
    cache: &mut LayerKv<B::Tensor>,
    batch: &B::Batch,
    cfg: &AttentionConfig,
) -> Result<B::Tensor> {
    let (_, width) = qkv.shape().as_matrix("qk_norm_rope_write_kv")?;
    if width != cfg.qkv_width() {
        return Err(Error::invalid(
            "qk_norm_rope_write_kv",
            format!(
                "qkv has {width} columns, the attention config needs {}",
                cfg.qkv_width()
            ),
        ));
    }
    let q_width = cfg.num_heads * cfg.head_dim;
    let kv_width = cfg.num_kv_heads * cfg.head_dim;
    // 1. Split: [T, (H + 2 KV) D] -> q [T, H D], k [T, KV D], v [T, KV D]
    let q = b.slice_columns(qkv, 0, q_width)?;
    let k = b.slice_columns(qkv, q_width, kv_width)?;
    let v = b.slice_columns(qkv, q_width + kv_width, kv_width)?;
    // 2. Per-head RMSNorm over head_dim, then 3. RoPE
    let q = b.rope(&b.rms_norm(&q, q_norm, cfg.qk_norm_eps)?, batch, cfg)?;
    let k = b.rope(&b.rms_norm(&k, k_norm, cfg.qk_norm_eps)?, batch, cfg)?;
    // 4. Cache write; v is untouched
    b.write_kv(cache, &k, &v, batch)?;
    Ok(q)
}

/// `residual + matmul(x, w)`.
pub fn matmul_add<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w: &B::Tensor,
    residual: &B::Tensor,
) -> Result<B::Tensor> {
    b.add(&b.matmul(x, w)?, residual)
}

/// `silu_mul(matmul(x, w_gate_up))`.
pub fn matmul_silu_mul<B: Backend>(
    b: &B,
    x: &B::Tensor,
    w_gate_up: &B::Tensor,
) -> Result<B::Tensor> {
    b.silu_mul(&b.matmul(x, w_gate_up)?)
}

/// Row-wise argmax after downloading the logits (lowest index wins ties; NaN is an error).
pub fn argmax_on_host<B: Backend>(b: &B, logits: &B::Tensor) -> Result<Vec<u32>> {
    let host = b.download(logits)?;
    let (rows, cols) = host.shape().as_matrix("argmax")?;
    if cols == 0 {
        return Err(Error::invalid("argmax", "zero columns"));
    }
    let v = match host.data() {
        HostData::F64(v) => v.clone(),
        _ => host.to_f64_vec(),
    };
    (0..rows)
        .map(|r| {
            let row = &v[r * cols..(r + 1) * cols];
            let mut best = 0;
            for (i, &x) in row.iter().enumerate() {
                if x.is_nan() {
                    return Err(Error::invalid(
                        "argmax",
                        format!("NaN logit in row {r}, column {i}"),
                    ));
                }
                if x > row[best] {
                    best = i;
                }
            }
            Ok(best as u32)
        })
        .collect()
}
