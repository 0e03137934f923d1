//! End-to-end timing of batched prefill and decode, the figures `qfuse bench` reports.
use std::time::Instant;

use qfuse_core::{Backend, BatchInfo, KvCache, Result, Rng, SeqChunk};

use crate::{Qwen3, Stepper, BLOCK_SIZE};

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
    /// Decode steps found already queued, one ahead (see [`Stepper`]).
    pub steps_ahead: usize,
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

/// The batch of a benchmark: `batch` sequences of random prompts, each with its own run of cache
/// blocks for `prompt_len + new_tokens` positions.
pub(crate) struct Workload<B: Backend> {
    pub(crate) cache: KvCache<B>,
    tables: Vec<Vec<u32>>,
    prompt_ids: Vec<u32>,
    capacity: usize,
}

impl<B: Backend> Workload<B> {
    pub(crate) fn new(model: &Qwen3<B>, b: &B, spec: &BenchSpec) -> Result<Self> {
        let capacity = spec.prompt_len + spec.new_tokens;
        let per_seq = capacity.div_ceil(BLOCK_SIZE);
        let tables = (0..spec.batch)
            .map(|s| ((s * per_seq) as u32..((s + 1) * per_seq) as u32).collect())
            .collect();
        let mut rng = Rng::new(spec.seed);
        let vocab = model.config().vocab_size;
        let prompt_ids = (0..spec.batch * spec.prompt_len)
            .map(|_| rng.below(vocab) as u32)
            .collect();
        Ok(Workload {
            cache: model.new_cache(b, per_seq * spec.batch, BLOCK_SIZE)?,
            tables,
            prompt_ids,
            capacity,
        })
    }

    /// Every sequence's prompt.
    pub(crate) fn prefill(&self) -> Result<BatchInfo> {
        self.step(
            0,
            self.prompt_ids.len() / self.tables.len().max(1),
            self.prompt_ids.clone(),
        )
    }

    /// `len` tokens `ids` per sequence from position `start`.
    pub(crate) fn step(&self, start: usize, len: usize, ids: Vec<u32>) -> Result<BatchInfo> {
        let chunks = self
            .tables
            .iter()
            .map(|t| SeqChunk {
                start_pos: start,
                len,
                block_table: t.clone(),
            })
            .collect();
        Ok(BatchInfo::new(BLOCK_SIZE, chunks)?
            .with_token_ids(ids)?
            .with_capacity(self.capacity))
    }
}

/// Runs a batched prefill of random prompts, then `new_tokens` greedy decode steps, synchronising
/// the device before each clock read.
pub fn run_bench<B: Backend>(model: &Qwen3<B>, b: &B, spec: &BenchSpec) -> Result<BenchReport> {
    let mut work = Workload::new(model, b, spec)?;
    let mut stepper = Stepper::new();
    b.synchronize()?;
    let t0 = Instant::now();
    let prompt = work.prefill()?;
    let mut next = stepper.step(model, b, &mut work.cache, &prompt, false)?;
    b.synchronize()?;
    let prefill_s = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    for step in 0..spec.new_tokens {
        let info = work.step(spec.prompt_len + step, 1, next)?;
        next = stepper.step(model, b, &mut work.cache, &info, true)?;
    }
    b.synchronize()?;
    Ok(BenchReport {
        prefill_s,
        decode_s: t1.elapsed().as_secs_f64(),
        steps: spec.new_tokens,
        batch: spec.batch,
        prompt_len: spec.prompt_len,
        weight_bytes: model.weight_bytes(),
        steps_ahead: stepper.used_ahead(),
    })
}
