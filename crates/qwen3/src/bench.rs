//! End-to-end timing of batched prefill and decode, the figures `qfuse bench` reports.
use std::time::Instant;

use qfuse_core::{Backend, BatchInfo, Result, Rng, SeqChunk};

use crate::{Qwen3, Stepper};

/// What to time.
#[derive(Clone, Copy, Debug)]
pub struct BenchSpec {
    /// Sequences decoded together.
    pub batch: usize,
    /// Prompt tokens per sequence (random ids).
    pub prompt_len: usize,
    /// Decode steps after the prefill.
    pub new_tokens: usize,
    /// Seed of the random prompts.
    pub seed: u64,
}

/// Measured times of one run.
#[derive(Clone, Copy, Debug)]
pub struct BenchReport {
    /// Seconds for the batched prefill (all prompts, up to the first sampled tokens).
    pub prefill_s: f64,
    /// Seconds for all decode steps.
    pub decode_s: f64,
    /// Decode steps run.
    pub steps: usize,
    /// Sequences per step.
    pub batch: usize,
    /// Prompt tokens per sequence.
    pub prompt_len: usize,
    /// Bytes of weights each forward pass reads.
    pub weight_bytes: usize,
}

impl BenchReport {
    /// Prompt tokens processed per second in the prefill.
    pub fn prefill_tok_s(&self) -> f64 {
        (self.batch * self.prompt_len) as f64 / self.prefill_s
    }
    /// Generated tokens per second in the decode phase (all sequences).
    pub fn decode_tok_s(&self) -> f64 {
        (self.batch * self.steps) as f64 / self.decode_s
    }
    /// Milliseconds per decode step.
    pub fn ms_per_step(&self) -> f64 {
        1e3 * self.decode_s / self.steps.max(1) as f64
    }
    /// Weight bytes read per second during decode (each step reads every weight once).
    pub fn weight_gb_s(&self) -> f64 {
        (self.weight_bytes * self.steps) as f64 / self.decode_s / 1e9
    }
}

/// Runs a batched prefill of random prompts, then `new_tokens` greedy decode steps, synchronising
/// the device before each clock read.
pub fn run_bench<B: Backend>(model: &Qwen3<B>, b: &B, spec: &BenchSpec) -> Result<BenchReport> {
    let cfg = model.config();
    let total = spec.prompt_len + spec.new_tokens;
    let bs = crate::BLOCK_SIZE;
    let per_seq = total.div_ceil(bs);
    let mut cache = model.new_cache(b, per_seq * spec.batch, bs)?;
    let mut rng = Rng::new(spec.seed);
    let tables: Vec<Vec<u32>> = (0..spec.batch)
        .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
        .collect();
    let ids: Vec<u32> = (0..spec.batch * spec.prompt_len)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let chunks = |start: usize, len: usize| -> Vec<SeqChunk> {
        tables
            .iter()
            .map(|t| SeqChunk {
                start_pos: start,
                len,
                block_table: t.clone(),
            })
            .collect()
    };
    let mut stepper = Stepper::new();
    b.synchronize()?;
    let t0 = Instant::now();
    let prompt = BatchInfo::new(bs, chunks(0, spec.prompt_len))?.with_token_ids(ids)?;
    let mut next = stepper.step(model, b, &mut cache, &prompt, false)?;
    b.synchronize()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..spec.new_tokens {
        let info = BatchInfo::new(bs, chunks(spec.prompt_len + step, 1))?
            .with_token_ids(next)?
            .with_capacity(total);
        next = stepper.step(model, b, &mut cache, &info, true)?;
    }
    b.synchronize()?;
    Ok(BenchReport {
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        steps: spec.new_tokens,
        batch: spec.batch,
        prompt_len: spec.prompt_len,
        weight_bytes: model.weight_bytes(),
    })
}
