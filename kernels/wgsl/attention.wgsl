// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (kv head × head group, token, split) of 128 threads serves up to MAX_G query
// heads of one KV head, so each key and value row is read once for all of them. It walks the
// split's slice of keys 0..=pos through the token's block table in tiles of 32 keys:
// - scores: four threads a key, each taking every fourth dimension for all the workgroup's heads
//   (a key row is read by 4 neighbouring threads, and a warp reads 8 rows at once);
// - one thread per (head, key) sums the four partial dots, then forms the running maximum over
//   the tile's scores of its head and the key's probability;
// - values: thread i accumulates output dims i and i + 128 of every head over the tile's rows
//   (consecutive threads read consecutive dims: coalesced).
// Loops over heads run to the constant MAX_G (guarded), so the per-head state stays in registers.
// With one split it writes the normalised output; otherwise partials [o (d), max, sum] per
// (token, head, split) for attention_combine.wgsl.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits, chunk].
// dispatch (KV * ceil(H / KV / MAX_G), T, splits); d <= 256.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<f32>;

const TILE: u32 = 32u;
const PARTS: u32 = 4u;
const WG: u32 = 128u;
const MAX_G: u32 = 4u;
const LOW: f32 = -3.4e38;
var<workgroup> qs: array<f32, 1024>;       // MAX_G heads × d <= 256, pre-scaled
var<workgroup> partial: array<f32, 512>;   // MAX_G × WG partial dot products
var<workgroup> scores: array<f32, 128>;    // MAX_G × TILE
var<workgroup> probs: array<f32, 128>;     // MAX_G × TILE
var<workgroup> tile_max: array<f32, 4>;    // MAX_G
var<workgroup> bases: array<u32, 32>;      // TILE

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let kvh = p[2];
    let d = p[3];
    let bs = p[4];
    let max_blocks = p[5];
    let scale = bitcast<f32>(p[6]);
    let splits = p[7];
    let chunk = p[8];
    let group = heads / kvh;
    let per_kv = (group + MAX_G - 1u) / MAX_G;
    let kv = wg.x / per_kv;
    let t = wg.y;
    let split = wg.z;
    if (kv >= kvh || t >= p[0]) { return; }
    let h0 = kv * group + (wg.x % per_kv) * MAX_G;
    let gn = min(MAX_G, (kv + 1u) * group - h0);
    let w = kvh * d;
    let table = token_seq[t] * max_blocks;
    let begin = split * chunk;
    let keys = min(positions[t] + 1u, begin + chunk);
    let qbase = (t * heads + h0) * d;
    for (var i = lid; i < gn * d; i += WG) { qs[i] = q[qbase + i] * scale; }
    var o = array<f32, 8>(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);  // [g * 2 + r]
    var m = array<f32, 4>(LOW, LOW, LOW, LOW);
    var l = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
    let kl = lid / PARTS;
    let kp = lid % PARTS;
    for (var tile = begin; tile < keys; tile += TILE) {
        workgroupBarrier();  // qs written; the previous tile's probs and bases consumed
        let key = tile + kl;
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        if (key < keys) {
            let base = (tables[table + key / bs] * bs + key % bs) * w + kv * d;
            if (kp == 0u) { bases[kl] = base; }
            for (var i = kp; i < d; i += PARTS) {
                let k = kc[base + i];
                for (var g = 0u; g < MAX_G; g++) {
                    if (g < gn) { acc[g] += qs[g * d + i] * k; }
                }
            }
        }
        for (var g = 0u; g < MAX_G; g++) { partial[g * WG + lid] = acc[g]; }
        workgroupBarrier();
        let n = min(TILE, keys - tile);
        let g = lid / TILE;
        let j = lid % TILE;
        if (lid < gn * TILE && j < n) {
            let b = g * WG + j * PARTS;
            scores[lid] = partial[b] + partial[b + 1u] + partial[b + 2u] + partial[b + 3u];
        }
        workgroupBarrier();
        if (lid < gn * TILE) {
            // Every thread holds the same running maximum m[g] (same updates, same order).
            var big = m[g];
            for (var jj = 0u; jj < n; jj++) { big = max(big, scores[g * TILE + jj]); }
            var pj = 0.0;
            if (j < n) { pj = exp(scores[lid] - big); }
            probs[lid] = pj;
            if (j == 0u) { tile_max[g] = big; }
        }
        workgroupBarrier();
        for (var g = 0u; g < MAX_G; g++) {
            if (g < gn) {
                let corr = exp(m[g] - tile_max[g]);
                m[g] = tile_max[g];
                l[g] *= corr;
                o[g * 2u] *= corr;
                o[g * 2u + 1u] *= corr;
            }
        }
        for (var j = 0u; j < n; j++) {
            let vb = bases[j];
            var v0 = 0.0;
            var v1 = 0.0;
            if (lid < d) { v0 = vc[vb + lid]; }
            if (lid + WG < d) { v1 = vc[vb + lid + WG]; }
            for (var g = 0u; g < MAX_G; g++) {
                if (g < gn) {
                    let pj = probs[g * TILE + j];
                    l[g] += pj;
                    o[g * 2u] += pj * v0;
                    o[g * 2u + 1u] += pj * v1;
                }
            }
        }
    }
    for (var g = 0u; g < MAX_G; g++) {
        if (g < gn) {
            let h = h0 + g;
            if (splits == 1u) {
                let ob = (t * heads + h) * d;
                if (lid < d) { out[ob + lid] = o[g * 2u] / l[g]; }
                if (lid + WG < d) { out[ob + lid + WG] = o[g * 2u + 1u] / l[g]; }
            } else {
                // A split past the token's position has no keys: l = 0 tells the combine to
                // skip it.
                let pb = ((t * heads + h) * splits + split) * (d + 2u);
                if (lid < d) { part[pb + lid] = o[g * 2u]; }
                if (lid + WG < d) { part[pb + lid + WG] = o[g * 2u + 1u]; }
                if (lid == 0u) {
                    part[pb + d] = m[g];
                    part[pb + d + 1u] = l[g];
                }
            }
        }
    }
}
