//! The golden fixtures written by `tools/golden/make_golden.py`: prompts, transformers' greedy
//! continuations and its float64 teacher-forced logits.
use std::path::{Path, PathBuf};

use qfuse_core::{rel_error, Error, Result};
use serde_json::Value;

/// The golden checkpoints `tools/golden/make_golden.py` writes.
pub const GOLDEN_MODELS: [&str; 4] = [
    "tied-bf16-gqa2-v4",
    "untied-f32-mha-v5",
    "mqa-sharded-bf16",
    "gqa4-f16",
];

/// Directory of golden checkpoint `name`: under `QFUSE_FIXTURES` when set (a test binary run
/// from another checkout), else this repository's `fixtures/golden`.
pub fn golden_dir(name: &str) -> PathBuf {
    std::env::var("QFUSE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden"))
        .join(name)
}

/// One prompt of a golden checkpoint.
#[derive(Clone, Debug)]
pub struct GoldenCase {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// transformers' greedy continuation.
    pub greedy: Vec<u32>,
    /// transformers' float64 logits over `prompt + greedy[..-1]`, row-major `[rows, vocab]`.
    pub logits: Vec<f64>,
}

impl GoldenCase {
    /// `prompt + greedy[..-1]`: the tokens `logits` was computed over.
    pub fn tokens(&self) -> Vec<u32> {
        let mut t = self.prompt.clone();
        t.extend_from_slice(&self.greedy[..self.greedy.len().saturating_sub(1)]);
        t
    }

    /// Greedy continuation of the prompt for as many tokens as transformers produced, stop ids
    /// off, reporting `top_logits` logits per step.
    pub fn request(&self, top_logits: usize) -> crate::Request {
        crate::Request {
            top_logits,
            ..crate::Request::greedy(self.prompt.clone(), self.greedy.len())
        }
    }

    /// Every case of the golden checkpoint in `dir`.
    pub fn load_all(dir: &Path) -> Result<Vec<GoldenCase>> {
        let bad = |what: String| Error::Model(format!("{}: {what}", dir.display()));
        let text =
            std::fs::read_to_string(dir.join("golden.json")).map_err(|e| bad(e.to_string()))?;
        let meta: Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let bytes =
            std::fs::read(dir.join("golden.safetensors")).map_err(|e| bad(e.to_string()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        let ids = |v: &Value| -> Result<Vec<u32>> {
            v.as_array()
                .ok_or_else(|| bad("ids are not a list".into()))?
                .iter()
                .map(|x| {
                    x.as_u64()
                        .map(|x| x as u32)
                        .ok_or_else(|| bad(format!("bad id {x}")))
                })
                .collect()
        };
        let cases = meta["cases"]
            .as_array()
            .ok_or_else(|| bad("no cases".into()))?;
        cases
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let t = st
                    .tensor(&format!("case{i}.logits"))
                    .map_err(|e| bad(e.to_string()))?;
                if t.dtype() != safetensors::Dtype::F64 {
                    return Err(bad(format!("case{i}.logits is not F64")));
                }
                let logits = t
                    .data()
                    .chunks_exact(8)
                    .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
                    .collect();
                Ok(GoldenCase {
                    prompt: ids(&c["prompt_ids"])?,
                    greedy: ids(&c["greedy_ids"])?,
                    logits,
                })
            })
            .collect()
    }
}

/// Compares logits row by row: the worst row's relative error, the largest absolute difference
/// per row, and the share of rows whose argmax agrees.
#[derive(Clone, Debug)]
pub struct LogitsDiff {
    /// ‖a − b‖ / ‖b‖ over all the logits.
    pub rel: f64,
    /// max over rows of ‖a − b‖ / ‖b‖.
    pub worst_rel: f64,
    /// Per row, max |a − b|.
    pub max_abs: Vec<f64>,
    /// Fraction of rows with the same argmax.
    pub top1_agreement: f64,
}

impl LogitsDiff {
    /// `ours` against `reference`, both `[rows, vocab]` row-major.
    pub fn new(ours: &[f64], reference: &[f64], vocab: usize) -> Self {
        let argmax = |r: &[f64]| {
            r.iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > r[b] { i } else { b })
        };
        let (mut worst_rel, mut max_abs, mut agree, mut rows) =
            (0.0f64, Vec::new(), 0usize, 0usize);
        for (a, b) in ours.chunks(vocab).zip(reference.chunks(vocab)) {
            worst_rel = worst_rel.max(rel_error(a, b));
            max_abs.push(
                a.iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f64::max),
            );
            agree += usize::from(argmax(a) == argmax(b));
            rows += 1;
        }
        LogitsDiff {
            rel: rel_error(ours, reference),
            worst_rel,
            max_abs,
            top1_agreement: agree as f64 / rows.max(1) as f64,
        }
    }
}
