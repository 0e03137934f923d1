// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (KV head × head group, token, split) of 128 threads serves up to four query
// heads of one KV head, one per vec4 lane, so each key and value row is read once for all of
// them. It walks the split's slice of keys 0..=pos through the token's block table in tiles of
// 32 keys:
// - scores: four threads a key, each taking runs of 8 dimensions (4 threads read a 128-byte
//   run of the row together), four runs' 32 loads issued before the products that use them;
// - values: thread i holds dim i of all the tile's 32 rows, requested as soon as the rows'
//   addresses are known, before the scores are summed (consecutive threads read consecutive
//   dims: coalesced); dims i + 128 (head sizes past 128) are read 8 rows at a time after;
// - one thread a key sums the four partial dots; every thread then forms the running maximum
//   from the tile's scores (all hold the same state) and one thread a key its probability.
// The rows' addresses (from the block table) for the next tile are formed while a tile's loads
// are in flight. Shader compilers do not unroll these loops for us, and at batch 1 a tile's
// time is its dependent rounds of loads: a tile takes one (keys and values together), not nine.
// With one split it writes the normalised output; otherwise partials [o (d), max, sum] per
// (token, head, split) for attention_combine.wgsl.
// QKN (qk_norm_rope_attention, decode steps: one token per sequence): q is the QKV projection
// [T, (H + 2 KV) d] and the workgroup forms its heads' q itself (q_norm, RoPE from the batch's
// table cs [T, d/2, (cos, sin)]); the workgroups whose slice holds the token's own key form
// that key (k_norm, RoPE) and value in workgroup memory and use them for it instead of reading
// the cache, and the first head group's writes both to the token's slot. No workgroup reads
// that slot from the cache, so the write needs no ordering.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits, chunk, eps (f32 bits)].
// dispatch (KV * ceil(H / KV / 4), T, splits); d <= 256.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> kc: array<f32>;
@group(0) @binding(3) var<storage, read_write> vc: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<f32>;
// QKN only (other builds are given stand-ins).
@group(0) @binding(9) var<storage, read> q_norm: array<f32>;
@group(0) @binding(10) var<storage, read> k_norm: array<f32>;
@group(0) @binding(11) var<storage, read> cs: array<f32>;
@group(0) @binding(12) var<storage, read> slots: array<u32>;

override QKN: bool = false;

const TILE: u32 = 32u;
const PARTS: u32 = 4u;
const RUN: u32 = 8u;
const WG: u32 = 128u;
const MAX_G: u32 = 4u;
const LOW: f32 = -3.4e38;
var<workgroup> qs: array<vec4<f32>, 264>;   // q of the 4 heads by dim (d <= 256, + a run)
var<workgroup> partial: array<vec4<f32>, 128>;
var<workgroup> scores: array<vec4<f32>, 32>;
var<workgroup> probs: array<vec4<f32>, 32>;
var<workgroup> bases: array<u32, 64>;   // two tiles' row addresses
var<workgroup> own_k: array<f32, 264>;     // QKN: the token's own key and value
var<workgroup> own_v: array<f32, 264>;
var<workgroup> red_k: array<f32, 128>;
const OWN: u32 = 0xffffffffu;              // bases[j] of the token's own key (QKN)

// Loads without branches (an index past the data reads element 0, then is zeroed), so a batch
// of them issues together.
fn k_at(i: u32, ok: bool) -> f32 {
    return select(0.0, kc[select(0u, i, ok)], ok);
}

// Dim i of the value row at `base`, or of the token's own value (base OWN, QKN).
fn v_at(base: u32, i: u32, ok: bool) -> f32 {
    let mine = QKN && base == OWN;
    let x = vc[select(0u, base + i, ok && !mine)];
    return select(select(0.0, x, ok), own_v[min(i, 263u)], ok && mine);
}

// The dot of q (the group's heads, by vec4 lane) with the run of 8 key dims from i of the row
// at `base` (dims past d are zeros).
fn run_dot(base: u32, i: u32, d: u32) -> vec4<f32> {
    let k0 = k_at(base + i, i < d);
    let k1 = k_at(base + i + 1u, i + 1u < d);
    let k2 = k_at(base + i + 2u, i + 2u < d);
    let k3 = k_at(base + i + 3u, i + 3u < d);
    let k4 = k_at(base + i + 4u, i + 4u < d);
    let k5 = k_at(base + i + 5u, i + 5u < d);
    let k6 = k_at(base + i + 6u, i + 6u < d);
    let k7 = k_at(base + i + 7u, i + 7u < d);
    let q = min(i, 256u);
    return qs[q] * k0 + qs[q + 1u] * k1 + qs[q + 2u] * k2 + qs[q + 3u] * k3 + qs[q + 4u] * k4
        + qs[q + 5u] * k5 + qs[q + 6u] * k6 + qs[q + 7u] * k7;
}

// Dim i of the value rows of the tile's keys j..j+3 (zeros from key n on); the tile's row
// addresses start at bases[cur].
fn v4(cur: u32, j: u32, n: u32, i: u32, ok: bool) -> vec4<f32> {
    let b = cur + j;
    return vec4<f32>(v_at(bases[b], i, ok && j < n), v_at(bases[b + 1u], i, ok && j + 1u < n),
        v_at(bases[b + 2u], i, ok && j + 2u < n), v_at(bases[b + 3u], i, ok && j + 3u < n));
}

// Where key `key`'s row starts in the cache (OWN for the token's own key when this slice forms
// it, 0 past the slice's keys).
fn row_base(key: u32, keys: u32, own: bool, table: u32, bs: u32, w: u32, off: u32) -> u32 {
    if (key >= keys) { return 0u; }
    if (own && key == keys - 1u) { return OWN; }
    return (tables[table + key / bs] * bs + key % bs) * w + off;
}

// The probabilities of keys j..j+3 (by head lane) times their value dims v.
fn pv4(j: u32, v: vec4<f32>) -> vec4<f32> {
    return probs[j] * v.x + probs[j + 1u] * v.y + probs[j + 2u] * v.z + probs[j + 3u] * v.w;
}

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
    var qstride = heads * d;
    if (QKN) { qstride = (heads + 2u * kvh) * d; }
    let qrow = t * qstride;
    let own = QKN && begin < keys && keys == positions[t] + 1u;  // this slice holds the own key
    var ssq = vec4<f32>(0.0);
    var ssk = 0.0;
    for (var i = lid; i < d + RUN; i += WG) {
        var qv = vec4<f32>(0.0);
        if (i < d) {
            for (var g = 0u; g < MAX_G; g++) {
                if (g < gn) { qv[g] = q[qrow + (h0 + g) * d + i]; }
            }
            if (own) {
                let kx = q[qrow + (heads + kv) * d + i];
                own_k[i] = kx;
                own_v[i] = q[qrow + (heads + kvh + kv) * d + i];
                ssk += kx * kx;
            }
        }
        qs[i] = qv;
        ssq += qv * qv;
    }
    if (QKN) {
        // Per-head RMS of q (vec4 lanes) and of the own key, then RoPE in place: thread i
        // rotates the pairs (i, i + d/2), reading both before writing either.
        partial[lid] = ssq;
        red_k[lid] = ssk;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                partial[lid] += partial[lid + s];
                red_k[lid] += red_k[lid + s];
            }
            workgroupBarrier();
        }
        let eps = bitcast<f32>(p[9]);
        let inv_q = inverseSqrt(partial[0] / f32(d) + eps);
        let inv_k = inverseSqrt(red_k[0] / f32(d) + eps);
        let half = d / 2u;
        for (var i = lid; i < half; i += WG) {
            let c = cs[(t * half + i) * 2u];
            let sn = cs[(t * half + i) * 2u + 1u];
            let a = qs[i] * inv_q * q_norm[i];
            let b = qs[i + half] * inv_q * q_norm[i + half];
            qs[i] = (a * c - b * sn) * scale;
            qs[i + half] = (b * c + a * sn) * scale;
            if (own) {
                let ka = own_k[i] * inv_k * k_norm[i];
                let kb = own_k[i + half] * inv_k * k_norm[i + half];
                own_k[i] = ka * c - kb * sn;
                own_k[i + half] = kb * c + ka * sn;
            }
        }
        workgroupBarrier();
        if (own && wg.x % per_kv == 0u) {
            let dst = slots[t] * w + kv * d;
            for (var i = lid; i < d; i += WG) {
                kc[dst + i] = own_k[i];
                vc[dst + i] = own_v[i];
            }
        }
    } else {
        for (var i = lid; i < d; i += WG) { qs[i] *= scale; }
    }
    // Lanes past gn see q = 0: finite scores whose outputs are never written.
    var o0 = vec4<f32>(0.0);
    var o1 = vec4<f32>(0.0);
    var m = vec4<f32>(LOW);
    var l = vec4<f32>(0.0);
    let kl = lid / PARTS;
    let kp = lid % PARTS;
    let has1 = lid + WG < d;
    // The row addresses of a tile's keys, double-buffered: the first tile's now, each next
    // tile's while this one's loads are in flight, so each tile's key and value loads go out
    // together in one round.
    let row_off = kv * d;
    if (lid < TILE) { bases[lid] = row_base(begin + lid, keys, own, table, bs, w, row_off); }
    var cur = 0u;
    for (var tile = begin; tile < keys; tile += TILE) {
        workgroupBarrier();  // qs and this tile's bases written; the previous tile's probs consumed
        let key = tile + kl;
        let n = min(TILE, keys - tile);
        let base = bases[cur + kl];
        var acc = vec4<f32>(0.0);
        if (QKN && key < keys && base == OWN) {
            for (var i = kp * RUN; i < d; i += PARTS * RUN) {
                for (var u = 0u; u < RUN; u++) { acc += qs[i + u] * own_k[i + u]; }
            }
        } else if (key < keys) {
            // 128 dims an iteration: four runs of 8 a thread, 32 loads in flight.
            for (var i = kp * RUN; i < d; i += 4u * PARTS * RUN) {
                acc += run_dot(base, i, d) + run_dot(base, i + PARTS * RUN, d)
                    + run_dot(base, i + 2u * PARTS * RUN, d) + run_dot(base, i + 3u * PARTS * RUN, d);
            }
        }
        // The tile's value rows for dim lid: they do not wait for the scores.
        let ok0 = lid < d;
        let va = v4(cur, 0u, n, lid, ok0);
        let vb = v4(cur, 4u, n, lid, ok0);
        let vc4 = v4(cur, 8u, n, lid, ok0);
        let vd = v4(cur, 12u, n, lid, ok0);
        let ve = v4(cur, 16u, n, lid, ok0);
        let vf = v4(cur, 20u, n, lid, ok0);
        let vg = v4(cur, 24u, n, lid, ok0);
        let vh = v4(cur, 28u, n, lid, ok0);
        if (lid < TILE) {
            bases[(cur ^ TILE) + lid] = row_base(tile + TILE + lid, keys, own, table, bs, w, row_off);
        }
        partial[lid] = acc;
        workgroupBarrier();
        if (lid < n) {
            let b = lid * PARTS;
            scores[lid] = partial[b] + partial[b + 1u] + partial[b + 2u] + partial[b + 3u];
        }
        workgroupBarrier();
        var big = m;
        for (var j = 0u; j < n; j++) { big = max(big, scores[j]); }
        let corr = exp(m - big);
        m = big;
        l *= corr;
        o0 *= corr;
        o1 *= corr;
        // Keys past the tile's last get probability 0 (their value rows are zeros).
        if (lid < TILE) { probs[lid] = select(vec4<f32>(0.0), exp(scores[lid] - m), lid < n); }
        workgroupBarrier();
        o0 += pv4(0u, va) + pv4(4u, vb) + pv4(8u, vc4) + pv4(12u, vd) + pv4(16u, ve)
            + pv4(20u, vf) + pv4(24u, vg) + pv4(28u, vh);
        for (var j = 0u; j < TILE; j += 4u) {
            l += probs[j] + probs[j + 1u] + probs[j + 2u] + probs[j + 3u];
        }
        // Dims past 128 (head sizes up to 256): 8 rows a round.
        if (has1) {
            var j = 0u;
            for (; j + RUN <= n; j += RUN) {
                let c0 = v_at(bases[cur + j], lid + WG, true);
                let c1 = v_at(bases[cur + j + 1u], lid + WG, true);
                let c2 = v_at(bases[cur + j + 2u], lid + WG, true);
                let c3 = v_at(bases[cur + j + 3u], lid + WG, true);
                let c4 = v_at(bases[cur + j + 4u], lid + WG, true);
                let c5 = v_at(bases[cur + j + 5u], lid + WG, true);
                let c6 = v_at(bases[cur + j + 6u], lid + WG, true);
                let c7 = v_at(bases[cur + j + 7u], lid + WG, true);
                o1 += probs[j] * c0 + probs[j + 1u] * c1 + probs[j + 2u] * c2 + probs[j + 3u] * c3
                    + probs[j + 4u] * c4 + probs[j + 5u] * c5 + probs[j + 6u] * c6
                    + probs[j + 7u] * c7;
            }
            for (; j < n; j++) { o1 += probs[j] * v_at(bases[cur + j], lid + WG, true); }
        }
        cur ^= TILE;
    }
    for (var g = 0u; g < MAX_G; g++) {
        if (g < gn) {
            let h = h0 + g;
            if (splits == 1u) {
                let ob = (t * heads + h) * d;
                if (lid < d) { out[ob + lid] = o0[g] / l[g]; }
                if (has1) { out[ob + lid + WG] = o1[g] / l[g]; }
            } else {
                // A split past the token's position has no keys: l = 0 tells the combine to
                // skip it.
                let pb = ((t * heads + h) * splits + split) * (d + 2u);
                if (lid < d) { part[pb + lid] = o0[g]; }
                if (has1) { part[pb + lid + WG] = o1[g]; }
                if (lid == 0u) {
                    part[pb + d] = m[g];
                    part[pb + d + 1u] = l[g];
                }
            }
        }
    }
}
