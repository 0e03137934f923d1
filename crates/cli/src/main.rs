//! `qfuse`: run Qwen3 checkpoints on a chosen backend.
mod report;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use qfuse_core::Backend;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};
use qfuse_qwen3::{
    check_against, profile, run_bench, write_synthetic, BenchSpec, CheckReport, Qwen3, Request,
    StageDiff, Stats, SynthShape,
};
use serde_json::json;

/// `println!` that ends the program quietly when stdout is a closed pipe (`qfuse … | head`)
/// instead of panicking, and returns other write errors.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
            return Err(e.into());
        }
    }};
}

mod textgen;
use textgen::{ChatArgs, GenerateArgs};

/// Backends compiled into this build, as `--backend` spells them.
const AVAILABLE_BACKENDS: &[&str] = &["cpu-ref", "cuda", "wgpu"];

#[derive(Parser)]
#[command(
    name = "qfuse",
    version,
    about = "Run Qwen3 models on interchangeable compute backends"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt of token ids greedily and print the new ids (or JSON).
    Generate(GenerateArgs),
    /// Chat with a model: streaming answers, history, /reset, /think on|off, /system, /stats.
    Chat(ChatArgs),
    /// Time batched prefill and decode end to end.
    Bench(BenchArgs),
    /// Write a synthetic checkpoint (random weights with trained-like statistics).
    Synth(SynthArgs),
    /// Compare a backend with a reference op by op and layer by layer; exit 1 if it fails.
    Check(CheckArgs),
    /// Where decode time goes, and what each fused kernel buys: isolated vs end to end (Amdahl).
    Profile(ProfileArgs),
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps profiled.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Repetitions of each isolated fused-op timing.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also draw the breakdown and predicted-vs-measured speedups as an SVG chart.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
    /// The reference backend.
    #[arg(long, default_value = "cpu-ref")]
    against: String,
    /// Prompt token ids, comma-separated (default: --prompt-len random ids).
    #[arg(long, value_name = "IDS")]
    prompt_ids: Option<String>,
    /// Random prompt length when no ids are given.
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Relative error allowed per op and for the logits (default: 1e-9 for cpu-ref, else 2e-2).
    #[arg(long)]
    tolerance: Option<f64>,
    /// Plant an error in the backend under test: OP:CALL:DELTA scales the output of the CALL-th
    /// (0-based) call of backend op OP by 1 + DELTA (e.g. matmul:5:1e-3), to see the check find it.
    #[arg(long, value_name = "OP:CALL:DELTA")]
    perturb: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Compute backend: cpu-ref, cuda or wgpu.
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
    /// GPU ordinal for device backends.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// KV-cache element type for the cuda backend: f32 (exact scores) or bf16 (half the memory
    /// and faster batched decode, but keys rounded to bf16 move large attention scores: on the
    /// synthetic 0.6B its logits are 3e-1 from the reference, against 4e-3 with f32).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: KvDtype,
    /// Launch every kernel instead of replaying decode steps captured as CUDA graphs.
    #[arg(long)]
    no_graphs: bool,
    /// Launch each CUDA kernel only after the previous one has drained, instead of as a
    /// programmatic dependent launch that overlaps its weight loads with the previous kernel.
    #[arg(long)]
    no_pdl: bool,
    /// Run prompt attention in the split-K CUDA kernel instead of the flash kernel (or GEMMs).
    #[arg(long)]
    no_attention_gemm: bool,
    /// Run these fused ops as their unfused compositions: OP[,OP…] or `all`
    /// (rms_norm_matmul, qk_norm_rope_write_kv, qk_norm_rope_attention, matmul_add, matmul_silu_mul, rms_norm_matmul_silu_mul).
    #[arg(long, value_name = "OPS")]
    unfused: Option<String>,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KvDtype {
    F32,
    Bf16,
}

#[derive(clap::Args)]
struct BenchArgs {
    /// Checkpoint directory.
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
    /// Prompt tokens per sequence (random ids).
    #[arg(long, default_value_t = 32)]
    prompt_len: usize,
    /// Decode steps timed.
    #[arg(long, default_value_t = 256)]
    new_tokens: usize,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// The card's measured copy bandwidth in GB/s (read + write), to report decode as a share of it.
    #[arg(long)]
    peak_gbs: Option<f64>,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
}

#[derive(clap::Args)]
struct SynthArgs {
    /// Model shape: tiny, qwen3-0.6b, qwen3-1.7b, qwen3-4b or qwen3-8b.
    #[arg(long)]
    shape: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// A command that runs on whichever backend the flag picks.
trait Job {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()>;
}

/// Runs `job` on `b`, or on `b` with the fused ops `--unfused` names decomposed.
fn run_maybe_unfused<B: Backend>(args: &BackendArgs, job: &impl Job, b: B) -> anyhow::Result<()> {
    match &args.unfused {
        Some(list) => {
            let ops = qfuse_core::FusedOp::parse_list(list)?;
            let names: Vec<&str> = ops.iter().map(|op| op.name()).collect();
            eprintln!("{}: running unfused: {}", B::NAME, names.join(", "));
            job.run(qfuse_core::Unfused::new(b, ops))
        }
        None => job.run(b),
    }
}

fn with_backend(args: &BackendArgs, job: &impl Job) -> anyhow::Result<()> {
    match args.backend.as_str() {
        "cpu-ref" => run_maybe_unfused(args, job, CpuRef::new()),
        "cuda" => {
            let kv_dtype = match args.kv_dtype {
                KvDtype::F32 => qfuse_core::DType::F32,
                KvDtype::Bf16 => qfuse_core::DType::BF16,
            };
            let b = CudaBackend::with_options(
                args.device,
                CudaOptions {
                    kv_dtype,
                    graphs: !args.no_graphs,
                    pdl: !args.no_pdl,
                    attention_gemm_min_rows: if args.no_attention_gemm {
                        usize::MAX
                    } else {
                        qfuse_cuda::ATTENTION_GEMM_MIN_ROWS
                    },
                    ..CudaOptions::default()
                },
            )
            .context("starting the cuda backend")?;
            let launches = if args.no_graphs {
                "plain launches"
            } else {
                "CUDA graphs"
            };
            let pdl = if b.uses_pdl() {
                ", programmatic dependent launch"
            } else {
                ""
            };
            eprintln!(
                "cuda: {} (KV cache {kv_dtype}, {launches}{pdl})",
                b.device_name()
            );
            let report = b.clone();
            run_maybe_unfused(args, job, b)?;
            if let Some(trace) = report.layer_trace_report() {
                eprintln!("{trace}");
            }
            if let Some(trace) = report.gemm_x3_trace_report() {
                eprintln!("{trace}");
            }
            if let Some(trace) = report.kernel_trace() {
                eprintln!("{}", trace.report());
                // Every stamp, for offline analysis.
                if let Ok(path) = std::env::var("QFUSE_CUDA_TRACE_FILE") {
                    std::fs::write(&path, trace.lines())
                        .with_context(|| format!("writing {path}"))?;
                }
            }
            Ok(())
        }
        "wgpu" => {
            let b =
                qfuse_wgpu::WgpuBackend::new(args.device).context("starting the wgpu backend")?;
            let prefetch = match b.prefetch_workgroups() {
                0 => String::new(),
                n => format!(
                    "; decode attention reads the next products' weights into L2 ({n} workgroups)"
                ),
            };
            eprintln!(
                "wgpu: {} (bf16 checkpoint weights packed exactly; activations, KV cache and accumulation f32{prefetch})",
                b.adapter_name()
            );
            let report = b.clone();
            run_maybe_unfused(args, job, b)?;
            if let Some(times) = report.timing_report() {
                eprintln!("{times}");
            }
            Ok(())
        }
        name => bail!(
            "unknown backend `{name}`; available: {}",
            AVAILABLE_BACKENDS.join(", ")
        ),
    }
}

fn parse_ids(s: &str) -> anyhow::Result<Vec<u32>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| {
            t.parse::<u32>()
                .with_context(|| format!("--prompt-ids: `{t}` is not a token id"))
        })
        .collect()
}

fn load<B: Backend>(b: &B, dir: &std::path::Path) -> anyhow::Result<Qwen3<B>> {
    Qwen3::load(b, dir).with_context(|| format!("loading {}", dir.display()))
}

/// The random-prompt workload of `bench` and `profile`.
fn workload_spec(batch: usize, prompt_len: usize, new_tokens: usize) -> anyhow::Result<BenchSpec> {
    if batch == 0 || prompt_len == 0 || new_tokens == 0 {
        bail!("--batch, --prompt-len and --new-tokens must be positive");
    }
    Ok(BenchSpec {
        batch,
        prompt_len,
        new_tokens,
        seed: 7,
    })
}

impl Job for BenchArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let spec = workload_spec(self.batch, self.prompt_len, self.new_tokens)?;
        let model = load(&b, &self.model)?;
        // Warm-up: kernel first-launch costs and allocator growth stay out of the figures.
        run_bench(
            &model,
            &b,
            &BenchSpec {
                new_tokens: 4.min(self.new_tokens),
                ..spec
            },
        )?;
        let r = run_bench(&model, &b, &spec)?;
        let share = self.peak_gbs.map(|p| 100.0 * r.weight_gb_s() / p);
        match self.format {
            Format::Json => out!(
                "{}",
                json!({
                    "backend": B::NAME, "batch": r.batch, "prompt_len": r.prompt_len, "new_tokens": r.steps,
                    "prefill_s": r.prefill_s, "prefill_tok_s": r.prefill_tok_s(), "decode_s": r.decode_s,
                    "decode_tok_s": r.decode_tok_s(), "ms_per_step": r.ms_per_step(),
                    "weight_bytes": r.weight_bytes, "weight_gb_s": r.weight_gb_s(), "percent_of_peak": share,
                    "steps_queued_ahead": r.steps_ahead,
                })
            ),
            Format::Text => {
                out!(
                    "{}: batch {} prompt {} new {} | prefill {:.1} ms ({:.0} tok/s) | decode {:.3} ms/step, {:.1} tok/s, weights {:.1} GB/s{} | {} steps queued ahead",
                    B::NAME,
                    r.batch,
                    r.prompt_len,
                    r.steps,
                    1e3 * r.prefill_s,
                    r.prefill_tok_s(),
                    r.ms_per_step(),
                    r.decode_tok_s(),
                    r.weight_gb_s(),
                    share.map(|s| format!(" ({s:.0}% of {:.0} GB/s)", self.peak_gbs.unwrap_or(0.0))).unwrap_or_default(),
                    r.steps_ahead
                );
            }
        }
        Ok(())
    }
}

/// The ops `--perturb` can name (Backend methods that fused ops are composed of).
const PERTURBABLE: &[&str] = &[
    "gather_rows",
    "rms_norm",
    "matmul",
    "add",
    "silu_mul",
    "slice_columns",
    "rope",
    "attention",
];

fn parse_perturb(s: &str) -> anyhow::Result<(&'static str, usize, f64)> {
    let parts: Vec<&str> = s.split(':').collect();
    let [op, call, delta] = parts[..] else {
        bail!("--perturb {s}: expected OP:CALL:DELTA, e.g. matmul:5:1e-3");
    };
    let op = PERTURBABLE.iter().find(|&&o| o == op).with_context(|| {
        format!(
            "--perturb: unknown op `{op}`; one of {}",
            PERTURBABLE.join(", ")
        )
    })?;
    let call = call
        .parse()
        .with_context(|| format!("--perturb: `{call}` is not a call index"))?;
    let delta = delta
        .parse()
        .with_context(|| format!("--perturb: `{delta}` is not a number"))?;
    Ok((op, call, delta))
}

/// `qfuse check` once the backend under test exists: picks the reference next.
struct CheckWith<'a, B: Backend> {
    args: &'a CheckArgs,
    b: B,
}

impl Job for CheckArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let against = BackendArgs {
            backend: self.against.clone(),
            device: self.backend.device,
            kv_dtype: KvDtype::F32,
            no_graphs: true,
            no_pdl: false,
            no_attention_gemm: false,
            unfused: None,
        };
        match &self.perturb {
            Some(p) => {
                let (op, call, delta) = parse_perturb(p)?;
                with_backend(
                    &against,
                    &CheckWith {
                        args: self,
                        b: qfuse_core::Perturbed::new(b, op, call, delta),
                    },
                )
            }
            None => with_backend(&against, &CheckWith { args: self, b }),
        }
    }
}

impl<B: Backend> Job for CheckWith<'_, B> {
    fn run<R: Backend>(&self, r: R) -> anyhow::Result<()> {
        let a = self.args;
        let (model, reference) = (load(&self.b, &a.model)?, load(&r, &a.model)?);
        let vocab = model.config().vocab_size;
        let tokens = match &a.prompt_ids {
            Some(ids) => parse_ids(ids)?,
            None => {
                let mut rng = qfuse_core::Rng::new(1);
                (0..a.prompt_len).map(|_| rng.below(vocab) as u32).collect()
            }
        };
        qfuse_qwen3::validate(&model, &Request::greedy(tokens.clone(), 0))?;
        let tolerance = a.tolerance.unwrap_or(if a.backend.backend == "cpu-ref" {
            1e-9
        } else {
            2e-2
        });
        let report = check_against(&self.b, &model, &r, &reference, &tokens, tolerance)?;
        match a.format {
            Format::Json => out!("{}", check_json(B::NAME, R::NAME, &tokens, &report)),
            Format::Text => print_check(B::NAME, R::NAME, &tokens, &report)?,
        }
        if !report.passed() {
            bail!(
                "check failed: {} vs {}: logits relative error {:.3e} (tolerance {:.1e}), top-1 agreement {:.4}{}",
                B::NAME,
                R::NAME,
                report.logits.rel,
                tolerance,
                report.logits.top1_agreement,
                report.first_divergence.map(|i| format!(", first divergence at {}", stage_label(&report.stages[i]))).unwrap_or_default()
            );
        }
        Ok(())
    }
}

fn stage_label(s: &StageDiff) -> String {
    format!("layer {} {}", s.layer, s.stage.name())
}

fn stats_json(s: &Stats) -> serde_json::Value {
    let num = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else {
            serde_json::Value::Null
        }
    };
    json!({"min": num(s.min), "max": num(s.max), "rms": num(s.rms), "non_finite": s.non_finite})
}

fn check_json(backend: &str, against: &str, tokens: &[u32], r: &CheckReport) -> serde_json::Value {
    let num = |x: f64| {
        if x.is_finite() {
            json!(x)
        } else {
            serde_json::Value::Null
        }
    };
    let stages: Vec<_> = r
        .stages
        .iter()
        .map(|s| {
            json!({"layer": s.layer, "op": s.stage.name(), "rel_error": num(s.rel_error), "max_abs_error": num(s.max_abs_error),
                   "within_tolerance": s.rel_error <= r.tolerance, "ours": stats_json(&s.ours), "reference": stats_json(&s.reference)})
        })
        .collect();
    let first = r
        .first_divergence
        .map(|i| json!({"index": i, "layer": r.stages[i].layer, "op": r.stages[i].stage.name()}));
    json!({
        "backend": backend, "against": against, "tokens": tokens.len(), "tolerance": r.tolerance,
        "stages": stages, "first_divergence": first,
        "logits": {"rel_error": num(r.logits.rel), "worst_row_rel_error": num(r.logits.worst_rel), "top1_agreement": r.logits.top1_agreement},
        "passed": r.passed(),
    })
}

fn print_check(
    backend: &str,
    against: &str,
    tokens: &[u32],
    r: &CheckReport,
) -> anyhow::Result<()> {
    out!(
        "{backend} vs {against}: {} tokens teacher-forced, tolerance {:.1e}",
        tokens.len(),
        r.tolerance
    );
    out!(
        "{:>5}  {:<38} {:>10} {:>10}  {:>32}  {:>32}  {:>6}",
        "layer",
        "op",
        "rel err",
        "max abs",
        "ours min / max / rms",
        "reference min / max / rms",
        "nonfin"
    );
    let stats = |s: &Stats| format!("{:>10.3e} {:>10.3e} {:>10.3e}", s.min, s.max, s.rms);
    for (i, s) in r.stages.iter().enumerate() {
        let mark = match r.first_divergence {
            Some(f) if f == i => "  <-- first divergence",
            _ if s.rel_error > r.tolerance => "  !",
            _ => "",
        };
        out!(
            "{:>5}  {:<38} {:>10.3e} {:>10.3e}  {}  {}  {:>6}{mark}",
            s.layer,
            s.stage.name(),
            s.rel_error,
            s.max_abs_error,
            stats(&s.ours),
            stats(&s.reference),
            s.ours.non_finite
        );
    }
    out!(
        "verdict: {} — logits relative error {:.3e} (worst row {:.3e}), top-1 agreement {:.4}",
        if r.passed() { "PASS" } else { "FAIL" },
        r.logits.rel,
        r.logits.worst_rel,
        r.logits.top1_agreement
    );
    Ok(())
}

impl Job for ProfileArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let spec = workload_spec(self.batch, self.prompt_len, self.new_tokens)?;
        if self.reps == 0 {
            bail!("--reps must be positive");
        }
        let model = load(&b, &self.model)?;
        qfuse_qwen3::validate(
            &model,
            &Request::greedy(vec![0; spec.prompt_len], spec.new_tokens),
        )?;
        let report = profile(&model, &b, &spec, self.reps)?;
        if let Some(path) = &self.svg {
            std::fs::write(path, report::profile_svg(B::NAME, &report))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if self.json {
            out!("{}", report::profile_json(B::NAME, &report));
        } else {
            out!("{}", report::profile_text(B::NAME, &report));
        }
        Ok(())
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Profile(args) => with_backend(&args.backend, &args),
        Command::Chat(args) => with_backend(&args.backend, &args),
        Command::Check(args) => with_backend(&args.backend, &args),
        Command::Generate(args) => with_backend(&args.backend, &args),
        Command::Bench(args) => with_backend(&args.backend, &args),
        Command::Synth(args) => {
            let shape = SynthShape::from_name(&args.shape)?;
            write_synthetic(&args.out, shape, args.seed)
                .with_context(|| format!("writing {}", args.out.display()))?;
            textgen::write_tokenizer(&args.out)?;
            eprintln!(
                "wrote a synthetic {} checkpoint (random weights, not a trained model) to {}",
                args.shape,
                args.out.display()
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
