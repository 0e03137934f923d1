//! Rendering `qfuse profile` results: a terminal table, stable JSON, and an SVG chart.
use std::fmt::Write as _;

use qfuse_qwen3::{FusedOpReport, ProfileReport, StageTime};
use serde_json::{json, Value};

fn stages_json(stages: &[StageTime]) -> Value {
    stages
        .iter()
        .map(|s| json!({"op": s.name, "ms": 1e3 * s.seconds, "share": s.share}))
        .collect()
}

fn fused_json(f: &FusedOpReport) -> Value {
    json!({
        "op": f.op.name(), "calls_per_step": f.calls_per_step,
        "fused_ms_per_step": 1e3 * f.fused_s, "unfused_ms_per_step": 1e3 * f.unfused_s,
        "isolated_speedup": f.speedup, "share_fused": f.share_fused, "share_unfused": f.share_unfused,
        "predicted_speedup": f.predicted, "measured_speedup": f.measured, "disagrees": f.disagrees(),
    })
}

/// The report as one JSON object (its keys are a stable interface).
pub fn profile_json(backend: &str, r: &ProfileReport) -> Value {
    json!({
        "backend": backend,
        "batch": r.spec.batch, "prompt_len": r.spec.prompt_len, "new_tokens": r.spec.new_tokens,
        "step_ms": 1e3 * r.step_s, "eager_step_ms": 1e3 * r.eager_step_s, "prefill_ms": 1e3 * r.prefill_s,
        "decode": stages_json(&r.decode), "prefill": stages_json(&r.prefill),
        "fused": r.fused.iter().map(fused_json).collect::<Vec<_>>(),
    })
}

fn stage_table(out: &mut String, title: &str, unit: &str, stages: &[StageTime]) {
    let _ = writeln!(
        out,
        "{title}\n  {:<40} {:>10} {:>7}",
        "op class", unit, "share"
    );
    for s in stages {
        let _ = writeln!(
            out,
            "  {:<40} {:>10.4} {:>6.1}%",
            s.name,
            1e3 * s.seconds,
            100.0 * s.share
        );
    }
}

/// The report as terminal tables.
pub fn profile_text(backend: &str, r: &ProfileReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{backend}: batch {}, prompt {}, {} decode steps: {:.3} ms/step on the fast path ({:.3} ms/step eager with a timing event per op); prefill {:.2} ms\n",
        r.spec.batch,
        r.spec.prompt_len,
        r.spec.new_tokens,
        1e3 * r.step_s,
        1e3 * r.eager_step_s,
        1e3 * r.prefill_s
    );
    stage_table(
        &mut out,
        "decode step, by op class (eager)",
        "ms/step",
        &r.decode,
    );
    out.push('\n');
    stage_table(&mut out, "prefill, by op class", "ms", &r.prefill);
    let _ = writeln!(
        out,
        "\nfused ops: isolated on the model's shapes (ms per step), p = share of the composition in an unfused step,\nprediction 1 / ((1 - p) + p / s), measured = step time unfused / fused (fast path)"
    );
    let _ = writeln!(
        out,
        "  {:<26} {:>5} {:>9} {:>10} {:>8} {:>7} {:>9} {:>9}",
        "op", "calls", "fused", "unfused", "s", "p", "predicted", "measured"
    );
    for f in &r.fused {
        let _ = writeln!(
            out,
            "  {:<26} {:>5} {:>9.4} {:>10.4} {:>8.2} {:>6.1}% {:>9.3} {:>9.3}{}",
            f.op.name(),
            f.calls_per_step,
            1e3 * f.fused_s,
            1e3 * f.unfused_s,
            f.speedup,
            100.0 * f.share_unfused,
            f.predicted,
            f.measured,
            if f.disagrees() {
                "  <- prediction off by more than 10%"
            } else {
                ""
            }
        );
    }
    out
}

const COLORS: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The decode breakdown as a stacked bar and, per fused op, predicted vs measured speedups.
pub fn profile_svg(backend: &str, r: &ProfileReport) -> String {
    let (w, left, bar_w) = (960.0, 40.0, 880.0);
    let legend_rows = r.decode.len().div_ceil(2);
    let chart_top = 150.0 + 22.0 * legend_rows as f64;
    let row_h = 46.0;
    let h = chart_top + 40.0 + row_h * r.fused.len() as f64 + 30.0;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="13">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="30" font-size="18" font-weight="bold">qfuse profile: {} — batch {}, {:.3} ms per decode step</text>"#,
        esc(backend),
        r.spec.batch,
        1e3 * r.step_s
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="62">Where an (eager) decode step's time goes</text>"#
    );
    let mut x = left;
    for (i, st) in r.decode.iter().enumerate() {
        let width = bar_w * st.share;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.2}" y="74" width="{width:.2}" height="36" fill="{}"><title>{}: {:.1}%</title></rect>"#,
            COLORS[i % COLORS.len()],
            esc(st.name),
            100.0 * st.share
        );
        x += width;
    }
    for (i, st) in r.decode.iter().enumerate() {
        let (lx, ly) = (left + 440.0 * (i % 2) as f64, 136.0 + 22.0 * (i / 2) as f64);
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{}" width="14" height="14" fill="{}"/>"#,
            ly - 11.0,
            COLORS[i % COLORS.len()]
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{ly}">{} — {:.1}% ({:.4} ms)</text>"#,
            lx + 20.0,
            esc(st.name),
            100.0 * st.share,
            1e3 * st.seconds
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="{}">End-to-end speedup of each fused op: Amdahl's prediction from its isolated speedup vs measured</text>"#,
        chart_top + 16.0
    );
    let max = r
        .fused
        .iter()
        .flat_map(|f| [f.predicted, f.measured])
        .fold(1.0f64, f64::max);
    let (label_w, scale) = (300.0, (bar_w - 300.0 - 120.0) / max);
    for (i, f) in r.fused.iter().enumerate() {
        let y = chart_top + 34.0 + row_h * i as f64;
        let _ = writeln!(
            s,
            r#"<text x="{left}" y="{}">{} (s = {:.2})</text>"#,
            y + 20.0,
            esc(f.op.name()),
            f.speedup
        );
        for (j, (v, color, what)) in [
            (f.predicted, "#bab0ac", "predicted"),
            (f.measured, "#4e79a7", "measured"),
        ]
        .into_iter()
        .enumerate()
        {
            let by = y + 18.0 * j as f64;
            let bw = (scale * v).max(1.0);
            let _ = writeln!(
                s,
                r#"<rect x="{}" y="{by}" width="{bw:.2}" height="15" fill="{color}"><title>{what} {v:.3}x</title></rect>"#,
                left + label_w
            );
            let _ = writeln!(
                s,
                r#"<text x="{:.2}" y="{}" font-size="11">{what} {v:.3}×</text>"#,
                left + label_w + bw + 6.0,
                by + 12.0
            );
        }
    }
    let one = left + label_w + scale;
    let _ = writeln!(
        s,
        r##"<line x1="{one:.2}" y1="{}" x2="{one:.2}" y2="{}" stroke="#333" stroke-dasharray="4 3"><title>1× (no gain)</title></line>"##,
        chart_top + 28.0,
        h - 24.0
    );
    s.push_str("</svg>\n");
    s
}
