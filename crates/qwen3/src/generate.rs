//! Generation of several sequences at once over the paged KV cache: one batched prefill, then
//! one batched decode step per token; greedy steps replay a captured graph where the backend has
//! them, sampled ones choose on the host from the downloaded logits.
use qfuse_core::{Backend, BatchInfo, Error, Result, SeqChunk};

use crate::{Inspector, Logits, Qwen3, Sampler, SamplingParams, Stepper};

/// Cache positions per block used by [`generate`].
pub const BLOCK_SIZE: usize = 16;

/// One sequence to continue.
#[derive(Clone, Debug)]
pub struct Request {
    /// Prompt token ids (at least one).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// Generation stops after emitting any of these (empty: never).
    pub stop_ids: Vec<u32>,
    /// How many of the largest raw logits to report per generated token (0: none).
    pub top_logits: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
}

impl Request {
    /// Greedy continuation of `prompt` for up to `max_new_tokens`, no stop ids, no logits report.
    pub fn greedy(prompt: Vec<u32>, max_new_tokens: usize) -> Self {
        Request {
            prompt,
            max_new_tokens,
            stop_ids: Vec::new(),
            top_logits: 0,
            sampling: SamplingParams::greedy(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// It generated `max_new_tokens` tokens.
    Length,
    /// It emitted a stop id (the id is included in the output).
    Stop,
}

impl FinishReason {
    /// `"length"` or `"stop"`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
        }
    }
}

/// The largest logits at one generation step, largest first (lower id first on ties).
#[derive(Clone, Debug, PartialEq)]
pub struct StepLogits {
    /// Token ids.
    pub top_ids: Vec<u32>,
    /// Their raw logits.
    pub top_logits: Vec<f64>,
}

/// What one request produced.
#[derive(Clone, Debug, PartialEq)]
pub struct Generation {
    /// Generated ids.
    pub new_ids: Vec<u32>,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Per generated token, the top logits when asked for.
    pub steps: Vec<StepLogits>,
}

/// Rejects a request the model cannot run, naming the offending value.
pub fn validate<B: Backend>(model: &Qwen3<B>, r: &Request) -> Result<()> {
    let cfg = model.config();
    if r.prompt.is_empty() {
        return Err(Error::invalid("generate", "the prompt is empty"));
    }
    if let Some((i, id)) = r
        .prompt
        .iter()
        .enumerate()
        .find(|(_, &id)| id as usize >= cfg.vocab_size)
    {
        return Err(Error::invalid(
            "generate",
            format!(
                "prompt token id {id} at index {i} is out of range (vocab_size {})",
                cfg.vocab_size
            ),
        ));
    }
    let total = r.prompt.len() + r.max_new_tokens;
    if total > cfg.max_position_embeddings {
        return Err(Error::invalid(
            "generate",
            format!(
                "prompt ({} tokens) + max new tokens ({}) = {total} exceeds max_position_embeddings {}",
                r.prompt.len(),
                r.max_new_tokens,
                cfg.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// The `k` largest values of `row`, largest first, lower index first on ties.
pub fn top_k(row: &[f64], k: usize) -> StepLogits {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    StepLogits {
        top_logits: idx.iter().map(|&i| row[i as usize]).collect(),
        top_ids: idx,
    }
}

struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    cached: usize,
    table: Vec<u32>,
    steps: Vec<StepLogits>,
    finished: Option<FinishReason>,
}

/// Positions a request's forward passes cover: its last generated token is never fed back.
fn processed_positions(r: &Request) -> usize {
    (r.prompt.len() + r.max_new_tokens).saturating_sub(1)
}

fn want_top(active: &[usize], requests: &[Request]) -> bool {
    active.iter().any(|&i| requests[i].top_logits > 0)
}

/// Continues every request, batched: all prompts in one prefill, then all unfinished sequences in
/// one decode step per token.
pub fn generate<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    requests: &[Request],
) -> Result<Vec<Generation>> {
    generate_with(model, b, requests, None, &mut |_, _| Ok(()))
}

/// [`generate`], calling `on_token(request, id)` as each token is chosen (for streaming; an error
/// stops generation), and with every forward pass run eagerly through `inspect` when it is given
/// (see [`Qwen3::forward_inspect`]).
pub fn generate_with<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    requests: &[Request],
    inspect: Option<&mut Inspector<'_, B>>,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
) -> Result<Vec<Generation>> {
    let mut stepper = Stepper::new();
    run(model, b, requests, inspect, on_token, &mut stepper)
}

/// [`generate`] with greedy decode steps queued one ahead or not (see [`Stepper`]), whatever
/// `QFUSE_DECODE_AHEAD` says; also returns how many steps queued ahead were used. For tests
/// and measurements: both must give the same ids.
pub fn generate_ahead<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    requests: &[Request],
    ahead: bool,
) -> Result<(Vec<Generation>, usize)> {
    let mut stepper = Stepper::with_ahead(ahead);
    let out = run(model, b, requests, None, &mut |_, _| Ok(()), &mut stepper)?;
    Ok((out, stepper.used_ahead()))
}

fn run<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    requests: &[Request],
    mut inspect: Option<&mut Inspector<'_, B>>,
    on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    stepper: &mut Stepper<B>,
) -> Result<Vec<Generation>> {
    for r in requests {
        validate(model, r)?;
        r.sampling.validate()?;
    }
    let mut samplers: Vec<Sampler> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| Sampler::new(r.sampling, i as u64))
        .collect();
    let blocks: usize = requests
        .iter()
        .map(|r| (r.prompt.len() + r.max_new_tokens).div_ceil(BLOCK_SIZE))
        .sum();
    let mut cache = model.new_cache(b, blocks.max(1), BLOCK_SIZE)?;
    let mut seqs: Vec<Seq> = requests
        .iter()
        .map(|r| Seq {
            tokens: r.prompt.clone(),
            prompt_len: r.prompt.len(),
            cached: 0,
            table: Vec::new(),
            steps: Vec::new(),
            finished: (r.max_new_tokens == 0).then_some(FinishReason::Length),
        })
        .collect();
    loop {
        let active: Vec<usize> = (0..seqs.len())
            .filter(|&i| seqs[i].finished.is_none())
            .collect();
        if active.is_empty() {
            break;
        }
        let (mut ids, mut chunks) = (Vec::new(), Vec::new());
        let mut decode = true;
        for &i in &active {
            let s = &mut seqs[i];
            // One position ahead where the sequence goes on, so the stepper can queue its next
            // step before this one's token is read.
            let ahead = (s.tokens.len() + 1).min(processed_positions(&requests[i]));
            cache
                .allocator()
                .reserve(&mut s.table, ahead.max(s.tokens.len()))?;
            ids.extend_from_slice(&s.tokens[s.cached..]);
            decode &= s.tokens.len() - s.cached == 1;
            chunks.push(SeqChunk {
                start_pos: s.cached,
                len: s.tokens.len() - s.cached,
                block_table: s.table.clone(),
            });
        }
        let capacity = active
            .iter()
            .map(|&i| processed_positions(&requests[i]))
            .max()
            .unwrap_or(0);
        let batch = BatchInfo::new(BLOCK_SIZE, chunks)?
            .with_token_ids(ids)?
            .with_capacity(capacity);
        let sampled = active.iter().any(|&i| !requests[i].sampling.is_greedy());
        let next = if want_top(&active, requests) || inspect.is_some() || sampled {
            // Top logits and sampling need the full rows on the host, inspection every stage:
            // an eager pass.
            let dev = b.prepare_batch(&batch)?;
            let logits = match inspect.as_deref_mut() {
                Some(f) => {
                    model.forward_inspect(b, &dev, &mut cache, Logits::LastPerSequence, f)?
                }
                None => model.forward(b, &dev, &mut cache, Logits::LastPerSequence)?,
            };
            let host = b.download(&logits)?.to_f64_vec();
            let vocab = model.config().vocab_size;
            let mut next = Vec::with_capacity(active.len());
            for (row, &i) in active.iter().enumerate() {
                let row_logits = &host[row * vocab..(row + 1) * vocab];
                if requests[i].top_logits > 0 {
                    seqs[i]
                        .steps
                        .push(top_k(row_logits, requests[i].top_logits));
                }
                next.push(samplers[i].sample(row_logits, &seqs[i].tokens));
            }
            next
        } else {
            stepper.step(model, b, &mut cache, &batch, decode)?
        };
        for (row, &i) in active.iter().enumerate() {
            let (s, r) = (&mut seqs[i], &requests[i]);
            s.cached = s.tokens.len();
            let id = next[row];
            s.tokens.push(id);
            on_token(i, id)?;
            if r.stop_ids.contains(&id) {
                s.finished = Some(FinishReason::Stop);
            } else if s.tokens.len() - s.prompt_len >= r.max_new_tokens {
                s.finished = Some(FinishReason::Length);
            }
            if s.finished.is_some() {
                cache.allocator().release(&mut s.table);
            }
        }
    }
    Ok(seqs
        .into_iter()
        .map(|s| Generation {
            new_ids: s.tokens[s.prompt_len..].to_vec(),
            finish_reason: s.finished.unwrap_or(FinishReason::Length),
            steps: s.steps,
        })
        .collect())
}

/// Greedy generation with decode steps queued ahead and without, on requests whose batch
/// changes as they run: three prompts of different lengths (5, 14 and 30 tokens) whose
/// sequences stop at a stop id mid-block, at their length limit where a block ends, and at a stop
/// id where a block ends, the stop ids picked from a first run without them. Device backends'
/// tests require the ids equal and some steps used.
pub fn decode_ahead_runs<B: Backend>(model: &Qwen3<B>, b: &B) -> Result<DecodeAheadRuns> {
    let vocab = model.config().vocab_size as u32;
    let prompt = |len: usize, seed: u32| -> Vec<u32> {
        (0..len as u32)
            .map(|i| (i * 7919 + seed * 104_729) % vocab)
            .collect()
    };
    let mut requests = vec![
        Request::greedy(prompt(5, 1), 40),
        // 14 + 18 = 32 positions: the last step ends at a block edge.
        Request::greedy(prompt(14, 2), 18),
        Request::greedy(prompt(30, 3), 35),
    ];
    let (free, _) = generate_ahead(model, b, &requests, false)?;
    // A stop at the first new id (at or after `step`) not generated before it.
    let stop_at = |ids: &[u32], step: usize| -> Vec<u32> {
        (step..ids.len())
            .find(|&k| !ids[..k].contains(&ids[k]))
            .map(|k| vec![ids[k]])
            .unwrap_or_default()
    };
    // Sequence 0 stops mid-block (step 6: its 12th token), sequence 2 at step 1 (its 32nd).
    requests[0].stop_ids = stop_at(&free[0].new_ids, 6);
    requests[2].stop_ids = stop_at(&free[2].new_ids, 1);
    let (ahead, used) = generate_ahead(model, b, &requests, true)?;
    let (plain, _) = generate_ahead(model, b, &requests, false)?;
    let ids = |g: Vec<Generation>| g.into_iter().map(|g| g.new_ids).collect();
    let (forced_ahead, forced_used) = forced_steps(model, b, true)?;
    let (forced_plain, _) = forced_steps(model, b, false)?;
    Ok(DecodeAheadRuns {
        ahead: ids(ahead),
        plain: ids(plain),
        used,
        forced_ahead,
        forced_plain,
        forced_used,
    })
}

/// Greedy steps of one sequence through a [`Stepper`] whose caller feeds every third step an id
/// other than the one returned, so the step queued ahead is dropped and the batch rewritten in
/// place; returns the ids and the steps found queued ahead.
fn forced_steps<B: Backend>(model: &Qwen3<B>, b: &B, ahead: bool) -> Result<(Vec<u32>, usize)> {
    let vocab = model.config().vocab_size as u32;
    let (prompt_len, steps): (usize, usize) = (5, 24);
    let capacity = prompt_len + steps;
    let table: Vec<u32> = (0..capacity.div_ceil(BLOCK_SIZE) as u32).collect();
    let mut cache = model.new_cache(b, table.len(), BLOCK_SIZE)?;
    let info = |start_pos: usize, ids: Vec<u32>| -> Result<BatchInfo> {
        let chunk = SeqChunk {
            start_pos,
            len: ids.len(),
            block_table: table.clone(),
        };
        Ok(BatchInfo::new(BLOCK_SIZE, vec![chunk])?
            .with_token_ids(ids)?
            .with_capacity(capacity))
    };
    let prompt = (0..prompt_len as u32)
        .map(|i| (i * 31 + 7) % vocab)
        .collect();
    let mut stepper = Stepper::with_ahead(ahead);
    let mut next = stepper.step(model, b, &mut cache, &info(0, prompt)?, false)?;
    let mut out = Vec::new();
    for k in 0..steps - 1 {
        let fed = if k % 3 == 1 {
            (next[0] + 1) % vocab
        } else {
            next[0]
        };
        next = stepper.step(
            model,
            b,
            &mut cache,
            &info(prompt_len + k, vec![fed])?,
            true,
        )?;
        out.push(next[0]);
    }
    Ok((out, stepper.used_ahead()))
}

/// What [`decode_ahead_runs`] generated.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeAheadRuns {
    /// Each request's new ids, decode steps queued ahead.
    pub ahead: Vec<Vec<u32>>,
    /// The same, without.
    pub plain: Vec<Vec<u32>>,
    /// Steps found queued ahead in the first run.
    pub used: usize,
    /// Ids of one sequence stepped with every third step fed another id than returned,
    /// decode steps queued ahead.
    pub forced_ahead: Vec<u32>,
    /// The same, without.
    pub forced_plain: Vec<u32>,
    /// Steps found queued ahead in the forced run.
    pub forced_used: usize,
}

impl DecodeAheadRuns {
    /// What a device backend's test requires of the runs but they show, if anything: ids queued
    /// ahead differing from ids stepped one at a time, or no step queued ahead at all.
    pub fn failure(&self) -> Option<String> {
        if self.ahead != self.plain {
            Some(format!(
                "ids {:?} queued ahead, {:?} not",
                self.ahead, self.plain
            ))
        } else if self.forced_ahead != self.forced_plain {
            Some(format!(
                "steps fed other ids: {:?} queued ahead, {:?} not",
                self.forced_ahead, self.forced_plain
            ))
        } else if self.used == 0 || self.forced_used == 0 {
            Some("no step was queued ahead".to_string())
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_ahead_runs_fail_on_any_difference_or_no_step_ahead() {
        let good = DecodeAheadRuns {
            ahead: vec![vec![1, 2], vec![3]],
            plain: vec![vec![1, 2], vec![3]],
            used: 2,
            forced_ahead: vec![4, 5],
            forced_plain: vec![4, 5],
            forced_used: 1,
        };
        assert_eq!(good.failure(), None);
        let bad = [
            DecodeAheadRuns {
                ahead: vec![vec![1, 9], vec![3]],
                ..good.clone()
            },
            DecodeAheadRuns {
                forced_ahead: vec![4, 6],
                ..good.clone()
            },
            DecodeAheadRuns {
                used: 0,
                ..good.clone()
            },
            DecodeAheadRuns {
                forced_used: 0,
                ..good.clone()
            },
        ];
        for runs in bad {
            assert!(runs.failure().is_some(), "{runs:?}");
        }
    }
}
