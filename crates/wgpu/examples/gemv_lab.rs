//! The batch-1 decode products as they run in a decode step, each dispatch waiting for the one
//! before, timed by device timestamps: the backend's subgroup GEMV build (`matmul_bf16_vec.wgsl`
//! followed by `matmul_bf16_sg.wgsl`) against variants of it read from WGSL files at run time, so one GPU
//! call compares several shader designs without a Rust toolchain there.
//!
//! A variant is a whole shader with the vectorised builds' bindings, params and fusion
//! constants (`NORM`, `EPI`); a line `// lab: columns=N` says how many output columns one
//! workgroup covers (default 2). Each product runs over 28 copies of its weights (one a layer,
//! so every call reads DRAM, not L2), every dispatch writing the same output, so wgpu puts a
//! barrier before each, as in a step. A figure is (T(280) − T(28)) / 252 dispatches, median of
//! seven runs; "apart" is the same with an output per dispatch (no barriers: the streaming rate).
//! Every variant's output is checked against the backend build's first.
//!
//! Run: `cargo run --release -p qfuse-wgpu --example gemv_lab -- [variant.wgsl ...]`.
use std::process::ExitCode;

const VEC: &str = include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl");
const SG: &str = include_str!("../../../kernels/wgsl/matmul_bf16_sg.wgsl");

const LAYERS: usize = 28;
const RUNS: usize = 7;
const LONG: usize = 10;

/// A decode step's products at the Qwen3-0.6B shape: name, NORM, EPI, K, weight rows.
const PRODUCTS: [(&str, bool, u32, usize, usize); 4] = [
    ("norm + qkv", true, 0, 1024, 4096),
    ("o_proj + residual", false, 1, 2048, 1024),
    ("norm + gate/up + silu", true, 2, 1024, 6144),
    ("down + residual", false, 1, 3072, 1024),
];

type Res<T> = std::result::Result<T, String>;

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gemv_lab: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Variant {
    name: String,
    source: String,
    columns: usize,
}

struct Gpu {
    device: wgpu::Device,
    queue: wgpu::Queue,
    ns_per_tick: f64,
}

/// One product's buffers: params, x, the weights' per-layer copies, aux, and outputs.
struct Product {
    params: wgpu::Buffer,
    x: wgpu::Buffer,
    weights: Vec<wgpu::Buffer>,
    aux: wgpu::Buffer,
    /// Output 0 is the shared one; the rest give "apart" runs an output each.
    outs: Vec<wgpu::Buffer>,
    out_len: usize,
    k: usize,
}

fn run() -> Res<()> {
    let mut variants = vec![Variant {
        name: "backend sg".into(),
        source: format!("{VEC}{SG}"),
        columns: 2,
    }];
    for path in std::env::args().skip(1) {
        let source = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let columns = source
            .lines()
            .find_map(|l| l.trim().strip_prefix("// lab: columns="))
            .map_or(Ok(2), |v| {
                v.trim().parse().map_err(|e| format!("{path}: {e}"))
            })?;
        let name = std::path::Path::new(&path)
            .file_stem()
            .map_or(path.clone(), |s| s.to_string_lossy().into_owned());
        variants.push(Variant {
            name,
            source,
            columns,
        });
    }
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle());
    let adapter = pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .into_iter()
        .next()
        .ok_or("no adapter")?;
    let needed = wgpu::Features::TIMESTAMP_QUERY | wgpu::Features::SUBGROUP;
    if !adapter.features().contains(needed) {
        return Err("the adapter lacks timestamp queries or subgroups".into());
    }
    println!("adapter: {}", adapter.get_info().name);
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("gemv_lab"),
        required_features: needed,
        required_limits: adapter.limits(),
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    let gpu = Gpu {
        ns_per_tick: f64::from(queue.get_timestamp_period()),
        device,
        queue,
    };
    // On a CPU driver one layer's copy is enough to check the variants (the times mean nothing).
    let layers = if adapter.get_info().device_type == wgpu::DeviceType::Cpu {
        1
    } else {
        LAYERS
    };
    println!(
        "µs a dependent dispatch (median of {RUNS}, over {} dispatches), and apart (no barriers)",
        layers * (LONG - 1)
    );
    for (name, norm, epi, k, n) in PRODUCTS {
        let product = gpu.product(norm, epi, k, n, layers);
        let mut reference: Option<Vec<f32>> = None;
        for v in &variants {
            let pipeline = match gpu.pipeline(v, norm, epi, &product) {
                Ok(p) => p,
                Err(e) => {
                    println!("  {name:<22} {:<28} does not compile: {e}", v.name);
                    continue;
                }
            };
            let y = gpu.once(&pipeline, &product, v.columns)?;
            let err = match &reference {
                None => {
                    reference = Some(y);
                    0.0
                }
                Some(r) => {
                    let num: f64 = r
                        .iter()
                        .zip(&y)
                        .map(|(a, b)| f64::from(a - b).powi(2))
                        .sum();
                    let den: f64 = r.iter().map(|a| f64::from(*a).powi(2)).sum();
                    (num / den.max(1e-30)).sqrt()
                }
            };
            let time = |shared: bool| -> Res<f64> {
                let (mut short, mut long) = (Vec::new(), Vec::new());
                for _ in 0..RUNS {
                    short.push(gpu.chain(&pipeline, &product, v.columns, layers, shared)?);
                    long.push(gpu.chain(&pipeline, &product, v.columns, layers * LONG, shared)?);
                }
                Ok((median(long) - median(short)) / (layers * (LONG - 1)) as f64 / 1e3)
            };
            let (dep, apart) = (time(true)?, time(false)?);
            println!(
                "  {name:<22} {:<28} {dep:>7.2} µs  apart {apart:>6.2} µs  rel err {err:.1e}{}",
                v.name,
                if err > 1e-5 { "  MISMATCH" } else { "" }
            );
        }
    }
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Deterministic values in [-scale, scale).
fn noise(len: usize, seed: u64, scale: f32) -> Vec<f32> {
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

impl Gpu {
    fn buffer(&self, bytes: &[u8], usage: wgpu::BufferUsages) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        self.device
            .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: None,
                contents: bytes,
                usage,
            })
    }

    fn product(&self, norm: bool, epi: u32, k: usize, n: usize, layers: usize) -> Product {
        let storage = wgpu::BufferUsages::STORAGE;
        let out_len = if epi == 2 { n / 2 } else { n };
        // Padded to two vec4s so a variant may bind them as a uniform.
        let params = [
            1,
            k as u32,
            out_len as u32,
            out_len as u32,
            0,
            1e-6f32.to_bits(),
            0,
            0,
        ];
        let weights = (0..layers)
            .map(|l| {
                let bf16: Vec<u16> = noise(n * k, l as u64 + 7, 0.05)
                    .iter()
                    .map(|v| (v.to_bits() >> 16) as u16)
                    .collect();
                self.buffer(bytemuck::cast_slice(&bf16), storage)
            })
            .collect();
        let aux = if norm {
            noise(k, 3, 1.0).iter().map(|g| 1.0 + g).collect()
        } else {
            noise(out_len, 5, 1.0)
        };
        let outs = (0..layers * LONG)
            .map(|_| {
                self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: None,
                    size: 4 * out_len as u64,
                    usage: storage | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                })
            })
            .collect();
        Product {
            params: self.buffer(
                bytemuck::cast_slice(&params),
                storage | wgpu::BufferUsages::UNIFORM,
            ),
            x: self.buffer(bytemuck::cast_slice(&noise(k, 1, 2.0)), storage),
            weights,
            aux: self.buffer(bytemuck::cast_slice(&aux), storage),
            outs,
            out_len,
            k,
        }
    }

    /// `v` built for `p`'s fusion; a variant declaring `override P_K` also gets the shape as
    /// constants (`P_T`, `P_K`, `P_ROWS`, `P_STRIDE`, `P_OFF`) instead of reading params.
    fn pipeline(
        &self,
        v: &Variant,
        norm: bool,
        epi: u32,
        p: &Product,
    ) -> Res<wgpu::ComputePipeline> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self
            .device
            .create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(&v.name),
                source: wgpu::ShaderSource::Wgsl(v.source.as_str().into()),
            });
        let mut constants = vec![
            ("NORM", if norm { 1.0 } else { 0.0 }),
            ("EPI", f64::from(epi)),
        ];
        if v.source.contains("override P_K") {
            constants.extend([
                ("P_T", 1.0),
                ("P_K", p.k as f64),
                ("P_ROWS", p.out_len as f64),
                ("P_STRIDE", p.out_len as f64),
                ("P_OFF", 0.0),
            ]);
        }
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(&v.name),
                layout: None,
                module: &module,
                entry_point: Some("main"),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    ..Default::default()
                },
                cache: None,
            });
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(e
                .to_string()
                .lines()
                .take(6)
                .collect::<Vec<_>>()
                .join(" | ")),
            None => Ok(pipeline),
        }
    }

    fn bind(
        &self,
        pipeline: &wgpu::ComputePipeline,
        p: &Product,
        layer: usize,
        out: usize,
    ) -> wgpu::BindGroup {
        let buffers = [&p.params, &p.x, &p.weights[layer], &p.outs[out], &p.aux];
        let entries: Vec<wgpu::BindGroupEntry> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| wgpu::BindGroupEntry {
                binding: i as u32,
                resource: b.as_entire_binding(),
            })
            .collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        })
    }

    /// One dispatch on layer 0's weights into output 0, read back.
    fn once(&self, pipeline: &wgpu::ComputePipeline, p: &Product, columns: usize) -> Res<Vec<f32>> {
        let group = self.bind(pipeline, p, 0, 0);
        let mut enc = self.device.create_command_encoder(&Default::default());
        // Cleared, so a variant that writes nothing cannot pass on an earlier one's output.
        enc.clear_buffer(&p.outs[0], 0, None);
        {
            let mut pass = enc.begin_compute_pass(&Default::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &group, &[]);
            pass.dispatch_workgroups(p.out_len.div_ceil(columns) as u32, 1, 1);
        }
        let bytes = 4 * p.out_len as u64;
        let readback = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        enc.copy_buffer_to_buffer(&p.outs[0], 0, &readback, 0, bytes);
        self.queue.submit([enc.finish()]);
        let words = self.read(&readback)?;
        Ok(words.iter().map(|w| f32::from_bits(*w)).collect())
    }

    fn read(&self, buffer: &wgpu::Buffer) -> Res<Vec<u32>> {
        let slice = buffer.slice(..);
        slice.map_async(wgpu::MapMode::Read, |_| {});
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|e| e.to_string())?;
        let view = slice.get_mapped_range().map_err(|e| e.to_string())?;
        Ok(bytemuck::cast_slice(&view).to_vec())
    }

    /// Device ns of `count` dispatches over the layers' weights in turn, into output 0 each
    /// (`shared`: a barrier before each) or each into its own.
    fn chain(
        &self,
        pipeline: &wgpu::ComputePipeline,
        p: &Product,
        columns: usize,
        count: usize,
        shared: bool,
    ) -> Res<f64> {
        let layers = p.weights.len();
        let groups: Vec<wgpu::BindGroup> = (0..count)
            .map(|i| self.bind(pipeline, p, i % layers, if shared { 0 } else { i }))
            .collect();
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: None,
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            pass.set_pipeline(pipeline);
            for g in &groups {
                pass.set_bind_group(0, g, &[]);
                pass.dispatch_workgroups(p.out_len.div_ceil(columns) as u32, 1, 1);
            }
        }
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
}
