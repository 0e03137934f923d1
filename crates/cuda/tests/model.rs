//! Model-level checks of the CUDA backend against cpu-ref: teacher-forced logits (relative error
//! <= 2e-2, top-1 agreement >= 99%) on the golden fixtures and, when QFUSE_SYNTH_DIR names a
//! synthetic Qwen3-0.6B checkpoint, on 256+ positions of it; greedy ids equal to transformers'
//! wherever its top-1 margin exceeds the measured bf16 error; batched equals alone.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::PathBuf;

use qfuse_core::{Backend, Rng};
use qfuse_cpu_ref::CpuRef;
use qfuse_cuda::CudaBackend;
use qfuse_qwen3::{
    decode_ahead_runs, generate, golden_dir as fixture, GoldenCase, LogitsDiff, Qwen3, Request,
    GOLDEN_MODELS as MODELS,
};
const REL_TOL: f64 = 2e-2;

/// The KV cache's type: `QFUSE_KV_DTYPE` (`f32`, the default, or `bf16`).
fn kv_dtype() -> qfuse_core::DType {
    match std::env::var("QFUSE_KV_DTYPE").as_deref() {
        Ok("bf16") => qfuse_core::DType::BF16,
        _ => qfuse_core::DType::F32,
    }
}

/// The backend, with the KV cache in `kv_dtype()`.
fn cuda() -> Option<CudaBackend> {
    let options = qfuse_cuda::CudaOptions {
        kv_dtype: kv_dtype(),
        ..Default::default()
    };
    qfuse_core::testing::device_or_skip("cuda model tests", CudaBackend::with_options(0, options))
}

fn logits<B: Backend>(b: &B, model: &Qwen3<B>, tokens: &[u32]) -> Vec<f64> {
    b.download(&model.score(b, tokens).unwrap())
        .unwrap()
        .to_f64_vec()
}

/// Teacher-forced comparison of one token sequence; returns the per-row max abs error.
fn compare(
    name: &str,
    gpu: &CudaBackend,
    gm: &Qwen3<CudaBackend>,
    cm: &Qwen3<CpuRef>,
    tokens: &[u32],
) -> Vec<f64> {
    let vocab = cm.config().vocab_size;
    let d = LogitsDiff::new(
        &logits(gpu, gm, tokens),
        &logits(&CpuRef, cm, tokens),
        vocab,
    );
    println!(
        "{name}: {} positions, relative error {:.3e} (worst row {:.3e}), top-1 agreement {:.4}",
        tokens.len(),
        d.rel,
        d.worst_rel,
        d.top1_agreement
    );
    assert!(d.rel <= REL_TOL, "{name}: relative error {:.3e}", d.rel);
    assert!(
        d.top1_agreement >= 0.99,
        "{name}: top-1 agreement {}",
        d.top1_agreement
    );
    d.max_abs
}

#[test]
fn golden_fixtures_match_reference_and_transformers() {
    let Some(gpu) = cuda() else { return };
    for name in MODELS {
        let dir = fixture(name);
        let (gm, cm) = (
            Qwen3::load(&gpu, &dir).unwrap(),
            Qwen3::load(&CpuRef, &dir).unwrap(),
        );
        let vocab = cm.config().vocab_size;
        let cases = GoldenCase::load_all(&dir).unwrap();
        let requests: Vec<Request> = cases.iter().map(|c| c.request(0)).collect();
        let batched = generate(&gm, &gpu, &requests).unwrap();
        for (i, case) in cases.iter().enumerate() {
            let max_abs = compare(&format!("{name} case {i}"), &gpu, &gm, &cm, &case.tokens());
            // Greedy ids must equal transformers' up to the first step whose top-1 margin (HF's
            // float64 logits) is within 4x the measured error of that row.
            let mut checked = 0;
            for (step, &want) in case.greedy.iter().enumerate() {
                let r = case.prompt.len() - 1 + step;
                let row = &case.logits[r * vocab..(r + 1) * vocab];
                let mut sorted = row.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] <= 4.0 * max_abs[r] {
                    break;
                }
                assert_eq!(
                    batched[i].new_ids[step], want,
                    "{name} case {i} step {step}"
                );
                checked += 1;
            }
            println!(
                "{name} case {i}: {checked}/{} greedy ids checked equal to transformers'",
                case.greedy.len()
            );
            let alone = generate(&gm, &gpu, std::slice::from_ref(&requests[i])).unwrap();
            assert_eq!(
                alone[0].new_ids, batched[i].new_ids,
                "{name} case {i}: alone vs batched"
            );
        }
    }
}

/// The backend and the synthetic checkpoint `QFUSE_SYNTH_DIR` names, loaded on it and on
/// cpu-ref; `None` (with a notice) without a GPU or the variable.
fn synthetic() -> Option<(CudaBackend, Qwen3<CudaBackend>, Qwen3<CpuRef>)> {
    let gpu = cuda()?;
    let Ok(dir) = std::env::var("QFUSE_SYNTH_DIR") else {
        eprintln!("skipping: set QFUSE_SYNTH_DIR to a `qfuse synth --shape qwen3-0.6b` checkpoint");
        return None;
    };
    let dir = PathBuf::from(dir);
    let (gm, cm) = (
        Qwen3::load(&gpu, &dir).unwrap(),
        Qwen3::load(&CpuRef, &dir).unwrap(),
    );
    Some((gpu, gm, cm))
}

#[test]
fn synthetic_full_size_matches_reference() {
    let Some((gpu, gm, cm)) = synthetic() else {
        return;
    };
    let mut rng = Rng::new(11);
    let tokens: Vec<u32> = (0..300)
        .map(|_| rng.below(cm.config().vocab_size) as u32)
        .collect();
    let max_abs = compare("synthetic", &gpu, &gm, &cm, &tokens);
    let tol = 4.0 * max_abs.iter().fold(0.0f64, |a, &b| a.max(b));
    // Batch-1 greedy decode (the single-row GEMV builds, split attention, graphs and PDL): each
    // token must be the reference's top-1 at its position, or within the measured error of it.
    let prompt = tokens[..16].to_vec();
    let got = generate(&gm, &gpu, &[Request::greedy(prompt.clone(), 48)]).unwrap();
    let full: Vec<u32> = prompt.iter().chain(&got[0].new_ids).copied().collect();
    let reference = logits(&CpuRef, &cm, &full);
    let vocab = cm.config().vocab_size;
    let mut exact = 0;
    for (step, &id) in got[0].new_ids.iter().enumerate() {
        let row = &reference[(prompt.len() - 1 + step) * vocab..][..vocab];
        let best = row.iter().fold(f64::MIN, |a, &b| a.max(b));
        assert!(
            row[id as usize] >= best - tol,
            "decode step {step}: token {id} scores {} against the reference's best {best} (tolerance {tol:.3e})",
            row[id as usize]
        );
        exact += usize::from(row[id as usize] == best);
    }
    println!(
        "synthetic decode: {exact}/{} greedy tokens are the reference's exact top-1, all within {tol:.3e}",
        got[0].new_ids.len()
    );
    // Several sequences decoded together give each one's tokens alone.
    let requests: Vec<Request> = (0..3)
        .map(|s| Request::greedy(tokens[s * 20..s * 20 + 10 + s].to_vec(), 12))
        .collect();
    let batched = generate(&gm, &gpu, &requests).unwrap();
    for (r, got) in requests.iter().zip(&batched) {
        assert_eq!(
            generate(&gm, &gpu, std::slice::from_ref(r)).unwrap()[0].new_ids,
            got.new_ids
        );
    }
}

/// Batched decode as `qfuse bench --batch N` runs it, teacher-forced: decode steps of one token
/// for each of 40 sequences (the products of 9-64 rows on `gemm_x3`, o_proj, gate/up and down
/// over two parts unless `QFUSE_CUDA_X3_TWO_PARTS=0`, and the batched decode attention), 320 positions
/// against cpu-ref's scores of each sequence. The 300-position comparison above runs as one
/// prompt, through the prompt products instead.
#[test]
fn batched_decode_matches_reference() {
    const SEQS: usize = 40;
    const PROMPT: usize = 24;
    const STEPS: usize = 8;
    let Some((gpu, gm, cm)) = synthetic() else {
        return;
    };
    let vocab = cm.config().vocab_size;
    let len = PROMPT + STEPS;
    let mut rng = Rng::new(13);
    let seqs: Vec<Vec<u32>> = (0..SEQS)
        .map(|_| (0..len).map(|_| rng.below(vocab) as u32).collect())
        .collect();
    let got = gm.score_decoding(&gpu, &seqs, PROMPT).unwrap();
    let mut want = Vec::new();
    for q in &seqs {
        want.extend_from_slice(&logits(&CpuRef, &cm, q)[PROMPT * vocab..]);
    }
    let d = LogitsDiff::new(&got, &want, vocab);
    println!(
        "batched decode: {SEQS} sequences x {STEPS} steps, relative error {:.3e} (worst row {:.3e}), top-1 agreement {:.4}",
        d.rel, d.worst_rel, d.top1_agreement
    );
    assert!(
        d.rel <= REL_TOL,
        "batched decode: relative error {:.3e}",
        d.rel
    );
    assert!(
        d.top1_agreement >= 0.99,
        "batched decode: top-1 agreement {}",
        d.top1_agreement
    );
}

/// CUDA graphs and programmatic dependent launches (the defaults) against plain launches, each
/// kernel starting after the previous one drained.
#[test]
fn graph_replay_gives_the_tokens_of_plain_launches() {
    let Some(gpu) = cuda() else { return };
    let plain = CudaBackend::with_options(
        0,
        qfuse_cuda::CudaOptions {
            graphs: false,
            pdl: false,
            // The same cache as `gpu`: only the launches differ.
            kv_dtype: kv_dtype(),
            ..Default::default()
        },
    )
    .unwrap();
    for name in MODELS {
        let dir = fixture(name);
        let requests: Vec<Request> = GoldenCase::load_all(&dir)
            .unwrap()
            .iter()
            .map(|c| Request::greedy(c.prompt.clone(), 24))
            .collect();
        let replays = gpu.graph_replays();
        let with_graphs = generate(&Qwen3::load(&gpu, &dir).unwrap(), &gpu, &requests).unwrap();
        assert!(
            gpu.graph_replays() > replays,
            "{name}: decode steps were not replayed as graphs (capture failed)"
        );
        let without = generate(&Qwen3::load(&plain, &dir).unwrap(), &plain, &requests).unwrap();
        for (i, (g, p)) in with_graphs.iter().zip(&without).enumerate() {
            assert_eq!(
                g.new_ids, p.new_ids,
                "{name} case {i}: graphs vs plain launches"
            );
        }
    }
}

/// Decode steps queued one ahead on the device's own ids give the ids of steps queued one at a
/// time, as graph replays and as plain launches, while the batch changes under them.
#[test]
fn decode_steps_queued_ahead_give_the_same_ids() {
    let Some(gpu) = cuda() else { return };
    let plain = CudaBackend::with_options(
        0,
        qfuse_cuda::CudaOptions {
            graphs: false,
            kv_dtype: kv_dtype(),
            ..Default::default()
        },
    )
    .unwrap();
    for name in MODELS {
        let dir = fixture(name);
        for b in [&gpu, &plain] {
            let runs = decode_ahead_runs(&Qwen3::load(b, &dir).unwrap(), b).unwrap();
            println!("{name}: {} steps queued ahead and used", runs.used);
            if let Some(failure) = runs.failure() {
                panic!("{name}: {failure}");
            }
        }
    }
}
