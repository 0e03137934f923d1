//! Prompt attention in isolation on Qwen3-0.6B's heads (16 query heads, 8 KV heads of 128): one
//! 2,048-token prompt, causal, from a full fp32 KV cache, through each of the CUDA backend's
//! prompt attention kernels (`QFUSE_CUDA_FLASH_ATTENTION`'s three choices: the 3xTF32 and fp32
//! flash kernels, fp32 cuBLAS GEMMs around a softmax kernel). One call's latency (launch, run,
//! host synchronize); throughput in prompt tokens.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use qfuse_core::testing::{activations, Rng};
use qfuse_core::{AttentionConfig, Backend, BatchInfo, KvCache, Result, SeqChunk};
use qfuse_cuda::{CudaBackend, CudaOptions, FlashAttention};

const TOKENS: usize = 2048;
const BLOCK: usize = 16;

/// A 2,048-token prompt's queries and its filled one-layer cache on `b`, and the batch.
fn inputs(
    b: &CudaBackend,
    cfg: &AttentionConfig,
) -> Result<(
    <CudaBackend as Backend>::Tensor,
    KvCache<CudaBackend>,
    BatchInfo,
)> {
    let mut rng = Rng::new(7);
    let blocks = TOKENS.div_ceil(BLOCK);
    let info = BatchInfo::new(
        BLOCK,
        vec![SeqChunk {
            start_pos: 0,
            len: TOKENS,
            block_table: (0..blocks as u32).collect(),
        }],
    )?;
    let kv_width = cfg.num_kv_heads * cfg.head_dim;
    let mut cache = KvCache::new(b, 1, blocks, BLOCK, cfg.num_kv_heads, cfg.head_dim)?;
    let k = b.upload(&activations(&mut rng, TOKENS, kv_width, false)?)?;
    let v = b.upload(&activations(&mut rng, TOKENS, kv_width, false)?)?;
    b.write_kv(cache.layer_mut(0), &k, &v, &b.prepare_batch(&info)?)?;
    let q = b.upload(&activations(
        &mut rng,
        TOKENS,
        cfg.num_heads * cfg.head_dim,
        false,
    )?)?;
    Ok((q, cache, info))
}

fn prefill_attention(c: &mut Criterion) {
    let cfg = AttentionConfig {
        num_heads: 16,
        num_kv_heads: 8,
        head_dim: 128,
        rope_theta: 1e6,
        qk_norm_eps: 1e-6,
    };
    let mut group = c.benchmark_group(format!("cuda/prefill_attention/{TOKENS}"));
    group.throughput(Throughput::Elements(TOKENS as u64));
    for (label, flash_attention) in [
        ("flash_wgmma", FlashAttention::Wgmma),
        ("flash_f16", FlashAttention::F16),
        ("flash_f16_scores", FlashAttention::F16Scores),
        ("flash_3xtf32", FlashAttention::Tf32x3),
        ("flash_fp32", FlashAttention::Fp32),
        ("sgemm", FlashAttention::Off),
    ] {
        let options = CudaOptions {
            flash_attention,
            ..CudaOptions::default()
        };
        let gpu = match CudaBackend::with_options(0, options) {
            Ok(gpu) => gpu,
            Err(e) => {
                eprintln!("skipping cuda prefill attention benches: {e}");
                return;
            }
        };
        let mut run = || -> Result<()> {
            let (q, cache, info) = inputs(&gpu, &cfg)?;
            let batch = gpu.prepare_batch(&info)?;
            // Once outside the timing: it also checks that the call runs at all.
            gpu.attention(&q, cache.layer(0), &batch, &cfg)?;
            gpu.synchronize()?;
            group.bench_function(label, |bench| {
                bench.iter(|| {
                    let y = gpu.attention(&q, cache.layer(0), &batch, &cfg);
                    gpu.synchronize().and(y)
                })
            });
            Ok(())
        };
        if let Err(e) = run() {
            eprintln!("cuda prefill attention {label}: {e}");
        }
    }
    group.finish();
}

criterion_group!(benches, prefill_attention);
criterion_main!(benches);
