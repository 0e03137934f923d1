//! What the shader labs (`gemv_lab`, `attention_lab`) share: the device, shader variants read at
//! run time, buffers, and device time of one compute pass by timestamps around it.
// Each lab uses a different part of this module.
#![allow(dead_code)]
use std::future::Future;

pub type Res<T> = std::result::Result<T, String>;

/// Runs and times dispatches on one adapter.
pub struct Gpu {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    ns_per_tick: f64,
    /// A CPU driver: timings mean nothing there, so the labs only check their variants.
    pub cpu: bool,
}

/// A shader variant: a whole WGSL source, and its `// lab: key=value` settings.
pub struct Variant {
    pub name: String,
    pub source: String,
}

impl Variant {
    pub fn new(name: &str, source: String) -> Variant {
        Variant {
            name: name.into(),
            source,
        }
    }

    /// The variants named on the command line (WGSL files), after `base`.
    pub fn with_args(base: Variant) -> Res<Vec<Variant>> {
        let mut all = vec![base];
        for path in std::env::args().skip(1) {
            let source = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            let name = std::path::Path::new(&path)
                .file_stem()
                .map_or(path.clone(), |s| s.to_string_lossy().into_owned());
            all.push(Variant::new(&name, source));
        }
        Ok(all)
    }

    /// The value of a `// lab: key=value` line, parsed.
    pub fn setting<T: std::str::FromStr>(&self, key: &str) -> Res<Option<T>> {
        let prefix = format!("// lab: {key}=");
        match self
            .source
            .lines()
            .find_map(|l| l.trim().strip_prefix(&prefix))
        {
            None => Ok(None),
            Some(v) => v
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| format!("{}: bad lab setting {key}={v}", self.name)),
        }
    }
}

/// A lab's exit: success, or its error on one line and a failing status.
pub fn exit(lab: &str, result: Res<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{lab}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// ‖b − a‖ / ‖a‖.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    let den: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Deterministic values in [-scale, scale).
pub fn noise(len: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn block<F: Future>(f: F) -> F::Output {
    pollster::block_on(f)
}

impl Gpu {
    /// The first adapter, with timestamp queries and `extra` features.
    pub fn open(extra: wgpu::Features) -> Res<Gpu> {
        let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
        let adapter = block(instance.enumerate_adapters(wgpu::Backends::all()))
            .into_iter()
            .next()
            .ok_or("no adapter")?;
        let needed = wgpu::Features::TIMESTAMP_QUERY | extra;
        if !adapter.features().contains(needed) {
            return Err(format!(
                "the adapter lacks {:?}",
                needed - adapter.features()
            ));
        }
        let info = adapter.get_info();
        println!("adapter: {}", info.name);
        let (device, queue) = block(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("lab"),
            required_features: needed,
            required_limits: adapter.limits(),
            ..Default::default()
        }))
        .map_err(|e| e.to_string())?;
        Ok(Gpu {
            ns_per_tick: f64::from(queue.get_timestamp_period()),
            device,
            queue,
            cpu: info.device_type == wgpu::DeviceType::Cpu,
        })
    }

    /// Nanoseconds a device timestamp tick.
    pub fn ns_per_tick(&self) -> f64 {
        self.ns_per_tick
    }

    pub fn buffer(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage,
            })
    }

    /// A storage buffer that passes can write and that can be cleared and read back.
    pub fn output(&self, words: usize) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 4 * words.max(1) as u64,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// `v` compiled with `constants`, or the validation error.
    pub fn pipeline(&self, v: &Variant, constants: &[(&str, f64)]) -> Res<wgpu::ComputePipeline> {
        self.pipeline_at(v, "main", constants)
    }

    /// [`Gpu::pipeline`] of the shader's entry point `entry`.
    pub fn pipeline_at(
        &self,
        v: &Variant,
        entry: &str,
        constants: &[(&str, f64)],
    ) -> Res<wgpu::ComputePipeline> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&v.name),
                source: wgpu::ShaderSource::Wgsl(v.source.as_str().into()),
            });
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&v.name),
                layout: None,
                module: &module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    ..Default::default()
                },
                cache: None,
            });
        match block(scope.pop()) {
            Some(e) => Err(e
                .to_string()
                .lines()
                .take(6)
                .collect::<Vec<_>>()
                .join(" | ")),
            None => Ok(pipeline),
        }
    }

    /// `buffers` bound in order to `pipeline`'s group 0, or the validation error (a variant
    /// that leaves a binding unused loses it from its layout).
    pub fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        buffers: &[&wgpu::Buffer],
    ) -> Res<wgpu::BindGroup> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        match block(scope.pop()) {
            Some(e) => Err(e
                .to_string()
                .lines()
                .take(4)
                .collect::<Vec<_>>()
                .join(" | ")),
            None => Ok(group),
        }
    }

    pub fn read(&self, buffer: &wgpu::Buffer) -> Res<Vec<u32>> {
        let slice = buffer.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        let view = slice.get_mapped_range().map_err(|e| e.to_string())?;
        Ok(bytemuck::cast_slice(&view).to_vec())
    }

    /// `out` cleared, then `record`'s dispatches, then `out` read back as f32.
    pub fn once(
        &self,
        out: &wgpu::Buffer,
        record: impl FnOnce(&mut wgpu::ComputePass),
    ) -> Res<Vec<f32>> {
        let mut enc = self.device.create_command_encoder(&Default::default());
        // Cleared, so a variant that writes nothing cannot pass on an earlier one's output.
        enc.clear_buffer(out, 0, None);
        record(&mut enc.begin_compute_pass(&Default::default()));
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: out.size(),
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(out, 0, &readback, 0, out.size());
        self.queue.submit([enc.finish()]);
        Ok(self
            .read(&readback)?
            .into_iter()
            .map(f32::from_bits)
            .collect())
    }

    /// Device ns of one compute pass holding `record`'s dispatches (timestamps at its ends).
    pub fn timed(&self, record: impl FnOnce(&mut wgpu::ComputePass)) -> Res<f64> {
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: None,
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        record(&mut enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: None,
            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                query_set: &set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        }));
        let resolved = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.resolve_query_set(&set, 0..2, &resolved, 0);
        enc.copy_buffer_to_buffer(&resolved, 0, &readback, 0, 16);
        self.queue.submit([enc.finish()]);
        let t = self.read(&readback)?;
        let ticks = |i: usize| u64::from(t[2 * i]) | (u64::from(t[2 * i + 1]) << 32);
        Ok(ticks(1).saturating_sub(ticks(0)) as f64 * self.ns_per_tick)
    }

    /// Device µs a repetition of `record(pass, i)` adds: the median over `runs` of
    /// T(`long` reps) − T(`short` reps), over `long − short`.
    pub fn per_rep(
        &self,
        runs: usize,
        (short, long): (usize, usize),
        record: &dyn Fn(&mut wgpu::ComputePass, usize),
    ) -> Res<f64> {
        let (mut s, mut l) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            s.push(self.timed(|pass| (0..short).for_each(|i| record(pass, i)))?);
            l.push(self.timed(|pass| (0..long).for_each(|i| record(pass, i)))?);
        }
        Ok((median(l) - median(s)) / (long - short) as f64 / 1e3)
    }
}
