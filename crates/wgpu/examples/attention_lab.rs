//! The batch-1 decode attention as it runs in a decode step (`attention.wgsl` with its q/k-norm
//! and RoPE prologue, then `attention_combine.wgsl` where the context is split), each pair waiting
//! for the one before, timed by device timestamps; against variants read from WGSL files at run
//! time, for ablations and new designs in one GPU call.
//!
//! A variant is a whole attention shader with `attention.wgsl`'s bindings and params. Lines
//! `// lab: qkn=0` (build it without the prologue), `// lab: chunk=N` (keys a split; default
//! the backend's rule) and `// lab: workgroups=X,Y` (the grid's first two sizes a split; default
//! KV heads × head groups, 1) change how it is run. Qwen3-0.6B's heads (16 query, 8 KV, 128
//! dims), one token at each of several context lengths. A figure is (T(280) − T(28)) / 252 pairs,
//! median of seven runs. Every variant's output is checked against the backend shader's.
//! `LAB_COMBINE=file.wgsl` runs every variant with another combine shader. `LAB_PREFETCH=N` adds
//! N workgroups to each attention dispatch that read the 0.6B's next products' weights into L2,
//! as the backend's `QFUSE_WGPU_PREFETCH` does, over 28 copies of those weights (so every
//! dispatch reads DRAM): what the prefetch costs the attention.
//!
//! `attention_lab/generate.py` writes the ablations and designs `PROBE=attention_lab` runs.
//!
//! Run: `cargo run --release -p qfuse-wgpu --example attention_lab -- [variant.wgsl ...]`.
use std::process::ExitCode;

mod common;
use common::{noise, rel_err, Gpu, Res, Variant};

/// The backend's build for adapters with subgroups (which the lab requires).
const ATTENTION: &str = concat!(
    include_str!("../../../kernels/wgsl/attention.wgsl"),
    include_str!("../../../kernels/wgsl/attention_sg.wgsl")
);
const COMBINE: &str = include_str!("../../../kernels/wgsl/attention_combine.wgsl");

const HEADS: usize = 16;
const KV_HEADS: usize = 8;
const DIM: usize = 128;
const BLOCK: usize = 16;
const RUNS: usize = 7;
const REPS: (usize, usize) = (28, 280);
/// Context lengths (keys, the token's own included): a 32-token prompt's first and last steps
/// of 256, its middle, the edges of one and two 32-key tiles, and long contexts.
const CONTEXTS: [usize; 8] = [33, 64, 65, 96, 160, 288, 1024, 2048];
/// The weights a layer's attention prefetches at the 0.6B shape (bf16 bytes): o_proj, gate/up,
/// down, the next layer's QKV.
const PREFETCH_BYTES: [usize; 4] = [
    1024 * 2048 * 2,
    6144 * 1024 * 2,
    1024 * 3072 * 2,
    4096 * 1024 * 2,
];

fn main() -> ExitCode {
    common::exit("attention_lab", run())
}

/// The backend's split: a few hundred workgroups, whole 32-key tiles.
fn backend_chunk(ctx: usize) -> usize {
    let want = 256 / KV_HEADS;
    32 * ctx.div_ceil(32 * want)
}

struct Case {
    ctx: usize,
    buffers: Vec<wgpu::Buffer>,
    part: wgpu::Buffer,
    out: wgpu::Buffer,
}

fn case(gpu: &Gpu, ctx: usize) -> Case {
    let storage = wgpu::BufferUsages::STORAGE;
    let words = |v: &[u32]| gpu.buffer(bytemuck::cast_slice(v), storage);
    let floats = |v: &[f32]| gpu.buffer(bytemuck::cast_slice(v), storage);
    let blocks = ctx.div_ceil(BLOCK);
    let slots = blocks * BLOCK;
    let width = KV_HEADS * DIM;
    let pos = (ctx - 1) as u32;
    // Blocks in reverse order, as a paged cache would hand them out in no particular order.
    let table: Vec<u32> = (0..blocks as u32).rev().collect();
    let slot = table[(ctx - 1) / BLOCK] * BLOCK as u32 + pos % BLOCK as u32;
    let half = DIM / 2;
    let cs: Vec<f32> = (0..half)
        .flat_map(|i| {
            let a = f64::from(pos) * 1e6f64.powf(-((2 * i) as f64) / DIM as f64);
            [a.cos() as f32, a.sin() as f32]
        })
        .collect();
    let gains: Vec<f32> = noise(DIM, 9, 0.5).iter().map(|g| 1.0 + g).collect();
    let buffers = vec![
        floats(&noise((HEADS + 2 * KV_HEADS) * DIM, 1, 2.0)),
        floats(&noise(slots * width, 2, 1.0)),
        floats(&noise(slots * width, 3, 1.0)),
        words(&[pos]),
        words(&[0]),
        words(&table),
        floats(&gains),
        floats(&gains),
        floats(&cs),
        words(&[slot]),
    ];
    let most_splits = ctx.div_ceil(32);
    Case {
        ctx,
        buffers,
        part: gpu.output(HEADS * most_splits * (DIM + 2)),
        out: gpu.output(HEADS * DIM),
    }
}

fn run() -> Res<()> {
    let variants = Variant::with_args(Variant::new("backend", ATTENTION.to_string()))?;
    let gpu = Gpu::open(wgpu::Features::SUBGROUP)?;
    // LAB_COMBINE: another combine shader (a file) for every variant.
    let combine_source = match std::env::var("LAB_COMBINE") {
        Ok(path) => {
            println!("combine: {path}");
            std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?
        }
        Err(_) => COMBINE.to_string(),
    };
    let combine = gpu.pipeline(&Variant::new("combine", combine_source), &[])?;
    let prefetch = match std::env::var("LAB_PREFETCH") {
        Ok(n) => n
            .parse::<usize>()
            .map_err(|_| format!("LAB_PREFETCH={n}: expected a number of workgroups"))?,
        Err(_) => 0,
    };
    // The prefetch's workgroups and bindings are in their own entry point.
    let entry = if prefetch > 0 { "main_pf" } else { "main" };
    let copies = match (prefetch, gpu.cpu) {
        (0, _) => 0,
        (_, true) => 1,
        _ => REPS.0,
    };
    let weights: Vec<Vec<wgpu::Buffer>> = (0..copies)
        .map(|_| PREFETCH_BYTES.iter().map(|b| gpu.output(b / 4)).collect())
        .collect();
    let contexts: &[usize] = if gpu.cpu { &CONTEXTS[..2] } else { &CONTEXTS };
    let reps = if gpu.cpu { (1, 3) } else { REPS };
    println!(
        "µs a dependent attention (+ combine) (median of {RUNS}, over {} of them), {prefetch} \
         prefetching workgroups",
        reps.1 - reps.0
    );
    for &ctx in contexts {
        let c = case(&gpu, ctx);
        let mut reference: Option<Vec<f32>> = None;
        for v in &variants {
            let qkn = v.setting::<u32>("qkn")?.unwrap_or(1);
            let pipeline = match gpu.pipeline_at(v, entry, &[("QKN", f64::from(qkn))]) {
                Ok(pl) => pl,
                Err(e) => {
                    println!("  ctx {ctx:>5} {:<28} does not compile: {e}", v.name);
                    continue;
                }
            };
            let chunk = v.setting("chunk")?.unwrap_or_else(|| backend_chunk(ctx));
            let splits = ctx.div_ceil(chunk);
            let grid: (u32, u32) = match v.setting::<String>("workgroups")? {
                Some(s) => {
                    let (x, y) = s.split_once(',').ok_or("workgroups=X,Y")?;
                    (
                        x.parse().map_err(|_| "workgroups")?,
                        y.parse().map_err(|_| "workgroups")?,
                    )
                }
                None => ((KV_HEADS * (HEADS / KV_HEADS).div_ceil(4)) as u32, 1),
            };
            let slices = prefetch.div_ceil((grid.0 * grid.1) as usize);
            let sectors = |i: usize| {
                if prefetch > 0 {
                    (PREFETCH_BYTES[i] / 32) as u32
                } else {
                    0
                }
            };
            let params: [u32; 14] = [
                1,
                HEADS as u32,
                KV_HEADS as u32,
                DIM as u32,
                BLOCK as u32,
                ctx.div_ceil(BLOCK) as u32,
                (1.0 / (DIM as f32).sqrt()).to_bits(),
                splits as u32,
                chunk as u32,
                1e-6f32.to_bits(),
                sectors(0),
                sectors(1),
                sectors(2),
                sectors(3),
            ];
            let params = gpu.buffer(bytemuck::cast_slice(&params), wgpu::BufferUsages::STORAGE);
            let b = &c.buffers;
            // A bind group a copy of the prefetched weights (one, of stand-ins, without).
            let sink = gpu.output(slices * (grid.0 * grid.1) as usize * 256);
            let binds = (0..copies.max(1))
                .map(|i| {
                    let mut bufs = vec![
                        &params, &b[0], &b[1], &b[2], &b[3], &b[4], &b[5], &c.out, &c.part, &b[6],
                        &b[7], &b[8], &b[9],
                    ];
                    if let Some(w) = weights.get(i) {
                        bufs.extend([&w[0], &w[1], &w[2], &w[3], &sink]);
                    }
                    gpu.bind(&pipeline, &bufs)
                })
                .collect::<Res<Vec<_>>>()?;
            let bind_combine = gpu.bind(&combine, &[&params, &c.part, &c.out])?;
            let record = |pass: &mut wgpu::ComputePass, i: usize| {
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &binds[i % binds.len()], &[]);
                pass.dispatch_workgroups(grid.0, grid.1, (splits + slices) as u32);
                if splits > 1 {
                    pass.set_pipeline(&combine);
                    pass.set_bind_group(0, &bind_combine, &[]);
                    pass.dispatch_workgroups(HEADS as u32, 1, 1);
                }
            };
            let y = gpu.once(&c.out, |pass| record(pass, 0))?;
            let err = match &reference {
                None => {
                    reference = Some(y);
                    0.0
                }
                Some(r) => rel_err(r, &y),
            };
            let us = gpu.per_rep(RUNS, reps, &record)?;
            println!(
                "  ctx {:>5} {:<28} {us:>7.2} µs  ({splits} splits of {chunk})  rel err {err:.1e}{}",
                c.ctx,
                v.name,
                if err > 1e-5 { "  MISMATCH" } else { "" }
            );
        }
    }
    Ok(())
}
