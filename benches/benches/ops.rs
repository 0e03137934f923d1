//! Isolated ops on the shapes of Qwen3-0.6B's decode step: each fused op against its unfused
//! composition on the same backend, with the weight bytes each call must read as criterion's
//! throughput (so the report's GB/s compares directly with the card's copy bandwidth).
//!
//! Two measures of each op: `{backend}/{op}/{shape}` is one call's latency (launch, run, host
//! synchronize); `{backend}/back_to_back/{op}/{shape}` is the device time per call of calls run
//! back to back as a decode step runs its layers (captured as one graph where the backend has
//! graphs, timed by device events), each call on another layer's copy of the weights so every
//! call reads its weights from DRAM, not from L2.
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qfuse_benches::{DecodeInputs, LayerWeights, LAYERS};
use qfuse_core::{compose, Backend, Result};
use qfuse_cpu_ref::CpuRef;

/// One layer's call of an op (layer 0 for single calls; each in turn in a back-to-back series).
type LayerCall<'a, B> = &'a dyn Fn(usize) -> Result<<B as Backend>::Tensor>;

/// Which measure of an op to take.
#[derive(Clone, Copy)]
enum Measure {
    /// One call's latency: launch, run, host synchronize.
    Latency,
    /// Device time per call of calls run back to back over `LAYERS` copies of the weights.
    BackToBack,
}

/// Benches `fused` and `composed` (the same op, unfused) by `measure`: one call on layer 0's
/// weights as `{backend}/{name}/{shape}`, or calls for layers 0..LAYERS in turn as
/// `{backend}/back_to_back/{name}/{shape}`.
#[allow(clippy::too_many_arguments)]
fn pair<B: Backend>(
    c: &mut Criterion,
    measure: Measure,
    name: &str,
    shape: &str,
    bytes: u64,
    b: &B,
    fused: LayerCall<'_, B>,
    composed: LayerCall<'_, B>,
) {
    let series_name = match measure {
        Measure::Latency => "",
        Measure::BackToBack => "back_to_back/",
    };
    let mut group = c.benchmark_group(format!("{}/{series_name}{name}/{shape}", B::NAME));
    group.throughput(Throughput::Bytes(bytes));
    for (label, op) in [("fused", fused), ("unfused", composed)] {
        if let Measure::Latency = measure {
            group.bench_function(label, |bench| {
                bench.iter(|| {
                    let y = op(0);
                    b.synchronize().and(y)
                })
            });
            continue;
        }
        let mut series = || -> Result<()> {
            for layer in 0..LAYERS {
                op(layer)?;
            }
            Ok(())
        };
        // `capture` runs the series once eagerly first, which also checks that it runs at all.
        let graph = match b.capture(&mut series) {
            Ok(g) => g,
            Err(e) => {
                eprintln!("{}: {name} {label}: {e}", B::NAME);
                continue;
            }
        };
        group.bench_function(label, |bench| {
            bench.iter_custom(|iters| {
                per_call_device_time(b, graph.as_ref(), op, iters).unwrap_or_else(|e| {
                    eprintln!("{}: {name} {label}: {e}", B::NAME);
                    std::process::exit(1)
                })
            })
        });
    }
    group.finish();
}

/// Device time of `iters` calls: whole series of `LAYERS` calls (graph replays where captured)
/// between two device events, scaled to `iters`.
fn per_call_device_time<B: Backend>(
    b: &B,
    graph: Option<&B::Graph>,
    op: LayerCall<'_, B>,
    iters: u64,
) -> Result<Duration> {
    let rounds = iters.div_ceil(LAYERS as u64).max(1);
    let start = b.record_event()?;
    for _ in 0..rounds {
        match graph {
            Some(g) => b.replay(g)?,
            None => {
                for layer in 0..LAYERS {
                    op(layer)?;
                }
            }
        }
    }
    let end = b.record_event()?;
    let seconds = b.elapsed_s(&start, &end)?;
    Ok(Duration::from_secs_f64(
        seconds * iters as f64 / (rounds * LAYERS as u64) as f64,
    ))
}

/// The decode step's fused GEMVs at `t` rows: input norm + QKV (1024 -> 4096), post-attention
/// norm + gate/up + SiLU·up (1024 -> 2 x 3072), o_proj + residual (2048 -> 1024) and down +
/// residual (3072 -> 1024), by `measure`. Back to back, each call takes the next of `LAYERS`
/// copies of its weights; otherwise there is one copy.
fn decode_gemvs<B: Backend>(c: &mut Criterion, b: &B, t: usize, measure: Measure) {
    let layers = match measure {
        Measure::Latency => 1,
        Measure::BackToBack => LAYERS,
    };
    let (Ok(d), Ok(l)) = (DecodeInputs::new(b, t), LayerWeights::new(b, layers)) else {
        eprintln!("{}: could not build inputs", B::NAME);
        return;
    };
    let eps = 1e-6;
    pair(
        c,
        measure,
        "rms_norm_matmul",
        &format!("{t}x1024->4096"),
        d.qkv_bytes(),
        b,
        &|i| b.rms_norm_matmul(&d.x, &d.norm, &l.w_qkv[i], eps),
        &|i| compose::rms_norm_matmul(b, &d.x, &d.norm, &l.w_qkv[i], eps),
    );
    pair(
        c,
        measure,
        "rms_norm_matmul_silu_mul",
        &format!("{t}x1024->2x3072"),
        d.gate_up_bytes(),
        b,
        &|i| b.rms_norm_matmul_silu_mul(&d.x, &d.norm, &l.w_gate_up[i], eps),
        &|i| compose::rms_norm_matmul_silu_mul(b, &d.x, &d.norm, &l.w_gate_up[i], eps),
    );
    pair(
        c,
        measure,
        "matmul_add",
        &format!("{t}x2048->1024"),
        d.o_bytes(),
        b,
        &|i| b.matmul_add(&d.attn, &l.w_o[i], &d.x),
        &|i| compose::matmul_add(b, &d.attn, &l.w_o[i], &d.x),
    );
    pair(
        c,
        measure,
        "matmul_add",
        &format!("{t}x3072->1024"),
        d.down_bytes(),
        b,
        &|i| b.matmul_add(&d.mlp, &l.w_down[i], &d.x),
        &|i| compose::matmul_add(b, &d.mlp, &l.w_down[i], &d.x),
    );
}

fn ops(c: &mut Criterion) {
    decode_gemvs(c, &CpuRef::new(), 1, Measure::Latency);
    match qfuse_cuda::CudaBackend::new(0) {
        Ok(gpu) => {
            for t in [1, 8] {
                decode_gemvs(c, &gpu, t, Measure::Latency);
            }
            decode_gemvs(c, &gpu, 1, Measure::BackToBack);
        }
        Err(e) => eprintln!("skipping cuda benches: {e}"),
    }
    match qfuse_wgpu::WgpuBackend::new(0) {
        Ok(gpu) => {
            decode_gemvs(c, &gpu, 1, Measure::Latency);
            decode_gemvs(c, &gpu, 1, Measure::BackToBack);
        }
        Err(e) => eprintln!("skipping wgpu benches: {e}"),
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
