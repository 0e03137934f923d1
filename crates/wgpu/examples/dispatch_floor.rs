//! What one compute dispatch costs the device when it must wait for the one before, through wgpu
//! and through raw Vulkan on the same `VkDevice`.
//!
//! The wgpu backend's batch-1 decode step is ~170 dependent dispatches; on the H200 each costs
//! ~7–10 µs beyond its data, against ~2 µs a kernel boundary in CUDA. This separates where that
//! goes: the same trivial shader dispatched N times in one command buffer, timed by device
//! timestamps around the whole run, (1) through a wgpu compute pass, every dispatch writing one
//! buffer (wgpu puts a buffer barrier before each) or each its own buffer (no barrier), and (2)
//! recorded by hand with `ash`: no barrier, a compute-to-compute memory barrier, and the barrier
//! wgpu-hal records (graphics stages included, one buffer barrier). Each figure is
//! (T(N=1,000) − T(N=100)) / 900, the median of seven runs, so fixed costs cancel.
//!
//! Run: `cargo run --release -p qfuse-wgpu --example dispatch_floor` (Vulkan adapters only).
use std::process::ExitCode;

use ash::vk;
use wgpu::hal::api::Vulkan;

/// One invocation of each workgroup bumps one word: the smallest work that writes memory.
const SHADER: &str = r#"
@group(0) @binding(0) var<storage, read_write> cells: array<u32>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) i: u32) {
    if (i == 0u) {
        cells[wg.x] = cells[wg.x] + 1u;
    }
}
"#;

const RUNS: usize = 7;
const SHORT: u32 = 100;
const LONG: u32 = 1000;
/// Workgroups a dispatch: one, and about what a decode GEMV launches.
const GRIDS: [u32; 2] = [1, 1024];

fn main() -> ExitCode {
    common::exit("dispatch_floor", run())
}

mod common;
use common::{median, Res};

/// The wgpu side: the shared lab device, and what the runs bind.
struct Gpu {
    lab: common::Gpu,
    /// Two pipelines of the same shader, for runs that switch pipelines every dispatch as a
    /// decode step does.
    pipelines: [wgpu::ComputePipeline; 2],
    /// One small storage buffer per dispatch of the longest run (the independent variant).
    buffers: Vec<wgpu::Buffer>,
    groups: Vec<wgpu::BindGroup>,
}

fn run() -> Res<()> {
    let lab = common::Gpu::open(wgpu::Features::empty())?;
    let device = &lab.device;
    let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
        label: Some("bump"),
        source: wgpu::ShaderSource::Wgsl(SHADER.into()),
    });
    let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
        label: None,
        entries: &[wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Storage { read_only: false },
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }],
    });
    let pipeline_layout = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
        label: None,
        bind_group_layouts: &[Some(&layout)],
        immediate_size: 0,
    });
    let pipelines = [0, 1].map(|_| {
        device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some("bump"),
            layout: Some(&pipeline_layout),
            module: &module,
            entry_point: Some("main"),
            compilation_options: Default::default(),
            cache: None,
        })
    });
    let buffers: Vec<wgpu::Buffer> = (0..LONG)
        .map(|_| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 4 * u64::from(GRIDS[1]),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        })
        .collect();
    let groups = buffers
        .iter()
        .map(|b| {
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &layout,
                entries: &[wgpu::BindGroupEntry {
                    binding: 0,
                    resource: b.as_entire_binding(),
                }],
            })
        })
        .collect();
    let gpu = Gpu {
        lab,
        pipelines,
        buffers,
        groups,
    };
    let raw = Raw::new(&gpu)?;
    println!(
        "µs a dispatch beyond the first (median of {RUNS}, (T({LONG}) - T({SHORT})) / {}):",
        LONG - SHORT
    );
    for grid in GRIDS {
        let per = |f: &dyn Fn(u32) -> Res<f64>| -> Res<f64> {
            let (mut short, mut long) = (Vec::new(), Vec::new());
            for _ in 0..RUNS {
                short.push(f(SHORT)?);
                long.push(f(LONG)?);
            }
            Ok((median(long) - median(short)) / f64::from(LONG - SHORT) / 1e3)
        };
        let rows: [(&str, Res<f64>); 9] = [
            (
                "wgpu, one buffer (a barrier each)",
                per(&|n| gpu.wgpu_run(n, grid, true, false)),
            ),
            (
                "wgpu, one buffer, pipelines switched",
                per(&|n| gpu.wgpu_run(n, grid, true, true)),
            ),
            (
                "wgpu, a buffer each (no barrier)",
                per(&|n| gpu.wgpu_run(n, grid, false, false)),
            ),
            (
                "raw, no barrier",
                per(&|n| raw.run(n, grid, Barrier::None, false)),
            ),
            (
                "raw, compute->compute memory barrier",
                per(&|n| raw.run(n, grid, Barrier::Compute, false)),
            ),
            (
                "raw, compute barrier, pipelines switched",
                per(&|n| raw.run(n, grid, Barrier::Compute, true)),
            ),
            (
                "raw, wgpu-hal's barrier",
                per(&|n| raw.run(n, grid, Barrier::WgpuHal, false)),
            ),
            (
                "raw, wgpu-hal's barrier, pipelines switched",
                per(&|n| raw.run(n, grid, Barrier::WgpuHal, true)),
            ),
            (
                "raw, full (ALL_COMMANDS) barrier",
                per(&|n| raw.run(n, grid, Barrier::All, false)),
            ),
        ];
        for (name, us) in rows {
            println!("  {grid:>5} workgroups  {name:<40} {:>7.2} µs", us?);
        }
    }
    Ok(())
}

impl Gpu {
    /// Device ns of `n` dispatches of `grid` workgroups in one wgpu compute pass.
    fn wgpu_run(&self, n: u32, grid: u32, shared: bool, switch: bool) -> Res<f64> {
        self.lab.timed(|pass| {
            pass.set_pipeline(&self.pipelines[0]);
            for i in 0..n as usize {
                if switch {
                    pass.set_pipeline(&self.pipelines[i % 2]);
                }
                pass.set_bind_group(0, &self.groups[if shared { 0 } else { i }], &[]);
                pass.dispatch_workgroups(grid, 1, 1);
            }
        })
    }
}

#[derive(Clone, Copy)]
enum Barrier {
    None,
    Compute,
    WgpuHal,
    All,
}

/// The same work recorded with `ash` on wgpu's `VkDevice` and queue.
struct Raw {
    device: ash::Device,
    queue: vk::Queue,
    pipelines: Vec<vk::Pipeline>,
    layout: vk::PipelineLayout,
    set: vk::DescriptorSet,
    buffer: vk::Buffer,
    pool: vk::CommandPool,
    queries: vk::QueryPool,
    ns_per_tick: f64,
}

impl Raw {
    fn new(gpu: &Gpu) -> Res<Raw> {
        // SAFETY: the hal device is only read for its handles; wgpu keeps it alive as long as
        // `gpu.device`, which outlives every use below (the process ends after them).
        let hal =
            unsafe { gpu.lab.device.as_hal::<Vulkan>() }.ok_or("the adapter is not Vulkan")?;
        let device = hal.raw_device().clone();
        let queue = hal.raw_queue();
        let family = hal.queue_family_index();
        drop(hal);
        let module = naga::front::wgsl::parse_str(SHADER).map_err(|e| e.to_string())?;
        let info = naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .map_err(|e| format!("{e:?}"))?;
        let words = naga::back::spv::write_vec(
            &module,
            &info,
            &naga::back::spv::Options::default(),
            Some(&naga::back::spv::PipelineOptions {
                shader_stage: naga::ShaderStage::Compute,
                entry_point: "main".into(),
            }),
        )
        .map_err(|e| e.to_string())?;
        // SAFETY: the buffer is a live wgpu buffer, used below only by this process's own command
        // buffers, never while wgpu records or runs work on it.
        let buffer = unsafe { gpu.buffers[0].as_hal::<Vulkan>() }
            .ok_or("the buffer is not Vulkan")
            // SAFETY: as above.
            .map(|b| unsafe { b.raw_handle() })?;
        let vk_err = |e: vk::Result| e.to_string();
        // SAFETY: plain object creation on a live device with well-formed create infos.
        unsafe {
            let binding = vk::DescriptorSetLayoutBinding::default()
                .binding(0)
                .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                .descriptor_count(1)
                .stage_flags(vk::ShaderStageFlags::COMPUTE);
            let set_layout = device
                .create_descriptor_set_layout(
                    &vk::DescriptorSetLayoutCreateInfo::default().bindings(&[binding]),
                    None,
                )
                .map_err(vk_err)?;
            let layout = device
                .create_pipeline_layout(
                    &vk::PipelineLayoutCreateInfo::default().set_layouts(&[set_layout]),
                    None,
                )
                .map_err(vk_err)?;
            let shader = device
                .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
                .map_err(vk_err)?;
            let stage = vk::PipelineShaderStageCreateInfo::default()
                .stage(vk::ShaderStageFlags::COMPUTE)
                .module(shader)
                .name(c"main");
            let info = vk::ComputePipelineCreateInfo::default()
                .stage(stage)
                .layout(layout);
            let pipelines = device
                .create_compute_pipelines(vk::PipelineCache::null(), &[info, info], None)
                .map_err(|(_, e)| e.to_string())?;
            let sizes = [vk::DescriptorPoolSize {
                ty: vk::DescriptorType::STORAGE_BUFFER,
                descriptor_count: 1,
            }];
            let dpool = device
                .create_descriptor_pool(
                    &vk::DescriptorPoolCreateInfo::default()
                        .max_sets(1)
                        .pool_sizes(&sizes),
                    None,
                )
                .map_err(vk_err)?;
            let set = device
                .allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(dpool)
                        .set_layouts(&[set_layout]),
                )
                .map_err(vk_err)?[0];
            let info = [vk::DescriptorBufferInfo {
                buffer,
                offset: 0,
                range: vk::WHOLE_SIZE,
            }];
            device.update_descriptor_sets(
                &[vk::WriteDescriptorSet::default()
                    .dst_set(set)
                    .dst_binding(0)
                    .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                    .buffer_info(&info)],
                &[],
            );
            let pool = device
                .create_command_pool(
                    &vk::CommandPoolCreateInfo::default()
                        .queue_family_index(family)
                        .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER),
                    None,
                )
                .map_err(vk_err)?;
            let queries = device
                .create_query_pool(
                    &vk::QueryPoolCreateInfo::default()
                        .query_type(vk::QueryType::TIMESTAMP)
                        .query_count(2),
                    None,
                )
                .map_err(vk_err)?;
            Ok(Raw {
                device,
                queue,
                pipelines,
                layout,
                set,
                buffer,
                pool,
                queries,
                ns_per_tick: gpu.lab.ns_per_tick(),
            })
        }
    }

    /// Device ns of `n` dispatches of `grid` workgroups, each followed by `barrier`, alternating
    /// between two pipelines if `switch`.
    fn run(&self, n: u32, grid: u32, barrier: Barrier, switch: bool) -> Res<f64> {
        let d = &self.device;
        let vk_err = |e: vk::Result| e.to_string();
        // SAFETY: every handle is live and owned by this struct; the command buffer is recorded,
        // submitted and waited for here before it is freed, so nothing it uses changes meanwhile.
        unsafe {
            let cb = d
                .allocate_command_buffers(
                    &vk::CommandBufferAllocateInfo::default()
                        .command_pool(self.pool)
                        .level(vk::CommandBufferLevel::PRIMARY)
                        .command_buffer_count(1),
                )
                .map_err(vk_err)?[0];
            d.begin_command_buffer(
                cb,
                &vk::CommandBufferBeginInfo::default()
                    .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
            )
            .map_err(vk_err)?;
            d.cmd_reset_query_pool(cb, self.queries, 0, 2);
            d.cmd_write_timestamp(cb, vk::PipelineStageFlags::TOP_OF_PIPE, self.queries, 0);
            d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, self.pipelines[0]);
            let rw = vk::AccessFlags::SHADER_READ | vk::AccessFlags::SHADER_WRITE;
            let graphics = vk::PipelineStageFlags::VERTEX_SHADER
                | vk::PipelineStageFlags::FRAGMENT_SHADER
                | vk::PipelineStageFlags::COMPUTE_SHADER;
            for i in 0..n as usize {
                if switch {
                    d.cmd_bind_pipeline(cb, vk::PipelineBindPoint::COMPUTE, self.pipelines[i % 2]);
                }
                d.cmd_bind_descriptor_sets(
                    cb,
                    vk::PipelineBindPoint::COMPUTE,
                    self.layout,
                    0,
                    &[self.set],
                    &[],
                );
                d.cmd_dispatch(cb, grid, 1, 1);
                match barrier {
                    Barrier::None => {}
                    Barrier::Compute => d.cmd_pipeline_barrier(
                        cb,
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::PipelineStageFlags::COMPUTE_SHADER,
                        vk::DependencyFlags::empty(),
                        &[vk::MemoryBarrier::default()
                            .src_access_mask(vk::AccessFlags::SHADER_WRITE)
                            .dst_access_mask(rw)],
                        &[],
                        &[],
                    ),
                    Barrier::WgpuHal => d.cmd_pipeline_barrier(
                        cb,
                        vk::PipelineStageFlags::TOP_OF_PIPE | graphics,
                        vk::PipelineStageFlags::BOTTOM_OF_PIPE | graphics,
                        vk::DependencyFlags::empty(),
                        &[],
                        &[vk::BufferMemoryBarrier::default()
                            .buffer(self.buffer)
                            .size(vk::WHOLE_SIZE)
                            .src_access_mask(rw)
                            .dst_access_mask(rw)],
                        &[],
                    ),
                    Barrier::All => d.cmd_pipeline_barrier(
                        cb,
                        vk::PipelineStageFlags::ALL_COMMANDS,
                        vk::PipelineStageFlags::ALL_COMMANDS,
                        vk::DependencyFlags::empty(),
                        &[vk::MemoryBarrier::default()
                            .src_access_mask(vk::AccessFlags::MEMORY_WRITE)
                            .dst_access_mask(
                                vk::AccessFlags::MEMORY_READ | vk::AccessFlags::MEMORY_WRITE,
                            )],
                        &[],
                        &[],
                    ),
                }
            }
            d.cmd_write_timestamp(cb, vk::PipelineStageFlags::BOTTOM_OF_PIPE, self.queries, 1);
            d.end_command_buffer(cb).map_err(vk_err)?;
            let fence = d
                .create_fence(&vk::FenceCreateInfo::default(), None)
                .map_err(vk_err)?;
            d.queue_submit(
                self.queue,
                &[vk::SubmitInfo::default().command_buffers(&[cb])],
                fence,
            )
            .map_err(vk_err)?;
            d.wait_for_fences(&[fence], true, u64::MAX)
                .map_err(vk_err)?;
            let mut t = [0u64; 2];
            d.get_query_pool_results(
                self.queries,
                0,
                &mut t,
                vk::QueryResultFlags::TYPE_64 | vk::QueryResultFlags::WAIT,
            )
            .map_err(vk_err)?;
            d.destroy_fence(fence, None);
            d.free_command_buffers(self.pool, &[cb]);
            Ok(t[1].saturating_sub(t[0]) as f64 * self.ns_per_tick)
        }
    }
}
