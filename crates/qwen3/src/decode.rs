//! One greedy step at a time over a paged cache, shared by generation and benchmarks: prefill
//! runs eagerly; decode steps are captured once as a device graph (where the backend has them)
//! and replayed with the batch rewritten in place, so a step costs one launch.
//!
//! Decode steps are also queued one ahead: once a step's sampling is queued, the next step is
//! queued on the device's own ids (it gathers its embeddings from them) before the host waits
//! for those ids, so the device does not idle while the host reads a token and records the next
//! step. The next call finds its step already queued when the caller continues the same
//! sequences with the ids just returned, which is what greedy generation does; otherwise the
//! step queued ahead is dropped. Its cache writes are then harmless: it wrote only the slot of
//! each sequence's next position, which the caller's step writes again before anything reads
//! it, or which belongs to a finished sequence.
use qfuse_core::{knobs, Backend, BatchInfo, KvCache, Result, SeqChunk};

use crate::{Logits, Qwen3};

/// Runs forward passes and greedy sampling, reusing a captured decode step while it can.
pub struct Stepper<B: Backend> {
    batch: Option<B::Batch>,
    graph: Option<B::Graph>,
    graphs_failed: bool,
    /// Queue each decode step's successor before reading its ids.
    ahead: bool,
    /// The decode step queued on `batch` before the caller asked for it (its ids the device's),
    /// and the ids the step before it returned.
    queued: Option<(BatchInfo, Vec<u32>)>,
    /// Steps found queued ahead.
    used_ahead: usize,
}

impl<B: Backend> Default for Stepper<B> {
    fn default() -> Self {
        Self::with_ahead(knobs::env_knob("QFUSE_DECODE_AHEAD", 0..=1) != Some(0))
    }
}

impl<B: Backend> Stepper<B> {
    /// A stepper with nothing captured, queueing decode steps ahead unless
    /// `QFUSE_DECODE_AHEAD=0`.
    pub fn new() -> Self {
        Self::default()
    }

    /// A stepper that queues decode steps ahead (where the backend can) or not.
    pub fn with_ahead(ahead: bool) -> Self {
        Stepper {
            batch: None,
            graph: None,
            graphs_failed: false,
            ahead,
            queued: None,
            used_ahead: 0,
        }
    }

    /// How many decode steps were found already queued when asked for.
    pub fn used_ahead(&self) -> usize {
        self.used_ahead
    }

    /// Runs the model over `info` (its token ids included) and returns the greedy next id of each
    /// sequence. `decode` marks a step of one new token per sequence: the kind worth capturing.
    pub fn step(
        &mut self,
        model: &Qwen3<B>,
        b: &B,
        cache: &mut KvCache<B>,
        info: &BatchInfo,
        decode: bool,
    ) -> Result<Vec<u32>> {
        let result = self.try_step(model, b, cache, info, decode);
        if result.is_err() {
            // Whatever was queued or captured may be half done: start afresh next time.
            *self = Stepper {
                used_ahead: self.used_ahead,
                ..Self::with_ahead(self.ahead)
            };
        }
        result
    }

    fn try_step(
        &mut self,
        model: &Qwen3<B>,
        b: &B,
        cache: &mut KvCache<B>,
        info: &BatchInfo,
        decode: bool,
    ) -> Result<Vec<u32>> {
        let queued = self.queued.take();
        if !decode {
            self.batch = None;
            self.graph = None;
            let mut batch = b.prepare_batch(info)?;
            let logits = model.forward(b, &batch, cache, Logits::LastPerSequence)?;
            b.sample_greedy(&logits, &mut batch)?;
            return b.read_sampled(&batch);
        }
        let already = queued
            .as_ref()
            .is_some_and(|(next, ids)| continues(next, info, ids));
        if already {
            self.used_ahead += 1;
        } else {
            if let (Some(_), Some(batch)) = (&queued, &self.batch) {
                // The step queued ahead is not wanted: take its ids off the batch's reads, so
                // the next read returns this step's. (Its error, if any, is not this step's.)
                let _ = b.read_sampled(batch);
            }
            self.queue(model, b, cache, info, false)?;
        }
        if let Some(next) = self.ahead.then(|| next_step(info)).flatten() {
            if self.queue(model, b, cache, &next, true)? {
                // All of it (its ids' copy included, read at the next call) on its way, so the
                // device goes on to it when this step ends.
                b.flush()?;
                self.queued = Some((next, Vec::new()));
            }
        }
        let ids = b.read_sampled(self.batch.as_ref().ok_or_else(no_batch)?)?;
        if let Some((_, prev)) = self.queued.as_mut() {
            prev.clone_from(&ids);
        }
        Ok(ids)
    }

    /// Queues the decode step `info`, its sampling and the start of its ids' read, on the batch
    /// rewritten in place (replaying the captured graph) where it can be. `on_device`: the
    /// step's token ids are the ones the last step sampled, still on the device; the step is
    /// then queued only where the backend can do that in place ([`Backend::advance_batch`]),
    /// and the return says whether it was.
    fn queue(
        &mut self,
        model: &Qwen3<B>,
        b: &B,
        cache: &mut KvCache<B>,
        info: &BatchInfo,
        on_device: bool,
    ) -> Result<bool> {
        let reused = match self.batch.as_mut() {
            Some(batch) if on_device => b.advance_batch(batch, info)?,
            Some(batch) => b.update_batch(batch, info)?,
            None => false,
        };
        if on_device && !reused {
            return Ok(false);
        }
        if !reused {
            self.graph = None;
            let mut batch = b.prepare_batch(info)?;
            if !self.graphs_failed {
                let captured = b.capture(&mut || {
                    let logits = model.forward(b, &batch, cache, Logits::LastPerSequence)?;
                    b.sample_greedy(&logits, &mut batch)
                });
                match captured {
                    Ok(g) => self.graph = g,
                    // A backend that cannot capture this step still runs it eagerly.
                    Err(_) => self.graphs_failed = true,
                }
            }
            self.batch = Some(batch);
        }
        let batch = self.batch.as_mut().ok_or_else(no_batch)?;
        match &self.graph {
            Some(g) => b.replay(g)?,
            None => {
                let logits = model.forward(b, batch, cache, Logits::LastPerSequence)?;
                b.sample_greedy(&logits, batch)?;
            }
        }
        b.start_read_sampled(batch)?;
        Ok(true)
    }
}

fn no_batch() -> qfuse_core::Error {
    qfuse_core::Error::invalid("Stepper::step", "no batch")
}

/// The decode step after `info` (a decode step): every sequence one position on, when its block
/// table already holds that position and the batch's capacity allows it. Its token ids are
/// placeholders (zeros).
fn next_step(info: &BatchInfo) -> Option<BatchInfo> {
    let chunks = info
        .seqs()
        .iter()
        .map(|s| {
            let pos = s.start_pos + 1;
            let fits = s.len == 1
                && pos < info.capacity()
                && pos / info.block_size() < s.block_table.len();
            fits.then(|| SeqChunk {
                start_pos: pos,
                len: 1,
                block_table: s.block_table.clone(),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    BatchInfo::new(info.block_size(), chunks)
        .ok()
        .map(|next| next.with_capacity(info.capacity()))
}

/// Whether `info` is the step `queued` was queued for: the same sequences at the same positions,
/// each table extending the one queued with (so the same slots), no larger capacity, and token
/// ids `ids` (the ones the device gathered).
fn continues(queued: &BatchInfo, info: &BatchInfo, ids: &[u32]) -> bool {
    info.block_size() == queued.block_size()
        && info.capacity() <= queued.capacity()
        && info.token_ids() == ids
        && info.seqs().len() == queued.seqs().len()
        && info.seqs().iter().zip(queued.seqs()).all(|(a, q)| {
            a.start_pos == q.start_pos
                && a.len == q.len
                && a.block_table.starts_with(&q.block_table)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(seqs: &[(usize, Vec<u32>)], capacity: usize, ids: Vec<u32>) -> BatchInfo {
        let chunks = seqs
            .iter()
            .map(|(pos, table)| SeqChunk {
                start_pos: *pos,
                len: 1,
                block_table: table.clone(),
            })
            .collect();
        BatchInfo::new(4, chunks)
            .unwrap()
            .with_token_ids(ids)
            .unwrap()
            .with_capacity(capacity)
    }

    #[test]
    fn the_next_step_needs_its_position_in_the_table_and_the_capacity() {
        let now = info(&[(2, vec![7]), (5, vec![1, 2])], 9, vec![3, 4]);
        let next = next_step(&now).unwrap();
        assert_eq!(next.positions(), &[3, 6]);
        assert_eq!(next.slots(), &[31, 10]);
        assert_eq!(next.capacity(), 9);
        // Position 4 needs a second block.
        assert!(next_step(&info(&[(3, vec![7])], 9, vec![0])).is_none());
        // Position 8 is past the capacity.
        assert!(next_step(&info(&[(7, vec![7, 8, 9])], 8, vec![0])).is_none());
        assert!(next_step(&info(&[(7, vec![7, 8, 9])], 9, vec![0])).is_some());
    }

    #[test]
    fn a_queued_step_continues_only_the_same_sequences_with_the_ids_read() {
        let queued = info(&[(3, vec![7]), (6, vec![1, 2])], 9, vec![0, 0]);
        let ids = [5, 6];
        let same = info(&[(3, vec![7]), (6, vec![1, 2])], 9, ids.to_vec());
        assert!(continues(&queued, &same, &ids));
        let grown = info(&[(3, vec![7, 4]), (6, vec![1, 2])], 9, ids.to_vec());
        assert!(continues(&queued, &grown, &ids));
        let other_ids = info(&[(3, vec![7]), (6, vec![1, 2])], 9, vec![5, 7]);
        assert!(!continues(&queued, &other_ids, &ids));
        let moved = info(&[(4, vec![7, 4]), (6, vec![1, 2])], 9, ids.to_vec());
        assert!(!continues(&queued, &moved, &ids));
        let other_block = info(&[(3, vec![8]), (6, vec![1, 2])], 9, ids.to_vec());
        assert!(!continues(&queued, &other_block, &ids));
        let fewer = info(&[(3, vec![7])], 9, vec![5]);
        assert!(!continues(&queued, &fewer, &[5]));
        let larger = info(&[(3, vec![7]), (6, vec![1, 2])], 10, ids.to_vec());
        assert!(!continues(&queued, &larger, &ids));
    }
}
