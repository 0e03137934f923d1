//! `qfuse generate` end to end: output schema, stop handling, and a one-line error (never a
//! panic) for every kind of bad input.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::Path;
use std::process::Command;

use safetensors::tensor::{Dtype, TensorView};
use serde_json::Value;

use qfuse_qwen3::golden_dir as fixture;

fn qfuse(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_qfuse"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// `qfuse generate --model MODEL EXTRA…`, greedy unless EXTRA sets a temperature.
fn generate(model: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    if !extra.contains(&"--temperature") {
        args.extend_from_slice(&["--temperature", "0"]);
    }
    qfuse(&args)
}

/// A writable copy of a fixture checkpoint.
fn copy_fixture(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrites `model.safetensors` in `dir`, letting `edit` drop or replace tensors.
fn rewrite_safetensors(
    dir: &Path,
    edit: impl Fn(&str, Dtype, Vec<usize>, Vec<u8>) -> Option<(Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, t)| {
            edit(&name, t.dtype(), t.shape().to_vec(), t.data().to_vec())
                .map(|(d, s, b)| (name, d, s, b))
        })
        .collect();
    let views: Vec<(String, TensorView)> = kept
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
}

fn edit_config(dir: &Path, edit: impl Fn(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(&path, v.to_string()).unwrap();
}

/// Exit code 1, nothing on stdout, one `error:` line on stderr containing `needle`.
fn assert_fails(result: (i32, String, String), needle: &str) {
    let (code, stdout, stderr) = result;
    assert_eq!(code, 1, "stderr: {stderr}");
    assert!(stdout.is_empty(), "stdout: {stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("error: ") && stderr.contains(needle),
        "want {needle:?} in {stderr}"
    );
}

#[test]
fn json_output_has_the_documented_schema() {
    let model = fixture("untied-f32-mha-v5");
    let (code, stdout, stderr) = generate(
        &model,
        &[
            "--prompt-ids",
            "12,7,99",
            "--max-new-tokens",
            "6",
            "--top-logits",
            "4",
            "--format",
            "json",
            "--ignore-eos",
        ],
    );
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(stdout.lines().count(), 1);
    let v: Value = serde_json::from_str(&stdout).unwrap();
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["backend", "prompt_ids", "new_ids", "finish_reason", "steps"]
    );
    assert_eq!(v["backend"], "cpu-ref");
    assert_eq!(v["prompt_ids"], serde_json::json!([12, 7, 99]));
    assert_eq!(v["finish_reason"], "length");
    let new_ids = v["new_ids"].as_array().unwrap();
    let steps = v["steps"].as_array().unwrap();
    assert_eq!((new_ids.len(), steps.len()), (6, 6));
    for (id, step) in new_ids.iter().zip(steps) {
        let logits: Vec<f64> = step["top_logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(logits.len(), 4);
        assert!(logits.windows(2).all(|w| w[0] >= w[1]), "{logits:?}");
        assert_eq!(&step["top_ids"][0], id, "greedy picks the largest logit");
    }
}

#[test]
fn stops_at_a_stop_id_unless_told_to_ignore_it() {
    let dir = copy_fixture("untied-f32-mha-v5");
    let args = [
        "--prompt-ids",
        "12,7,99",
        "--max-new-tokens",
        "6",
        "--format",
        "json",
    ];
    let (_, free, _) = generate(dir.path(), &[&args[..], &["--ignore-eos"]].concat());
    let first = serde_json::from_str::<Value>(&free).unwrap()["new_ids"][2]
        .as_u64()
        .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        format!("{{\"eos_token_id\": [{first}]}}"),
    )
    .unwrap();
    let (code, out, _) = generate(dir.path(), &args);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["finish_reason"], "stop");
    let got = v["new_ids"].as_array().unwrap();
    assert_eq!(got.last().unwrap().as_u64().unwrap(), first);
    assert!(got.len() <= 3);
    let (_, again, _) = generate(dir.path(), &[&args[..], &["--ignore-eos"]].concat());
    assert_eq!(again, free);
}

#[test]
fn check_passes_against_itself_and_locates_a_planted_error() {
    let m = fixture("gqa4-f16");
    let m = m.to_str().unwrap();
    let (code, out, err) = qfuse(&[
        "check",
        "--model",
        m,
        "--prompt-len",
        "12",
        "--format",
        "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["passed"], true);
    assert_eq!(v["first_divergence"], Value::Null);
    assert_eq!(
        (v["backend"].as_str(), v["against"].as_str()),
        (Some("cpu-ref"), Some("cpu-ref"))
    );
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 14);
    for key in [
        "layer",
        "op",
        "rel_error",
        "max_abs_error",
        "within_tolerance",
        "ours",
        "reference",
    ] {
        assert!(stages[3].get(key).is_some(), "{key}");
    }

    let (code, out, err) = qfuse(&[
        "check",
        "--model",
        m,
        "--prompt-len",
        "12",
        "--perturb",
        "matmul:5:1e-3",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("<-- first divergence"), "{out}");
    assert_fails(
        (code, String::new(), err),
        "first divergence at layer 1 o_proj+residual",
    );

    assert_fails(
        qfuse(&["check", "--model", m, "--perturb", "conv:1:2"]),
        "--perturb: unknown op `conv`",
    );
}

#[test]
fn profile_accounting_adds_up() {
    let m = fixture("gqa4-f16");
    let svg = tempfile::NamedTempFile::new().unwrap();
    let (code, out, err) = qfuse(&[
        "profile",
        "--model",
        m.to_str().unwrap(),
        "--prompt-len",
        "8",
        "--new-tokens",
        "3",
        "--reps",
        "2",
        "--json",
        "--svg",
        svg.path().to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for key in [
        "backend",
        "batch",
        "prompt_len",
        "new_tokens",
        "step_ms",
        "eager_step_ms",
        "prefill_ms",
        "decode",
        "prefill",
        "fused",
    ] {
        assert!(v.get(key).is_some(), "{key}");
    }
    for part in ["decode", "prefill"] {
        let stages = v[part].as_array().unwrap();
        let total: f64 = stages.iter().map(|s| s["share"].as_f64().unwrap()).sum();
        assert!((total - 1.0).abs() < 1e-9, "{part} shares sum to {total}");
        assert!(stages
            .iter()
            .all(|s| s["share"].as_f64().unwrap() >= 0.0 && s["ms"].as_f64().unwrap() >= 0.0));
        let names: Vec<&str> = stages.iter().map(|s| s["op"].as_str().unwrap()).collect();
        for want in [
            "embedding",
            "attention",
            "norm+lm_head",
            "sampling",
            "host overhead and launch gaps",
        ] {
            assert!(names.contains(&want), "{part} lacks {want}: {names:?}");
        }
    }
    let fused = v["fused"].as_array().unwrap();
    let ops: Vec<&str> = fused.iter().map(|f| f["op"].as_str().unwrap()).collect();
    assert_eq!(
        ops,
        [
            "rms_norm_matmul",
            "qk_norm_rope_write_kv",
            "qk_norm_rope_attention",
            "matmul_add",
            "rms_norm_matmul_silu_mul"
        ]
    );
    for f in fused {
        let (p, s) = (
            f["share_unfused"].as_f64().unwrap(),
            f["isolated_speedup"].as_f64().unwrap(),
        );
        let (fused_ms, unfused_ms) = (
            f["fused_ms_per_step"].as_f64().unwrap(),
            f["unfused_ms_per_step"].as_f64().unwrap(),
        );
        assert!((s - unfused_ms / fused_ms).abs() < 1e-9 * s);
        assert!(
            (f["predicted_speedup"].as_f64().unwrap() - 1.0 / ((1.0 - p) + p / s)).abs() < 1e-12
        );
        assert!(p > 0.0 && p <= 1.0 && f["measured_speedup"].as_f64().unwrap() > 0.0);
    }
    let drawn = std::fs::read_to_string(svg.path()).unwrap();
    assert!(drawn.starts_with("<svg") && drawn.trim_end().ends_with("</svg>"));
    assert_eq!(
        drawn.matches("predicted ").count(),
        2 * fused.len(),
        "a title and a label per prediction"
    );
}

#[test]
fn unfused_runs_give_the_same_tokens() {
    let m = fixture("mqa-sharded-bf16");
    let args = [
        "--prompt-ids",
        "3,1,4,1,5",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ];
    let (_, fused, _) = generate(&m, &args);
    let (code, unfused, err) = generate(&m, &[&args[..], &["--unfused", "all"]].concat());
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("running unfused: rms_norm_matmul"), "{err}");
    assert_eq!(fused, unfused);
    assert_fails(
        generate(&m, &[&args[..], &["--unfused", "gemm"]].concat()),
        "unknown fused op `gemm`",
    );
}

#[test]
fn check_numerics_reports_a_healthy_run() {
    let (code, out, err) = generate(
        &fixture("tied-bf16-gqa2-v4"),
        &[
            "--prompt-ids",
            "5,6,7",
            "--max-new-tokens",
            "4",
            "--check-numerics",
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim().split(',').count(), 4);
    assert!(
        err.contains("check-numerics: every op's output finite"),
        "{err}"
    );
}

#[test]
fn text_output_lists_the_new_ids() {
    let (code, out, _) = generate(
        &fixture("gqa4-f16"),
        &["--prompt-ids", "1,2,3", "--max-new-tokens", "3"],
    );
    assert_eq!(code, 0);
    assert_eq!(out.trim().split(',').count(), 3, "{out}");
}

#[test]
fn bad_arguments_are_one_line_errors() {
    let m = fixture("untied-f32-mha-v5");
    assert_fails(
        generate(&m, &["--prompt-ids", "1,2", "--backend", "tpu"]),
        "unknown backend `tpu`; available: cpu-ref, cuda, wgpu",
    );
    // With an adapter (lavapipe in CI) wgpu gives the reference's greedy tokens; without one, a
    // clear error.
    let args = [
        "--prompt-ids",
        "12,7,99",
        "--max-new-tokens",
        "6",
        "--ignore-eos",
    ];
    let wgpu = generate(&m, &[&args[..], &["--backend", "wgpu"]].concat());
    if wgpu.0 == 0 {
        assert_eq!(wgpu.1, generate(&m, &args).1);
        assert!(
            wgpu.2.contains("wgpu: "),
            "the adapter is named: {}",
            wgpu.2
        );
    } else {
        assert_fails(wgpu, "starting the wgpu backend: no device");
    }
    let cuda = generate(&m, &["--prompt-ids", "1,2", "--backend", "cuda"]);
    if cuda.0 != 0 {
        // No GPU here (CI): a clear error, not a panic.
        assert_fails(cuda, "starting the cuda backend: no device");
    }
    assert_fails(
        generate(&m, &["--prompt-ids", "1,200"]),
        "prompt token id 200 at index 1 is out of range (vocab_size 200)",
    );
    assert_fails(generate(&m, &["--prompt-ids", ""]), "the prompt is empty");
    assert_fails(
        generate(&m, &["--prompt-ids", "1,x"]),
        "`x` is not a token id",
    );
    assert_fails(
        generate(&m, &["--prompt-ids", "1", "--max-new-tokens", "512"]),
        "exceeds max_position_embeddings 512",
    );
    assert_fails(
        generate(&m, &["--prompt-ids", "1", "--temperature", "-1"]),
        "temperature -1 is invalid",
    );
    assert_fails(
        generate(&m, &["--prompt-ids", "1", "--top-p", "1.5"]),
        "top-p 1.5 is invalid",
    );
    assert_fails(
        generate(&m, &["--prompt-ids", "1", "--top-k", "0"]),
        "--top-k 0 is invalid",
    );
    assert_fails(
        generate(&m, &["--prompt-ids", "1", "--min-p", "2"]),
        "min-p 2 is invalid",
    );
    assert_fails(
        generate(&m, &["--prompt", "hello"]),
        "--prompt needs the checkpoint's tokenizer.json",
    );
    assert_fails(
        generate(&m, &[]),
        "give the prompt with --prompt TEXT or --prompt-ids IDS",
    );
    assert_fails(
        qfuse(&["generate", "--model", "Qwen/Qwen3-0.6B", "--prompt", "hi"]),
        "could not be downloaded from the Hugging Face Hub (offline?); pass a local checkpoint directory with --model DIR",
    );
    assert_fails(
        generate(Path::new("/nonexistent/model"), &["--prompt-ids", "1"]),
        "/nonexistent/model does not exist",
    );
}

#[test]
fn bad_checkpoints_are_one_line_errors() {
    let args = ["--prompt-ids", "1,2"];
    let name = "untied-f32-mha-v5";

    let d = copy_fixture(name);
    std::fs::remove_file(d.path().join("config.json")).unwrap();
    assert_fails(generate(d.path(), &args), "config.json");

    let d = copy_fixture(name);
    std::fs::write(d.path().join("config.json"), "{\"hidden_size\": 48,").unwrap();
    assert_fails(generate(d.path(), &args), "invalid JSON");

    let d = copy_fixture(name);
    edit_config(d.path(), |c| {
        c.remove("num_hidden_layers");
    });
    assert_fails(
        generate(d.path(), &args),
        "field `num_hidden_layers`: missing",
    );

    let d = copy_fixture(name);
    edit_config(d.path(), |c| {
        c.insert("vocab_size".into(), Value::from(0));
    });
    assert_fails(
        generate(d.path(), &args),
        "field `vocab_size`: must be a positive integer, got 0",
    );

    let d = copy_fixture(name);
    edit_config(d.path(), |c| {
        c.insert("intermediate_size".into(), Value::from(100));
    });
    assert_fails(generate(d.path(), &args), "tensor `model.layers.0.mlp.gate_proj.weight` has shape [96, 48] but the config implies [100, 48]");

    let d = copy_fixture(name);
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert_fails(
        generate(d.path(), &args),
        "no model.safetensors or model.safetensors.index.json",
    );

    let d = copy_fixture(name);
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(generate(d.path(), &args), "not a valid safetensors file");

    let d = copy_fixture(name);
    std::fs::write(d.path().join("model.safetensors"), b"garbage").unwrap();
    assert_fails(generate(d.path(), &args), "not a valid safetensors file");

    // A header that lies about sizes: one tensor's shape says fewer bytes than its offsets span.
    let d = copy_fixture(name);
    let path = d.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = String::from_utf8(bytes[8..8 + n].to_vec()).unwrap();
    let lied = header.replacen("[48]", "[47]", 1);
    assert_ne!(lied, header);
    let mut out = bytes[..8].to_vec();
    out.extend_from_slice(lied.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    assert_fails(generate(d.path(), &args), "not a valid safetensors file");

    let d = copy_fixture(name);
    rewrite_safetensors(d.path(), |n, dt, s, b| {
        (n != "model.norm.weight").then_some((dt, s, b))
    });
    assert_fails(
        generate(d.path(), &args),
        "checkpoint has no tensor `model.norm.weight`",
    );

    let d = copy_fixture(name);
    rewrite_safetensors(d.path(), |n, dt, s, b| {
        Some(if n == "model.layers.1.self_attn.k_norm.weight" {
            (Dtype::I32, s, b)
        } else {
            (dt, s, b)
        })
    });
    assert_fails(
        generate(d.path(), &args),
        "tensor `model.layers.1.self_attn.k_norm.weight` has dtype I32",
    );

    let d = copy_fixture("mqa-sharded-bf16");
    let shard = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("00002-of"))
        .unwrap();
    std::fs::remove_file(&shard).unwrap();
    assert_fails(generate(d.path(), &args), "00002-of-00005.safetensors");
}
