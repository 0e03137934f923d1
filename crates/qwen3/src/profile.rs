//! Amdahl profiling: where end-to-end time goes, what each fused kernel costs and saves in
//! isolation, what Amdahl's law predicts that buys end to end, and what it really buys.
use std::time::Instant;

use qfuse_core::{
    compose, AttentionConfig, Backend, BatchInfo, FusedOp, HostTensor, KvCache, LayerKv, Result,
    Rng, SeqChunk, Unfused,
};

use crate::bench::Workload;
use crate::{run_bench, BenchSpec, Logits, Qwen3, BLOCK_SIZE};

/// The signature the two attention-prologue ops share (`qk_norm_rope_write_kv` and
/// `qk_norm_rope_attention`, fused or composed).
type Prologue<B> = fn(
    &B,
    &<B as Backend>::Tensor,
    &<B as Backend>::Tensor,
    &<B as Backend>::Tensor,
    &mut LayerKv<<B as Backend>::Tensor>,
    &<B as Backend>::Batch,
    &AttentionConfig,
) -> Result<<B as Backend>::Tensor>;

/// Label of the time not covered by any op: host work and gaps between launches.
pub const GAPS: &str = "host overhead and launch gaps";

/// Time of one op class.
#[derive(Clone, Debug, PartialEq)]
pub struct StageTime {
    /// The op class ([`crate::Stage::name`], `sampling`, or [`GAPS`]).
    pub name: &'static str,
    /// Seconds (per decode step, or for the whole prefill).
    pub seconds: f64,
    /// Share of the pass's wall time.
    pub share: f64,
}

/// What one fused op buys.
#[derive(Clone, Debug, PartialEq)]
pub struct FusedOpReport {
    /// The op.
    pub op: FusedOp,
    /// Calls per decode step.
    pub calls_per_step: usize,
    /// Seconds per step the fused kernels take, timed in isolation on the model's shapes.
    pub fused_s: f64,
    /// Seconds per step the unfused composition takes, timed the same way.
    pub unfused_s: f64,
    /// Isolated speedup `s = unfused / fused`.
    pub speedup: f64,
    /// Share of the fused op in a fused decode step.
    pub share_fused: f64,
    /// Share `p` of its composition in a step with it unfused (Amdahl's `p`).
    pub share_unfused: f64,
    /// Amdahl's prediction of the end-to-end speedup of fusing it, `1 / ((1 - p) + p / s)`.
    pub predicted: f64,
    /// Measured end-to-end speedup: step time with the op unfused / with it fused.
    pub measured: f64,
}

impl FusedOpReport {
    /// Prediction and measurement differ by more than 10%.
    pub fn disagrees(&self) -> bool {
        (self.predicted - self.measured).abs() > 0.1 * self.measured
    }
}

/// A full profile.
#[derive(Clone, Debug)]
pub struct ProfileReport {
    /// The workload.
    pub spec: BenchSpec,
    /// Seconds per decode step on the fast path (graphs where the backend has them).
    pub step_s: f64,
    /// Seconds per decode step run eagerly with a timing event at every op boundary.
    pub eager_step_s: f64,
    /// Seconds of the batched prefill, eager and instrumented.
    pub prefill_s: f64,
    /// Decode time per step by op class (shares of `eager_step_s`, summing to 1).
    pub decode: Vec<StageTime>,
    /// Prefill time by op class (shares of `prefill_s`, summing to 1).
    pub prefill: Vec<StageTime>,
    /// Every fused op the model uses.
    pub fused: Vec<FusedOpReport>,
}

/// Amdahl's law: the speedup of a whole when a share `p` of it gets `s` times faster.
pub fn amdahl(p: f64, s: f64) -> f64 {
    1.0 / ((1.0 - p) + p / s)
}

fn random<B: Backend>(b: &B, rng: &mut Rng, rows: usize, cols: usize) -> Result<B::Tensor> {
    b.upload(&HostTensor::from_f64(
        [rows, cols],
        (0..rows * cols).map(|_| rng.normal()).collect(),
    )?)
}

/// Device seconds per op class, in order of first appearance.
type OpTimes = Vec<(&'static str, f64)>;

/// One forward pass with a timing event at every op boundary; returns the sampled ids, the
/// device seconds per op class and the wall seconds.
fn instrumented<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    info: &BatchInfo,
    cache: &mut KvCache<B>,
) -> Result<(Vec<u32>, OpTimes, f64)> {
    let mut batch = b.prepare_batch(info)?;
    b.synchronize()?;
    let wall = Instant::now();
    let mut events = vec![("start", b.record_event()?)];
    let logits = model.forward_inspect(
        b,
        &batch,
        cache,
        Logits::LastPerSequence,
        &mut |_, stage, _| {
            events.push((stage.name(), b.record_event()?));
            Ok(())
        },
    )?;
    b.sample_greedy(&logits, &mut batch)?;
    events.push(("sampling", b.record_event()?));
    let next = b.read_sampled(&batch)?;
    b.synchronize()?;
    let wall = wall.elapsed().as_secs_f64();
    let mut times: Vec<(&'static str, f64)> = Vec::new();
    for w in events.windows(2) {
        let dt = b.elapsed_s(&w[0].1, &w[1].1)?;
        match times.iter_mut().find(|(n, _)| *n == w[1].0) {
            Some((_, t)) => *t += dt,
            None => times.push((w[1].0, dt)),
        }
    }
    Ok((next, times, wall))
}

/// Shares of `wall`, with the uncovered rest as [`GAPS`] (clamped at 0 where timer noise makes
/// the ops add up to more than the wall time).
fn shares(times: &OpTimes, wall: f64, per: f64) -> Vec<StageTime> {
    let covered: f64 = times.iter().map(|(_, t)| t).sum();
    let total = wall.max(covered);
    let mut v: Vec<StageTime> = times
        .iter()
        .map(|&(name, t)| StageTime {
            name,
            seconds: t / per,
            share: t / total,
        })
        .collect();
    v.push(StageTime {
        name: GAPS,
        seconds: (total - covered) / per,
        share: (total - covered) / total,
    });
    v
}

/// Seconds per call of `f`, timed with backend events over `reps` calls after two warm-ups.
fn time_op<B: Backend>(
    b: &B,
    reps: usize,
    mut f: impl FnMut() -> Result<B::Tensor>,
) -> Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    b.synchronize()?;
    let start = b.record_event()?;
    for _ in 0..reps {
        f()?;
    }
    let end = b.record_event()?;
    Ok(b.elapsed_s(&start, &end)? / reps as f64)
}

/// Profiles batched decode (and the prefill before it) of `model` on `b`.
pub fn profile<B: Backend>(
    model: &Qwen3<B>,
    b: &B,
    spec: &BenchSpec,
    reps: usize,
) -> Result<ProfileReport> {
    let cfg = model.config().clone();
    // 1. The fast path, end to end (warmed up first).
    run_bench(
        model,
        b,
        &BenchSpec {
            new_tokens: spec.new_tokens.min(4),
            ..*spec
        },
    )?;
    let step_s = run_bench(model, b, spec)?.ms_per_step() / 1e3;

    // 2. The same work eagerly, with an event at every op boundary.
    let mut work = Workload::new(model, b, spec)?;
    let prompt = work.prefill()?;
    let (mut next, prefill_times, prefill_s) = instrumented(model, b, &prompt, &mut work.cache)?;
    let (mut decode_times, mut eager_wall) = (OpTimes::new(), 0.0);
    for step in 0..spec.new_tokens {
        let info = work.step(spec.prompt_len + step, 1, next)?;
        let (n, times, wall) = instrumented(model, b, &info, &mut work.cache)?;
        next = n;
        eager_wall += wall;
        for (name, t) in times {
            match decode_times.iter_mut().find(|(n, _)| *n == name) {
                Some((_, acc)) => *acc += t,
                None => decode_times.push((name, t)),
            }
        }
    }
    let steps = spec.new_tokens.max(1) as f64;

    // 3. Each fused op the model uses, fused and composed, on the model's own weights and shapes.
    let (t, eps, l0) = (spec.batch, cfg.rms_norm_eps, &model.layers()[0]);
    let layers = cfg.num_hidden_layers;
    let mut rng = Rng::new(3);
    let x = random(b, &mut rng, t, cfg.hidden_size)?;
    let attn_out = random(b, &mut rng, t, cfg.num_attention_heads * cfg.head_dim)?;
    let act = random(b, &mut rng, t, cfg.intermediate_size)?;
    let qkv = random(b, &mut rng, t, cfg.attention().qkv_width())?;
    let mut kv = KvCache::new(b, 1, t, BLOCK_SIZE, cfg.num_key_value_heads, cfg.head_dim)?;
    let kv_info = BatchInfo::new(
        BLOCK_SIZE,
        (0..t)
            .map(|s| SeqChunk {
                start_pos: spec.prompt_len % BLOCK_SIZE,
                len: 1,
                block_table: vec![s as u32],
            })
            .collect(),
    )?;
    let kv_batch = b.prepare_batch(&kv_info)?;
    let (a, mlp) = (&l0.self_attn, &l0.mlp);
    let mut fused = Vec::new();
    for op in FusedOp::ALL {
        // (calls per step, fused seconds per step, composed seconds per step)
        let (calls, f, u) = match op {
            FusedOp::RmsNormMatmul => {
                let qf = time_op(b, reps, || {
                    b.rms_norm_matmul(&x, &l0.input_layernorm, &a.qkv_proj, eps)
                })?;
                let qu = time_op(b, reps, || {
                    compose::rms_norm_matmul(b, &x, &l0.input_layernorm, &a.qkv_proj, eps)
                })?;
                let lf = time_op(b, reps, || {
                    b.rms_norm_logits(&x, model.norm(), model.lm_head(), eps)
                })?;
                let lu = time_op(b, reps, || {
                    compose::rms_norm_matmul(b, &x, model.norm(), model.lm_head(), eps)
                })?;
                (layers + 1, layers as f64 * qf + lf, layers as f64 * qu + lu)
            }
            FusedOp::QkNormRopeWriteKv | FusedOp::QkNormRopeAttention => {
                let (fused_op, composed): (Prologue<B>, Prologue<B>) =
                    if op == FusedOp::QkNormRopeWriteKv {
                        (
                            B::qk_norm_rope_write_kv,
                            compose::qk_norm_rope_write_kv::<B>,
                        )
                    } else {
                        (
                            B::qk_norm_rope_attention,
                            compose::qk_norm_rope_attention::<B>,
                        )
                    };
                let cfg_a = cfg.attention();
                let (qn, kn) = (&a.q_norm, &a.k_norm);
                let f = time_op(b, reps, || {
                    fused_op(b, &qkv, qn, kn, kv.layer_mut(0), &kv_batch, &cfg_a)
                })?;
                let u = time_op(b, reps, || {
                    composed(b, &qkv, qn, kn, kv.layer_mut(0), &kv_batch, &cfg_a)
                })?;
                (layers, layers as f64 * f, layers as f64 * u)
            }
            FusedOp::MatmulAdd => {
                let of = time_op(b, reps, || b.matmul_add(&attn_out, &a.o_proj, &x))?;
                let ou = time_op(b, reps, || compose::matmul_add(b, &attn_out, &a.o_proj, &x))?;
                let df = time_op(b, reps, || b.matmul_add(&act, &mlp.down_proj, &x))?;
                let du = time_op(b, reps, || compose::matmul_add(b, &act, &mlp.down_proj, &x))?;
                (
                    2 * layers,
                    layers as f64 * (of + df),
                    layers as f64 * (ou + du),
                )
            }
            FusedOp::RmsNormMatmulSiluMul => {
                let post = &l0.post_attention_layernorm;
                let f = time_op(b, reps, || {
                    b.rms_norm_matmul_silu_mul(&x, post, &mlp.gate_up_proj, eps)
                })?;
                let u = time_op(b, reps, || {
                    compose::rms_norm_matmul_silu_mul(b, &x, post, &mlp.gate_up_proj, eps)
                })?;
                (layers, layers as f64 * f, layers as f64 * u)
            }
            // Only where the backend has a layer kernel: else both sides are the composition.
            FusedOp::DecoderLayer if !b.fuses_decoder_layer() => continue,
            FusedOp::DecoderLayer => {
                let (cfg_a, w) = (cfg.attention(), l0.weights());
                let f = time_op(b, reps, || {
                    b.decoder_layer(&x, &w, kv.layer_mut(0), &kv_batch, &cfg_a, eps)
                })?;
                let u = time_op(b, reps, || {
                    compose::decoder_layer(b, &x, &w, kv.layer_mut(0), &kv_batch, &cfg_a, eps)
                })?;
                (layers, layers as f64 * f, layers as f64 * u)
            }
            // Only inside the composition of rms_norm_matmul_silu_mul: the model never calls it.
            FusedOp::MatmulSiluMul => continue,
        };
        let unfused_backend = Unfused::new(b.clone(), vec![op]);
        let unfused_model = model.rebind::<Unfused<B>>();
        let unfused_step = run_bench(&unfused_model, &unfused_backend, spec)?.ms_per_step() / 1e3;
        // The rest of an unfused step is the fused step less this op (isolated timings can
        // exceed their in-model share; the rest never goes below zero).
        let (speedup, share_unfused) = (u / f, u / ((step_s - f).max(0.0) + u));
        fused.push(FusedOpReport {
            op,
            calls_per_step: calls,
            fused_s: f,
            unfused_s: u,
            speedup,
            share_fused: f / step_s,
            share_unfused,
            predicted: amdahl(share_unfused, speedup),
            measured: unfused_step / step_s,
        });
    }
    Ok(ProfileReport {
        spec: *spec,
        step_s,
        eager_step_s: eager_wall / steps,
        prefill_s,
        decode: shares(&decode_times, eager_wall, steps),
        prefill: shares(&prefill_times, prefill_s, 1.0),
        fused,
    })
}
