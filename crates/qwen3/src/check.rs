//! Backend diffing: run one backend and a reference on the same tokens and compare every op's
//! output, layer by layer, to find where (if anywhere) they part ways.
use qfuse_core::{rel_error, Backend, Result};

use crate::{LogitsDiff, Qwen3, Stage};

/// Value statistics of one op's output.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stats {
    /// Smallest finite value.
    pub min: f64,
    /// Largest finite value.
    pub max: f64,
    /// Root mean square of the finite values.
    pub rms: f64,
    /// NaNs and infinities.
    pub non_finite: usize,
}

impl Stats {
    fn of(v: &[f64]) -> Stats {
        let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
        let rms = (finite.iter().map(|x| x * x).sum::<f64>() / finite.len().max(1) as f64).sqrt();
        Stats {
            min: finite.iter().copied().fold(f64::INFINITY, f64::min),
            max: finite.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            rms,
            non_finite: v.len() - finite.len(),
        }
    }
}

/// One op's output compared.
#[derive(Clone, Debug, PartialEq)]
pub struct StageDiff {
    /// Layer (0 for the embedding; the last layer for the logits).
    pub layer: usize,
    /// The op.
    pub stage: Stage,
    /// ‖ours − reference‖ / ‖reference‖.
    pub rel_error: f64,
    /// max |ours − reference|.
    pub max_abs_error: f64,
    /// The backend under test.
    pub ours: Stats,
    /// The reference.
    pub reference: Stats,
}

/// The whole comparison and its verdict.
#[derive(Clone, Debug)]
pub struct CheckReport {
    /// Every op of every layer, in execution order.
    pub stages: Vec<StageDiff>,
    /// Index into `stages` of the first op whose error exceeds the tolerance or that holds a
    /// non-finite value.
    pub first_divergence: Option<usize>,
    /// Teacher-forced logits over the whole sequence.
    pub logits: LogitsDiff,
    /// The tolerance applied.
    pub tolerance: f64,
}

impl CheckReport {
    /// Logits within tolerance, top-1 agreement at least 99%, nothing non-finite anywhere.
    pub fn passed(&self) -> bool {
        self.logits.rel <= self.tolerance
            && self.logits.top1_agreement >= 0.99
            && self.stages.iter().all(|s| s.ours.non_finite == 0)
    }
}

/// `(layer, stage, values)` of every op's output of one pass.
type Recorded = Vec<(usize, Stage, Vec<f64>)>;

/// Every op's output of one teacher-forced pass over `tokens`, downloaded, and the logits.
fn record<B: Backend>(b: &B, model: &Qwen3<B>, tokens: &[u32]) -> Result<(Recorded, Vec<f64>)> {
    let mut seen = Vec::new();
    let logits = model.score_inspect(b, tokens, &mut |layer, stage, t| {
        seen.push((layer, stage, b.download(t)?.to_f64_vec()));
        Ok(())
    })?;
    Ok((seen, b.download(&logits)?.to_f64_vec()))
}

/// Runs `model` on `b` and `reference_model` on `r` over the same tokens and compares every op.
pub fn check_against<B: Backend, R: Backend>(
    b: &B,
    model: &Qwen3<B>,
    r: &R,
    reference_model: &Qwen3<R>,
    tokens: &[u32],
    tolerance: f64,
) -> Result<CheckReport> {
    let (want, want_logits) = record(r, reference_model, tokens)?;
    let (got, got_logits) = record(b, model, tokens)?;
    let stages: Vec<StageDiff> = got
        .iter()
        .zip(&want)
        .map(|((layer, stage, o), (_, _, w))| StageDiff {
            layer: *layer,
            stage: *stage,
            rel_error: rel_error(o, w),
            max_abs_error: o
                .iter()
                .zip(w)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max),
            ours: Stats::of(o),
            reference: Stats::of(w),
        })
        .collect();
    let first_divergence = stages
        .iter()
        .position(|s| s.rel_error > tolerance || s.ours.non_finite > 0);
    let logits = LogitsDiff::new(
        &got_logits,
        &want_logits,
        reference_model.config().vocab_size,
    );
    Ok(CheckReport {
        stages,
        first_divergence,
        logits,
        tolerance,
    })
}
