//! `qfuse`: run Qwen3 checkpoints on a chosen backend.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use qfuse_core::Backend;
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::{CudaBackend, CudaOptions};
use qfuse_qwen3::{
    check_numerics, generate_greedy, generate_greedy_inspected, run_bench, write_synthetic,
    BenchSpec, Qwen3, Request, SynthShape, NUMERICS_LIMIT,
};
use serde_json::json;

/// Backends compiled into this build, as `--backend` spells them.
const AVAILABLE_BACKENDS: &[&str] = &["cpu-ref", "cuda"];
/// Backends qfuse knows of that this build may lack.
const KNOWN_BACKENDS: &[&str] = &["cpu-ref", "cuda", "wgpu"];

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
    /// Time batched prefill and decode end to end.
    Bench(BenchArgs),
    /// Write a synthetic checkpoint (random weights with trained-like statistics).
    Synth(SynthArgs),
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
struct BackendArgs {
    /// Compute backend: cpu-ref or cuda.
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
    /// GPU ordinal for device backends.
    #[arg(long, default_value_t = 0)]
    device: usize,
    /// KV-cache element type for the cuda backend: f32 (exact scores) or bf16 (half the memory).
    #[arg(long, value_enum, default_value = "f32")]
    kv_dtype: KvDtype,
    /// Launch every kernel instead of replaying decode steps captured as CUDA graphs.
    #[arg(long)]
    no_graphs: bool,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KvDtype {
    F32,
    Bf16,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json + model.safetensors or sharded safetensors).
    #[arg(long)]
    model: PathBuf,
    #[command(flatten)]
    backend: BackendArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_name = "IDS")]
    prompt_ids: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy (the only mode of this build).
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Report the K largest raw logits (before temperature) of every generated token.
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_logits: usize,
    /// Keep generating past stop ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Check every op's output of every forward pass and stop at the first non-finite or
    /// exploding (|x| > 1e6) activation, naming the layer and op. Slow: a debugging aid.
    #[arg(long)]
    check_numerics: bool,
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

fn with_backend(args: &BackendArgs, job: &impl Job) -> anyhow::Result<()> {
    match args.backend.as_str() {
        "cpu-ref" => job.run(CpuRef::new()),
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
                },
            )
            .context("starting the cuda backend")?;
            let launches = if args.no_graphs {
                "plain launches"
            } else {
                "CUDA graphs"
            };
            eprintln!(
                "cuda: {} (KV cache {kv_dtype}, {launches})",
                b.device_name()
            );
            job.run(b)
        }
        name if KNOWN_BACKENDS.contains(&name) => bail!(
            "backend `{name}` is not compiled into this build; available: {}",
            AVAILABLE_BACKENDS.join(", ")
        ),
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

impl Job for GenerateArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let prompt = parse_ids(&self.prompt_ids)?;
        if self.temperature != 0.0 {
            bail!(
                "--temperature {}: only 0 (greedy decoding) is supported in this build",
                self.temperature
            );
        }
        let model = load(&b, &self.model)?;
        let stop_ids = if self.ignore_eos {
            Vec::new()
        } else {
            model.config().stop_ids(&self.model)?
        };
        let request = Request {
            prompt: prompt.clone(),
            max_new_tokens: self.max_new_tokens,
            stop_ids,
            top_logits: self.top_logits,
        };
        let out = if self.check_numerics {
            let mut check = check_numerics(&b, NUMERICS_LIMIT);
            let out = generate_greedy_inspected(&model, &b, &[request], Some(&mut check))?;
            eprintln!(
                "check-numerics: every op's output finite and within |x| <= {NUMERICS_LIMIT:.0e}"
            );
            out
        } else {
            generate_greedy(&model, &b, &[request])?
        }
        .remove(0);
        match self.format {
            Format::Json => {
                let steps: Vec<_> = out
                    .steps
                    .iter()
                    .map(|s| json!({"top_ids": s.top_ids, "top_logits": s.top_logits}))
                    .collect();
                let doc = json!({
                    "backend": B::NAME,
                    "prompt_ids": prompt,
                    "new_ids": out.new_ids,
                    "finish_reason": out.finish_reason.as_str(),
                    "steps": steps,
                });
                println!("{doc}");
            }
            Format::Text => {
                let ids: Vec<String> = out.new_ids.iter().map(u32::to_string).collect();
                println!("{}", ids.join(","));
                for (i, s) in out.steps.iter().enumerate() {
                    let pairs: Vec<String> = s
                        .top_ids
                        .iter()
                        .zip(&s.top_logits)
                        .map(|(id, l)| format!("{id}:{l:.6}"))
                        .collect();
                    println!("step {i}: {}", pairs.join(" "));
                }
                eprintln!("finish_reason: {}", out.finish_reason.as_str());
            }
        }
        Ok(())
    }
}

impl Job for BenchArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        if self.batch == 0 || self.prompt_len == 0 || self.new_tokens == 0 {
            bail!("--batch, --prompt-len and --new-tokens must be positive");
        }
        let model = load(&b, &self.model)?;
        let spec = BenchSpec {
            batch: self.batch,
            prompt_len: self.prompt_len,
            new_tokens: self.new_tokens,
            seed: 7,
        };
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
            Format::Json => println!(
                "{}",
                json!({
                    "backend": B::NAME, "batch": r.batch, "prompt_len": r.prompt_len, "new_tokens": r.steps,
                    "prefill_s": r.prefill_s, "prefill_tok_s": r.prefill_tok_s(), "decode_s": r.decode_s,
                    "decode_tok_s": r.decode_tok_s(), "ms_per_step": r.ms_per_step(),
                    "weight_bytes": r.weight_bytes, "weight_gb_s": r.weight_gb_s(), "percent_of_peak": share,
                })
            ),
            Format::Text => {
                println!(
                    "{}: batch {} prompt {} new {} | prefill {:.1} ms ({:.0} tok/s) | decode {:.3} ms/step, {:.1} tok/s, weights {:.1} GB/s{}",
                    B::NAME,
                    r.batch,
                    r.prompt_len,
                    r.steps,
                    1e3 * r.prefill_s,
                    r.prefill_tok_s(),
                    r.ms_per_step(),
                    r.decode_tok_s(),
                    r.weight_gb_s(),
                    share.map(|s| format!(" ({s:.0}% of {:.0} GB/s)", self.peak_gbs.unwrap_or(0.0))).unwrap_or_default()
                );
            }
        }
        Ok(())
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => with_backend(&args.backend, &args),
        Command::Bench(args) => with_backend(&args.backend, &args),
        Command::Synth(args) => {
            let shape = SynthShape::from_name(&args.shape)?;
            write_synthetic(&args.out, shape, args.seed)
                .with_context(|| format!("writing {}", args.out.display()))?;
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
