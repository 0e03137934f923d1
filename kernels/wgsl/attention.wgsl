// Causal GQA attention over the paged cache, fp32 with an online softmax. One thread per
// (query head, token) walks keys 0..=pos of the token's sequence through its block table.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits)]. dispatch (ceil(H / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let heads = p[1];
    let kvh = p[2];
    let d = p[3];
    let bs = p[4];
    let max_blocks = p[5];
    let scale = bitcast<f32>(p[6]);
    let h = g.x;
    let t = g.y;
    if (h >= heads || t >= p[0]) { return; }
    let kv = h / (heads / kvh);
    let w = kvh * d;
    let qbase = (t * heads + h) * d;
    let table = token_seq[t] * max_blocks;
    var o: array<f32, 256>;
    for (var i = 0u; i < d; i++) { o[i] = 0.0; }
    var m = -3.4e38;
    var l = 0.0;
    for (var key = 0u; key <= positions[t]; key++) {
        let slot = tables[table + key / bs] * bs + key % bs;
        let kbase = slot * w + kv * d;
        var s = 0.0;
        for (var i = 0u; i < d; i++) { s += q[qbase + i] * kc[kbase + i]; }
        s *= scale;
        let m_new = max(m, s);
        let corr = exp(m - m_new);
        let pr = exp(s - m_new);
        l = l * corr + pr;
        for (var i = 0u; i < d; i++) { o[i] = o[i] * corr + pr * vc[kbase + i]; }
        m = m_new;
    }
    for (var i = 0u; i < d; i++) { out[qbase + i] = o[i] / l; }
}
