//! Qwen3, written once over any [`Backend`].
//!
//! Per layer: `h = x + o_proj(attn(input_layernorm(x)))`, `x' = h + down(silu(gate(n)) * up(n))`
//! with `n = post_attention_layernorm(h)`; q/k get per-head RMSNorm before split-half RoPE; no
//! embedding scaling, no biases. q/k/v and gate/up are fused into one matrix each at load time.
use std::path::Path;

use qfuse_core::{
    Backend, BatchInfo, DeviceTensor, Error, HostTensor, KvCache, LayerWeights, Result, SeqChunk,
};

use crate::{Checkpoint, Config};

/// Which rows of logits a forward pass returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Logits {
    /// Every token of the batch: `[T, vocab]` (teacher forcing, scoring).
    All,
    /// The last token of each sequence: `[sequences, vocab]` (generation).
    LastPerSequence,
}

/// Attention weights of one layer.
#[derive(Debug)]
pub struct Attention<B: Backend> {
    /// `q_proj`, `k_proj`, `v_proj` stacked: `[(heads + 2 kv_heads) * head_dim, hidden]`.
    pub qkv_proj: B::Tensor,
    /// Per-head query RMSNorm gains `[head_dim]`.
    pub q_norm: B::Tensor,
    /// Per-head key RMSNorm gains `[head_dim]`.
    pub k_norm: B::Tensor,
    /// `[hidden, heads * head_dim]`.
    pub o_proj: B::Tensor,
}

/// MLP weights of one layer.
#[derive(Debug)]
pub struct Mlp<B: Backend> {
    /// `gate_proj` and `up_proj` stacked: `[2 * intermediate, hidden]`.
    pub gate_up_proj: B::Tensor,
    /// `[hidden, intermediate]`.
    pub down_proj: B::Tensor,
}

/// One decoder layer.
#[derive(Debug)]
pub struct DecoderLayer<B: Backend> {
    /// Gains of the pre-attention RMSNorm.
    pub input_layernorm: B::Tensor,
    /// Self-attention.
    pub self_attn: Attention<B>,
    /// Gains of the pre-MLP RMSNorm.
    pub post_attention_layernorm: B::Tensor,
    /// The MLP.
    pub mlp: Mlp<B>,
}

impl<B: Backend> DecoderLayer<B> {
    /// The layer's weights as [`Backend::decoder_layer`] takes them.
    pub fn weights(&self) -> LayerWeights<'_, B::Tensor> {
        let a = &self.self_attn;
        LayerWeights {
            input_norm: &self.input_layernorm,
            qkv: &a.qkv_proj,
            q_norm: &a.q_norm,
            k_norm: &a.k_norm,
            o_proj: &a.o_proj,
            post_norm: &self.post_attention_layernorm,
            gate_up: &self.mlp.gate_up_proj,
            down: &self.mlp.down_proj,
        }
    }
}

/// The points of a forward pass an inspector sees, in order, per layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Token embeddings `[T, hidden]` (layer 0).
    Embedding,
    /// Fused input norm + QKV projection `[T, qkv_width]`.
    Qkv,
    /// Queries after q-norm and RoPE `[T, heads * head_dim]` (keys and values went to the cache).
    QueryRope,
    /// Attention output `[T, heads * head_dim]`.
    Attention,
    /// Residual stream after attention `[T, hidden]`.
    AttentionResidual,
    /// SiLU(gate) * up `[T, intermediate]`.
    MlpActivation,
    /// Residual stream after the MLP: the layer's output `[T, hidden]`.
    LayerOutput,
    /// Logits (after the final norm and `lm_head`).
    Logits,
}

impl Stage {
    /// The stage's name in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Embedding => "embedding",
            Stage::Qkv => "input_layernorm+qkv_proj",
            Stage::QueryRope => "q_norm/k_norm+rope",
            Stage::Attention => "attention",
            Stage::AttentionResidual => "o_proj+residual",
            Stage::MlpActivation => "post_attention_layernorm+gate_up+silu",
            Stage::LayerOutput => "down_proj+residual",
            Stage::Logits => "norm+lm_head",
        }
    }
}

/// Largest magnitude [`check_numerics`] lets pass: trained Qwen3 residual streams carry outlier
/// channels of 1e3-1e4, so 1e6 is two orders of magnitude past anything a healthy model makes
/// (the project qfuse replaces saw 1e29 in layer 1).
pub const NUMERICS_LIMIT: f64 = 1e6;

/// An inspector that stops a forward pass at the first stage whose output holds a non-finite
/// value or one larger in magnitude than `limit`, naming the layer and op. It downloads every
/// stage's output, so it is a debugging aid, not a fast path.
pub fn check_numerics<B: Backend>(
    b: &B,
    limit: f64,
) -> impl FnMut(usize, Stage, &B::Tensor) -> Result<()> + '_ {
    move |layer, stage, t| {
        let v = b.download(t)?.to_f64_vec();
        let non_finite = v.iter().filter(|x| !x.is_finite()).count();
        let max = v
            .iter()
            .filter(|x| x.is_finite())
            .fold(0.0f64, |m, x| m.max(x.abs()));
        let at = if stage == Stage::Embedding {
            "embedding".to_string()
        } else {
            format!("layer {layer}, {}", stage.name())
        };
        if non_finite > 0 {
            return Err(Error::invalid(
                "check-numerics",
                format!(
                    "{at}: {non_finite} non-finite values of {} (max finite |x| {max:.3e})",
                    v.len()
                ),
            ));
        }
        if max > limit {
            return Err(Error::invalid(
                "check-numerics",
                format!("{at}: max |x| = {max:.3e} exceeds {limit:.0e}"),
            ));
        }
        Ok(())
    }
}

/// A callback seeing `(layer, stage, tensor)` at every [`Stage`] of a forward pass.
pub type Inspector<'a, B> = dyn FnMut(usize, Stage, &<B as Backend>::Tensor) -> Result<()> + 'a;

/// Qwen3ForCausalLM.
#[derive(Debug)]
pub struct Qwen3<B: Backend> {
    cfg: Config,
    embed_tokens: B::Tensor,
    layers: Vec<DecoderLayer<B>>,
    norm: B::Tensor,
    lm_head: B::Tensor,
}

/// Every tensor the checkpoint must hold for `cfg`, with its shape.
pub fn expected_tensors(cfg: &Config) -> Vec<(String, Vec<usize>)> {
    let (h, d, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let (q, kv) = (cfg.num_attention_heads * d, cfg.num_key_value_heads * d);
    let mut t = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        t.extend([
            (format!("{p}.input_layernorm.weight"), vec![h]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, h]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, h]),
            (format!("{p}.self_attn.q_norm.weight"), vec![d]),
            (format!("{p}.self_attn.k_norm.weight"), vec![d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![h, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![h]),
            (format!("{p}.mlp.gate_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.up_proj.weight"), vec![i, h]),
            (format!("{p}.mlp.down_proj.weight"), vec![h, i]),
        ]);
    }
    t.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, h]));
    }
    t
}

/// Uploads tensors stacked along rows; parts in different storage dtypes are widened to f32 first.
fn upload_stacked<B: Backend>(b: &B, ckpt: &Checkpoint, names: &[String]) -> Result<B::Tensor> {
    let parts = names
        .iter()
        .map(|n| ckpt.tensor(n))
        .collect::<Result<Vec<HostTensor>>>()?;
    let same = parts.iter().all(|p| p.dtype() == parts[0].dtype());
    let parts: Vec<HostTensor> = if same {
        parts
    } else {
        parts
            .iter()
            .map(|p| p.to_dtype(qfuse_core::DType::F32))
            .collect()
    };
    b.upload_weight(&HostTensor::concat_rows(&parts.iter().collect::<Vec<_>>())?)
}

impl<B: Backend> Qwen3<B> {
    /// Loads `dir` (config.json + safetensors) onto the backend.
    pub fn load(b: &B, dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::Model(format!(
                "model directory {} does not exist",
                dir.display()
            )));
        }
        let cfg = Config::from_dir(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Self::from_checkpoint(b, cfg, &ckpt)
    }

    /// Builds the model from an open checkpoint. Every expected tensor is checked for presence,
    /// dtype and shape before anything is uploaded.
    pub fn from_checkpoint(b: &B, cfg: Config, ckpt: &Checkpoint) -> Result<Self> {
        for (name, shape) in expected_tensors(&cfg) {
            ckpt.check(&name, &shape)?;
        }
        let up = |name: &str| b.upload_weight(&ckpt.tensor(name)?);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let names = |parts: &[&str]| {
                parts
                    .iter()
                    .map(|s| format!("{p}.{s}.weight"))
                    .collect::<Vec<_>>()
            };
            layers.push(DecoderLayer {
                input_layernorm: up(&format!("{p}.input_layernorm.weight"))?,
                self_attn: Attention {
                    qkv_proj: upload_stacked(
                        b,
                        ckpt,
                        &names(&["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]),
                    )?,
                    q_norm: up(&format!("{p}.self_attn.q_norm.weight"))?,
                    k_norm: up(&format!("{p}.self_attn.k_norm.weight"))?,
                    o_proj: up(&format!("{p}.self_attn.o_proj.weight"))?,
                },
                post_attention_layernorm: up(&format!("{p}.post_attention_layernorm.weight"))?,
                mlp: Mlp {
                    gate_up_proj: upload_stacked(
                        b,
                        ckpt,
                        &names(&["mlp.gate_proj", "mlp.up_proj"]),
                    )?,
                    down_proj: up(&format!("{p}.mlp.down_proj.weight"))?,
                },
            });
        }
        let embed_tokens = up("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            up("lm_head.weight")?
        };
        Ok(Qwen3 {
            embed_tokens,
            layers,
            norm: up("model.norm.weight")?,
            lm_head,
            cfg,
        })
    }

    /// The same weights seen through a wrapper backend with the same tensor type (for example
    /// [`qfuse_core::Unfused`]); tensors are shared, not copied.
    pub fn rebind<B2: Backend<Tensor = B::Tensor>>(&self) -> Qwen3<B2> {
        let layers = self
            .layers
            .iter()
            .map(|l| DecoderLayer {
                input_layernorm: l.input_layernorm.clone(),
                self_attn: Attention {
                    qkv_proj: l.self_attn.qkv_proj.clone(),
                    q_norm: l.self_attn.q_norm.clone(),
                    k_norm: l.self_attn.k_norm.clone(),
                    o_proj: l.self_attn.o_proj.clone(),
                },
                post_attention_layernorm: l.post_attention_layernorm.clone(),
                mlp: Mlp {
                    gate_up_proj: l.mlp.gate_up_proj.clone(),
                    down_proj: l.mlp.down_proj.clone(),
                },
            })
            .collect();
        Qwen3 {
            cfg: self.cfg.clone(),
            embed_tokens: self.embed_tokens.clone(),
            layers,
            norm: self.norm.clone(),
            lm_head: self.lm_head.clone(),
        }
    }

    /// Gains of the final RMSNorm.
    pub fn norm(&self) -> &B::Tensor {
        &self.norm
    }

    /// The output projection `[vocab, hidden]` (the embedding matrix when tied).
    pub fn lm_head(&self) -> &B::Tensor {
        &self.lm_head
    }

    /// The architecture.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Bytes of device memory the weights occupy (a tied `lm_head` counted once): what one
    /// decode step must read.
    pub fn weight_bytes(&self) -> usize {
        let size = |t: &B::Tensor| t.shape().numel() * t.dtype().size_in_bytes();
        let mut total = size(&self.embed_tokens) + size(&self.norm);
        if !self.cfg.tie_word_embeddings {
            total += size(&self.lm_head);
        }
        for l in &self.layers {
            let a = &l.self_attn;
            total += [
                &l.input_layernorm,
                &a.qkv_proj,
                &a.q_norm,
                &a.k_norm,
                &a.o_proj,
                &l.post_attention_layernorm,
            ]
            .into_iter()
            .chain([&l.mlp.gate_up_proj, &l.mlp.down_proj])
            .map(size)
            .sum::<usize>();
        }
        total
    }

    /// The decoder layers.
    pub fn layers(&self) -> &[DecoderLayer<B>] {
        &self.layers
    }

    /// An empty paged KV cache for this model.
    pub fn new_cache(&self, b: &B, num_blocks: usize, block_size: usize) -> Result<KvCache<B>> {
        let c = &self.cfg;
        KvCache::new(
            b,
            c.num_hidden_layers,
            num_blocks,
            block_size,
            c.num_key_value_heads,
            c.head_dim,
        )
    }

    /// Teacher-forced logits `[tokens.len(), vocab]` of one sequence: row `i` scores token `i + 1`.
    pub fn score(&self, b: &B, tokens: &[u32]) -> Result<B::Tensor> {
        self.score_inspect(b, tokens, &mut |_, _, _| Ok(()))
    }

    /// Teacher-forced logits of several sequences of one length, as batched decode computes
    /// them: every sequence's first `prompt` tokens as one prompt batch, then one decode step
    /// per later position, each of one token for every sequence at once. Returns the decode
    /// steps' logits on the host, sequence by sequence: `[seqs × (len − prompt), vocab]`, where
    /// row `i` of a sequence scores its token `prompt + i + 1` (the rows [`Qwen3::score`] gives
    /// from `prompt` on).
    pub fn score_decoding(&self, b: &B, seqs: &[Vec<u32>], prompt: usize) -> Result<Vec<f64>> {
        let len = seqs.first().map_or(0, Vec::len);
        if prompt == 0 || prompt >= len || seqs.iter().any(|q| q.len() != len) {
            return Err(Error::invalid(
                "score_decoding",
                format!("sequences of one length past a prompt of {prompt} tokens (at least 1)"),
            ));
        }
        let bs = crate::BLOCK_SIZE;
        let per_seq = len.div_ceil(bs);
        let mut cache = self.new_cache(b, seqs.len() * per_seq, bs)?;
        // Every sequence's tokens [start, start + n) as one batch.
        let batch = |start: usize, n: usize| {
            let chunks = (0..seqs.len())
                .map(|s| SeqChunk {
                    start_pos: start,
                    len: n,
                    block_table: (s * per_seq..(s + 1) * per_seq).map(|i| i as u32).collect(),
                })
                .collect();
            let ids = seqs
                .iter()
                .flat_map(|q| q[start..start + n].to_vec())
                .collect();
            b.prepare_batch(&BatchInfo::new(bs, chunks)?.with_token_ids(ids)?)
        };
        self.forward(b, &batch(0, prompt)?, &mut cache, Logits::LastPerSequence)?;
        let vocab = self.cfg.vocab_size;
        let mut per_seq_rows = vec![Vec::with_capacity((len - prompt) * vocab); seqs.len()];
        for pos in prompt..len {
            let step = self.forward(b, &batch(pos, 1)?, &mut cache, Logits::All)?;
            let rows = b.download(&step)?.to_f64_vec();
            for (out, row) in per_seq_rows.iter_mut().zip(rows.chunks(vocab)) {
                out.extend_from_slice(row);
            }
        }
        Ok(per_seq_rows.concat())
    }

    /// [`Qwen3::score`] through an inspector (see [`Qwen3::forward_inspect`]).
    pub fn score_inspect(
        &self,
        b: &B,
        tokens: &[u32],
        inspect: &mut Inspector<'_, B>,
    ) -> Result<B::Tensor> {
        let bs = crate::BLOCK_SIZE;
        let blocks = tokens.len().div_ceil(bs).max(1);
        let mut cache = self.new_cache(b, blocks, bs)?;
        let table = (0..blocks as u32).collect();
        let chunk = SeqChunk {
            start_pos: 0,
            len: tokens.len(),
            block_table: table,
        };
        let info = BatchInfo::new(bs, vec![chunk])?.with_token_ids(tokens.to_vec())?;
        self.forward_inspect(
            b,
            &b.prepare_batch(&info)?,
            &mut cache,
            Logits::All,
            inspect,
        )
    }

    /// One forward pass over a prepared batch of sequences' new tokens (their ids are in the
    /// batch). Writes their keys and values to `cache` and returns logits as `logits` asks.
    pub fn forward(
        &self,
        b: &B,
        batch: &B::Batch,
        cache: &mut KvCache<B>,
        logits: Logits,
    ) -> Result<B::Tensor> {
        self.pass(b, batch, cache, logits, &mut |_, _, _| Ok(()), false)
    }

    /// [`Qwen3::forward`], calling `inspect(layer, stage, tensor)` at every [`Stage`]; an error
    /// from `inspect` stops the pass (numerics checks, layer-by-layer diffing). Attention runs
    /// as its two ops, so the inspector sees q between them.
    pub fn forward_inspect(
        &self,
        b: &B,
        dev_batch: &B::Batch,
        cache: &mut KvCache<B>,
        logits: Logits,
        inspect: &mut Inspector<'_, B>,
    ) -> Result<B::Tensor> {
        self.pass(b, dev_batch, cache, logits, inspect, true)
    }

    fn pass(
        &self,
        b: &B,
        dev_batch: &B::Batch,
        cache: &mut KvCache<B>,
        logits: Logits,
        inspect: &mut Inspector<'_, B>,
        inspecting: bool,
    ) -> Result<B::Tensor> {
        let batch = dev_batch.as_ref();
        if let Some(bad) = batch
            .token_ids()
            .iter()
            .find(|&&id| id as usize >= self.cfg.vocab_size)
        {
            return Err(Error::invalid(
                "Qwen3::forward",
                format!(
                    "token id {bad} is out of range (vocab_size {})",
                    self.cfg.vocab_size
                ),
            ));
        }
        if batch.max_context() > self.cfg.max_position_embeddings {
            return Err(Error::invalid(
                "Qwen3::forward",
                format!(
                    "context of {} tokens exceeds max_position_embeddings {}",
                    batch.max_context(),
                    self.cfg.max_position_embeddings
                ),
            ));
        }
        let (eps, attn) = (self.cfg.rms_norm_eps, self.cfg.attention());
        // 1. Embedding lookup, unscaled: [T] -> [T, hidden]
        let mut x = b.embed(&self.embed_tokens, dev_batch)?;
        inspect(0, Stage::Embedding, &x)?;
        for (l, layer) in self.layers.iter().enumerate() {
            if !inspecting {
                // Steps 2-6 below as one op: a backend may run the layer as one kernel.
                x = b.decoder_layer(
                    &x,
                    &layer.weights(),
                    cache.layer_mut(l),
                    dev_batch,
                    &attn,
                    eps,
                )?;
                continue;
            }
            let a = &layer.self_attn;
            // 2. input_layernorm + QKV projection: [T, hidden] -> [T, (H + 2 KV) D]
            let qkv = b.rms_norm_matmul(&x, &layer.input_layernorm, &a.qkv_proj, eps)?;
            inspect(l, Stage::Qkv, &qkv)?;
            // 3. Per-head q/k RMSNorm, RoPE, K/V into the paged cache: -> q [T, H D]
            // 4. Causal GQA attention over each sequence's cache: -> [T, H D]
            // (Two ops here, so the inspector sees q between them; `decoder_layer` runs them
            // as `qk_norm_rope_attention`.)
            let q = b.qk_norm_rope_write_kv(
                &qkv,
                &a.q_norm,
                &a.k_norm,
                cache.layer_mut(l),
                dev_batch,
                &attn,
            )?;
            inspect(l, Stage::QueryRope, &q)?;
            let o = b.attention(&q, cache.layer(l), dev_batch, &attn)?;
            inspect(l, Stage::Attention, &o)?;
            // 5. o_proj with the residual add: -> h [T, hidden]
            let h = b.matmul_add(&o, &a.o_proj, &x)?;
            inspect(l, Stage::AttentionResidual, &h)?;
            // 6. MLP: post_attention_layernorm, silu(gate) * up, then down_proj with the
            //    residual: -> [T, intermediate] -> [T, hidden]
            let g = b.rms_norm_matmul_silu_mul(
                &h,
                &layer.post_attention_layernorm,
                &layer.mlp.gate_up_proj,
                eps,
            )?;
            inspect(l, Stage::MlpActivation, &g)?;
            x = b.matmul_add(&g, &layer.mlp.down_proj, &h)?;
            inspect(l, Stage::LayerOutput, &x)?;
        }
        // 7. Final norm + lm_head, on the rows asked for: -> [rows, vocab]
        // (In decode every sequence has one new token: its last row is its only row.)
        if logits == Logits::LastPerSequence && batch.num_tokens() != batch.seqs().len() {
            x = b.gather_rows(&x, &batch.last_rows())?;
        }
        let out = b.rms_norm_logits(&x, &self.norm, &self.lm_head, eps)?;
        inspect(self.layers.len().saturating_sub(1), Stage::Logits, &out)?;
        Ok(out)
    }
}
