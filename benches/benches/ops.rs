//! Isolated ops on the shapes of Qwen3-0.6B's decode step: each fused op against its unfused
//! composition on the same backend, with the weight bytes each call must read as criterion's
//! throughput (so the report's GB/s compares directly with the card's copy bandwidth).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qfuse_benches::DecodeInputs;
use qfuse_core::{compose, Backend, Result};
use qfuse_cpu_ref::CpuRef;

/// Benches `fused` and `composed` (the same op, unfused) as `{backend}/{name}/{shape}`.
fn pair<B: Backend>(
    c: &mut Criterion,
    name: &str,
    shape: &str,
    bytes: u64,
    b: &B,
    fused: impl Fn() -> Result<B::Tensor>,
    composed: impl Fn() -> Result<B::Tensor>,
) {
    let mut group = c.benchmark_group(format!("{}/{name}/{shape}", B::NAME));
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function("fused", |bench| {
        bench.iter(|| {
            let y = fused();
            b.synchronize().and(y)
        })
    });
    group.bench_function("unfused", |bench| {
        bench.iter(|| {
            let y = composed();
            b.synchronize().and(y)
        })
    });
    group.finish();
}

/// The decode step's fused GEMVs at `t` rows: input norm + QKV (1024 -> 4096), post-attention
/// norm + gate/up + SiLU·up (1024 -> 2 x 3072), o_proj + residual (2048 -> 1024) and down +
/// residual (3072 -> 1024).
fn decode_gemvs<B: Backend>(c: &mut Criterion, b: &B, t: usize) {
    let Ok(d) = DecodeInputs::new(b, t) else {
        eprintln!("{}: could not build inputs", B::NAME);
        return;
    };
    let eps = 1e-6;
    pair(
        c,
        "rms_norm_matmul",
        &format!("{t}x1024->4096"),
        d.qkv_bytes(),
        b,
        || b.rms_norm_matmul(&d.x, &d.norm, &d.w_qkv, eps),
        || compose::rms_norm_matmul(b, &d.x, &d.norm, &d.w_qkv, eps),
    );
    pair(
        c,
        "rms_norm_matmul_silu_mul",
        &format!("{t}x1024->2x3072"),
        d.gate_up_bytes(),
        b,
        || b.rms_norm_matmul_silu_mul(&d.x, &d.norm, &d.w_gate_up, eps),
        || compose::rms_norm_matmul_silu_mul(b, &d.x, &d.norm, &d.w_gate_up, eps),
    );
    pair(
        c,
        "matmul_add",
        &format!("{t}x2048->1024"),
        d.o_bytes(),
        b,
        || b.matmul_add(&d.attn, &d.w_o, &d.x),
        || compose::matmul_add(b, &d.attn, &d.w_o, &d.x),
    );
    pair(
        c,
        "matmul_add",
        &format!("{t}x3072->1024"),
        d.down_bytes(),
        b,
        || b.matmul_add(&d.mlp, &d.w_down, &d.x),
        || compose::matmul_add(b, &d.mlp, &d.w_down, &d.x),
    );
}

fn ops(c: &mut Criterion) {
    decode_gemvs(c, &CpuRef::new(), 1);
    match qfuse_cuda::CudaBackend::new(0) {
        Ok(gpu) => {
            for t in [1, 8] {
                decode_gemvs(c, &gpu, t);
            }
        }
        Err(e) => eprintln!("skipping cuda benches: {e}"),
    }
    match qfuse_wgpu::WgpuBackend::new(0) {
        Ok(gpu) => decode_gemvs(c, &gpu, 1),
        Err(e) => eprintln!("skipping wgpu benches: {e}"),
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
