// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (head, token, split) of 64 threads walks the split's slice of keys 0..=pos
// through the token's block table in tiles of 64: thread j scores key j of the tile (q is in
// workgroup memory), every thread then reads the tile's 64 scores to update the running max and
// sum (no reduction barriers), and thread i accumulates output dims i, i + 64, ... over the
// tile's values (consecutive threads read consecutive dims: coalesced). With one split it writes
// the normalised output; otherwise partials [o (d), max, sum] per (token, head, split) for
// attention_combine.wgsl.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits, chunk].
// dispatch (H, T, splits); d <= 256.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<f32>;

const TILE: u32 = 64u;
var<workgroup> qs: array<f32, 256>;
var<workgroup> scores: array<f32, 64>;
var<workgroup> bases: array<u32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let kvh = p[2];
    let d = p[3];
    let bs = p[4];
    let max_blocks = p[5];
    let scale = bitcast<f32>(p[6]);
    let h = wg.x;
    let t = wg.y;
    let split = wg.z;
    let splits = p[7];
    if (h >= heads || t >= p[0]) { return; }
    let kv = h / (heads / kvh);
    let w = kvh * d;
    let qbase = (t * heads + h) * d;
    let table = token_seq[t] * max_blocks;
    let begin = split * p[8];
    let keys = min(positions[t] + 1u, begin + p[8]);
    for (var i = lid; i < d; i += TILE) { qs[i] = q[qbase + i] * scale; }
    var o = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    var m = -3.4e38;
    var l = 0.0;
    for (var tile = begin; tile < keys; tile += TILE) {
        workgroupBarrier();  // qs written; the previous tile's scores and bases consumed
        let key = tile + lid;
        var s = -3.4e38;
        if (key < keys) {
            let base = (tables[table + key / bs] * bs + key % bs) * w + kv * d;
            bases[lid] = base;
            var acc = 0.0;
            for (var i = 0u; i < d; i++) { acc += qs[i] * kc[base + i]; }
            s = acc;
        }
        scores[lid] = s;
        workgroupBarrier();
        let n = min(TILE, keys - tile);
        var m_tile = m;
        for (var j = 0u; j < n; j++) { m_tile = max(m_tile, scores[j]); }
        let corr = exp(m - m_tile);
        l *= corr;
        for (var r = 0u; r < 4u; r++) { o[r] *= corr; }
        for (var j = 0u; j < n; j++) {
            let pj = exp(scores[j] - m_tile);
            l += pj;
            let vb = bases[j];
            for (var r = 0u; r < 4u; r++) {
                let i = lid + r * TILE;
                if (i < d) { o[r] += pj * vc[vb + i]; }
            }
        }
        m = m_tile;
    }
    if (splits == 1u) {
        for (var r = 0u; r < 4u; r++) {
            let i = lid + r * TILE;
            if (i < d) { out[qbase + i] = o[r] / l; }
        }
        return;
    }
    // A split past the token's position has no keys: l = 0 tells the combine to skip it.
    let pb = ((t * heads + h) * splits + split) * (d + 2u);
    for (var r = 0u; r < 4u; r++) {
        let i = lid + r * TILE;
        if (i < d) { part[pb + i] = o[r]; }
    }
    if (lid == 0u) {
        part[pb + d] = m;
        part[pb + d + 1u] = l;
    }
}
