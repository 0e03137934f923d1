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
}

impl HostTimes {
    pub(crate) fn report(&self) -> String {
        format!(
            "wgpu host times: dispatches recorded {}; submissions {}; waits {}",
            self.record.describe(),
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
        let bytes = u64::from(count) * 8;
        let resolved = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&self.set, 0..count, &resolved, 0);
        enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, bytes);
        ResolvedStamps {
            readback,
            kernels: self.kernels,
        }
    }
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
        let ticks: Vec<u64> = match slice.get_mapped_range() {
            Ok(view) => view
                .chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect(),
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
