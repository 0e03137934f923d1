//! One greedy step at a time over a paged cache, shared by generation and benchmarks: prefill
//! runs eagerly; decode steps are captured once as a device graph (where the backend has them)
//! and replayed with the batch rewritten in place, so a step costs one launch.
use qfuse_core::{Backend, BatchInfo, KvCache, Result};

use crate::{Logits, Qwen3};

/// Runs forward passes and greedy sampling, reusing a captured decode step while it can.
pub struct Stepper<B: Backend> {
    batch: Option<B::Batch>,
    graph: Option<B::Graph>,
    graphs_failed: bool,
}

impl<B: Backend> Default for Stepper<B> {
    fn default() -> Self {
        Stepper {
            batch: None,
            graph: None,
            graphs_failed: false,
        }
    }
}

impl<B: Backend> Stepper<B> {
    /// A stepper with nothing captured.
    pub fn new() -> Self {
        Self::default()
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
        if !decode {
            self.batch = None;
            self.graph = None;
            let mut batch = b.prepare_batch(info)?;
            let logits = model.forward(b, &batch, cache, Logits::LastPerSequence)?;
            b.sample_greedy(&logits, &mut batch)?;
            return b.read_sampled(&batch);
        }
        let reused = match self.batch.as_mut() {
            Some(batch) => b.update_batch(batch, info)?,
            None => false,
        };
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
        let Some(batch) = self.batch.as_mut() else {
            return Err(qfuse_core::Error::invalid("Stepper::step", "no batch"));
        };
        match &self.graph {
            Some(g) => b.replay(g)?,
            None => {
                let logits = model.forward(b, batch, cache, Logits::LastPerSequence)?;
                b.sample_greedy(&logits, batch)?;
            }
        }
        b.read_sampled(batch)
    }
}
