//! `Config`: the architecture read from a Hugging Face `config.json` (transformers 4.x and 5.x
//! dialects), with everything qfuse does not implement rejected by name.
use std::path::Path;

use qfuse_core::{AttentionConfig, Error, Result};
use serde_json::{Map, Value};

/// A Qwen3 dense model's architecture.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA).
    pub num_key_value_heads: usize,
    /// Size of one head (need not be hidden / heads).
    pub head_dim: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Vocabulary size (rows of the embedding and of `lm_head`).
    pub vocab_size: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// `lm_head` shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest sequence (prompt + generated) the model supports.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence id, if any (Qwen3 prepends none).
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids: generation stops at any of them.
    pub eos_token_ids: Vec<u32>,
}

fn bad(field: &str, msg: impl std::fmt::Display) -> Error {
    Error::Model(format!("config.json: field `{field}`: {msg}"))
}

fn positive(m: &Map<String, Value>, field: &str, default: Option<usize>) -> Result<usize> {
    match m.get(field) {
        None | Some(Value::Null) => default.ok_or_else(|| bad(field, "missing")),
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => {
                usize::try_from(n).map_err(|_| bad(field, format!("too large: {v}")))
            }
            _ => Err(bad(field, format!("must be a positive integer, got {v}"))),
        },
    }
}

fn positive_f64(m: &Map<String, Value>, field: &str, default: f64) -> Result<f64> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => match v.as_f64() {
            Some(x) if x > 0.0 && x.is_finite() => Ok(x),
            _ => Err(bad(field, format!("must be a positive number, got {v}"))),
        },
    }
}

fn flag(m: &Map<String, Value>, field: &str, default: bool) -> Result<bool> {
    match m.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(field, format!("must be true or false, got {v}"))),
    }
}

/// A token id field that may be null, one id, or a list of ids.
fn token_ids(m: &Map<String, Value>, field: &str) -> Result<Vec<u32>> {
    let one = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                bad(
                    field,
                    format!("must be a token id or a list of them, got {v}"),
                )
            })
    };
    match m.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

fn is_absent_or(m: &Map<String, Value>, field: &str, ok: impl Fn(&Value) -> bool) -> bool {
    m.get(field).is_none_or(|v| v.is_null() || ok(v))
}

impl Config {
    /// Reads and validates `dir/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            err: e,
        })?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Model(msg) => Error::Model(format!("{}: {}", dir.display(), msg)),
            other => other,
        })
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::Model(format!("config.json: invalid JSON: {e}")))?;
        let m = v
            .as_object()
            .ok_or_else(|| Error::Model("config.json: not a JSON object".into()))?;

        if let Some(arch) = m.get("architectures").and_then(Value::as_array) {
            if !arch.iter().any(|a| a.as_str() == Some("Qwen3ForCausalLM")) {
                return Err(bad(
                    "architectures",
                    format!("{arch:?} is not Qwen3ForCausalLM"),
                ));
            }
        }
        if !is_absent_or(m, "model_type", |v| v.as_str() == Some("qwen3")) {
            return Err(bad(
                "model_type",
                format!("{} is not \"qwen3\"", m["model_type"]),
            ));
        }
        if flag(m, "use_sliding_window", false)? {
            return Err(bad(
                "use_sliding_window",
                "sliding-window attention is not supported",
            ));
        }
        if let Some(types) = m.get("layer_types").and_then(Value::as_array) {
            if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
                return Err(bad(
                    "layer_types",
                    format!("layer type {t} is not supported"),
                ));
            }
        }
        if !is_absent_or(m, "rope_scaling", |_| false) {
            return Err(bad(
                "rope_scaling",
                format!("{} is not supported", m["rope_scaling"]),
            ));
        }
        if !is_absent_or(m, "hidden_act", |v| v.as_str() == Some("silu")) {
            return Err(bad(
                "hidden_act",
                format!("{} is not supported (only silu)", m["hidden_act"]),
            ));
        }
        if flag(m, "attention_bias", false)? {
            return Err(bad("attention_bias", "biases are not supported"));
        }

        // transformers 5.x: rope_parameters {rope_theta, rope_type}; 4.x: top-level rope_theta.
        let rope_theta = match m.get("rope_parameters") {
            Some(Value::Object(p)) => {
                if !is_absent_or(p, "rope_type", |v| v.as_str() == Some("default")) {
                    return Err(bad(
                        "rope_parameters.rope_type",
                        format!("{} is not supported (only default)", p["rope_type"]),
                    ));
                }
                positive_f64(p, "rope_theta", positive_f64(m, "rope_theta", 10_000.0)?)
                    .map_err(|_| bad("rope_parameters.rope_theta", "must be a positive number"))?
            }
            None | Some(Value::Null) => positive_f64(m, "rope_theta", 10_000.0)?,
            Some(v) => {
                return Err(bad(
                    "rope_parameters",
                    format!("must be an object, got {v}"),
                ))
            }
        };

        let hidden_size = positive(m, "hidden_size", None)?;
        let num_attention_heads = positive(m, "num_attention_heads", None)?;
        let num_key_value_heads = positive(m, "num_key_value_heads", Some(num_attention_heads))?;
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!("{num_key_value_heads} does not divide num_attention_heads {num_attention_heads}"),
            ));
        }
        let head_dim = positive(
            m,
            "head_dim",
            Some(hidden_size / num_attention_heads).filter(|&d| d > 0),
        )?;
        if head_dim % 2 != 0 {
            return Err(bad(
                "head_dim",
                format!("{head_dim} is odd; RoPE needs an even head size"),
            ));
        }
        Ok(Config {
            hidden_size,
            num_hidden_layers: positive(m, "num_hidden_layers", None)?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: positive(m, "intermediate_size", None)?,
            vocab_size: positive(m, "vocab_size", None)?,
            rope_theta,
            rms_norm_eps: positive_f64(m, "rms_norm_eps", 1e-6)?,
            tie_word_embeddings: flag(m, "tie_word_embeddings", false)?,
            max_position_embeddings: positive(m, "max_position_embeddings", Some(32_768))?,
            bos_token_id: token_ids(m, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(m, "eos_token_id")?,
        })
    }

    /// The attention geometry every layer shares.
    pub fn attention(&self) -> AttentionConfig {
        AttentionConfig {
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rope_theta: self.rope_theta,
            qk_norm_eps: self.rms_norm_eps,
        }
    }

    /// Stop ids: `generation_config.json`'s `eos_token_id` when the file has one, else the config's.
    pub fn stop_ids(&self, dir: &Path) -> Result<Vec<u32>> {
        let path = dir.join("generation_config.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(self.eos_token_ids.clone());
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))?;
        let m = v
            .as_object()
            .ok_or_else(|| Error::Model(format!("{}: not an object", path.display())))?;
        let ids = token_ids(m, "eos_token_id")
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok(if ids.is_empty() {
            self.eos_token_ids.clone()
        } else {
            ids
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str = r#"{"architectures":["Qwen3ForCausalLM"],"model_type":"qwen3","hidden_size":1024,
        "num_hidden_layers":28,"num_attention_heads":16,"num_key_value_heads":8,"head_dim":128,
        "intermediate_size":3072,"vocab_size":151936,"rope_theta":1000000,"rope_scaling":null,
        "rms_norm_eps":1e-6,"tie_word_embeddings":true,"max_position_embeddings":40960,
        "bos_token_id":151643,"eos_token_id":151645,"torch_dtype":"bfloat16","sliding_window":null,
        "use_sliding_window":false,"hidden_act":"silu","attention_bias":false}"#;

    #[test]
    fn reads_the_published_qwen3_0_6b_config() {
        let c = Config::from_json(V4).unwrap();
        assert_eq!(
            (c.hidden_size, c.head_dim, c.num_key_value_heads),
            (1024, 128, 8)
        );
        assert_eq!(c.rope_theta, 1e6);
        assert_eq!(c.eos_token_ids, vec![151645]);
        assert!(c.tie_word_embeddings);
    }

    #[test]
    fn reads_the_transformers_5_dialect() {
        let v5 = V4
            .replace(
                r#""rope_theta":1000000,"rope_scaling":null,"#,
                r#""rope_parameters":{"rope_theta":5e5,"rope_type":"default"},"#,
            )
            .replace(
                r#""eos_token_id":151645"#,
                r#""eos_token_id":[151645,151643]"#,
            );
        let c = Config::from_json(&v5).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        assert_eq!(c.eos_token_ids, vec![151645, 151643]);
    }

    #[test]
    fn rejects_what_is_not_implemented_naming_the_field() {
        let cases = [
            (
                r#""use_sliding_window":false"#,
                r#""use_sliding_window":true"#,
                "use_sliding_window",
            ),
            (
                r#""rope_scaling":null"#,
                r#""rope_scaling":{"type":"yarn","factor":4}"#,
                "rope_scaling",
            ),
            (
                r#""Qwen3ForCausalLM""#,
                r#""LlamaForCausalLM""#,
                "architectures",
            ),
            (
                r#""hidden_size":1024"#,
                r#""hidden_size":-3"#,
                "hidden_size",
            ),
            (r#""hidden_size":1024,"#, "", "hidden_size"),
            (
                r#""num_key_value_heads":8"#,
                r#""num_key_value_heads":5"#,
                "num_key_value_heads",
            ),
            (
                r#""eos_token_id":151645"#,
                r#""eos_token_id":"x""#,
                "eos_token_id",
            ),
            (r#""head_dim":128"#, r#""head_dim":127"#, "head_dim"),
        ];
        for (from, to, field) in cases {
            let text = V4.replace(from, to);
            assert_ne!(text, V4, "{from}");
            let err = Config::from_json(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{field}: {err}");
        }
        assert!(Config::from_json("{not json")
            .unwrap_err()
            .to_string()
            .contains("invalid JSON"));
    }
}
