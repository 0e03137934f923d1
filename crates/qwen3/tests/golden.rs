//! cpu-ref against transformers' Qwen3ForCausalLM in float64 (with its three float32 islands
//! patched to float64, see tools/golden/make_golden.py): logits to ~1e-9, identical greedy ids.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::path::{Path, PathBuf};

use qfuse_core::{BatchInfo, DeviceTensor, SeqChunk};
use qfuse_cpu_ref::{CpuRef, CpuTensor};
use qfuse_qwen3::{generate_greedy, Logits, Qwen3, Request};
use serde_json::Value;

const MODELS: [&str; 4] = [
    "tied-bf16-gqa2-v4",
    "untied-f32-mha-v5",
    "mqa-sharded-bf16",
    "gqa4-f16",
];
/// Largest allowed ‖ours − HF‖ / ‖HF‖ of any row of logits.
const LOGITS_REL: f64 = 1e-9;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/golden")
        .join(name)
}

struct Case {
    prompt: Vec<u32>,
    greedy: Vec<u32>,
    /// HF logits over prompt + greedy[..-1], row-major [rows, vocab].
    logits: Vec<f64>,
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn cases(dir: &Path) -> Vec<Case> {
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    meta["cases"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let t = st.tensor(&format!("case{i}.logits")).unwrap();
            assert_eq!(t.dtype(), safetensors::Dtype::F64);
            let logits = t
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect();
            Case {
                prompt: ids(&c["prompt_ids"]),
                greedy: ids(&c["greedy_ids"]),
                logits,
            }
        })
        .collect()
}

fn row_rel_errors(ours: &[f64], hf: &[f64], vocab: usize) -> f64 {
    ours.chunks(vocab)
        .zip(hf.chunks(vocab))
        .map(|(a, b)| qfuse_core::testing::rel_error(a, b))
        .fold(0.0, f64::max)
}

fn teacher_forced(model: &Qwen3<CpuRef>, tokens: &[u32]) -> CpuTensor {
    let mut cache = model
        .new_cache(&CpuRef, tokens.len().div_ceil(16), 16)
        .unwrap();
    let table = (0..tokens.len().div_ceil(16) as u32).collect();
    let batch = BatchInfo::new(
        16,
        vec![SeqChunk {
            start_pos: 0,
            len: tokens.len(),
            block_table: table,
        }],
    )
    .unwrap();
    model
        .forward(&CpuRef, tokens, &batch, &mut cache, Logits::All)
        .unwrap()
}

#[test]
fn teacher_forced_logits_match_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen3::load(&CpuRef, &dir).unwrap();
        let vocab = model.config().vocab_size;
        for (i, case) in cases(&dir).iter().enumerate() {
            let mut tokens = case.prompt.clone();
            tokens.extend_from_slice(&case.greedy[..case.greedy.len() - 1]);
            let logits = teacher_forced(&model, &tokens);
            assert_eq!(logits.shape().dims(), &[tokens.len(), vocab]);
            let err = row_rel_errors(logits.values(), &case.logits, vocab);
            println!(
                "{name} case {i} ({} tokens): worst row relative error {err:.2e}",
                tokens.len()
            );
            assert!(err <= LOGITS_REL, "{name} case {i}: {err:.3e}");
        }
    }
}

#[test]
fn cached_greedy_generation_matches_transformers() {
    for name in MODELS {
        let dir = fixture(name);
        let model = Qwen3::load(&CpuRef, &dir).unwrap();
        let vocab = model.config().vocab_size;
        let cases = cases(&dir);
        let requests: Vec<Request> = cases
            .iter()
            .map(|c| Request {
                prompt: c.prompt.clone(),
                max_new_tokens: c.greedy.len(),
                stop_ids: vec![],
                top_logits: vocab,
            })
            .collect();
        // All cases in one batch (batched prefill, then batched decode steps over the cache) ...
        let batched = generate_greedy(&model, &CpuRef, &requests).unwrap();
        for (i, (case, got)) in cases.iter().zip(&batched).enumerate() {
            assert_eq!(got.new_ids, case.greedy, "{name} case {i}: greedy ids");
            // ... and every decode step's logits against HF's teacher-forced row for that position.
            for (step, s) in got.steps.iter().enumerate() {
                let row = &case.logits[(case.prompt.len() - 1 + step) * vocab..][..vocab];
                let mut ours = vec![0.0; vocab];
                for (&id, &v) in s.top_ids.iter().zip(&s.top_logits) {
                    ours[id as usize] = v;
                }
                let err = qfuse_core::testing::rel_error(&ours, row);
                assert!(err <= LOGITS_REL, "{name} case {i} step {step}: {err:.3e}");
            }
        }
        // ... and each alone gives the same result as in the batch.
        for (i, r) in requests.iter().enumerate() {
            let alone = generate_greedy(&model, &CpuRef, std::slice::from_ref(r)).unwrap();
            assert_eq!(
                alone[0].new_ids, batched[i].new_ids,
                "{name} case {i}: alone vs batched"
            );
            for (a, b) in alone[0].steps.iter().zip(&batched[i].steps) {
                assert!(qfuse_core::testing::rel_error(&a.top_logits, &b.top_logits) <= 1e-13);
            }
        }
    }
}
