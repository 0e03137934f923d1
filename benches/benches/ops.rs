//! Isolated ops: each fused op against its unfused composition on the same backend.
use criterion::{criterion_group, criterion_main, Criterion};
use qfuse_benches::NormMatmulInputs;
use qfuse_core::{compose, Backend};
use qfuse_cpu_ref::CpuRef;

fn bench_rms_norm_matmul<B: Backend>(
    c: &mut Criterion,
    b: &B,
    t: usize,
    hidden: usize,
    out: usize,
) {
    let Ok(inp) = NormMatmulInputs::new(b, t, hidden, out) else {
        eprintln!("{}: could not build inputs", B::NAME);
        return;
    };
    let shape = format!("{t}x{hidden}->{out}");
    c.bench_function(&format!("{}/rms_norm_matmul/{shape}", B::NAME), |bench| {
        bench.iter(|| {
            let y = b.rms_norm_matmul(&inp.x, &inp.norm, &inp.w, 1e-6);
            b.synchronize().and(y)
        })
    });
    c.bench_function(&format!("{}/rms_norm+matmul/{shape}", B::NAME), |bench| {
        bench.iter(|| {
            let y = compose::rms_norm_matmul(b, &inp.x, &inp.norm, &inp.w, 1e-6);
            b.synchronize().and(y)
        })
    });
}

fn ops(c: &mut Criterion) {
    // Qwen3-0.6B's QKV projection at decode (T = 1): 1024 -> (16 + 2 * 8) * 128.
    bench_rms_norm_matmul(c, &CpuRef::new(), 1, 1024, 4096);
    match qfuse_cuda::CudaBackend::new(0) {
        Ok(gpu) => {
            for t in [1, 8] {
                bench_rms_norm_matmul(c, &gpu, t, 1024, 4096);
            }
        }
        Err(e) => eprintln!("skipping cuda benches: {e}"),
    }
    match qfuse_wgpu::WgpuBackend::new(0) {
        Ok(gpu) => bench_rms_norm_matmul(c, &gpu, 1, 1024, 4096),
        Err(e) => eprintln!("skipping wgpu benches: {e}"),
    }
}

criterion_group!(benches, ops);
criterion_main!(benches);
