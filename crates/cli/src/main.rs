//! `qfuse`: run Qwen3 checkpoints on a chosen backend.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use qfuse_core::Backend;
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{generate_greedy, Qwen3, Request};
use serde_json::json;

/// Backends compiled into this build, as `--backend` spells them.
const AVAILABLE_BACKENDS: &[&str] = &["cpu-ref"];
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
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Format {
    Text,
    Json,
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Checkpoint directory (config.json + model.safetensors or sharded safetensors).
    #[arg(long)]
    model: PathBuf,
    /// Compute backend.
    #[arg(long, default_value = "cpu-ref")]
    backend: String,
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

fn generate<B: Backend>(b: B, args: &GenerateArgs) -> anyhow::Result<()> {
    let prompt = parse_ids(&args.prompt_ids)?;
    if !(args.temperature == 0.0) {
        bail!(
            "--temperature {}: only 0 (greedy decoding) is supported in this build",
            args.temperature
        );
    }
    let model = Qwen3::load(&b, &args.model)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let stop_ids = if args.ignore_eos {
        Vec::new()
    } else {
        model.config().stop_ids(&args.model)?
    };
    let request = Request {
        prompt: prompt.clone(),
        max_new_tokens: args.max_new_tokens,
        stop_ids,
        top_logits: args.top_logits,
    };
    let out = generate_greedy(&model, &b, &[request])?.remove(0);
    match args.format {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(args) => match args.backend.as_str() {
            "cpu-ref" => generate(CpuRef::new(), &args),
            name if KNOWN_BACKENDS.contains(&name) => bail!(
                "backend `{name}` is not compiled into this build; available: {}",
                AVAILABLE_BACKENDS.join(", ")
            ),
            name => bail!(
                "unknown backend `{name}`; available: {}",
                AVAILABLE_BACKENDS.join(", ")
            ),
        },
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
