// lab: the combine as it was before the 17th session (a split at a time, 64 threads), for LAB_COMBINE.
// out[t, h, :] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M) over the splits attention.wgsl
// left in `part` ([o (d), max, sum] per (token, head, split)); splits without keys (sum 0) are
// skipped. params: as attention.wgsl's. dispatch (H, T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let d = p[3];
    let splits = p[7];
    let h = wg.x;
    let t = wg.y;
    if (h >= heads || t >= p[0]) { return; }
    let base = (t * heads + h) * splits;
    var big = -3.4e38;
    for (var s = 0u; s < splits; s++) {
        let pb = (base + s) * (d + 2u);
        if (part[pb + d + 1u] > 0.0) { big = max(big, part[pb + d]); }
    }
    for (var i = lid; i < d; i += 64u) {
        var num = 0.0;
        var den = 0.0;
        for (var s = 0u; s < splits; s++) {
            let pb = (base + s) * (d + 2u);
            let l = part[pb + d + 1u];
            if (l > 0.0) {
                let f = exp(part[pb + d] - big);
                num += part[pb + i] * f;
                den += l * f;
            }
        }
        out[(t * heads + h) * d + i] = num / den;
    }
}
