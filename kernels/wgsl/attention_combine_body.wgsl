// The body of attention_combine.wgsl, shared with layer.wgsl: head h of token t, by a workgroup
// of COMBINE_WG threads.
fn combine(h: u32, t: u32, lid: u32) {
    let heads = p[1];
    let d = p[3];
    let splits = p[7];
    if (h >= heads || t >= p[0]) { return; }
    let base = (t * heads + h) * splits;
    var big = -3.4e38;
    for (var s = 0u; s < splits; s++) {
        let pb = (base + s) * (d + 2u);
        if (part[pb + d + 1u] > 0.0) { big = max(big, part[pb + d]); }
    }
    for (var i = lid; i < d; i += COMBINE_WG) {
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
