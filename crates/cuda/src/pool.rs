//! A caching allocator for the f32 buffers every op returns.
//!
//! Allocating each op's output with `cuMemAllocAsync` and freeing it on drop puts an allocation
//! and a free into the stream between most pairs of kernels. Inside a CUDA graph they become
//! memory nodes, and a kernel that follows one cannot start early as a programmatic dependent
//! launch, so the whole step falls back to launch-after-drain. Here a dropped buffer goes back to
//! a free list (one stream: stream order alone makes the reuse safe) and the next request of its
//! size class takes it: the decode step issues no memory operations at all.
//!
//! Buffers taken while a graph is being captured belong to that graph ([`CaptureSet`]): the
//! captured kernels keep writing them on every replay, so they must never be handed to anyone
//! else. Within the capture a dropped buffer is reused by the capture itself; the set frees its
//! buffers when the graph is dropped. A capture must not allocate fresh memory (that would be a
//! graph allocation node, which a replay cannot repeat while the buffer lives), so the backend
//! runs the step once eagerly first, which leaves the pool holding every size the step needs.
use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, DriverError};
use qfuse_core::reuse::{lock_unpoisoned as lock, size_class};

/// Bytes of idle buffers kept for reuse; beyond this a dropped buffer is freed.
const CACHE_LIMIT_BYTES: usize = 2 << 30;

type FreeLists = HashMap<usize, Vec<CudaSlice<f32>>>;

/// Why a buffer could not be had.
#[derive(Debug)]
pub(crate) enum PoolError {
    Driver(DriverError),
    /// A capture asked for a size the eager warm-up never used.
    MissDuringCapture(usize),
}

#[derive(Default)]
pub(crate) struct Pool {
    free: Mutex<(FreeLists, usize)>,
    capture: Mutex<Option<Arc<CaptureSet>>>,
}

/// The buffers one captured graph owns.
#[derive(Default)]
pub struct CaptureSet {
    free: Mutex<FreeLists>,
}

/// An f32 device buffer that returns to its pool (or its graph's set) when dropped.
pub struct Pooled {
    slice: ManuallyDrop<CudaSlice<f32>>,
    home: Home,
}

enum Home {
    /// Freed on drop (uploads, zeros: long-lived, not worth caching).
    Unpooled,
    Pool(Arc<Pool>),
    Capture(Arc<CaptureSet>),
}

impl Pool {
    /// A buffer of at least `n` elements, contents undefined.
    pub(crate) fn alloc(
        self: &Arc<Self>,
        stream: &Arc<CudaStream>,
        n: usize,
    ) -> Result<Pooled, PoolError> {
        let len = size_class(n);
        let capture = lock(&self.capture).clone();
        let slice = match &capture {
            Some(set) => {
                let own = lock(&set.free).get_mut(&len).and_then(Vec::pop);
                own.or_else(|| self.take(len))
                    .ok_or(PoolError::MissDuringCapture(len))?
            }
            // SAFETY: f32 has no invalid bit patterns; callers write before they read.
            None => match self.take(len) {
                Some(s) => s,
                None => unsafe { stream.alloc::<f32>(len) }.map_err(PoolError::Driver)?,
            },
        };
        let home = match capture {
            Some(set) => Home::Capture(set),
            None => Home::Pool(Arc::clone(self)),
        };
        Ok(Pooled {
            slice: ManuallyDrop::new(slice),
            home,
        })
    }

    fn take(&self, len: usize) -> Option<CudaSlice<f32>> {
        let mut free = lock(&self.free);
        let s = free.0.get_mut(&len)?.pop()?;
        free.1 -= len * 4;
        Some(s)
    }

    fn give(&self, s: CudaSlice<f32>) {
        let bytes = s.len() * 4;
        let mut free = lock(&self.free);
        if free.1 + bytes <= CACHE_LIMIT_BYTES {
            free.1 += bytes;
            free.0.entry(s.len()).or_default().push(s);
        }
    }

    /// From now until [`Pool::end_capture`], buffers handed out belong to the returned set.
    pub(crate) fn begin_capture(&self) -> Arc<CaptureSet> {
        let set = Arc::new(CaptureSet::default());
        *lock(&self.capture) = Some(Arc::clone(&set));
        set
    }

    pub(crate) fn end_capture(&self) {
        *lock(&self.capture) = None;
    }
}

impl Pooled {
    /// A buffer that is freed, not cached, when dropped.
    pub(crate) fn unpooled(slice: CudaSlice<f32>) -> Self {
        Pooled {
            slice: ManuallyDrop::new(slice),
            home: Home::Unpooled,
        }
    }

    pub(crate) fn slice(&self) -> &CudaSlice<f32> {
        &self.slice
    }

    pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<f32> {
        &mut self.slice
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        // SAFETY: drop runs once and nothing touches `slice` after this.
        let s = unsafe { ManuallyDrop::take(&mut self.slice) };
        match &self.home {
            Home::Unpooled => drop(s),
            Home::Pool(pool) => pool.give(s),
            Home::Capture(set) => lock(&set.free).entry(s.len()).or_default().push(s),
        }
    }
}
