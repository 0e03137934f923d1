// Causal GQA prompt attention over the paged cache, query-blocked (flash): a 128-thread
// workgroup serves up to 8 consecutive tokens of one sequence (a block) for up to four query
// heads of one KV head (vec4 lanes, as attention.wgsl), and walks keys 0..=the block's last
// position in tiles of 16, each tile's key and value rows read once for all of the block's
// queries (attention.wgsl reads every row once a token: a 2,048-token prompt's attention spent
// 9.9 ms a layer on the H200 re-reading them). fp32 with an online softmax:
// - the tile's row addresses (block table), then its keys into workgroup memory as vec4s (four
//   loads a thread, one round), its values requested into registers at the same time;
// - scores: thread (query lid / 16, key lid % 16) takes the dot over d, keys past the query's
//   position masked;
// - every thread turns its score into a probability against its query's new running max, one
//   thread a query updates the running max and sum; the values replace the keys in workgroup
//   memory;
// - thread i accumulates output dim i of every query of the block.
// params: attention.wgsl's (scale at 6); blocks: [first token, tokens] per block.
// dispatch (KV * ceil(H / KV / 4), blocks); d <= 128 and a multiple of 4.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<vec4<f32>>;
@group(0) @binding(3) var<storage, read> vc: array<vec4<f32>>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read> blocks: array<u32>;

const WG: u32 = 128u;
const QB: u32 = 8u;
const KT: u32 = 16u;
const MAX_G: u32 = 4u;
const MAX_D4: u32 = 32u;                     // 128 dims as vec4s
// Row strides padded by one vec4: the 16 keys a score step reads (and the queries) then fall in
// different banks, where a 512-byte stride put them all in the same ones.
const Q_STRIDE: u32 = 129u;
const KV_STRIDE: u32 = 33u;
const LOW: f32 = -3.4e38;
var<workgroup> qs: array<vec4<f32>, 1032>;  // [QB][129]: queries (heads by lane), scaled
var<workgroup> kvt: array<vec4<f32>, 528>;  // [KT][33]: the tile's keys, then its values
var<workgroup> sc: array<vec4<f32>, 128>;   // [QB][KT]: scores
var<workgroup> pr: array<vec4<f32>, 128>;   // [QB][KT]: probabilities
var<workgroup> ms: array<vec4<f32>, 8>;     // [QB]: running max
var<workgroup> ls: array<vec4<f32>, 8>;     // [QB]: running sum
var<workgroup> corr: array<vec4<f32>, 8>;   // [QB]: this tile's correction of o
var<workgroup> rows: array<u32, 16>;        // [KT]: the tile's row offsets (vec4s)

// Row `kj`'s vec4 `c` of the tile (keys or values), or zeros for a key past the tile's end.
fn tile_vec(v: bool, kj: u32, c: u32, n: u32, d4: u32) -> vec4<f32> {
    let ok = kj < n && c < d4;
    let i = select(0u, rows[kj] + c, ok);
    var x: vec4<f32>;
    if (v) { x = vc[i]; } else { x = kc[i]; }
    return select(vec4<f32>(0.0), x, ok);
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let kvh = p[2];
    let d = p[3];
    let d4 = d / 4u;
    let bs = p[4];
    let max_blocks = p[5];
    let scale = bitcast<f32>(p[6]);
    let group = heads / kvh;
    let per_kv = (group + MAX_G - 1u) / MAX_G;
    let kv = wg.x / per_kv;
    let h0 = kv * group + (wg.x % per_kv) * MAX_G;
    let gn = min(MAX_G, (kv + 1u) * group - h0);
    let first = blocks[2u * wg.y];
    let count = blocks[2u * wg.y + 1u];
    let table = token_seq[first] * max_blocks;
    let pos0 = positions[first];
    let keys = pos0 + count;  // keys 0..keys-1: through the block's last position
    let w4 = kvh * d4;
    for (var i = lid; i < QB * 128u; i += WG) {
        let qi = i / 128u;
        let dim = i % 128u;
        var v = vec4<f32>(0.0);
        if (qi < count && dim < d) {
            for (var g = 0u; g < MAX_G; g++) {
                if (g < gn) { v[g] = q[((first + qi) * heads + h0 + g) * d + dim] * scale; }
            }
        }
        qs[qi * Q_STRIDE + dim] = v;
    }
    if (lid < QB) {
        ms[lid] = vec4<f32>(LOW);
        ls[lid] = vec4<f32>(0.0);
    }
    // Thread lid: output dim lid of the 8 queries.
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var o2 = vec4<f32>(0.0);
    var o3 = vec4<f32>(0.0);
    var o4 = vec4<f32>(0.0);
    var o5 = vec4<f32>(0.0);
    var o6 = vec4<f32>(0.0);
    var o7 = vec4<f32>(0.0);
    let sq = lid / KT;   // the score this thread forms: query sq, key sk
    let sk = lid % KT;
    // The tile's vec4s a thread stages: KT rows of 32 vec4s = 512, four a thread.
    let r0 = lid / MAX_D4;
    let c0 = lid % MAX_D4;
    for (var tile = 0u; tile < keys; tile += KT) {
        let n = min(KT, keys - tile);
        workgroupBarrier();  // the previous tile's values and probabilities consumed
        if (lid < KT) {
            let key = tile + lid;
            var r = 0u;
            if (key < keys) { r = ((tables[table + key / bs] * bs + key % bs) * w4 + kv * d4); }
            rows[lid] = r;
        }
        workgroupBarrier();
        let k0 = tile_vec(false, r0, c0, n, d4);
        let k1 = tile_vec(false, r0 + 4u, c0, n, d4);
        let k2 = tile_vec(false, r0 + 8u, c0, n, d4);
        let k3 = tile_vec(false, r0 + 12u, c0, n, d4);
        let v0 = tile_vec(true, r0, c0, n, d4);
        let v1 = tile_vec(true, r0 + 4u, c0, n, d4);
        let v2 = tile_vec(true, r0 + 8u, c0, n, d4);
        let v3 = tile_vec(true, r0 + 12u, c0, n, d4);
        let at = r0 * KV_STRIDE + c0;
        kvt[at] = k0;
        kvt[at + 4u * KV_STRIDE] = k1;
        kvt[at + 8u * KV_STRIDE] = k2;
        kvt[at + 12u * KV_STRIDE] = k3;
        workgroupBarrier();
        // Score (sq, sk): four accumulators over the dims, 4 dims a step.
        var s = vec4<f32>(0.0);
        for (var c = 0u; c < d4; c++) {
            let kk = kvt[sk * KV_STRIDE + c];
            let qb = sq * Q_STRIDE + 4u * c;
            s += qs[qb] * kk.x + qs[qb + 1u] * kk.y + qs[qb + 2u] * kk.z + qs[qb + 3u] * kk.w;
        }
        let key = tile + sk;
        if (sq >= count || sk >= n || key > pos0 + sq) { s = vec4<f32>(LOW); }
        sc[lid] = s;
        workgroupBarrier();
        // The values replace the keys; every thread turns its score into a probability against
        // its query's new running max, then one thread a query updates the softmax state.
        kvt[at] = v0;
        kvt[at + 4u * KV_STRIDE] = v1;
        kvt[at + 8u * KV_STRIDE] = v2;
        kvt[at + 12u * KV_STRIDE] = v3;
        let old = ms[sq];
        var big = old;
        for (var j = 0u; j < KT; j++) { big = max(big, sc[sq * KT + j]); }
        // Masked keys (LOW) get 0, also while every key so far is masked (big LOW).
        pr[lid] = select(vec4<f32>(0.0), exp(s - big), s > vec4<f32>(0.5 * LOW));
        workgroupBarrier();
        if (sk == 0u) {
            var sum = vec4<f32>(0.0);
            for (var j = 0u; j < KT; j++) { sum += pr[sq * KT + j]; }
            let c = exp(old - big);
            ms[sq] = big;
            ls[sq] = ls[sq] * c + sum;
            corr[sq] = c;
        }
        workgroupBarrier();
        if (lid < d) {
            o0 *= corr[0];
            o1 *= corr[1];
            o2 *= corr[2];
            o3 *= corr[3];
            o4 *= corr[4];
            o5 *= corr[5];
            o6 *= corr[6];
            o7 *= corr[7];
            for (var j = 0u; j < n; j++) {
                let v = kvt[j * KV_STRIDE + lid / 4u][lid % 4u];
                o0 += pr[j] * v;
                o1 += pr[KT + j] * v;
                o2 += pr[2u * KT + j] * v;
                o3 += pr[3u * KT + j] * v;
                o4 += pr[4u * KT + j] * v;
                o5 += pr[5u * KT + j] * v;
                o6 += pr[6u * KT + j] * v;
                o7 += pr[7u * KT + j] * v;
            }
        }
    }
    workgroupBarrier();
    if (lid < d) {
        let os = array<vec4<f32>, 8>(o0, o1, o2, o3, o4, o5, o6, o7);
        for (var qi = 0u; qi < count; qi++) {
            let o = os[qi] / ls[qi];
            for (var g = 0u; g < gn; g++) {
                out[((first + qi) * heads + h0 + g) * d + lid] = o[g];
            }
        }
    }
}
