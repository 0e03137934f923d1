//! `qfuse generate` and `qfuse chat`: models from a directory or the built-in default, text in
//! through the tokenizer and chat template, streamed text out, sampling settings.
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context};
use qfuse_core::Backend;
use qfuse_qwen3::{
    check_numerics, generate_with, synthetic_checkpoint, Message, Qwen3, Request, SamplingParams,
    StreamDecoder, SynthShape, Tokenizer, NUMERICS_LIMIT,
};
use serde_json::json;

use crate::{parse_ids, BackendArgs, Format, Job};

/// The shipped Qwen3 tokenizer, for the built-in model and for `synth`.
pub const TOKENIZER_JSON: &[u8] = include_bytes!("../../../assets/qwen3-tokenizer/tokenizer.json");
/// The shipped Qwen3 tokenizer's config (with the chat template).
pub const TOKENIZER_CONFIG: &str =
    include_str!("../../../assets/qwen3-tokenizer/tokenizer_config.json");

#[derive(clap::Args)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 is greedy. Default: the checkpoint's generation_config.json, else
    /// Qwen3's recommended 0.6.
    #[arg(long, allow_negative_numbers = true)]
    temperature: Option<f64>,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities reach P.
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f64>,
    /// Drop tokens less likely than P times the most likely one.
    #[arg(long, allow_negative_numbers = true)]
    min_p: Option<f64>,
    /// Penalise tokens already present (HF-style: logits divided / multiplied by it).
    #[arg(long, allow_negative_numbers = true)]
    repetition_penalty: Option<f64>,
    /// Subtract from the logits of tokens already present.
    #[arg(long, allow_negative_numbers = true)]
    presence_penalty: Option<f64>,
    /// Seed of the sampling stream: the same seed gives the same text on the same backend.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

impl SamplingArgs {
    fn resolve(&self, defaults: SamplingParams) -> anyhow::Result<SamplingParams> {
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_k: self.top_k.or(defaults.top_k),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            min_p: self.min_p.unwrap_or(defaults.min_p),
            repetition_penalty: self
                .repetition_penalty
                .unwrap_or(defaults.repetition_penalty),
            presence_penalty: self.presence_penalty.unwrap_or(defaults.presence_penalty),
            seed: self.seed,
        };
        if self.top_k == Some(0) {
            bail!("--top-k 0 is invalid: must be at least 1");
        }
        p.validate()?;
        Ok(p)
    }
}

#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum OnOff {
    On,
    Off,
}

/// A model ready to talk: weights on the backend, tokenizer, stop ids and default sampling.
pub struct Loaded<B: Backend> {
    pub model: Qwen3<B>,
    pub tokenizer: Option<Tokenizer>,
    pub stop_ids: Vec<u32>,
    pub sampling: SamplingParams,
}

/// Loads `--model` (a checkpoint directory), or the built-in tiny random model when absent.
pub fn load_model<B: Backend>(b: &B, model: Option<&str>) -> anyhow::Result<Loaded<B>> {
    let Some(name) = model else {
        eprintln!(
            "qfuse: no --model given: using the built-in tiny Qwen3 with random weights (its text is gibberish) and the real Qwen3 tokenizer; pass --model DIR for a real checkpoint"
        );
        let (cfg, ckpt) = synthetic_checkpoint(SynthShape::Tiny, 0)?;
        // <|im_end|> from the config, and <|endoftext|>, as the synthetic generation_config.json has.
        let mut stop_ids = cfg.eos_token_ids.clone();
        stop_ids.push(151_643);
        return Ok(Loaded {
            model: Qwen3::from_checkpoint(b, cfg, &ckpt)?,
            tokenizer: Some(Tokenizer::from_bytes(
                TOKENIZER_JSON,
                Some(TOKENIZER_CONFIG),
            )?),
            stop_ids,
            sampling: SamplingParams::recommended(None)?,
        });
    };
    let mut dir = PathBuf::from(name);
    if !dir.exists() && looks_like_repo_id(name) {
        dir = download(name).with_context(|| {
            format!("`{name}` is not a local directory and could not be downloaded from the Hugging Face Hub (offline?); pass a local checkpoint directory with --model DIR")
        })?;
    }
    // Progress for people watching a large checkpoint load; scripts see only results and errors.
    let show = std::io::stderr().is_terminal();
    let started = Instant::now();
    if show {
        eprintln!("loading {} on {} ...", dir.display(), B::NAME);
    }
    let model = Qwen3::load(b, &dir).with_context(|| format!("loading {}", dir.display()))?;
    if show {
        eprintln!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    }
    let tokenizer = if dir.join("tokenizer.json").exists() {
        Some(Tokenizer::from_dir(&dir)?)
    } else {
        None
    };
    Ok(Loaded {
        stop_ids: model.config().stop_ids(&dir)?,
        sampling: SamplingParams::recommended(Some(&dir))?,
        model,
        tokenizer,
    })
}

/// Fetches a Hub repository's checkpoint into the usual Hugging Face cache (`HF_HOME`), or finds
/// it there, and returns the snapshot directory.
fn download(repo: &str) -> anyhow::Result<PathBuf> {
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(std::io::stderr().is_terminal())
        .build()?;
    let repo = api.model(repo.to_string());
    let config = repo.get("config.json")?;
    for optional in [
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut shards: Vec<&str> = v["weight_map"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, f)| f.as_str())
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for shard in shards {
                repo.get(shard)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")?;
        }
    }
    config
        .parent()
        .map(Path::to_path_buf)
        .context("the cache path has no parent")
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// Checkpoint directory (config.json + safetensors [+ tokenizer.json]); default: the built-in
    /// tiny random model.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Prompt token ids, comma-separated.
    #[arg(long, value_name = "IDS", conflicts_with = "prompt")]
    prompt_ids: Option<String>,
    /// Prompt text (tokenized with the checkpoint's tokenizer).
    #[arg(long)]
    prompt: Option<String>,
    /// Wrap --prompt in the chat template as one user turn.
    #[arg(long, requires = "prompt")]
    chat: bool,
    /// With --chat: Qwen3's thinking mode (off adds the template's empty think block).
    #[arg(long, value_enum, default_value = "on")]
    think: OnOff,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Report the K largest raw logits (before temperature) of every generated token.
    #[arg(long, value_name = "K", default_value_t = 0)]
    top_logits: usize,
    /// Keep generating past stop ids.
    #[arg(long)]
    ignore_eos: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// Time to first token and tokens per second on stderr.
    #[arg(long)]
    stats: bool,
    /// Check every op's output of every forward pass and stop at the first non-finite or
    /// exploding (|x| > 1e6) activation, naming the layer and op. Slow: a debugging aid.
    #[arg(long)]
    check_numerics: bool,
}

/// Wall-clock figures of one generation.
struct Stats {
    started: Instant,
    first: Option<Instant>,
    last: Option<Instant>,
    tokens: usize,
}

impl Stats {
    fn new() -> Self {
        Stats {
            started: Instant::now(),
            first: None,
            last: None,
            tokens: 0,
        }
    }
    fn token(&mut self) {
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.tokens += 1;
    }
    fn line(&self) -> String {
        let ttft = self.first.map_or(0.0, |f| (f - self.started).as_secs_f64());
        let rate = match (self.first, self.last) {
            (Some(f), Some(l)) if self.tokens > 1 && l > f => {
                (self.tokens - 1) as f64 / (l - f).as_secs_f64()
            }
            _ => 0.0,
        };
        format!(
            "{} tokens, time to first token {:.1} ms, {:.1} tok/s after it",
            self.tokens,
            1e3 * ttft,
            rate
        )
    }
}

/// Writes streamed text to stdout at once (a closed pipe ends the program quietly).
fn emit(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        return Err(e.into());
    }
    Ok(())
}

fn require_tokenizer<'a>(t: &'a Option<Tokenizer>, what: &str) -> anyhow::Result<&'a Tokenizer> {
    t.as_ref().with_context(|| {
        format!("{what} needs the checkpoint's tokenizer.json, and this checkpoint has none")
    })
}

impl Job for GenerateArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let loaded = load_model(&b, self.model.as_deref())?;
        let text_mode = self.prompt.is_some();
        let prompt: Vec<u32> = match (&self.prompt_ids, &self.prompt) {
            (Some(ids), None) => parse_ids(ids)?,
            (None, Some(text)) => {
                let tok = require_tokenizer(&loaded.tokenizer, "--prompt")?;
                let text = if self.chat {
                    let thinking = (self.think == OnOff::Off).then_some(false);
                    tok.render_chat(&[Message::new("user", text)], true, thinking)?
                } else {
                    text.clone()
                };
                tok.encode(&text)?
            }
            _ => bail!("give the prompt with --prompt TEXT or --prompt-ids IDS"),
        };
        let sampling = self.sampling.resolve(loaded.sampling)?;
        let request = Request {
            prompt: prompt.clone(),
            max_new_tokens: self.max_new_tokens,
            stop_ids: if self.ignore_eos {
                Vec::new()
            } else {
                loaded.stop_ids.clone()
            },
            top_logits: self.top_logits,
            sampling,
        };
        let stream_text = text_mode && self.format == Format::Text;
        let mut decoder = loaded
            .tokenizer
            .as_ref()
            .map(|t| StreamDecoder::new(t, true));
        let mut stats = Stats::new();
        let mut on_token = |_: usize, id: u32| -> qfuse_core::Result<()> {
            stats.token();
            if let (true, Some(d)) = (stream_text, decoder.as_mut()) {
                let piece = d.push(id)?;
                emit(&piece).map_err(|e| qfuse_core::Error::invalid("output", e.to_string()))?;
            }
            Ok(())
        };
        let out = if self.check_numerics {
            let mut check = check_numerics(&b, NUMERICS_LIMIT);
            let out = generate_with(
                &loaded.model,
                &b,
                &[request],
                Some(&mut check),
                &mut on_token,
            )?;
            eprintln!(
                "check-numerics: every op's output finite and within |x| <= {NUMERICS_LIMIT:.0e}"
            );
            out
        } else {
            generate_with(&loaded.model, &b, &[request], None, &mut on_token)?
        }
        .remove(0);
        let text = match &loaded.tokenizer {
            Some(t) => Some(t.decode(&out.new_ids, true)?),
            None => None,
        };
        match self.format {
            Format::Json => {
                let steps: Vec<_> = out
                    .steps
                    .iter()
                    .map(|s| json!({"top_ids": s.top_ids, "top_logits": s.top_logits}))
                    .collect();
                let mut doc = json!({
                    "backend": B::NAME,
                    "prompt_ids": prompt,
                    "new_ids": out.new_ids,
                    "finish_reason": out.finish_reason.as_str(),
                    "steps": steps,
                });
                if let Some(text) = text {
                    doc["text"] = json!(text);
                }
                out!("{doc}");
            }
            Format::Text if stream_text => {
                if let Some(d) = decoder.as_mut() {
                    emit(&d.finish()?)?;
                }
                out!("");
            }
            Format::Text => {
                let ids: Vec<String> = out.new_ids.iter().map(u32::to_string).collect();
                out!("{}", ids.join(","));
                for (i, s) in out.steps.iter().enumerate() {
                    let pairs: Vec<String> = s
                        .top_ids
                        .iter()
                        .zip(&s.top_logits)
                        .map(|(id, l)| format!("{id}:{l:.6}"))
                        .collect();
                    out!("step {i}: {}", pairs.join(" "));
                }
            }
        }
        eprintln!("finish_reason: {}", out.finish_reason.as_str());
        if self.stats {
            eprintln!("stats: {}", stats.line());
        }
        Ok(())
    }
}

#[derive(clap::Args)]
pub struct ChatArgs {
    /// Checkpoint directory; default: the built-in tiny random model.
    #[arg(long)]
    model: Option<String>,
    #[command(flatten)]
    pub backend: BackendArgs,
    /// System prompt.
    #[arg(long)]
    system: Option<String>,
    /// Qwen3's thinking mode at the start (/think on|off changes it).
    #[arg(long, value_enum, default_value = "on")]
    think: OnOff,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

const CHAT_HELP: &str = "commands: /reset  /think on|off  /system TEXT  /stats  /help  /quit (or Ctrl-D); Ctrl-C stops an answer";

/// The conversation and its settings; a failed turn leaves it as it was.
struct Conversation {
    system: Option<String>,
    history: Vec<Message>,
    thinking: bool,
    last_stats: Option<String>,
}

impl Conversation {
    fn messages(&self, user: &str) -> Vec<Message> {
        let mut m: Vec<Message> = self
            .system
            .iter()
            .map(|s| Message::new("system", s))
            .collect();
        m.extend(self.history.iter().cloned());
        m.push(Message::new("user", user));
        m
    }
}

impl Job for ChatArgs {
    fn run<B: Backend>(&self, b: B) -> anyhow::Result<()> {
        let loaded = load_model(&b, self.model.as_deref())?;
        let tok = require_tokenizer(&loaded.tokenizer, "chat")?;
        if !tok.has_chat_template() {
            bail!("chat needs a chat template in the checkpoint's tokenizer_config.json");
        }
        let sampling = self.sampling.resolve(loaded.sampling)?;
        // Ctrl-C stops the answer being generated, not the program.
        let _ = ctrlc::set_handler(|| INTERRUPTED.store(true, Ordering::SeqCst));
        let interactive = std::io::stdin().is_terminal();
        if interactive {
            eprintln!("{CHAT_HELP}");
        }
        let mut conv = Conversation {
            system: self.system.clone(),
            history: Vec::new(),
            thinking: self.think == OnOff::On,
            last_stats: None,
        };
        let max_ctx = loaded.model.config().max_position_embeddings;
        let stdin = std::io::stdin();
        let mut lines = stdin.lock().lines();
        let mut turn = 0u64;
        loop {
            if interactive {
                eprint!("you> ");
                let _ = std::io::stderr().flush();
            }
            let Some(line) = lines.next() else { break };
            let line = line.context("reading stdin")?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(cmd) = line.strip_prefix('/') {
                let (name, arg) = cmd
                    .split_once(' ')
                    .map_or((cmd, ""), |(n, a)| (n, a.trim()));
                match (name, arg) {
                    ("quit" | "exit", _) => break,
                    ("reset", _) => {
                        conv.history.clear();
                        eprintln!("[conversation cleared]");
                    }
                    ("think", "on") => conv.thinking = true,
                    ("think", "off") => conv.thinking = false,
                    ("system", "") => {
                        conv.system = None;
                        eprintln!("[system prompt removed]");
                    }
                    ("system", text) => {
                        conv.system = Some(text.to_string());
                        eprintln!("[system prompt set]");
                    }
                    ("stats", _) => eprintln!(
                        "{}",
                        conv.last_stats.as_deref().unwrap_or("[no answer yet]")
                    ),
                    ("help", _) => eprintln!("{CHAT_HELP}"),
                    _ => eprintln!("error: unknown command `/{cmd}`; {CHAT_HELP}"),
                }
                continue;
            }
            let thinking = (!conv.thinking).then_some(false);
            let prompt = match tok
                .render_chat(&conv.messages(line), true, thinking)
                .and_then(|t| tok.encode(&t))
            {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("error: {e}");
                    continue;
                }
            };
            if prompt.len() >= max_ctx {
                eprintln!("error: the conversation is {} tokens, beyond the model's {max_ctx}; /reset to start over", prompt.len());
                continue;
            }
            let request = Request {
                max_new_tokens: self.max_new_tokens.min(max_ctx - prompt.len()),
                stop_ids: loaded.stop_ids.clone(),
                top_logits: 0,
                sampling: SamplingParams {
                    seed: sampling.seed.wrapping_add(turn),
                    ..sampling
                },
                prompt,
            };
            turn += 1;
            INTERRUPTED.store(false, Ordering::SeqCst);
            let mut decoder = StreamDecoder::new(tok, true);
            let mut stats = Stats::new();
            let mut answer = String::new();
            if interactive {
                eprint!("qwen> ");
            }
            let result = generate_with(&loaded.model, &b, &[request], None, &mut |_, id| {
                stats.token();
                let piece = decoder.push(id)?;
                answer.push_str(&piece);
                emit(&piece).map_err(|e| qfuse_core::Error::invalid("output", e.to_string()))?;
                if INTERRUPTED.load(Ordering::SeqCst) {
                    return Err(qfuse_core::Error::invalid("chat", "interrupted"));
                }
                Ok(())
            });
            let rest = decoder.finish()?;
            answer.push_str(&rest);
            emit(&rest)?;
            out!("");
            match result {
                Ok(_) => {}
                Err(_) if INTERRUPTED.load(Ordering::SeqCst) => eprintln!("[answer stopped]"),
                Err(e) => {
                    eprintln!("error: {e}");
                    continue;
                }
            }
            conv.last_stats = Some(stats.line());
            conv.history.push(Message::new("user", line));
            conv.history.push(Message::new("assistant", &answer));
        }
        Ok(())
    }
}

/// Writes the shipped tokenizer files next to a synthetic checkpoint.
pub fn write_tokenizer(dir: &Path) -> anyhow::Result<()> {
    std::fs::write(dir.join("tokenizer.json"), TOKENIZER_JSON)
        .with_context(|| format!("writing {}", dir.display()))?;
    std::fs::write(dir.join("tokenizer_config.json"), TOKENIZER_CONFIG)
        .with_context(|| format!("writing {}", dir.display()))?;
    Ok(())
}
