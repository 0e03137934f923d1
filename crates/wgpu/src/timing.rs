//! Measuring the wgpu backend: where the host's time goes and, with timestamp queries inside
//! compute passes, each pipeline's device time. Off unless a knob asks (each costs time).
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use qfuse_core::reuse::lock_unpoisoned as lock;

/// How many times something happened and the host time it took in all.
#[derive(Default)]
pub(crate) struct Tally {
    count: AtomicU64,
    ns: AtomicU64,
}

impl Tally {
    /// Counts one more, which began at `since`.
    pub(crate) fn add(&self, since: Instant) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.ns
            .fetch_add(since.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    fn describe(&self) -> String {
        let (n, t) = (
            self.count.load(Ordering::Relaxed),
            self.ns.load(Ordering::Relaxed),
        );
        format!(
            "{n} in {:.1} ms ({:.2} µs each)",
            t as f64 / 1e6,
            t as f64 / 1e3 / n.max(1) as f64
        )
    }
}

/// Where the host's time goes (`QFUSE_WGPU_HOST_TIMES=1`): recording dispatches, submitting them,
/// and waiting for results. A decode step whose wall time is mostly recording and submitting is
/// bound by the CPU, not the GPU.
#[derive(Default)]
pub(crate) struct HostTimes {
    pub(crate) record: Tally,
    pub(crate) submit: Tally,
    pub(crate) wait: Tally,
    /// Bind groups made because the cache had none for a dispatch's buffers (part of `record`).
    pub(crate) bind_groups: Tally,
}

impl HostTimes {
    pub(crate) fn report(&self) -> String {
        format!(
            "wgpu host times: dispatches recorded {} (bind groups made {}); submissions {}; waits {}",
            self.record.describe(),
            self.bind_groups.describe(),
            self.submit.describe(),
            self.wait.describe()
        )
    }
}

/// Timestamps around the dispatches of one recording: one when its pass begins, one after each
/// dispatch, so stamp `i + 1` minus stamp `i` is dispatch `i`'s device time including the
/// barrier wgpu put before it.
pub(crate) struct DispatchStamps {
    set: wgpu::QuerySet,
    kernels: Vec<&'static str>,
}

/// Timestamps one query set holds (the WebGPU maximum is 4,096).
const STAMPS: u32 = 1024;

impl DispatchStamps {
    pub(crate) fn begin(device: &wgpu::Device, pass: &mut wgpu::ComputePass<'static>) -> Self {
        let set = device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("dispatch stamps"),
            ty: wgpu::QueryType::Timestamp,
            count: STAMPS,
        });
        pass.write_timestamp(&set, 0);
        DispatchStamps {
            set,
            kernels: Vec::new(),
        }
    }

    pub(crate) fn after(&mut self, pass: &mut wgpu::ComputePass<'static>, kernel: &'static str) {
        self.kernels.push(kernel);
        pass.write_timestamp(&self.set, self.kernels.len() as u32);
    }

    /// No room for another dispatch's stamp: the recording must be submitted.
    pub(crate) fn full(&self) -> bool {
        self.kernels.len() + 1 >= STAMPS as usize
    }

    /// Copies the stamps to a mappable buffer at the end of `enc` (its pass already ended).
    pub(crate) fn resolve(
        self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
    ) -> ResolvedStamps {
        let count = self.kernels.len() as u32 + 1;
        ResolvedStamps {
            readback: resolve_stamps(device, enc, &self.set, count),
            kernels: self.kernels,
        }
    }
}

/// Copies the first `count` stamps of `set` to a new mappable buffer at the end of `enc`.
fn resolve_stamps(
    device: &wgpu::Device,
    enc: &mut wgpu::CommandEncoder,
    set: &wgpu::QuerySet,
    count: u32,
) -> wgpu::Buffer {
    let bytes = u64::from(count) * 8;
    let buffer = |usage| {
        device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let resolved = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
    let readback = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    enc.resolve_query_set(set, 0..count, &resolved, 0);
    enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, bytes);
    readback
}

/// A mapped stamp buffer's ticks.
fn ticks(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

/// A submitted recording's stamps, readable once the queue reaches them.
pub(crate) struct ResolvedStamps {
    readback: wgpu::Buffer,
    kernels: Vec<&'static str>,
}

/// Device time per pipeline, summed over every timed dispatch (`QFUSE_WGPU_GPU_TIMES=1`).
pub(crate) struct GpuTimes {
    ns_per_tick: f64,
    by_kernel: Mutex<HashMap<&'static str, (u64, f64)>>,
}

impl GpuTimes {
    /// What the device must offer for these measurements.
    pub(crate) const FEATURES: wgpu::Features =
        wgpu::Features::TIMESTAMP_QUERY.union(wgpu::Features::TIMESTAMP_QUERY_INSIDE_PASSES);

    pub(crate) fn new(ns_per_tick: f32) -> Self {
        GpuTimes {
            ns_per_tick: f64::from(ns_per_tick),
            by_kernel: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for `stamps` (so timing serialises the host with the device) and adds them up.
    pub(crate) fn collect(&self, device: &wgpu::Device, stamps: ResolvedStamps) {
        let slice = stamps.readback.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        // A measurement that cannot be read is left out rather than failing the work measured.
        if device.poll(wgpu::PollType::wait_indefinitely()).is_err() {
            return;
        }
        if !matches!(rx.recv(), Ok(Ok(()))) {
            return;
        }
        let ticks = match slice.get_mapped_range() {
            Ok(view) => ticks(&view),
            Err(_) => return,
        };
        stamps.readback.unmap();
        let mut by_kernel = lock(&self.by_kernel);
        for (kernel, pair) in stamps.kernels.iter().zip(ticks.windows(2)) {
            let entry = by_kernel.entry(kernel).or_insert((0, 0.0));
            entry.0 += 1;
            entry.1 += pair[1].saturating_sub(pair[0]) as f64 * self.ns_per_tick;
        }
    }

    pub(crate) fn report(&self) -> String {
        let by_kernel = lock(&self.by_kernel);
        let total: f64 = by_kernel.values().map(|v| v.1).sum();
        let mut rows: Vec<_> = by_kernel.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let mut out = format!(
            "wgpu device times (timestamps around each dispatch): {:.1} ms in all",
            total / 1e6
        );
        for (kernel, (count, ns)) in rows {
            out.push_str(&format!(
                "\n  {kernel:<32} {count:>7} dispatches {:>9.2} µs each {:>5.1}%",
                ns / 1e3 / *count as f64,
                100.0 * ns / total.max(1.0)
            ));
        }
        out
    }
}

/// When each submitted pass began and ended on the device (`QFUSE_WGPU_PASS_TIMES=1`): two
/// timestamps a submission, read only when reported, so the host keeps running ahead of the
/// device. Busy time against the span between the first pass's start and the last's end says
/// whether the device ever waits for the host, and for how long.
pub(crate) struct PassTimes {
    ns_per_tick: f64,
    pending: Mutex<Vec<wgpu::Buffer>>,
}

impl PassTimes {
    pub(crate) const FEATURES: wgpu::Features = wgpu::Features::TIMESTAMP_QUERY;

    pub(crate) fn new(ns_per_tick: f32) -> Self {
        PassTimes {
            ns_per_tick: f64::from(ns_per_tick),
            pending: Mutex::new(Vec::new()),
        }
    }

    /// A query set for one pass's two timestamps.
    pub(crate) fn query_set(device: &wgpu::Device) -> wgpu::QuerySet {
        device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("pass stamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        })
    }

    /// Copies `set`'s stamps to a mappable buffer at the end of `enc` (its pass already ended),
    /// to be read at the report.
    pub(crate) fn resolve(
        &self,
        device: &wgpu::Device,
        enc: &mut wgpu::CommandEncoder,
        set: &wgpu::QuerySet,
    ) {
        lock(&self.pending).push(resolve_stamps(device, enc, set, 2));
    }

    /// Reads every pass's stamps so far and sums them up.
    pub(crate) fn report(&self, device: &wgpu::Device) -> String {
        let buffers = std::mem::take(&mut *lock(&self.pending));
        for b in &buffers {
            b.slice(..).map_async(wgpu::MapMode::Read, |_| {});
        }
        if device.poll(wgpu::PollType::wait_indefinitely()).is_err() {
            return "wgpu pass times: the device could not be polled".into();
        }
        let mut passes: Vec<(u64, u64)> = buffers
            .iter()
            .filter_map(|b| {
                let t = ticks(&b.slice(..).get_mapped_range().ok()?);
                Some((*t.first()?, *t.get(1)?))
            })
            .collect();
        passes.sort_unstable();
        let (Some(first), Some(last)) = (passes.first(), passes.last()) else {
            return "wgpu pass times: no passes".into();
        };
        let ms = |ticks: u64| ticks as f64 * self.ns_per_tick / 1e6;
        let busy: u64 = passes.iter().map(|(b, e)| e.saturating_sub(*b)).sum();
        let span = last.1.saturating_sub(first.0);
        let mut gaps: Vec<u64> = passes
            .windows(2)
            .map(|w| w[1].0.saturating_sub(w[0].1))
            .collect();
        gaps.sort_unstable();
        let idle: u64 = gaps.iter().sum();
        let median = gaps.get(gaps.len() / 2).copied().unwrap_or(0);
        let long: Vec<u64> = gaps.iter().copied().filter(|g| ms(*g) > 0.05).collect();
        format!(
            "wgpu pass times: {} passes, device busy {:.1} ms of a {:.1} ms span ({:.0}%); idle between passes {:.1} ms, median gap {:.1} µs, {} gaps over 50 µs ({:.1} ms)",
            passes.len(),
            ms(busy),
            ms(span),
            100.0 * busy as f64 / span.max(1) as f64,
            ms(idle),
            ms(median) * 1e3,
            long.len(),
            ms(long.iter().sum())
        )
    }
}
