//! A 2,048-token prompt's four products on Qwen3-0.6B's shapes in isolation, on the CUDA
//! backend's two paths for them: the wgmma kernel over the three bf16 parts with the epilogue
//! fused (`kernels/gemm_wgmma.cu`, the default on H100/H200) and cuBLAS plus a sum kernel
//! (`QFUSE_CUDA_WGMMA=0`). Each call includes its split kernel (RMSNorm fused where the product
//! has one). One call's latency (launch, run, host synchronize); throughput in prompt tokens.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qfuse_core::testing::{activations, gains, weights, Rng};
use qfuse_core::{Backend, DType, Result};
use qfuse_cuda::{CudaBackend, CudaOptions};

const TOKENS: usize = 2048;

type Tensor = <CudaBackend as Backend>::Tensor;

/// One product of the layer: its name, K, N (gate and up rows together for SiLU·up) and how it
/// runs.
#[derive(Clone, Copy)]
enum Product {
    /// input norm + QKV
    NormQkv,
    /// o_proj + residual
    OProj,
    /// post-attention norm + gate/up + SiLU·up
    NormGateUp,
    /// down + residual
    Down,
}

impl Product {
    fn name(self) -> &'static str {
        match self {
            Product::NormQkv => "norm_qkv",
            Product::OProj => "o_proj_add",
            Product::NormGateUp => "norm_gate_up_silu",
            Product::Down => "down_add",
        }
    }

    fn shape(self) -> (usize, usize) {
        match self {
            Product::NormQkv => (1024, 4096),
            Product::OProj => (2048, 1024),
            Product::NormGateUp => (1024, 6144),
            Product::Down => (3072, 1024),
        }
    }

    fn run(
        self,
        b: &CudaBackend,
        x: &Tensor,
        w: &Tensor,
        gain: &Tensor,
        res: &Tensor,
    ) -> Result<Tensor> {
        match self {
            Product::NormQkv => b.rms_norm_matmul(x, gain, w, 1e-6),
            Product::OProj | Product::Down => b.matmul_add(x, w, res),
            Product::NormGateUp => b.rms_norm_matmul_silu_mul(x, gain, w, 1e-6),
        }
    }
}

fn prefill_products(c: &mut Criterion) {
    let mut group = c.benchmark_group(format!("cuda/prefill_products/{TOKENS}"));
    group.throughput(Throughput::Elements(TOKENS as u64));
    for (label, wgmma) in [("wgmma", true), ("cublas", false)] {
        let options = CudaOptions {
            wgmma,
            ..CudaOptions::default()
        };
        let gpu = match CudaBackend::with_options(0, options) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("skipping cuda prefill product benches: {e}");
                return;
            }
        };
        for product in [
            Product::NormQkv,
            Product::OProj,
            Product::NormGateUp,
            Product::Down,
        ] {
            let mut run = || -> Result<()> {
                let mut rng = Rng::new(11);
                let (k, n) = product.shape();
                let x = gpu.upload(&activations(&mut rng, TOKENS, k, true)?)?;
                // bf16, as checkpoints store them (`weights` makes one matrix in four f32).
                let w = gpu.upload_weight(&weights(&mut rng, n, k)?.to_dtype(DType::BF16))?;
                let gain = gpu.upload(&gains(&mut rng, k, 3.0)?)?;
                let res = gpu.upload(&activations(&mut rng, TOKENS, n, true)?)?;
                if wgmma && !gpu.uses_wgmma(TOKENS, k, n, matches!(product, Product::NormGateUp)) {
                    eprintln!(
                        "{}: no wgmma on this GPU; the cuBLAS path runs",
                        product.name()
                    );
                }
                // Once outside the timing: it also checks that the call runs at all.
                product.run(&gpu, &x, &w, &gain, &res)?;
                gpu.synchronize()?;
                group.bench_function(format!("{}/{label}", product.name()), |bench| {
                    bench.iter(|| {
                        let y = product.run(&gpu, &x, &w, &gain, &res);
                        gpu.synchronize().and(y)
                    })
                });
                Ok(())
            };
            if let Err(e) = run() {
                eprintln!("cuda prefill product {} {label}: {e}", product.name());
            }
        }
    }
    group.finish();
}

criterion_group!(benches, prefill_products);
criterion_main!(benches);
