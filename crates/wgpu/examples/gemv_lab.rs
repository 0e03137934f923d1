//! The batch-1 decode products as they run in a decode step, each dispatch waiting for the one
//! before, timed by device timestamps: the backend's subgroup GEMV build (`matmul_bf16_vec.wgsl`
//! followed by `matmul_bf16_sg.wgsl`) against variants of it read from WGSL files at run time,
//! so one GPU call compares several shader designs without a Rust toolchain there.
//!
//! A variant is a whole shader with the vectorised builds' bindings, params and fusion
//! constants (`NORM`, `EPI`); a line `// lab: columns=N` says how many output columns one
//! workgroup covers (default 2), and one declaring `override P_K` also gets the shape as
//! constants (`P_T`, `P_K`, `P_ROWS`, `P_STRIDE`, `P_OFF`). Each product runs over 28 copies of
//! its weights (one a layer, so every call reads DRAM, not L2), every dispatch writing the same
//! output, so wgpu puts a barrier before each, as in a step. A figure is (T(280) − T(28)) / 252
//! dispatches, median of seven runs; "apart" is the same with an output per dispatch (no
//! barriers: the streaming rate). Every variant's output is checked against the backend build's.
//!
//! With `LAB_LM_HEAD=1` it times the final norm + lm_head instead (151,936 rows of 1,024; 16,384
//! on a CPU driver, whose bindings hold 128 MiB) over two copies of its weights, against the
//! backend's `_wide` build, which serves it.
//!
//! With `LAB_COPIES=N` the products run over N copies of their weights instead: `LAB_COPIES=1`
//! keeps them in L2, the bound on what a dependent product gains from weights prefetched there.
//!
//! `gemv_lab/generate.py` writes the variants `PROBE=gemv_lab` and `PROBE=lm_head_lab` run.
//!
//! Run: `cargo run --release -p qfuse-wgpu --example gemv_lab -- [variant.wgsl ...]`.
use std::process::ExitCode;

mod common;
use common::{noise, rel_err, Gpu, Res, Variant};

const VEC: &str = include_str!("../../../kernels/wgsl/matmul_bf16_vec.wgsl");
const SG_SUMS: &str = include_str!("../../../kernels/wgsl/matmul_bf16_sg_sums.wgsl");
const SG: &str = include_str!("../../../kernels/wgsl/matmul_bf16_sg.wgsl");
const WIDE: &str = include_str!("../../../kernels/wgsl/matmul_bf16_wide.wgsl");

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

fn main() -> ExitCode {
    common::exit("gemv_lab", run())
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
    let lm_head = std::env::var("LAB_LM_HEAD").as_deref() == Ok("1");
    let base = if lm_head {
        Variant::new("backend wide", format!("// lab: columns=16\n{VEC}{WIDE}"))
    } else {
        Variant::new("backend sg", format!("{VEC}{SG_SUMS}{SG}"))
    };
    let variants = Variant::with_args(base)?;
    let gpu = Gpu::open(wgpu::Features::SUBGROUP)?;
    // On a CPU driver one layer's copy is enough to check the variants; the lm_head's weights
    // exceed the L2 cache by themselves.
    let layers = match (gpu.cpu, lm_head) {
        (true, _) => 1,
        (false, true) => 2,
        (false, false) => LAYERS,
    };
    let copies = match std::env::var("LAB_COPIES") {
        Ok(n) => match n.parse::<usize>() {
            Ok(n) if n >= 1 => n.min(layers),
            _ => return Err(format!("LAB_COPIES={n}: expected a whole number from 1")),
        },
        Err(_) => layers,
    };
    let lm_rows = if gpu.cpu { 16_384 } else { 151_936 };
    let products: &[(&str, bool, u32, usize, usize)] = if lm_head {
        &[("norm + lm_head", true, 0, 1024, lm_rows)]
    } else {
        &PRODUCTS
    };
    let reps = (layers, layers * LONG);
    println!(
        "µs a dependent dispatch (median of {RUNS}, over {} dispatches, {copies} copies of the \
         weights), and apart (no barriers)",
        reps.1 - reps.0
    );
    for &(name, norm, epi, k, n) in products {
        let p = product(&gpu, epi, k, n, copies, layers * LONG);
        let mut reference: Option<Vec<f32>> = None;
        for v in &variants {
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
            let pipeline = match gpu.pipeline(v, &constants) {
                Ok(pl) => pl,
                Err(e) => {
                    println!("  {name:<22} {:<28} does not compile: {e}", v.name);
                    continue;
                }
            };
            let groups = p.out_len.div_ceil(v.setting("columns")?.unwrap_or(2)) as u32;
            let bind = |layer: usize, out: usize| {
                gpu.bind(
                    &pipeline,
                    &[&p.params, &p.x, &p.weights[layer], &p.outs[out], &p.aux],
                )
            };
            let first = bind(0, 0)?;
            let y = gpu.once(&p.outs[0], |pass| {
                pass.set_pipeline(&pipeline);
                pass.set_bind_group(0, &first, &[]);
                pass.dispatch_workgroups(groups, 1, 1);
            })?;
            let err = match &reference {
                None => {
                    reference = Some(y);
                    0.0
                }
                Some(r) => rel_err(r, &y),
            };
            let mut times = [0.0; 2];
            for (shared, time) in [true, false].into_iter().zip(&mut times) {
                let binds = (0..reps.1)
                    .map(|i| bind(i % copies, if shared { 0 } else { i }))
                    .collect::<Res<Vec<_>>>()?;
                *time = gpu.per_rep(RUNS, reps, &|pass, i| {
                    pass.set_pipeline(&pipeline);
                    pass.set_bind_group(0, &binds[i], &[]);
                    pass.dispatch_workgroups(groups, 1, 1);
                })?;
            }
            println!(
                "  {name:<22} {:<28} {:>7.2} µs  apart {:>6.2} µs  rel err {err:.1e}{}",
                v.name,
                times[0],
                times[1],
                if err > 1e-5 { "  MISMATCH" } else { "" }
            );
        }
    }
    Ok(())
}

fn product(gpu: &Gpu, epi: u32, k: usize, n: usize, copies: usize, outs: usize) -> Product {
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
    let weights = (0..copies)
        .map(|l| {
            let bf16: Vec<u16> = noise(n * k, l as u64 + 7, 0.05)
                .iter()
                .map(|v| (v.to_bits() >> 16) as u16)
                .collect();
            gpu.buffer(bytemuck::cast_slice(&bf16), storage)
        })
        .collect();
    // A norm's gains around 1 (NORM), else a residual.
    let aux = if epi == 1 {
        noise(out_len, 5, 1.0)
    } else {
        noise(k, 3, 1.0).iter().map(|g| 1.0 + g).collect()
    };
    Product {
        params: gpu.buffer(
            bytemuck::cast_slice(&params),
            storage | wgpu::BufferUsages::UNIFORM,
        ),
        x: gpu.buffer(bytemuck::cast_slice(&noise(k, 1, 2.0)), storage),
        weights,
        aux: gpu.buffer(bytemuck::cast_slice(&aux), storage),
        outs: (0..outs).map(|_| gpu.output(out_len)).collect(),
        out_len,
        k,
    }
}
