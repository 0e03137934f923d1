//! What recording and submitting a dispatch costs the host in wgpu, by the number of buffers its
//! bind group holds: the wgpu backend's batch-1 decode step spends ~8.6 µs of host time a
//! dispatch on the H200's machine (`QFUSE_WGPU_HOST_TIMES`), as much as the device's work.
//! 2,000 dispatches in one compute pass, two pipelines alternating, a bind group each of `k`
//! storage buffers (the last written, the rest read), split into the pass's recording, the
//! command buffer's finish and the queue submission; median of five runs.
//!
//! Run: `cargo run --release -p qfuse-wgpu --example host_cost`.
use std::process::ExitCode;
use std::time::Instant;

mod common;
use common::{median, Gpu, Res, Variant};

const DISPATCHES: usize = 2000;
const RUNS: usize = 5;

fn main() -> ExitCode {
    common::exit("host_cost", run())
}

/// A shader reading word 0 of `k - 1` buffers and writing their sum to the last.
fn shader(k: usize) -> String {
    let mut s = String::new();
    for i in 0..k - 1 {
        s += &format!("@group(0) @binding({i}) var<storage, read> in{i}: array<u32>;\n");
    }
    s += &format!(
        "@group(0) @binding({}) var<storage, read_write> out: array<u32>;\n",
        k - 1
    );
    s += "@compute @workgroup_size(64)\nfn main(@builtin(local_invocation_index) i: u32) {\n    var s = 0u;\n";
    for i in 0..k - 1 {
        s += &format!("    s += in{i}[0];\n");
    }
    s += "    if (i == 0u) { out[0] = s; }\n}\n";
    s
}

fn run() -> Res<()> {
    let gpu = Gpu::open(wgpu::Features::empty())?;
    println!("host µs a dispatch ({DISPATCHES} in a pass, median of {RUNS}): record / finish / submit / all");
    for k in [2, 5, 9, 13] {
        let v = Variant::new(&format!("{k} buffers"), shader(k));
        let pipelines = [gpu.pipeline(&v, &[])?, gpu.pipeline(&v, &[])?];
        let buffers: Vec<wgpu::Buffer> = (0..64).map(|_| gpu.output(64)).collect();
        // Distinct inputs and outputs a dispatch, cycling through the pool: each dispatch
        // writes a buffer a later one reads, as a model's ops do.
        let groups = (0..DISPATCHES)
            .map(|d| {
                let bound: Vec<&wgpu::Buffer> =
                    (0..k).map(|j| &buffers[(d * 3 + j) % 64]).collect();
                gpu.bind(&pipelines[d % 2], &bound)
            })
            .collect::<Res<Vec<_>>>()?;
        let (mut rec, mut fin, mut sub) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let t0 = Instant::now();
            let mut enc = gpu.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for (d, g) in groups.iter().enumerate() {
                    pass.set_pipeline(&pipelines[d % 2]);
                    pass.set_bind_group(0, g, &[]);
                    pass.dispatch_workgroups(1, 1, 1);
                }
            }
            let t1 = Instant::now();
            let cb = enc.finish();
            let t2 = Instant::now();
            gpu.queue.submit([cb]);
            let t3 = Instant::now();
            gpu.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| e.to_string())?;
            let per = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6 / DISPATCHES as f64;
            rec.push(per(t0, t1));
            fin.push(per(t1, t2));
            sub.push(per(t2, t3));
        }
        let (r, f, s) = (median(rec), median(fin), median(sub));
        println!(
            "  {:<12} {r:>6.2} / {f:>6.2} / {s:>6.2} / {:>6.2}",
            v.name,
            r + f + s
        );
    }
    Ok(())
}
