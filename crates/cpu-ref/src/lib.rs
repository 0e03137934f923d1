//! `CpuRef`: the f64 reference backend. Every op is a plain loop in f64 over weights upcast
//! exactly from their storage dtype; rayon splits independent rows across cores. It implements
//! no fused op: the trait's compositions are the definition the fast backends are checked against.
#![forbid(unsafe_code)]

use std::sync::Arc;

use qfuse_core::{
    AttentionConfig, Backend, BatchInfo, DType, DeviceTensor, Error, HostTensor, LayerKv, Result,
    Shape,
};
use rayon::prelude::*;

/// The reference backend.
#[derive(Clone, Debug, Default)]
pub struct CpuRef;

impl CpuRef {
    /// The backend (it has no state).
    pub fn new() -> Self {
        CpuRef
    }
}

/// An f64 tensor in host memory, shared on clone.
#[derive(Clone, Debug)]
pub struct CpuTensor {
    shape: Shape,
    data: Arc<Vec<f64>>,
}

impl CpuTensor {
    fn new(shape: impl Into<Shape>, data: Vec<f64>) -> Self {
        CpuTensor {
            shape: shape.into(),
            data: Arc::new(data),
        }
    }

    /// The elements.
    pub fn values(&self) -> &[f64] {
        &self.data
    }
}

impl DeviceTensor for CpuTensor {
    fn shape(&self) -> &Shape {
        &self.shape
    }
    fn dtype(&self) -> DType {
        DType::F64
    }
}

fn matrix(t: &CpuTensor, op: &'static str) -> Result<(usize, usize)> {
    t.shape.as_matrix(op)
}

fn vector(t: &CpuTensor, op: &'static str) -> Result<usize> {
    match t.shape.dims() {
        [n] => Ok(*n),
        _ => Err(Error::invalid(
            op,
            format!("expected a vector, got shape {}", t.shape),
        )),
    }
}

/// Dot product with four independent partial sums (exact enough for 1e-12 and ~4x faster than one
/// dependent chain).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0.0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..4 {
            acc[j] += x[j] * y[j];
        }
    }
    let tail: f64 = ra.iter().zip(rb).map(|(x, y)| x * y).sum();
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

impl CpuRef {
    fn check_cache(&self, cache: &LayerKv<CpuTensor>, cfg: &AttentionConfig) -> Result<usize> {
        match cache.k.shape.dims() {
            [blocks, bs, kvh, hd] if *kvh == cfg.num_kv_heads && *hd == cfg.head_dim => {
                if cache.v.shape != cache.k.shape {
                    return Err(Error::shape("kv cache", &cache.k.shape, &cache.v.shape));
                }
                Ok(blocks * bs)
            }
            _ => Err(Error::invalid(
                "kv cache",
                format!(
                    "cache shape {} does not match {} kv heads of size {}",
                    cache.k.shape, cfg.num_kv_heads, cfg.head_dim
                ),
            )),
        }
    }
}

impl Backend for CpuRef {
    type Tensor = CpuTensor;
    type Batch = BatchInfo;
    type Graph = ();
    type Event = std::time::Instant;
    const NAME: &'static str = "cpu-ref";

    fn upload(&self, host: &HostTensor) -> Result<CpuTensor> {
        Ok(CpuTensor::new(host.shape().clone(), host.to_f64_vec()))
    }

    fn download(&self, t: &CpuTensor) -> Result<HostTensor> {
        HostTensor::from_f64(t.shape.clone(), t.data.to_vec())
    }

    fn zeros(&self, shape: &Shape, _dtype: DType) -> Result<CpuTensor> {
        Ok(CpuTensor::new(shape.clone(), vec![0.0; shape.numel()]))
    }

    fn kv_dtype(&self) -> DType {
        DType::F64
    }

    fn prepare_batch(&self, info: &BatchInfo) -> Result<BatchInfo> {
        Ok(info.clone())
    }

    fn gather_rows(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let (n, c) = matrix(table, "gather_rows")?;
        let mut out = Vec::with_capacity(ids.len() * c);
        for &id in ids {
            let id = id as usize;
            if id >= n {
                return Err(Error::invalid(
                    "gather_rows",
                    format!("id {id} out of range 0..{n}"),
                ));
            }
            out.extend_from_slice(&table.data[id * c..(id + 1) * c]);
        }
        Ok(CpuTensor::new([ids.len(), c], out))
    }

    fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f64) -> Result<CpuTensor> {
        let (_, c) = matrix(x, "rms_norm")?;
        let g = vector(w, "rms_norm")?;
        if g == 0 || c % g != 0 {
            return Err(Error::shape("rms_norm", &x.shape, &w.shape));
        }
        let mut out = x.data.to_vec();
        out.par_chunks_mut(g).for_each(|group| {
            let mean_sq = group.iter().map(|v| v * v).sum::<f64>() / g as f64;
            let inv = 1.0 / (mean_sq + eps).sqrt();
            for (v, wi) in group.iter_mut().zip(w.data.iter()) {
                *v = *v * inv * wi;
            }
        });
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn matmul(&self, x: &CpuTensor, w: &CpuTensor) -> Result<CpuTensor> {
        let (t, k) = matrix(x, "matmul")?;
        let (n, k2) = matrix(w, "matmul")?;
        if k != k2 {
            return Err(Error::shape("matmul", &x.shape, &w.shape));
        }
        // Output transposed ([n, t]) so each task reads one weight row once.
        let mut yt = vec![0.0; n * t];
        if t > 0 && k > 0 {
            yt.par_chunks_mut(t)
                .zip(w.data.par_chunks(k))
                .for_each(|(col, wrow)| {
                    for (i, y) in col.iter_mut().enumerate() {
                        *y = dot(&x.data[i * k..(i + 1) * k], wrow);
                    }
                });
        }
        let mut y = vec![0.0; t * n];
        for o in 0..n {
            for i in 0..t {
                y[i * n + o] = yt[o * t + i];
            }
        }
        Ok(CpuTensor::new([t, n], y))
    }

    fn add(&self, a: &CpuTensor, b: &CpuTensor) -> Result<CpuTensor> {
        if a.shape != b.shape {
            return Err(Error::shape("add", &a.shape, &b.shape));
        }
        let out = a
            .data
            .iter()
            .zip(b.data.iter())
            .map(|(x, y)| x + y)
            .collect();
        Ok(CpuTensor::new(a.shape.clone(), out))
    }

    fn silu_mul(&self, gate_up: &CpuTensor) -> Result<CpuTensor> {
        let (t, c) = matrix(gate_up, "silu_mul")?;
        if c % 2 != 0 {
            return Err(Error::invalid("silu_mul", format!("odd width {c}")));
        }
        let i = c / 2;
        let mut out = Vec::with_capacity(t * i);
        for row in gate_up.data.chunks_exact(c.max(1)).take(t) {
            out.extend((0..i).map(|j| silu(row[j]) * row[i + j]));
        }
        Ok(CpuTensor::new([t, i], out))
    }

    fn slice_columns(&self, x: &CpuTensor, start: usize, len: usize) -> Result<CpuTensor> {
        let (t, c) = matrix(x, "slice_columns")?;
        if start + len > c {
            return Err(Error::invalid(
                "slice_columns",
                format!("columns {start}..{} out of range 0..{c}", start + len),
            ));
        }
        let mut out = Vec::with_capacity(t * len);
        for r in 0..t {
            out.extend_from_slice(&x.data[r * c + start..r * c + start + len]);
        }
        Ok(CpuTensor::new([t, len], out))
    }

    fn rope(&self, x: &CpuTensor, batch: &BatchInfo, cfg: &AttentionConfig) -> Result<CpuTensor> {
        let (t, c) = matrix(x, "rope")?;
        let d = cfg.head_dim;
        if d == 0 || !d.is_multiple_of(2) || c % d != 0 || t != batch.num_tokens() {
            return Err(Error::invalid(
                "rope",
                format!(
                    "x {} with head_dim {d} and {} batch tokens",
                    x.shape,
                    batch.num_tokens()
                ),
            ));
        }
        let half = d / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| cfg.rope_theta.powf(-((2 * i) as f64) / d as f64))
            .collect();
        let mut out = x.data.to_vec();
        out.par_chunks_mut(c)
            .zip(batch.positions().par_iter())
            .for_each(|(row, &pos)| {
                for head in row.chunks_exact_mut(d) {
                    for (i, f) in inv_freq.iter().enumerate() {
                        let (sin, cos) = (pos as f64 * f).sin_cos();
                        let (a, b) = (head[i], head[i + half]);
                        head[i] = a * cos - b * sin;
                        head[i + half] = b * cos + a * sin;
                    }
                }
            });
        Ok(CpuTensor::new(x.shape.clone(), out))
    }

    fn write_kv(
        &self,
        cache: &mut LayerKv<Self::Tensor>,
        k: &CpuTensor,
        v: &CpuTensor,
        batch: &BatchInfo,
    ) -> Result<()> {
        let (t, w) = matrix(k, "write_kv")?;
        if v.shape != k.shape || t != batch.num_tokens() {
            return Err(Error::shape("write_kv", &k.shape, &v.shape));
        }
        let dims = cache.k.shape.dims();
        let (slots, slot_w) = match dims {
            [b, bs, h, d] => (b * bs, h * d),
            _ => {
                return Err(Error::invalid(
                    "write_kv",
                    format!("cache shape {}", cache.k.shape),
                ))
            }
        };
        if slot_w != w {
            return Err(Error::shape("write_kv", &k.shape, &cache.k.shape));
        }
        for (pool, src) in [(&mut cache.k, k), (&mut cache.v, v)] {
            let dst = Arc::make_mut(&mut pool.data);
            for (r, &slot) in batch.slots().iter().enumerate() {
                let slot = slot as usize;
                if slot >= slots {
                    return Err(Error::invalid(
                        "write_kv",
                        format!("slot {slot} beyond {slots}"),
                    ));
                }
                dst[slot * w..(slot + 1) * w].copy_from_slice(&src.data[r * w..(r + 1) * w]);
            }
        }
        Ok(())
    }

    fn attention(
        &self,
        q: &CpuTensor,
        cache: &LayerKv<Self::Tensor>,
        batch: &BatchInfo,
        cfg: &AttentionConfig,
    ) -> Result<CpuTensor> {
        let (t, c) = matrix(q, "attention")?;
        let (d, kvh) = (cfg.head_dim, cfg.num_kv_heads);
        if c != cfg.num_heads * d
            || t != batch.num_tokens()
            || kvh == 0
            || !cfg.num_heads.is_multiple_of(kvh)
        {
            return Err(Error::invalid(
                "attention",
                format!(
                    "q {} for {} heads of {d} and {} tokens",
                    q.shape, cfg.num_heads, t
                ),
            ));
        }
        let slots = self.check_cache(cache, cfg)?;
        let group = cfg.group_size();
        let scale = cfg.scale();
        let (kc, vc) = (&cache.k.data, &cache.v.data);
        let slot_w = kvh * d;
        let mut out = vec![0.0; t * c];
        let rows: Result<Vec<()>> = out
            .par_chunks_mut(c)
            .enumerate()
            .map(|(r, orow)| {
                let s = batch.token_seq()[r] as usize;
                let pos = batch.positions()[r] as usize;
                let kv_slots: Vec<usize> = (0..=pos).map(|p| batch.slot(s, p)).collect();
                if let Some(bad) = kv_slots.iter().find(|&&sl| sl >= slots) {
                    return Err(Error::invalid(
                        "attention",
                        format!("slot {bad} beyond {slots}"),
                    ));
                }
                for h in 0..cfg.num_heads {
                    let kv = h / group;
                    let qh = &q.data[r * c + h * d..r * c + (h + 1) * d];
                    let scores: Vec<f64> = kv_slots
                        .iter()
                        .map(|&sl| {
                            dot(qh, &kc[sl * slot_w + kv * d..sl * slot_w + (kv + 1) * d]) * scale
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                    let total: f64 = weights.iter().sum();
                    let oh = &mut orow[h * d..(h + 1) * d];
                    for (&sl, wgt) in kv_slots.iter().zip(&weights) {
                        let vrow = &vc[sl * slot_w + kv * d..sl * slot_w + (kv + 1) * d];
                        for (o, vv) in oh.iter_mut().zip(vrow) {
                            *o += wgt / total * vv;
                        }
                    }
                }
                Ok(())
            })
            .collect();
        rows?;
        Ok(CpuTensor::new([t, c], out))
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn record_event(&self) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }

    fn elapsed_s(&self, start: &std::time::Instant, end: &std::time::Instant) -> Result<f64> {
        Ok(end.saturating_duration_since(*start).as_secs_f64())
    }
}
