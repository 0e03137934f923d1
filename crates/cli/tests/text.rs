//! Text in and out: the built-in default model, text prompts, chat wrapping, streaming, seeds,
//! the chat REPL driven through stdin, and synthetic checkpoints with the tokenizer.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use qfuse_qwen3::Tokenizer;
use serde_json::Value;

/// Starts `qfuse args`, writes `stdin` to it and closes it; stdout and stderr stay piped.
fn spawn(args: &[&str], stdin: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child
}

fn qfuse(args: &[&str], stdin: &str) -> (i32, String, String) {
    let out = spawn(args, stdin).wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/qwen3-tokenizer"))
        .unwrap()
}

#[test]
fn the_built_in_model_runs_with_no_arguments_but_a_prompt() {
    let (code, out, err) = qfuse(
        &[
            "generate",
            "--prompt",
            "Hello, world",
            "--max-new-tokens",
            "8",
            "--stats",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("random weights"),
        "says plainly the weights are random: {err}"
    );
    assert!(
        err.contains("stats: 8 tokens") || err.contains("finish_reason: stop"),
        "{err}"
    );
    assert!(!out.trim().is_empty());
}

#[test]
fn json_text_is_the_decode_of_the_new_ids_and_chat_wraps_the_prompt() {
    let (code, out, err) = qfuse(
        &[
            "generate",
            "--prompt",
            "Why is the sky blue?",
            "--chat",
            "--think",
            "off",
            "--max-new-tokens",
            "6",
            "--format",
            "json",
            "--temperature",
            "0",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let ids = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let tok = tokenizer();
    assert_eq!(
        v["text"].as_str().unwrap(),
        tok.decode(&ids("new_ids"), true).unwrap()
    );
    let prompt = tok.decode(&ids("prompt_ids"), false).unwrap();
    assert!(
        prompt.starts_with("<|im_start|>user\nWhy is the sky blue?<|im_end|>\n"),
        "{prompt:?}"
    );
    assert!(
        prompt.ends_with("<|im_start|>assistant\n<think>\n\n</think>\n\n"),
        "{prompt:?}"
    );
}

#[test]
fn a_seed_reproduces_a_sampled_run() {
    let run = |seed: &str| {
        let (code, out, err) = qfuse(
            &[
                "generate",
                "--prompt",
                "Once upon a time",
                "--max-new-tokens",
                "16",
                "--temperature",
                "1.0",
                "--top-k",
                "50",
                "--seed",
                seed,
                "--format",
                "json",
            ],
            "",
        );
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["new_ids"].clone()
    };
    assert_eq!(run("5"), run("5"));
    assert_ne!(run("5"), run("6"));
}

#[test]
fn streamed_text_equals_the_one_shot_decode() {
    let args = [
        "generate",
        "--prompt",
        "Tell me a story",
        "--max-new-tokens",
        "24",
        "--temperature",
        "0",
        "--ignore-eos",
    ];
    let (_, streamed, _) = qfuse(&args, "");
    let (_, json, _) = qfuse(&[&args[..], &["--format", "json"]].concat(), "");
    let text = serde_json::from_str::<Value>(&json).unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(streamed, format!("{text}\n"));
}

#[test]
fn chat_reads_turns_from_stdin_and_survives_bad_commands() {
    let script = "Hi!\n/bogus\n/think off\n/system You are terse.\nWhat is 2+2?\n/stats\n/reset\nAgain?\n/quit\nnever read\n";
    let (code, out, err) = qfuse(
        &["chat", "--max-new-tokens", "5", "--temperature", "0"],
        script,
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out.lines().count(),
        3,
        "one answer line per user turn: {out:?}"
    );
    assert!(err.contains("error: unknown command `/bogus`"), "{err}");
    assert!(
        err.contains("[system prompt set]") && err.contains("[conversation cleared]"),
        "{err}"
    );
    assert!(err.contains("tokens, time to first token"), "/stats: {err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn synth_writes_a_checkpoint_that_talks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let (code, _, err) = qfuse(&["synth", "--shape", "tiny", "--out", d, "--seed", "3"], "");
    assert_eq!(code, 0, "{err}");
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.path().join(f).exists(), "{f}");
    }
    let (code, out, err) = qfuse(
        &[
            "generate",
            "--model",
            d,
            "--prompt",
            "abc",
            "--max-new-tokens",
            "4",
        ],
        "",
    );
    assert_eq!(code, 0, "{err}");
    assert!(!out.is_empty());
    let (code, _, err) = qfuse(&["synth", "--shape", "qwen3-70b", "--out", d], "");
    assert_eq!(code, 1);
    assert!(err.contains("unknown shape `qwen3-70b`"), "{err}");
}

#[test]
fn ctrl_c_stops_the_answer_but_not_the_chat() {
    let mut child = spawn(
        &["chat", "--max-new-tokens", "30000", "--temperature", "0"],
        "Talk forever\n/stats\n/quit\n",
    );
    // Wait until the answer is streaming (the handler is installed before it starts).
    let mut first = [0u8; 1];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    let started = std::time::Instant::now();
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("[answer stopped]"), "{err}");
    assert!(
        err.contains("tokens, time to first token"),
        "/stats after the interrupt: {err}"
    );
    assert!(
        started.elapsed().as_secs() < 20,
        "the answer stopped promptly"
    );
}

#[test]
fn bad_text_inputs_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_eq!(qfuse(&["synth", "--shape", "tiny", "--out", d], "").0, 0);
    let one_line_error = |args: &[&str], needle: &str| {
        let (code, out, err) = qfuse(args, "");
        assert_eq!(code, 1, "{err}");
        assert!(out.is_empty(), "{out}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with("error: ") && err.contains(needle) && !err.contains("panicked"),
            "want {needle:?}: {err}"
        );
    };
    one_line_error(
        &[
            "generate",
            "--model",
            d,
            "--prompt",
            "hi",
            "--max-new-tokens",
            "40960",
        ],
        "exceeds max_position_embeddings 40960",
    );
    let config = dir.path().join("tokenizer_config.json");
    std::fs::write(
        &config,
        r#"{"chat_template": "{% for m in messages %}{{ m.content "}"#,
    )
    .unwrap();
    one_line_error(
        &["generate", "--model", d, "--prompt", "hi", "--chat"],
        "chat template does not parse",
    );
    std::fs::write(
        &config,
        r#"{"chat_template": "{{ raise_exception('no system role') }}"}"#,
    )
    .unwrap();
    one_line_error(
        &["generate", "--model", d, "--prompt", "hi", "--chat"],
        "chat template failed to render",
    );
    std::fs::write(&config, "{ not json").unwrap();
    one_line_error(
        &["generate", "--model", d, "--prompt", "hi"],
        "tokenizer_config.json: invalid JSON",
    );
    std::fs::write(dir.path().join("tokenizer.json"), "[]").unwrap();
    one_line_error(
        &["generate", "--model", d, "--prompt", "hi"],
        "not a valid tokenizer",
    );
}
