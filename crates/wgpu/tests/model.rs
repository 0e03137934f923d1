//! The wgpu backend at model level: teacher-forced logits against cpu-ref on every golden
//! checkpoint (relative error <= 1e-3, top-1 agreement 1), greedy ids equal to transformers'
//! where its top-1 margin exceeds 4x the measured error, batched equal to alone; decode with
//! weights prefetched equal to without.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use qfuse_core::testing::device_or_skip;
use qfuse_core::{Backend, HostData, HostTensor};
use qfuse_cpu_ref::CpuRef;
use qfuse_qwen3::{
    decode_ahead_runs, generate, golden_dir, GoldenCase, LogitsDiff, Qwen3, Request, GOLDEN_MODELS,
};
use qfuse_wgpu::{WgpuBackend, WgpuOptions};

/// The backend with default options, or `None` (with a notice naming `what`) without an adapter.
fn gpu(what: &str) -> Option<WgpuBackend> {
    device_or_skip(what, WgpuBackend::for_tests(0, &WgpuOptions::default()))
}

/// Golden checkpoint `name` loaded on `gpu` and on cpu-ref.
fn load_both(gpu: &WgpuBackend, name: &str) -> (Qwen3<WgpuBackend>, Qwen3<CpuRef>) {
    let dir = golden_dir(name);
    (
        Qwen3::load(gpu, &dir).unwrap(),
        Qwen3::load(&CpuRef, &dir).unwrap(),
    )
}

#[test]
fn golden_fixtures_match_reference_and_transformers() {
    let Some(gpu) = gpu("wgpu model tests") else {
        return;
    };
    eprintln!("wgpu adapter: {}", gpu.adapter_name());
    for name in GOLDEN_MODELS {
        let dir = golden_dir(name);
        let (gm, cm) = load_both(&gpu, name);
        let vocab = cm.config().vocab_size;
        let cases = GoldenCase::load_all(&dir).unwrap();
        let requests: Vec<Request> = cases.iter().map(|c| c.request(0)).collect();
        let batched = generate(&gm, &gpu, &requests).unwrap();
        for (i, case) in cases.iter().enumerate() {
            let tokens = case.tokens();
            let ours = gpu
                .download(&gm.score(&gpu, &tokens).unwrap())
                .unwrap()
                .to_f64_vec();
            let reference = CpuRef
                .download(&cm.score(&CpuRef, &tokens).unwrap())
                .unwrap()
                .to_f64_vec();
            let d = LogitsDiff::new(&ours, &reference, vocab);
            println!(
                "{name} case {i}: relative error {:.3e} (worst row {:.3e})",
                d.rel, d.worst_rel
            );
            assert!(
                d.rel <= 1e-3 && d.worst_rel <= 1e-3,
                "{name} case {i}: {:.3e}",
                d.worst_rel
            );
            assert_eq!(d.top1_agreement, 1.0, "{name} case {i}");
            for (step, &want) in case.greedy.iter().enumerate() {
                let r = case.prompt.len() - 1 + step;
                let mut row = case.logits[r * vocab..(r + 1) * vocab].to_vec();
                row.sort_by(|a, b| b.total_cmp(a));
                if row[0] - row[1] <= 4.0 * d.max_abs[r] {
                    break;
                }
                assert_eq!(
                    batched[i].new_ids[step], want,
                    "{name} case {i} step {step}"
                );
            }
            let alone = generate(&gm, &gpu, std::slice::from_ref(&requests[i])).unwrap();
            assert_eq!(
                alone[0].new_ids, batched[i].new_ids,
                "{name} case {i}: alone vs batched"
            );
        }
    }
}

/// Batched decode steps (one token for each of several sequences, the decode attention over the
/// cache), teacher-forced, against cpu-ref's scores of each sequence on every golden checkpoint.
#[test]
fn batched_decode_matches_reference() {
    let Some(gpu) = gpu("wgpu model tests") else {
        return;
    };
    for name in GOLDEN_MODELS {
        let (gm, cm) = load_both(&gpu, name);
        let vocab = cm.config().vocab_size;
        let seqs: Vec<Vec<u32>> = (0..6u32)
            .map(|s| {
                (0..40)
                    .map(|i| (s * 37 + i * 11 + 3) % vocab as u32)
                    .collect()
            })
            .collect();
        let got = gm.score_decoding(&gpu, &seqs, 33).unwrap();
        let mut want = Vec::new();
        for q in &seqs {
            let all = CpuRef.download(&cm.score(&CpuRef, q).unwrap()).unwrap();
            want.extend_from_slice(&all.to_f64_vec()[33 * vocab..]);
        }
        let d = LogitsDiff::new(&got, &want, vocab);
        println!(
            "{name} batched decode: relative error {:.3e} (worst row {:.3e})",
            d.rel, d.worst_rel
        );
        assert!(d.worst_rel <= 1e-3, "{name}: {:.3e}", d.worst_rel);
        assert_eq!(d.top1_agreement, 1.0, "{name}");
    }
}

#[test]
fn decode_steps_queued_ahead_give_the_same_ids() {
    let Some(gpu) = gpu("wgpu decode-ahead test") else {
        return;
    };
    for name in GOLDEN_MODELS {
        let model = Qwen3::load(&gpu, &golden_dir(name)).unwrap();
        let runs = decode_ahead_runs(&model, &gpu).unwrap();
        println!("{name}: {} steps queued ahead and used", runs.used);
        if let Some(failure) = runs.failure() {
            panic!("{name}: {failure}");
        }
    }
}

/// The device words a weight tensor occupies: bf16 packed two to a word (the odd last one
/// zero-padded), f32 one a word.
fn device_words(t: &HostTensor) -> Vec<u32> {
    match t.data() {
        HostData::BF16(v) => v
            .chunks(2)
            .map(|c| {
                u32::from(c[0].to_bits()) | u32::from(c.get(1).map_or(0, |x| x.to_bits())) << 16
            })
            .collect(),
        HostData::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        other => panic!("weights held as {other:?}"),
    }
}

#[test]
fn prefetching_decode_gives_the_same_ids_and_reads_every_planned_sector() {
    let without = WgpuOptions {
        prefetch_workgroups: Some(0),
        ..WgpuOptions::default()
    };
    let Some(plain) = device_or_skip("wgpu prefetch test", WgpuBackend::for_tests(0, &without))
    else {
        return;
    };
    // The fixture whose weights have the most sectors (f16, held as f32).
    let dir = golden_dir("gqa4-f16");
    let requests: Vec<Request> = GoldenCase::load_all(&dir)
        .unwrap()
        .iter()
        .map(|c| c.request(0))
        .collect();
    let pm = Qwen3::load(&plain, &dir).unwrap();
    let want_ids = new_ids(generate(&pm, &plain, &requests).unwrap());
    // Both attention builds: subgroup and workgroup reductions.
    for no_subgroups in [false, true] {
        let options = WgpuOptions {
            prefetch_workgroups: Some(1),
            prefetch_weights: Some("ogdq".into()),
            no_subgroups,
            ..WgpuOptions::default()
        };
        let gpu = WgpuBackend::for_tests(0, &options).unwrap();
        let gm = Qwen3::load(&gpu, &dir).unwrap();
        let ids = new_ids(generate(&gm, &gpu, &requests).unwrap());
        assert_eq!(ids, want_ids, "no_subgroups {no_subgroups}");
        // One sequence, so the prefetch has the fewest threads (one slice of workgroups) and
        // each covers its sectors in more than one round of its four loads.
        generate(&gm, &gpu, &requests[..1]).unwrap();
        // The last decode step's last layer read ahead its o_proj, gate/up and down weights
        // and the QKV weights of layer 0, the layer that ran after it in the step before.
        let sums = gpu
            .prefetch_sums()
            .unwrap()
            .expect("decode steps prefetched");
        let layers = gm.layers();
        let last = layers.last().unwrap();
        let planned = [
            &last.self_attn.o_proj,
            &last.mlp.gate_up_proj,
            &last.mlp.down_proj,
            &layers[0].self_attn.qkv_proj,
        ];
        let n = sums.len();
        let mut want = vec![0u32; n];
        let mut most = 0;
        for t in planned {
            let words = device_words(&gpu.download(t).unwrap());
            most = most.max(words.len().div_ceil(8));
            for s in 0..words.len().div_ceil(8) {
                want[s % n] ^= words[s * 8];
            }
        }
        assert!(
            most > 4 * n,
            "{most} sectors over {n} threads: one round each"
        );
        assert_eq!(sums, want, "no_subgroups {no_subgroups}");
    }
}

fn new_ids(runs: Vec<qfuse_qwen3::Generation>) -> Vec<Vec<u32>> {
    runs.into_iter().map(|g| g.new_ids).collect()
}
