//! The backend conformance suite: every op of a backend under test against a reference backend
//! on random shapes and values (gains up to 100, activations with 1e4 outliers, several sequences
//! with scattered cache blocks), compared by `‖out − ref‖ / ‖ref‖`.
//!
//! A backend crate instantiates it with one line in `tests/conformance.rs`:
//! ```text
//! qfuse_core::backend_tests!(backend: CudaBackend = CudaBackend::new(0),
//!                            reference: CpuRef = CpuRef::new(), tolerance: Tolerance::BF16);
//! ```
use crate::{
    compose, AttentionConfig, Backend, BatchInfo, DType, Error, HostTensor, KvCache, LayerKv,
    LayerWeights, Result, SeqChunk, Shape,
};

pub use crate::{rel_error, Perturbed, Rng};
pub use proptest;

/// The largest relative error a backend may show against the reference.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tolerance {
    /// Bound on `‖out − ref‖ / ‖ref‖`.
    pub rel: f64,
}

impl Tolerance {
    /// f64 arithmetic (another order of summation).
    pub const F64: Tolerance = Tolerance { rel: 1e-12 };
    /// f32 activations and accumulation. Not 1e-5: with k_norm gains of 100 attention scores reach
    /// ~10², and their f32 rounding alone moves softmax weights by ~1e-5.
    pub const F32: Tolerance = Tolerance { rel: 1e-4 };
    /// bf16 storage of activations or cache, fp32 accumulation.
    pub const BF16: Tolerance = Tolerance { rel: 2e-2 };
}

/// Values rounded to bf16 so that every backend, whatever it stores, sees exactly these inputs.
fn bf16_exact(shape: impl Into<Shape>, v: Vec<f64>) -> Result<HostTensor> {
    Ok(HostTensor::from_f64(shape, v)?
        .to_dtype(DType::BF16)
        .to_dtype(DType::F64))
}

/// Activations `[rows, cols]`: N(0, 1), with up to two outlier channels of magnitude ~1e4 when
/// `outliers` (as in trained Qwen3 residual streams).
pub fn activations(rng: &mut Rng, rows: usize, cols: usize, outliers: bool) -> Result<HostTensor> {
    let mut v: Vec<f64> = (0..rows * cols).map(|_| rng.normal()).collect();
    if outliers && cols >= 4 {
        for _ in 0..2 {
            let c = rng.below(cols);
            for r in 0..rows {
                v[r * cols + c] *= 1e4;
            }
        }
    }
    bf16_exact([rows, cols], v)
}

/// A weight matrix `[out, inp]` scaled like a trained projection (std `1/sqrt(inp)`), stored
/// (as checkpoints store it) in bf16 three times out of four, else in f32, so both of a backend's
/// weight paths are exercised; the values are bf16-exact either way.
pub fn weights(rng: &mut Rng, out: usize, inp: usize) -> Result<HostTensor> {
    let s = 1.0 / (inp.max(1) as f64).sqrt();
    let w = bf16_exact(
        [out, inp],
        (0..out * inp).map(|_| rng.normal() * s).collect(),
    )?;
    Ok(w.to_dtype(if rng.below(4) == 0 {
        DType::F32
    } else {
        DType::BF16
    }))
}

/// Norm gains `[n]`, uniform in `(0, max_gain]` (Qwen3's k_norm gains reach ~100).
pub fn gains(rng: &mut Rng, n: usize, max_gain: f64) -> Result<HostTensor> {
    bf16_exact(
        [n],
        (0..n)
            .map(|_| max_gain * (0.02 + 0.98 * rng.uniform()))
            .collect(),
    )
}

/// Uploads one host weight (matrix or gains) to both backends in their weight formats.
pub fn upload_weight2<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    h: &HostTensor,
) -> Result<(B::Tensor, R::Tensor)> {
    Ok((b.upload_weight(h)?, r.upload_weight(h)?))
}

/// Compares one tensor of each backend.
pub fn assert_close<B: Backend, R: Backend>(
    what: &str,
    b: &B,
    out: &B::Tensor,
    r: &R,
    reference: &R::Tensor,
    tol: Tolerance,
) -> Result<()> {
    let (o, e) = (b.download(out)?, r.download(reference)?);
    if o.shape() != e.shape() {
        return Err(Error::shape("assert_close", o.shape(), e.shape()));
    }
    within(tol, &o.to_f64_vec(), &e.to_f64_vec(), || {
        format!("{what}: {} vs {}", B::NAME, R::NAME)
    })
}

/// `Ok` when `‖got − want‖ / ‖want‖` is within `tol`; else an error naming what was compared.
fn within(tol: Tolerance, got: &[f64], want: &[f64], what: impl FnOnce() -> String) -> Result<()> {
    let err = rel_error(got, want);
    if err <= tol.rel {
        Ok(())
    } else {
        Err(Error::invalid(
            "conformance",
            format!("{}: relative error {err:.3e} > {:.1e}", what(), tol.rel),
        ))
    }
}

/// Uploads one host tensor to both backends.
pub fn upload2<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    h: &HostTensor,
) -> Result<(B::Tensor, R::Tensor)> {
    Ok((b.upload(h)?, r.upload(h)?))
}

/// `gather_rows` on a random table and ids.
pub fn check_gather_rows<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (n, c) = (1 + rng.below(300), 1 + rng.below(200));
    let ids: Vec<u32> = (0..1 + rng.below(20))
        .map(|_| rng.below(n) as u32)
        .collect();
    let table = activations(&mut rng, n, c, true)?;
    let table = table.to_dtype(if rng.below(2) == 0 {
        DType::F32
    } else {
        DType::BF16
    });
    let (tb, tr) = upload_weight2(b, r, &table)?;
    assert_close(
        "gather_rows",
        b,
        &b.gather_rows(&tb, &ids)?,
        r,
        &r.gather_rows(&tr, &ids)?,
        tol,
    )?;
    if b.gather_rows(&tb, &[n as u32]).is_ok() {
        return Err(Error::invalid(
            "conformance",
            "gather_rows accepted an out-of-range id",
        ));
    }
    Ok(())
}

/// `rms_norm` over whole rows and over head-sized groups, gains up to 100, outlier activations.
pub fn check_rms_norm<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, g) = (1 + rng.below(9), 1 + rng.below(200));
    let c = g * (1 + rng.below(4));
    let (xb, xr) = upload2(b, r, &activations(&mut rng, t, c, true)?)?;
    let (wb, wr) = upload_weight2(b, r, &gains(&mut rng, g, 100.0)?)?;
    let eps = [1e-6, 1e-5][rng.below(2)];
    assert_close(
        "rms_norm",
        b,
        &b.rms_norm(&xb, &wb, eps)?,
        r,
        &r.rms_norm(&xr, &wr, eps)?,
        tol,
    )
}

/// An inner (reduction) dimension: half the time any size up to `max`, half the time a multiple of
/// 128 up to 1024, the aligned sizes real models have and vectorised kernels split.
fn inner_dim(rng: &mut Rng, max: usize) -> usize {
    match rng.below(3) {
        0 => 1 + rng.below(max),
        1 => 128 * (1 + rng.below(8)),
        // Whole 256-wide slices up to 3,072: the shapes batch-1 GEMV builds specialise for.
        _ => 256 * (1 + rng.below(12)),
    }
}

/// Rows of a matmul: a single row (batch-1 decode, the path with its own kernels) a third of
/// the time, else 1..=max.
fn matmul_rows(rng: &mut Rng, max: usize) -> usize {
    if rng.below(3) == 0 {
        1
    } else {
        1 + rng.below(max)
    }
}

/// `matmul`, including odd sizes.
pub fn check_matmul<B: Backend, R: Backend>(b: &B, r: &R, tol: Tolerance, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, k, n) = (
        matmul_rows(&mut rng, 12),
        inner_dim(&mut rng, 400),
        1 + rng.below(400),
    );
    let (xb, xr) = upload2(b, r, &activations(&mut rng, t, k, false)?)?;
    let (wb, wr) = upload_weight2(b, r, &weights(&mut rng, n, k)?)?;
    assert_close(
        "matmul",
        b,
        &b.matmul(&xb, &wb)?,
        r,
        &r.matmul(&xr, &wr)?,
        tol,
    )
}

/// `add`, `silu_mul` and `slice_columns`.
pub fn check_elementwise<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, i) = (1 + rng.below(9), 1 + rng.below(300));
    let (xb, xr) = upload2(b, r, &activations(&mut rng, t, 2 * i, true)?)?;
    let (yb, yr) = upload2(b, r, &activations(&mut rng, t, 2 * i, false)?)?;
    assert_close("add", b, &b.add(&xb, &yb)?, r, &r.add(&xr, &yr)?, tol)?;
    assert_close("silu_mul", b, &b.silu_mul(&yb)?, r, &r.silu_mul(&yr)?, tol)?;
    let start = rng.below(2 * i);
    let len = 1 + rng.below(2 * i - start);
    assert_close(
        "slice_columns",
        b,
        &b.slice_columns(&xb, start, len)?,
        r,
        &r.slice_columns(&xr, start, len)?,
        tol,
    )
}

/// One layer's cache on the backend under test and on the reference.
pub type CachePair<B, R> = (
    LayerKv<<B as Backend>::Tensor>,
    LayerKv<<R as Backend>::Tensor>,
);

/// A random attention geometry and a batch of 1–4 sequences with random history lengths and
/// scattered, shuffled cache blocks.
pub struct AttentionCase {
    /// Heads, KV heads, head size, RoPE theta, q/k-norm eps.
    pub cfg: AttentionConfig,
    /// The batch of new tokens.
    pub batch: BatchInfo,
    /// The same sequences from position 0: writes their history to the cache.
    pub history: BatchInfo,
    /// Blocks in the pool.
    pub num_blocks: usize,
}

impl AttentionCase {
    /// A case drawn from `rng`; `max_context` bounds each sequence's length.
    pub fn random(rng: &mut Rng, max_context: usize) -> Result<Self> {
        Self::draw(rng, max_context, false)
    }

    /// A decode step: 1 to 16 sequences of one new token each.
    pub fn random_decode_step(rng: &mut Rng, max_context: usize) -> Result<Self> {
        Self::draw(rng, max_context, true)
    }

    /// A batch-1 decode step with Qwen3's head size, 128: one sequence's one new token after
    /// fewer than `max_context` cached ones (the shape a backend may run as one layer kernel).
    pub fn single_decode_step(rng: &mut Rng, max_context: usize) -> Result<Self> {
        let num_kv_heads = 1 + rng.below(3);
        let cfg = AttentionConfig {
            num_heads: num_kv_heads * [1, 2, 4, 8][rng.below(4)],
            num_kv_heads,
            head_dim: 128,
            rope_theta: [1e4, 1e6][rng.below(2)],
            qk_norm_eps: 1e-6,
        };
        let block_size = [1, 3, 16][rng.below(3)];
        let start = rng.below(max_context.max(2) - 1);
        Self::with_sequences(rng, cfg, block_size, vec![(start, 1)])
    }

    fn draw(rng: &mut Rng, max_context: usize, decode_step: bool) -> Result<Self> {
        // Mostly small odd-sized heads; one case in eight the real 128 or the largest, 256.
        let head_dim = if rng.below(8) == 0 {
            [128, 256][rng.below(2)]
        } else {
            2 * (1 + rng.below(40))
        };
        let num_kv_heads = 1 + rng.below(3);
        let num_heads = num_kv_heads * [1, 2, 3, 4, 8][rng.below(5)];
        let block_size = [1, 3, 16][rng.below(3)];
        // A quarter of the cases are a batched decode step: 9-16 sequences, one new token each
        // (more rows than the decode-sized kernels take at once).
        let decode_batch = decode_step || rng.below(4) == 0;
        let seqs = if decode_step {
            1 + rng.below(16)
        } else if decode_batch {
            9 + rng.below(8)
        } else {
            1 + rng.below(4)
        };
        let lens: Vec<(usize, usize)> = (0..seqs)
            .map(|_| {
                let len = if decode_batch { 1 } else { 1 + rng.below(8) };
                (rng.below(max_context.saturating_sub(len).max(1)), len)
            })
            .collect();
        let cfg = AttentionConfig {
            num_heads,
            num_kv_heads,
            head_dim,
            rope_theta: [1e4, 1e6][rng.below(2)],
            qk_norm_eps: 1e-6,
        };
        Self::with_sequences(rng, cfg, block_size, lens)
    }

    /// Prompts (or prompt chunks) of `(cached, new)` tokens for the heads of `cfg`, in shuffled
    /// cache blocks of `block_size`: the long-prompt shapes random cases rarely draw.
    pub fn prompts(
        rng: &mut Rng,
        cfg: AttentionConfig,
        block_size: usize,
        lens: Vec<(usize, usize)>,
    ) -> Result<Self> {
        Self::with_sequences(rng, cfg, block_size, lens)
    }

    /// Sequences of `(cached, new)` tokens in shuffled blocks of a pool with two spare blocks.
    fn with_sequences(
        rng: &mut Rng,
        cfg: AttentionConfig,
        block_size: usize,
        lens: Vec<(usize, usize)>,
    ) -> Result<Self> {
        let num_blocks: usize = lens
            .iter()
            .map(|(s, l)| (s + l).div_ceil(block_size))
            .sum::<usize>()
            + 2;
        let mut pool: Vec<u32> = (0..num_blocks as u32).collect();
        for i in (1..pool.len()).rev() {
            pool.swap(i, rng.below(i + 1));
        }
        let (mut chunks, mut hist) = (Vec::new(), Vec::new());
        for (start, len) in lens {
            let table: Vec<u32> = pool.drain(..(start + len).div_ceil(block_size)).collect();
            chunks.push(SeqChunk {
                start_pos: start,
                len,
                block_table: table.clone(),
            });
            hist.push(SeqChunk {
                start_pos: 0,
                len: start + len,
                block_table: table,
            });
        }
        Ok(AttentionCase {
            cfg,
            batch: BatchInfo::new(block_size, chunks)?,
            history: BatchInfo::new(block_size, hist)?,
            num_blocks,
        })
    }

    /// An empty one-layer cache for this case.
    pub fn cache<B: Backend>(&self, b: &B) -> Result<LayerKv<B::Tensor>> {
        let bs = self.batch.block_size();
        let c = KvCache::new(
            b,
            1,
            self.num_blocks,
            bs,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
        )?;
        Ok(c.layer(0).clone())
    }

    /// Random keys and values for every history position, written to fresh caches of both backends.
    pub fn filled_caches<B: Backend, R: Backend>(
        &self,
        rng: &mut Rng,
        b: &B,
        r: &R,
    ) -> Result<CachePair<B, R>> {
        let (mut cb, mut cr) = (self.cache(b)?, self.cache(r)?);
        let (t, w) = (
            self.history.num_tokens(),
            self.cfg.num_kv_heads * self.cfg.head_dim,
        );
        let (kb, kr) = upload2(b, r, &activations(rng, t, w, false)?)?;
        let (vb, vr) = upload2(b, r, &activations(rng, t, w, false)?)?;
        b.write_kv(&mut cb, &kb, &vb, &b.prepare_batch(&self.history)?)?;
        r.write_kv(&mut cr, &kr, &vr, &r.prepare_batch(&self.history)?)?;
        Ok((cb, cr))
    }

    /// The attention prologue's inputs on both backends: the QKV projection's activations (with
    /// outliers), q_norm gains up to 2 and k_norm gains up to 100.
    pub fn prologue_inputs<B: Backend, R: Backend>(
        &self,
        rng: &mut Rng,
        b: &B,
        r: &R,
    ) -> Result<[(B::Tensor, R::Tensor); 3]> {
        let (t, d) = (self.batch.num_tokens(), self.cfg.head_dim);
        let qkv = upload2(b, r, &activations(rng, t, self.cfg.qkv_width(), true)?)?;
        let q_norm = upload_weight2(b, r, &gains(rng, d, 2.0)?)?;
        let k_norm = upload_weight2(b, r, &gains(rng, d, 100.0)?)?;
        Ok([qkv, q_norm, k_norm])
    }
}

/// `rope` at the positions of a random batch.
pub fn check_rope<B: Backend, R: Backend>(b: &B, r: &R, tol: Tolerance, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let case = AttentionCase::random(&mut rng, 600)?;
    let c = case.cfg.num_heads * case.cfg.head_dim;
    let (xb, xr) = upload2(
        b,
        r,
        &activations(&mut rng, case.batch.num_tokens(), c, false)?,
    )?;
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    assert_close(
        "rope",
        b,
        &b.rope(&xb, &bb, &case.cfg)?,
        r,
        &r.rope(&xr, &br, &case.cfg)?,
        tol,
    )
}

/// `write_kv` then `attention` over several sequences with history in scattered blocks.
pub fn check_attention<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let case = AttentionCase::random(&mut rng, 300)?;
    check_attention_case(b, r, tol, &mut rng, &case)
}

/// `write_kv` of `case`'s history with random keys and values, then `attention` for its batch
/// with random queries, on both backends.
pub fn check_attention_case<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    rng: &mut Rng,
    case: &AttentionCase,
) -> Result<()> {
    let (cb, cr) = case.filled_caches(rng, b, r)?;
    assert_close("write_kv (keys)", b, &cb.k, r, &cr.k, tol)?;
    assert_close("write_kv (values)", b, &cb.v, r, &cr.v, tol)?;
    let c = case.cfg.num_heads * case.cfg.head_dim;
    let q = activations(rng, case.batch.num_tokens(), c, false)?;
    let (qb, qr) = upload2(b, r, &q)?;
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    let out_b = b.attention(&qb, &cb, &bb, &case.cfg)?;
    let out_r = r.attention(&qr, &cr, &br, &case.cfg)?;
    assert_close("attention", b, &out_b, r, &out_r, tol)
}

/// `qk_norm_rope_write_kv` on both backends for `case` (caches filled with its history first):
/// its q output and the caches it wrote, compared; returns the backend's q and cache.
fn qk_norm_rope_write_kv_case<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    rng: &mut Rng,
    case: &AttentionCase,
    (bb, br): (&B::Batch, &R::Batch),
) -> Result<(B::Tensor, LayerKv<B::Tensor>)> {
    let (mut cb, mut cr) = case.filled_caches(rng, b, r)?;
    let [(xb, xr), (qnb, qnr), (knb, knr)] = case.prologue_inputs(rng, b, r)?;
    let qb = b.qk_norm_rope_write_kv(&xb, &qnb, &knb, &mut cb, bb, &case.cfg)?;
    let qr = r.qk_norm_rope_write_kv(&xr, &qnr, &knr, &mut cr, br, &case.cfg)?;
    assert_close("qk_norm_rope_write_kv (q)", b, &qb, r, &qr, tol)?;
    assert_close("qk_norm_rope_write_kv (keys)", b, &cb.k, r, &cr.k, tol)?;
    assert_close("qk_norm_rope_write_kv (values)", b, &cb.v, r, &cr.v, tol)?;
    Ok((qb, cb))
}

/// `qk_norm_rope_write_kv` for prompts: 1-3 sequences of 65-300 new tokens after up to 100
/// cached ones (the row counts random cases never draw, where a backend may change kernels),
/// head sizes 64, 128, 256 and one that is no multiple of 64.
pub fn check_qk_norm_rope_write_kv_prompt<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let num_kv_heads = 1 + rng.below(3);
    let cfg = AttentionConfig {
        num_heads: num_kv_heads * [1, 2, 4][rng.below(3)],
        num_kv_heads,
        head_dim: [64, 128, 256, 96][rng.below(4)],
        rope_theta: [1e4, 1e6][rng.below(2)],
        qk_norm_eps: 1e-6,
    };
    let lens = (0..1 + rng.below(3))
        .map(|_| (rng.below(101), 65 + rng.below(236)))
        .collect();
    let block_size = [1, 16][rng.below(2)];
    let case = AttentionCase::prompts(&mut rng, cfg, block_size, lens)?;
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    qk_norm_rope_write_kv_case(b, r, tol, &mut rng, &case, (&bb, &br)).map(|_| ())
}

/// The fused `qk_norm_rope_write_kv` (q output and cache contents), then attention on its cache.
pub fn check_qk_norm_rope_write_kv<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let case = AttentionCase::random(&mut rng, 200)?;
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    let (qb, cb) = qk_norm_rope_write_kv_case(b, r, tol, &mut rng, &case, (&bb, &br))?;
    // Attention on what the backend wrote, given to the reference too: a cache kept in bf16 rounds
    // keys that k_norm gains of ~100 make large, and with scores that peaked the softmax is too
    // ill-conditioned to compare outputs computed from differently rounded caches.
    let as_ref = |t: &B::Tensor| r.upload(&b.download(t)?);
    let written = LayerKv::<R::Tensor> {
        k: as_ref(&cb.k)?,
        v: as_ref(&cb.v)?,
    };
    let ab = b.attention(&qb, &cb, &bb, &case.cfg)?;
    let ar = r.attention(&as_ref(&qb)?, &written, &br, &case.cfg)?;
    assert_close("attention after qk_norm_rope_write_kv", b, &ab, r, &ar, tol)
}

/// The fused `qk_norm_rope_attention` against the same backend's composition of its two ops
/// (which the checks above hold to the reference), on identical caches: decode steps half the
/// time (where backends fuse), any batch otherwise; and the keys and values it wrote against the
/// reference's.
pub fn check_qk_norm_rope_attention<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let case = if rng.below(2) == 0 {
        AttentionCase::random_decode_step(&mut rng, 300)?
    } else {
        AttentionCase::random(&mut rng, 300)?
    };
    let mut again = rng.clone();
    let (mut fused, mut cr) = case.filled_caches(&mut rng, b, r)?;
    let (mut composed, _) = case.filled_caches(&mut again, b, r)?;
    let [(xb, xr), (qnb, qnr), (knb, knr)] = case.prologue_inputs(&mut rng, b, r)?;
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    let out_f = b.qk_norm_rope_attention(&xb, &qnb, &knb, &mut fused, &bb, &case.cfg)?;
    let out_c = compose::qk_norm_rope_attention(b, &xb, &qnb, &knb, &mut composed, &bb, &case.cfg)?;
    r.qk_norm_rope_write_kv(&xr, &qnr, &knr, &mut cr, &br, &case.cfg)?;
    assert_close("qk_norm_rope_attention (keys)", b, &fused.k, r, &cr.k, tol)?;
    assert_close(
        "qk_norm_rope_attention (values)",
        b,
        &fused.v,
        r,
        &cr.v,
        tol,
    )?;
    assert_close(
        "qk_norm_rope_attention vs its composition",
        b,
        &out_f,
        b,
        &out_c,
        tol,
    )
}

/// The fused `decoder_layer` against the same backend's composition of its ops on identical
/// caches (the checks above hold those ops to the reference), and the keys and values it wrote
/// against the reference's. Half the cases are a batch-1 decode step with head size 128 and
/// bf16 weights, where a backend may run the layer as one kernel; the rest any batch. Compared
/// is the layer's update `out - x`, which the residual stream's outliers would otherwise hide.
pub fn check_decoder_layer<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    // Cases: a batch-1 decode step (3 in 8), a random batch (3 in 8), or a prompt of 65-200
    // tokens with Qwen3's head size and whole 128-element tiles (1 in 4: the shapes a backend may
    // run on prompt-sized kernels, e.g. the CUDA backend's MLP over bf16 parts).
    let kind = rng.below(8);
    let (kernel_shaped, prompt) = (kind < 3, kind >= 6);
    let case = if kernel_shaped {
        AttentionCase::single_decode_step(&mut rng, 600)?
    } else if prompt {
        let num_kv_heads = 1 + rng.below(2);
        let cfg = AttentionConfig {
            num_heads: num_kv_heads * [1, 2][rng.below(2)],
            num_kv_heads,
            head_dim: 128,
            rope_theta: 1e6,
            qk_norm_eps: 1e-6,
        };
        let lens = (0..1 + rng.below(2))
            .map(|_| (rng.below(51), 65 + rng.below(71)))
            .collect();
        AttentionCase::prompts(&mut rng, cfg, 16, lens)?
    } else {
        AttentionCase::random(&mut rng, 300)?
    };
    let (cfg, t) = (case.cfg, case.batch.num_tokens());
    // Half the batch-1 cases have a hidden size of whole 256-element slices, as real models do:
    // the shape the decode-sized kernels specialise for (the CUDA backend's batch-1 GEMVs).
    let hidden = if prompt {
        256 * (1 + rng.below(2))
    } else if kernel_shaped && rng.below(2) == 0 {
        256 * (1 + rng.below(4))
    } else {
        8 * (1 + rng.below(64))
    };
    let inter = if prompt {
        128 * (1 + rng.below(3))
    } else {
        8 * (1 + rng.below(96))
    };
    let mut again = rng.clone();
    let (mut fused, mut cr) = case.filled_caches(&mut rng, b, r)?;
    let (mut composed, _) = case.filled_caches(&mut again, b, r)?;
    let matrix = |rng: &mut Rng, out: usize, inp: usize| -> Result<(B::Tensor, R::Tensor)> {
        let w = weights(rng, out, inp)?;
        let w = if kernel_shaped || prompt {
            w.to_dtype(DType::BF16)
        } else {
            w
        };
        upload_weight2(b, r, &w)
    };
    let attn_width = cfg.num_heads * cfg.head_dim;
    let qkv = matrix(&mut rng, cfg.qkv_width(), hidden)?;
    let o_proj = matrix(&mut rng, hidden, attn_width)?;
    let gate_up = matrix(&mut rng, 2 * inter, hidden)?;
    let down = matrix(&mut rng, hidden, inter)?;
    let input_norm = upload_weight2(b, r, &gains(&mut rng, hidden, 3.0)?)?;
    let post_norm = upload_weight2(b, r, &gains(&mut rng, hidden, 3.0)?)?;
    let q_norm = upload_weight2(b, r, &gains(&mut rng, cfg.head_dim, 2.0)?)?;
    let k_norm = upload_weight2(b, r, &gains(&mut rng, cfg.head_dim, 100.0)?)?;
    let x = activations(&mut rng, t, hidden, true)?;
    let (xb, xr) = upload2(b, r, &x)?;
    // The layer's weights on one side: the backend under test (0) or the reference (1).
    macro_rules! side {
        ($i:tt) => {
            LayerWeights {
                input_norm: &input_norm.$i,
                qkv: &qkv.$i,
                q_norm: &q_norm.$i,
                k_norm: &k_norm.$i,
                o_proj: &o_proj.$i,
                post_norm: &post_norm.$i,
                gate_up: &gate_up.$i,
                down: &down.$i,
            }
        };
    }
    let (wb, wr) = (side!(0), side!(1));
    let (bb, br) = (b.prepare_batch(&case.batch)?, r.prepare_batch(&case.batch)?);
    let eps = 1e-6;
    let out_f = b.decoder_layer(&xb, &wb, &mut fused, &bb, &cfg, eps)?;
    let out_c = compose::decoder_layer(b, &xb, &wb, &mut composed, &bb, &cfg, eps)?;
    r.decoder_layer(&xr, &wr, &mut cr, &br, &cfg, eps)?;
    assert_close("decoder_layer (keys)", b, &fused.k, r, &cr.k, tol)?;
    assert_close("decoder_layer (values)", b, &fused.v, r, &cr.v, tol)?;
    let update = |out: &B::Tensor| -> Result<Vec<f64>> {
        let o = b.download(out)?.to_f64_vec();
        Ok(o.iter().zip(x.to_f64_vec()).map(|(o, x)| o - x).collect())
    };
    within(tol, &update(&out_f)?, &update(&out_c)?, || {
        format!(
            "decoder_layer vs its composition on {} (update out - x)",
            B::NAME
        )
    })
}

/// The five GEMV-family ops on `b`, downloaded: `matmul(x, w)`, `rms_norm_matmul(x, gain, w)`,
/// `matmul_add(x, w, residual)`, `matmul_silu_mul(x, gate_up)` and
/// `rms_norm_matmul_silu_mul(x, gain, gate_up)` (eps 1e-6), for tests that hold one backend's
/// kernel builds or paths against another's.
pub fn gemv_family<B: Backend>(
    b: &B,
    x: &HostTensor,
    w: &HostTensor,
    gate_up: &HostTensor,
    gain: &HostTensor,
    residual: &HostTensor,
) -> Result<Vec<Vec<f64>>> {
    let (x, gain, residual) = (b.upload(x)?, b.upload(gain)?, b.upload(residual)?);
    let (w, gate_up) = (b.upload_weight(w)?, b.upload_weight(gate_up)?);
    let eps = 1e-6;
    [
        b.matmul(&x, &w)?,
        b.rms_norm_matmul(&x, &gain, &w, eps)?,
        b.matmul_add(&x, &w, &residual)?,
        b.matmul_silu_mul(&x, &gate_up)?,
        b.rms_norm_matmul_silu_mul(&x, &gain, &gate_up, eps)?,
    ]
    .iter()
    .map(|y| Ok(b.download(y)?.to_f64_vec()))
    .collect()
}

/// `rms_norm_logits`: the final norm and a vocabulary projection of 1-64 rows (decode steps), a
/// third of the cases 9-24 rows as wide as a vocabulary (past the 16,384 columns batched-decode
/// kernels take), with outlier activations and large gains.
pub fn check_logits<B: Backend, R: Backend>(b: &B, r: &R, tol: Tolerance, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, k, n) = if rng.below(3) == 0 {
        let k = [64, 1 + rng.below(64)][rng.below(2)];
        (9 + rng.below(16), k, 16_385 + rng.below(500))
    } else {
        let k = [64, 128, 1 + rng.below(128)][rng.below(3)];
        (matmul_rows(&mut rng, 64), k, 1 + rng.below(300))
    };
    let (xb, xr) = upload2(b, r, &activations(&mut rng, t, k, true)?)?;
    let (nb, nr) = upload_weight2(b, r, &gains(&mut rng, k, 3.0)?)?;
    let (wb, wr) = upload_weight2(b, r, &weights(&mut rng, n, k)?)?;
    let eps = 1e-6;
    assert_close(
        "rms_norm_logits",
        b,
        &b.rms_norm_logits(&xb, &nb, &wb, eps)?,
        r,
        &r.rms_norm_logits(&xr, &nr, &wr, eps)?,
        tol,
    )
}

/// The fused matmul family: `rms_norm_matmul`, `rms_norm_matmul_silu_mul`, `matmul_add`,
/// `matmul_silu_mul`.
pub fn check_fused_matmuls<B: Backend, R: Backend>(
    b: &B,
    r: &R,
    tol: Tolerance,
    seed: u64,
) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, k, n) = (
        matmul_rows(&mut rng, 9),
        inner_dim(&mut rng, 300).max(2),
        1 + rng.below(300),
    );
    let (xb, xr) = upload2(b, r, &activations(&mut rng, t, k, true)?)?;
    let (resb, resr) = upload2(b, r, &activations(&mut rng, t, k, true)?)?;
    let (nb, nr) = upload_weight2(b, r, &gains(&mut rng, k, 3.0)?)?;
    let (wb, wr) = upload_weight2(b, r, &weights(&mut rng, n, k)?)?;
    let (gub, gur) = upload_weight2(b, r, &weights(&mut rng, 2 * n, k)?)?;
    let (dwb, dwr) = upload_weight2(b, r, &weights(&mut rng, k, n)?)?;
    let eps = 1e-6;
    assert_close(
        "rms_norm_matmul",
        b,
        &b.rms_norm_matmul(&xb, &nb, &wb, eps)?,
        r,
        &r.rms_norm_matmul(&xr, &nr, &wr, eps)?,
        tol,
    )?;
    assert_close(
        "rms_norm_matmul_silu_mul",
        b,
        &b.rms_norm_matmul_silu_mul(&xb, &nb, &gub, eps)?,
        r,
        &r.rms_norm_matmul_silu_mul(&xr, &nr, &gur, eps)?,
        tol,
    )?;
    let (nxb, nxr) = (b.rms_norm(&xb, &nb, eps)?, r.rms_norm(&xr, &nr, eps)?);
    let (gb, gr) = (
        b.matmul_silu_mul(&nxb, &gub)?,
        r.matmul_silu_mul(&nxr, &gur)?,
    );
    assert_close("matmul_silu_mul", b, &gb, r, &gr, tol)?;
    assert_close(
        "matmul_add",
        b,
        &b.matmul_add(&gb, &dwb, &resb)?,
        r,
        &r.matmul_add(&gr, &dwr, &resr)?,
        tol,
    )
}

/// `argmax`: equal ids wherever the reference's top-1 margin exceeds the tolerance.
pub fn check_argmax<B: Backend, R: Backend>(b: &B, r: &R, tol: Tolerance, seed: u64) -> Result<()> {
    let mut rng = Rng::new(seed);
    let (t, v) = (1 + rng.below(6), 1 + rng.below(5000));
    let logits = activations(&mut rng, t, v, false)?;
    let (lb, lr) = upload2(b, r, &logits)?;
    let (ib, ir) = (b.argmax(&lb)?, r.argmax(&lr)?);
    let vals = logits.to_f64_vec();
    for row in 0..t {
        let x = &vals[row * v..(row + 1) * v];
        let (best, got) = (x[ir[row] as usize], x[ib[row] as usize]);
        if best - got > tol.rel * best.abs().max(1.0) {
            return Err(Error::invalid(
                "conformance",
                format!(
                    "argmax row {row}: {} chose {} ({got}), reference {} ({best})",
                    B::NAME,
                    ib[row],
                    ir[row]
                ),
            ));
        }
    }
    Ok(())
}

/// Proptest cases per op: `QFUSE_CONFORMANCE_CASES`, default 24.
pub fn cases() -> u32 {
    std::env::var("QFUSE_CONFORMANCE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24)
}

/// A freshly made backend for a test, or `None` with a printed notice (`skipping {what}: no
/// device (…)`) when the device is missing, unless `QFUSE_REQUIRE_GPU=1`; any other error
/// panics.
pub fn device_or_skip<B>(what: &str, made: Result<B>) -> Option<B> {
    match made {
        Ok(b) => Some(b),
        Err(Error::NoDevice(why)) if std::env::var("QFUSE_REQUIRE_GPU").as_deref() != Ok("1") => {
            eprintln!("skipping {what}: no device ({why})");
            None
        }
        Err(e) => panic!("{what}: could not create the backend: {e}"),
    }
}

/// The backend under test, built once per test binary; `None` (with a printed notice) when the
/// device is missing, unless `QFUSE_REQUIRE_GPU=1`.
pub fn backend_or_skip<B: Backend>(
    cell: &'static std::sync::OnceLock<Option<B>>,
    make: impl FnOnce() -> Result<B>,
) -> Option<&'static B> {
    cell.get_or_init(|| device_or_skip(&format!("{} conformance tests", B::NAME), make()))
        .as_ref()
}

/// Emits `#[test]`s (proptest, [`cases`] each) checking every op of a backend against a reference.
#[macro_export]
macro_rules! backend_tests {
    (backend: $ty:ty = $make:expr, reference: $rty:ty = $rmake:expr, tolerance: $tol:expr) => {
        mod conformance {
            use super::*;
            use $crate::testing::proptest::prelude::*;

            static BACKEND: ::std::sync::OnceLock<Option<$ty>> = ::std::sync::OnceLock::new();

            fn run(
                seed: u64,
                check: fn(&$ty, &$rty, $crate::testing::Tolerance, u64) -> $crate::Result<()>,
            ) -> ::std::result::Result<(), TestCaseError> {
                let Some(b) = $crate::testing::backend_or_skip(&BACKEND, || $make) else {
                    return Ok(());
                };
                let r: $rty = $rmake;
                check(b, &r, $tol, seed).map_err(|e| TestCaseError::fail(e.to_string()))
            }

            proptest! {
                #![proptest_config(ProptestConfig::with_cases($crate::testing::cases()))]
                #[test] fn gather_rows_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_gather_rows)? }
                #[test] fn rms_norm_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_rms_norm)? }
                #[test] fn matmul_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_matmul)? }
                #[test] fn elementwise_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_elementwise)? }
                #[test] fn rope_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_rope)? }
                #[test] fn attention_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_attention)? }
                #[test] fn qk_norm_rope_write_kv_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_qk_norm_rope_write_kv)? }
                #[test] fn qk_norm_rope_write_kv_prompt_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_qk_norm_rope_write_kv_prompt)? }
                #[test] fn qk_norm_rope_attention_matches_composition(s in any::<u64>()) { run(s, $crate::testing::check_qk_norm_rope_attention)? }
                #[test] fn fused_matmuls_match_reference(s in any::<u64>()) { run(s, $crate::testing::check_fused_matmuls)? }
                #[test] fn logits_match_reference(s in any::<u64>()) { run(s, $crate::testing::check_logits)? }
                #[test] fn decoder_layer_matches_composition(s in any::<u64>()) { run(s, $crate::testing::check_decoder_layer)? }
                #[test] fn argmax_matches_reference(s in any::<u64>()) { run(s, $crate::testing::check_argmax)? }
            }
        }
    };
}
