//! Choosing the next token from logits: greedy, or temperature sampling narrowed by top-k, top-p
//! and min-p, after repetition and presence penalties; seeded, so a run is reproducible.
use std::path::Path;

use qfuse_core::{Error, Result, Rng};
use serde_json::Value;

/// How to pick tokens. `temperature == 0` is greedy (the other fields then only apply penalties).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    /// Softmax temperature; 0 picks the largest logit.
    pub temperature: f64,
    /// Keep only the k most likely tokens (`None`: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// Drop tokens less likely than `min_p` times the most likely one (0: none).
    pub min_p: f64,
    /// HF-style: logits of tokens already present are divided by it when positive, multiplied
    /// when negative (1: off).
    pub repetition_penalty: f64,
    /// Subtracted from the logits of tokens already present (0: off).
    pub presence_penalty: f64,
    /// Seed of the random stream.
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingParams {
    /// Always the largest logit.
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: None,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            seed: 0,
        }
    }

    /// Qwen3's recommended defaults for thinking mode (temperature 0.6, top-k 20, top-p 0.95),
    /// overridden by `dir/generation_config.json` where it sets them.
    pub fn recommended(dir: Option<&Path>) -> Result<Self> {
        let mut p = SamplingParams {
            temperature: 0.6,
            top_k: Some(20),
            top_p: 0.95,
            ..Self::greedy()
        };
        let Some(path) = dir.map(|d| d.join("generation_config.json")) else {
            return Ok(p);
        };
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(p);
        };
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::Model(format!("{}: invalid JSON: {e}", path.display())))?;
        if v.get("do_sample").and_then(Value::as_bool) == Some(false) {
            p.temperature = 0.0;
        }
        if let Some(t) = v.get("temperature").and_then(Value::as_f64) {
            p.temperature = t;
        }
        if let Some(k) = v.get("top_k").and_then(Value::as_u64) {
            p.top_k = (k > 0).then_some(k as usize);
        }
        if let Some(x) = v.get("top_p").and_then(Value::as_f64) {
            p.top_p = x;
        }
        if let Some(x) = v.get("min_p").and_then(Value::as_f64) {
            p.min_p = x;
        }
        if let Some(x) = v.get("repetition_penalty").and_then(Value::as_f64) {
            p.repetition_penalty = x;
        }
        p.validate()
            .map_err(|e| Error::Model(format!("{}: {e}", path.display())))?;
        Ok(p)
    }

    /// Whether this is plain greedy decoding (no penalties either).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 && self.repetition_penalty == 1.0 && self.presence_penalty == 0.0
    }

    /// Rejects values outside their ranges, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str, v: String, want: &str| {
            Err(Error::invalid(
                "sampling",
                format!("{what} {v} is invalid: {want}"),
            ))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad(
                "temperature",
                self.temperature.to_string(),
                "must be finite and >= 0",
            );
        }
        if self.top_k == Some(0) {
            return bad("top-k", "0".into(), "must be at least 1");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top-p", self.top_p.to_string(), "must be in (0, 1]");
        }
        if !(0.0..1.0).contains(&self.min_p) {
            return bad("min-p", self.min_p.to_string(), "must be in [0, 1)");
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad(
                "repetition penalty",
                self.repetition_penalty.to_string(),
                "must be finite and > 0",
            );
        }
        if !self.presence_penalty.is_finite() {
            return bad(
                "presence penalty",
                self.presence_penalty.to_string(),
                "must be finite",
            );
        }
        Ok(())
    }
}

/// Draws tokens with one request's parameters and random stream.
#[derive(Clone, Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
}

impl Sampler {
    /// A sampler; `stream` separates the random streams of requests sharing a seed.
    pub fn new(params: SamplingParams, stream: u64) -> Self {
        Sampler {
            params,
            rng: Rng::new(params.seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
        }
    }

    /// The next token after `history` (prompt and generated ids) given raw `logits`.
    pub fn sample(&mut self, logits: &[f64], history: &[u32]) -> u32 {
        let p = &self.params;
        let mut z = logits.to_vec();
        if p.repetition_penalty != 1.0 || p.presence_penalty != 0.0 {
            let mut seen = vec![false; z.len()];
            for &id in history {
                if let Some(s) = seen.get_mut(id as usize) {
                    *s = true;
                }
            }
            for (x, _) in z.iter_mut().zip(&seen).filter(|(_, &s)| s) {
                *x = if *x > 0.0 {
                    *x / p.repetition_penalty
                } else {
                    *x * p.repetition_penalty
                };
                *x -= p.presence_penalty;
            }
        }
        let argmax = |v: &[f64]| {
            v.iter()
                .enumerate()
                .fold(0, |b, (i, &x)| if x > v[b] { i } else { b })
        };
        if p.temperature == 0.0 {
            return argmax(&z) as u32;
        }
        // Candidates by descending logit (lower id first on ties), then the filters.
        let mut order: Vec<usize> = (0..z.len()).collect();
        order.sort_by(|&a, &b| z[b].total_cmp(&z[a]).then(a.cmp(&b)));
        if let Some(k) = p.top_k {
            order.truncate(k.max(1));
        }
        let max = z[order[0]];
        let mut probs: Vec<f64> = order
            .iter()
            .map(|&i| ((z[i] - max) / p.temperature).exp())
            .collect();
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|q| *q /= total);
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            let keep = probs.iter().position(|q| {
                cum += q;
                cum >= p.top_p
            });
            let keep = keep.map_or(probs.len(), |i| i + 1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        if p.min_p > 0.0 {
            let floor = p.min_p * probs[0];
            let keep = probs.iter().take_while(|&&q| q >= floor).count().max(1);
            order.truncate(keep);
            probs.truncate(keep);
        }
        let total: f64 = probs.iter().sum();
        let mut u = self.rng.uniform() * total;
        for (i, q) in order.iter().zip(&probs) {
            if u < *q {
                return *i as u32;
            }
            u -= q;
        }
        order[order.len() - 1] as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f64) -> SamplingParams {
        SamplingParams {
            temperature,
            seed: 9,
            ..SamplingParams::greedy()
        }
    }

    #[test]
    fn greedy_takes_the_largest_logit() {
        let mut s = Sampler::new(SamplingParams::greedy(), 0);
        assert_eq!(s.sample(&[0.1, 3.0, 2.0, 3.0], &[]), 1);
    }

    #[test]
    fn top_k_never_leaves_the_k_best() {
        let logits: Vec<f64> = (0..50).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut best: Vec<usize> = (0..50).collect();
        best.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let mut s = Sampler::new(
            SamplingParams {
                top_k: Some(5),
                ..params(5.0)
            },
            0,
        );
        for _ in 0..2000 {
            let id = s.sample(&logits, &[]) as usize;
            assert!(best[..5].contains(&id), "{id}");
        }
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        // p = softmax([ln 1, ln 2, ln 3, ln 4]) = [0.1, 0.2, 0.3, 0.4] at temperature 1.
        let logits: Vec<f64> = [1.0f64, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        let mut s = Sampler::new(params(1.0), 3);
        let n = 40_000;
        let mut counts = [0usize; 4];
        for _ in 0..n {
            counts[s.sample(&logits, &[]) as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let (f, want) = (c as f64 / n as f64, 0.1 * (i + 1) as f64);
            // 5 standard deviations of a binomial proportion.
            let sd = (want * (1.0 - want) / n as f64).sqrt();
            assert!((f - want).abs() < 5.0 * sd, "token {i}: {f} vs {want}");
        }
    }

    #[test]
    fn top_p_and_min_p_cut_the_tail() {
        let logits: Vec<f64> = [1.0f64, 2.0, 3.0, 4.0].iter().map(|x| x.ln()).collect();
        // Cumulative from the top: 0.4, 0.7, 0.9, 1.0 -> top-p 0.65 keeps {3, 2}.
        let mut s = Sampler::new(
            SamplingParams {
                top_p: 0.65,
                ..params(1.0)
            },
            1,
        );
        assert!((0..3000).all(|_| s.sample(&logits, &[]) >= 2));
        // min-p 0.6 keeps tokens with p >= 0.24: {3, 2}.
        let mut s = Sampler::new(
            SamplingParams {
                min_p: 0.6,
                ..params(1.0)
            },
            2,
        );
        assert!((0..3000).all(|_| s.sample(&logits, &[]) >= 2));
    }

    #[test]
    fn penalties_discourage_repeats_and_seeds_reproduce() {
        let logits = [2.0, 1.9, -1.0];
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 1.5,
                ..SamplingParams::greedy()
            },
            0,
        );
        assert_eq!(s.sample(&logits, &[0]), 1, "2.0 / 1.5 < 1.9");
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 5.0,
                ..SamplingParams::greedy()
            },
            0,
        );
        assert_eq!(s.sample(&logits, &[0, 1]), 2);
        let draw = |seed| {
            let mut s = Sampler::new(
                SamplingParams {
                    seed,
                    ..params(1.0)
                },
                0,
            );
            (0..64)
                .map(|_| s.sample(&[0.0; 16], &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        assert_ne!(draw(5), draw(6));
    }

    #[test]
    fn invalid_values_are_named() {
        for (p, what) in [
            (
                SamplingParams {
                    temperature: -1.0,
                    ..SamplingParams::greedy()
                },
                "temperature",
            ),
            (
                SamplingParams {
                    top_k: Some(0),
                    ..SamplingParams::greedy()
                },
                "top-k",
            ),
            (
                SamplingParams {
                    top_p: 1.5,
                    ..SamplingParams::greedy()
                },
                "top-p",
            ),
            (
                SamplingParams {
                    top_p: 0.0,
                    ..SamplingParams::greedy()
                },
                "top-p",
            ),
            (
                SamplingParams {
                    min_p: 1.0,
                    ..SamplingParams::greedy()
                },
                "min-p",
            ),
            (
                SamplingParams {
                    repetition_penalty: 0.0,
                    ..SamplingParams::greedy()
                },
                "repetition penalty",
            ),
        ] {
            let err = p.validate().unwrap_err().to_string();
            assert!(err.contains(what), "{err}");
        }
        assert!(SamplingParams::recommended(None)
            .unwrap()
            .validate()
            .is_ok());
    }
}
