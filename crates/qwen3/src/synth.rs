//! Synthetic checkpoints: complete Hugging Face-format Qwen3 checkpoints with random bf16 weights
//! whose statistics resemble a trained model's (RMSNorm gains around 1, k_norm gains reaching
//! ~100, a few residual-stream channels of magnitude 1e3-1e4), deterministic for a seed. They let
//! benchmarks and GPU tests run full-size shapes where no real weights can be downloaded.
use std::io::Write;
use std::path::Path;

use half::bf16;
use qfuse_core::{Error, Result, Rng};

use crate::{Checkpoint, Config};

/// A model shape to synthesise.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SynthShape {
    /// ~20 MB: 2 layers, hidden 64, Qwen3's full 151,936-token vocabulary.
    Tiny,
    /// Qwen3-0.6B: 28 layers, hidden 1024, 16/8 heads of 128, MLP 3072, tied embeddings.
    Qwen3_0_6B,
    /// Qwen3-1.7B: 28 layers, hidden 2048, 16/8 heads of 128, MLP 6144, tied embeddings.
    Qwen3_1_7B,
    /// Qwen3-4B: 36 layers, hidden 2560, 32/8 heads of 128, MLP 9728, tied embeddings.
    Qwen3_4B,
    /// Qwen3-8B: 36 layers, hidden 4096, 32/8 heads of 128, MLP 12288, untied.
    Qwen3_8B,
}

impl SynthShape {
    /// The names the CLI accepts.
    pub const NAMES: &'static [&'static str] =
        &["tiny", "qwen3-0.6b", "qwen3-1.7b", "qwen3-4b", "qwen3-8b"];

    /// Parses a CLI name.
    pub fn from_name(name: &str) -> Result<Self> {
        Ok(match name {
            "tiny" => SynthShape::Tiny,
            "qwen3-0.6b" => SynthShape::Qwen3_0_6B,
            "qwen3-1.7b" => SynthShape::Qwen3_1_7B,
            "qwen3-4b" => SynthShape::Qwen3_4B,
            "qwen3-8b" => SynthShape::Qwen3_8B,
            other => {
                return Err(Error::invalid(
                    "synth",
                    format!("unknown shape `{other}`; known: {}", Self::NAMES.join(", ")),
                ))
            }
        })
    }

    /// (layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, tied)
    fn dims(self) -> (usize, usize, usize, usize, usize, usize, usize, bool) {
        match self {
            // The full vocabulary, so the real tokenizer's every id is valid.
            SynthShape::Tiny => (2, 64, 4, 2, 32, 192, 151_936, true),
            SynthShape::Qwen3_0_6B => (28, 1024, 16, 8, 128, 3072, 151_936, true),
            SynthShape::Qwen3_1_7B => (28, 2048, 16, 8, 128, 6144, 151_936, true),
            SynthShape::Qwen3_4B => (36, 2560, 32, 8, 128, 9728, 151_936, true),
            SynthShape::Qwen3_8B => (36, 4096, 32, 8, 128, 12_288, 151_936, false),
        }
    }

    /// The `config.json` of this shape (transformers 4.x dialect, as the published checkpoints).
    pub fn config_json(self) -> String {
        let (layers, hidden, heads, kv, hd, inter, vocab, tied) = self.dims();
        format!(
            r#"{{
  "architectures": ["Qwen3ForCausalLM"],
  "model_type": "qwen3",
  "hidden_size": {hidden},
  "num_hidden_layers": {layers},
  "num_attention_heads": {heads},
  "num_key_value_heads": {kv},
  "head_dim": {hd},
  "intermediate_size": {inter},
  "vocab_size": {vocab},
  "max_position_embeddings": 40960,
  "rope_theta": 1000000,
  "rope_scaling": null,
  "rms_norm_eps": 1e-06,
  "tie_word_embeddings": {tied},
  "hidden_act": "silu",
  "attention_bias": false,
  "use_sliding_window": false,
  "sliding_window": null,
  "bos_token_id": 151643,
  "eos_token_id": 151645,
  "torch_dtype": "bfloat16",
  "qfuse_synthetic": "random weights; not a trained model"
}}
"#
        )
    }
}

/// Approximately normal (sum of four uniforms, variance-matched): several times faster than
/// Box-Muller, which matters for the billions of values of the larger shapes.
fn fast_normal(rng: &mut Rng) -> f32 {
    let s: f64 = (0..4).map(|_| rng.uniform()).sum::<f64>() - 2.0;
    (s * 3f64.sqrt()) as f32
}

enum Init {
    Normal(f32),
    Uniform(f32, f32),
    /// Log-uniform in [0.5, 8], with every 32nd channel (from channel 5) in [40, 100].
    KNorm,
    /// Uniform in [0.5, 2], but [0.02, 0.1] on the channels where k_norm is large: a trained
    /// model's q and k gains keep attention logits moderate where the keys are huge.
    QNorm,
}

/// `generation_config.json` of every synthetic checkpoint: Qwen3's stop ids and recommended
/// sampling.
pub const GENERATION_CONFIG: &str = "{\n  \"eos_token_id\": [151645, 151643],\n  \"do_sample\": true,\n  \"temperature\": 0.6,\n  \"top_k\": 20,\n  \"top_p\": 0.95\n}\n";

/// Writes a synthetic checkpoint (config.json, generation_config.json, model.safetensors) to `dir`.
pub fn write_synthetic(dir: &Path, shape: SynthShape, seed: u64) -> Result<()> {
    let io = |e: std::io::Error| Error::Io {
        path: dir.display().to_string(),
        err: e,
    };
    std::fs::create_dir_all(dir).map_err(io)?;
    let file = std::fs::File::create(dir.join("model.safetensors")).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    write_safetensors(&mut w, shape, seed).map_err(io)?;
    w.flush().map_err(io)?;
    std::fs::write(dir.join("config.json"), shape.config_json()).map_err(io)?;
    std::fs::write(dir.join("generation_config.json"), GENERATION_CONFIG).map_err(io)?;
    Ok(())
}

/// A synthetic checkpoint built in memory: its config and tensors.
pub fn synthetic_checkpoint(shape: SynthShape, seed: u64) -> Result<(Config, Checkpoint)> {
    let mut bytes = Vec::new();
    write_safetensors(&mut bytes, shape, seed).map_err(|e| Error::Io {
        path: "<memory>".into(),
        err: e,
    })?;
    Ok((
        Config::from_json(&shape.config_json())?,
        Checkpoint::from_bytes("synthetic", bytes)?,
    ))
}

/// The tensors of a synthetic checkpoint, in safetensors layout.
fn write_safetensors(w: &mut impl Write, shape: SynthShape, seed: u64) -> std::io::Result<()> {
    let (layers, h, heads, kv, d, inter, vocab, tied) = shape.dims();
    let mut specs: Vec<(String, Vec<usize>, Init)> = vec![(
        "model.embed_tokens.weight".into(),
        vec![vocab, h],
        Init::Normal(0.03),
    )];
    let s = |fan_in: usize| Init::Normal((fan_in as f32).powf(-0.5));
    // Projections back into the residual stream are scaled by 1/sqrt(2 layers) (as GPT-2 and its
    // successors initialise them): each layer nudges the stream instead of replacing it, as in a
    // trained model. Without it a random 28-layer stack is chaotic, amplifying rounding ~1e4-fold.
    let branch =
        |fan_in: usize| Init::Normal((fan_in as f32).powf(-0.5) / (2.0 * layers as f32).sqrt());
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        specs.extend([
            (
                format!("{p}.input_layernorm.weight"),
                vec![h],
                Init::Uniform(0.5, 1.5),
            ),
            (
                format!("{p}.self_attn.q_proj.weight"),
                vec![heads * d, h],
                s(h),
            ),
            (
                format!("{p}.self_attn.k_proj.weight"),
                vec![kv * d, h],
                s(h),
            ),
            (
                format!("{p}.self_attn.v_proj.weight"),
                vec![kv * d, h],
                s(h),
            ),
            (format!("{p}.self_attn.q_norm.weight"), vec![d], Init::QNorm),
            // Trained Qwen3 k_norm gains are mostly small, with a few channels reaching ~100.
            (format!("{p}.self_attn.k_norm.weight"), vec![d], Init::KNorm),
            (
                format!("{p}.self_attn.o_proj.weight"),
                vec![h, heads * d],
                branch(heads * d),
            ),
            (
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                Init::Uniform(0.5, 1.5),
            ),
            (format!("{p}.mlp.gate_proj.weight"), vec![inter, h], s(h)),
            (format!("{p}.mlp.up_proj.weight"), vec![inter, h], s(h)),
            (
                format!("{p}.mlp.down_proj.weight"),
                vec![h, inter],
                branch(inter),
            ),
        ]);
    }
    specs.push(("model.norm.weight".into(), vec![h], Init::Uniform(0.5, 1.5)));
    if !tied {
        specs.push(("lm_head.weight".into(), vec![vocab, h], Init::Normal(0.03)));
    }
    // Residual-stream outliers: a few hidden channels whose down_proj rows are scaled up so the
    // stream carries values of 1e3-1e4 there after a few layers, as trained checkpoints do.
    let outliers: Vec<usize> = (0..3).map(|i| (i * 397 + 11) % h).collect();

    let mut header = String::from("{");
    let mut offset = 0usize;
    for (i, (name, dims, _)) in specs.iter().enumerate() {
        let bytes = dims.iter().product::<usize>() * 2;
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"BF16\",\"shape\":{dims:?},\"data_offsets\":[{offset},{}]}}",
            offset + bytes
        ));
        offset += bytes;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    w.write_all(&(header.len() as u64).to_le_bytes())?;
    w.write_all(header.as_bytes())?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut buf = Vec::new();
    for (t, (name, dims, init)) in specs.iter().enumerate() {
        let n: usize = dims.iter().product();
        let cols = *dims.last().unwrap_or(&1);
        let boost_rows = name.ends_with("down_proj.weight");
        buf.clear();
        buf.resize(2 * n, 0u8);
        // Fixed-size chunks, each with its own stream derived from (seed, tensor, chunk): the
        // bytes do not depend on how many threads write them.
        const CHUNK: usize = 1 << 20;
        let fill = |c: usize, out: &mut [u8]| {
            let mut rng = Rng::new(seed ^ 0x5157_454E_3300 ^ ((t as u64) << 40) ^ c as u64);
            for (j, bytes) in out.chunks_exact_mut(2).enumerate() {
                let idx = c * CHUNK + j;
                let mut v = match init {
                    Init::Normal(sd) => fast_normal(&mut rng) * sd,
                    Init::Uniform(lo, hi) => lo + (hi - lo) * rng.uniform() as f32,
                    Init::KNorm if idx % 32 == 5 => 40.0 + 60.0 * rng.uniform() as f32,
                    Init::QNorm if idx % 32 == 5 => 0.02 + 0.08 * rng.uniform() as f32,
                    Init::QNorm => 0.5 + 1.5 * rng.uniform() as f32,
                    Init::KNorm => 0.5 * 16f32.powf(rng.uniform() as f32),
                };
                if boost_rows && outliers.contains(&(idx / cols)) {
                    v *= 2000.0;
                }
                bytes.copy_from_slice(&bf16::from_f32(v).to_le_bytes());
            }
        };
        let chunks: Vec<(usize, &mut [u8])> = buf.chunks_mut(2 * CHUNK).enumerate().collect();
        let per_thread = chunks.len().div_ceil(threads).max(1);
        let mut chunks = chunks;
        std::thread::scope(|scope| {
            while !chunks.is_empty() {
                let batch: Vec<_> = chunks.drain(..per_thread.min(chunks.len())).collect();
                scope.spawn(move || batch.into_iter().for_each(|(c, out)| fill(c, out)));
            }
        });
        w.write_all(&buf)?;
    }
    Ok(())
}
