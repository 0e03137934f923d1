//! `Perturbed`: a backend wrapper that plants a numerical error in one call of one op, to prove
//! that checks fail when they should and that divergence finders point at the right place.
use crate::{AttentionConfig, Backend, BatchInfo, DType, HostTensor, LayerKv, Result, Shape};

/// A backend that computes like `inner` except that one call of one unfused op has its output
/// scaled by `1 + delta`: the planted bug that proves a check can fail and that a divergence
/// finder points at the right op and layer. Fused ops use the trait's compositions.
#[derive(Clone, Debug)]
pub struct Perturbed<B: Backend> {
    inner: B,
    op: &'static str,
    call: usize,
    delta: f64,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl<B: Backend> Perturbed<B> {
    /// Perturbs the `call`-th (0-based) call of `op` (a [`Backend`] method name) by `1 + delta`.
    pub fn new(inner: B, op: &'static str, call: usize, delta: f64) -> Self {
        Perturbed {
            inner,
            op,
            call,
            delta,
            calls: Default::default(),
        }
    }

    fn maybe(&self, op: &'static str, t: B::Tensor) -> Result<B::Tensor> {
        if op != self.op {
            return Ok(t);
        }
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n != self.call {
            return Ok(t);
        }
        let h = self.inner.download(&t)?;
        let v = h
            .to_f64_vec()
            .iter()
            .map(|x| x * (1.0 + self.delta))
            .collect();
        self.inner
            .upload(&HostTensor::from_f64(h.shape().clone(), v)?.to_dtype(h.dtype()))
    }
}

impl<B: Backend> Backend for Perturbed<B> {
    type Tensor = B::Tensor;
    type Batch = B::Batch;
    type Graph = ();
    type Event = B::Event;
    const NAME: &'static str = "perturbed";

    fn upload(&self, host: &HostTensor) -> Result<B::Tensor> {
        self.inner.upload(host)
    }
    fn upload_weight(&self, host: &HostTensor) -> Result<B::Tensor> {
        self.inner.upload_weight(host)
    }
    fn download(&self, t: &B::Tensor) -> Result<HostTensor> {
        self.inner.download(t)
    }
    fn zeros(&self, shape: &Shape, dtype: DType) -> Result<B::Tensor> {
        self.inner.zeros(shape, dtype)
    }
    fn kv_dtype(&self) -> DType {
        self.inner.kv_dtype()
    }
    fn prepare_batch(&self, info: &BatchInfo) -> Result<B::Batch> {
        self.inner.prepare_batch(info)
    }
    fn gather_rows(&self, table: &B::Tensor, ids: &[u32]) -> Result<B::Tensor> {
        self.maybe("gather_rows", self.inner.gather_rows(table, ids)?)
    }
    fn rms_norm(&self, x: &B::Tensor, w: &B::Tensor, eps: f64) -> Result<B::Tensor> {
        self.maybe("rms_norm", self.inner.rms_norm(x, w, eps)?)
    }
    fn matmul(&self, x: &B::Tensor, w: &B::Tensor) -> Result<B::Tensor> {
        self.maybe("matmul", self.inner.matmul(x, w)?)
    }
    fn add(&self, a: &B::Tensor, b: &B::Tensor) -> Result<B::Tensor> {
        self.maybe("add", self.inner.add(a, b)?)
    }
    fn silu_mul(&self, gate_up: &B::Tensor) -> Result<B::Tensor> {
        self.maybe("silu_mul", self.inner.silu_mul(gate_up)?)
    }
    fn slice_columns(&self, x: &B::Tensor, start: usize, len: usize) -> Result<B::Tensor> {
        self.maybe("slice_columns", self.inner.slice_columns(x, start, len)?)
    }
    fn rope(&self, x: &B::Tensor, batch: &B::Batch, cfg: &AttentionConfig) -> Result<B::Tensor> {
        self.maybe("rope", self.inner.rope(x, batch, cfg)?)
    }
    fn write_kv(
        &self,
        cache: &mut LayerKv<Self::Tensor>,
        k: &B::Tensor,
        v: &B::Tensor,
        batch: &B::Batch,
    ) -> Result<()> {
        self.inner.write_kv(cache, k, v, batch)
    }
    fn attention(
        &self,
        q: &B::Tensor,
        cache: &LayerKv<Self::Tensor>,
        batch: &B::Batch,
        cfg: &AttentionConfig,
    ) -> Result<B::Tensor> {
        self.maybe("attention", self.inner.attention(q, cache, batch, cfg)?)
    }
    fn synchronize(&self) -> Result<()> {
        self.inner.synchronize()
    }
    fn record_event(&self) -> Result<B::Event> {
        self.inner.record_event()
    }
    fn elapsed_s(&self, start: &B::Event, end: &B::Event) -> Result<f64> {
        self.inner.elapsed_s(start, end)
    }
}
