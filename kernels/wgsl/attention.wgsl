// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (KV head × head group, token, split) of WG threads (128, or 256 in the
// subgroup build where subgroups have at least 8) serves up to four query heads of one KV head,
// one per vec4 lane, so each key and value row is read once for all of them. It walks the
// split's slice of keys 0..=pos through the token's block table in tiles of 32 keys:
// - scores: PARTS = WG / 32 threads a key (4 or 8), each taking runs of 8 dimensions (4 threads
//   read a 128-byte run of the row together), two runs' 16 loads issued before the products
//   that use them;
// - a key's partial dots are summed (`tile_scores`), every thread forms the running maximum
//   from the tile's scores (`tile_max`; all hold the same state);
// - values: thread i accumulates output dims i and i + WG over the tile's rows, 8 rows' loads
//   at a time (consecutive threads read consecutive dims: coalesced), each row's probability
//   formed where it is used. Where d <= WG / 2 the workgroup's two halves take the tile's two
//   halves of keys instead, each over all dims (16 rows' loads at a time), and add their sums
//   at the end.
// This file ends before those reductions and the entry point: attention_wg.wgsl (workgroup
// memory and barriers) or attention_sg.wgsl (subgroup operations) follows it.
// Shader compilers do not unroll these loops for us: issuing loads ahead of their use is what
// keeps more than one memory access in flight per thread.
// With one split it writes the normalised output; otherwise partials [o (d), max, sum] per
// (token, head, split) for attention_combine.wgsl.
// QKN (qk_norm_rope_attention, decode steps: one token per sequence): q is the QKV projection
// [T, (H + 2 KV) d] and the workgroup forms its heads' q itself (q_norm, RoPE from the batch's
// table cs [T, d/2, (cos, sin)]); the workgroups whose slice holds the token's own key form
// that key (k_norm, RoPE) and value in workgroup memory and use them for it instead of reading
// the cache, and the first head group's writes both to the token's slot. No workgroup reads
// that slot from the cache, so the write needs no ordering.
// Prefetch (QKN, entry point `main_pf`; `QFUSE_WGPU_PREFETCH`): workgroups past the splits
// (wg.z >= splits) attend to nothing. They read one word of every 32-byte sector of up to four weight buffers
// (pf0..pf3: the products that follow this attention), so those products find their weights in
// L2 instead of DRAM while attention, which moves little, holds the critical path.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits, chunk, eps (f32 bits),
// sectors of pf0..pf3 (0: unused)].
// dispatch (KV * ceil(H / KV / 4), T, splits + prefetch slices); d <= 256.
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
// `main_pf` only: the weights, and each prefetching thread's XOR of the words it read (written
// so the loads are kept; tests check it).
@group(0) @binding(13) var<storage, read> pf0: array<u32>;
@group(0) @binding(14) var<storage, read> pf1: array<u32>;
@group(0) @binding(15) var<storage, read> pf2: array<u32>;
@group(0) @binding(16) var<storage, read> pf3: array<u32>;
@group(0) @binding(17) var<storage, read_write> sink: array<u32>;

override QKN: bool = false;

// Threads a workgroup, and threads a key in a tile's scores (so WG / PARTS = TILE): 128 and 4,
// or 256 and 8 (the subgroup build, subgroups of at least 8). With 256 and d <= 128 the two
// halves of the workgroup add the values of a tile's two halves of keys (under the same running
// max, so their sums add at the end): each thread's rounds of key loads and of value rows are
// halved.
override WG: u32 = 128u;
override PARTS: u32 = 4u;
const TILE: u32 = 32u;
const RUN: u32 = 8u;
const MAX_G: u32 = 4u;
const LOW: f32 = -3.4e38;
var<workgroup> qs: array<vec4<f32>, 264>;   // q of the 4 heads by dim (d <= 256, + a run)
var<workgroup> partial: array<vec4<f32>, 256>;
var<workgroup> scores: array<vec4<f32>, 32>;
var<workgroup> bases: array<u32, 32>;
var<workgroup> own_k: array<f32, 264>;     // QKN: the token's own key and value
var<workgroup> own_v: array<f32, 264>;
var<workgroup> red_k: array<f32, 256>;
var<workgroup> lsum: vec4<f32>;
const OWN: u32 = 0xffffffffu;              // bases[j] of the token's own key (QKN)

fn k_at(i: u32, ok: bool) -> f32 {
    var x = 0.0;
    if (ok) { x = kc[i]; }
    return x;
}

// Dim i of the value row at `base`, or of the token's own value (base OWN, QKN).
fn v_at(base: u32, i: u32, ok: bool) -> f32 {
    var x = 0.0;
    if (ok) {
        if (QKN && base == OWN) {
            x = own_v[i];
        } else {
            x = vc[base + i];
        }
    }
    return x;
}

// A run of 8 key dims from i of the row at `base` (dims past d read as 0), loaded.
struct Run8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

fn load_run(base: u32, i: u32, d: u32) -> Run8 {
    return Run8(
        vec4<f32>(k_at(base + i, true), k_at(base + i + 1u, i + 1u < d),
            k_at(base + i + 2u, i + 2u < d), k_at(base + i + 3u, i + 3u < d)),
        vec4<f32>(k_at(base + i + 4u, i + 4u < d), k_at(base + i + 5u, i + 5u < d),
            k_at(base + i + 6u, i + 6u < d), k_at(base + i + 7u, i + 7u < d)),
    );
}

// q's dot with a loaded run of dims i..i + 7 (vec4 lanes: the heads).
fn dot_run(i: u32, r: Run8) -> vec4<f32> {
    return qs[i] * r.a.x + qs[i + 1u] * r.a.y + qs[i + 2u] * r.a.z + qs[i + 3u] * r.a.w
        + qs[i + 4u] * r.b.x + qs[i + 5u] * r.b.y + qs[i + 6u] * r.b.z + qs[i + 7u] * r.b.w;
}

// Dim `at` of the value rows of the tile's keys j..j + 7, loaded (zero where !ok).
fn load_rows(j: u32, at: u32, ok: bool) -> Run8 {
    return Run8(
        vec4<f32>(v_at(bases[j], at, ok), v_at(bases[j + 1u], at, ok),
            v_at(bases[j + 2u], at, ok), v_at(bases[j + 3u], at, ok)),
        vec4<f32>(v_at(bases[j + 4u], at, ok), v_at(bases[j + 5u], at, ok),
            v_at(bases[j + 6u], at, ok), v_at(bases[j + 7u], at, ok)),
    );
}

// Keys j..j + 7's probabilities under the running max m (vec4 lanes: the heads).
fn probs(j: u32, m: vec4<f32>) -> array<vec4<f32>, 8> {
    return array<vec4<f32>, 8>(
        exp(scores[j] - m), exp(scores[j + 1u] - m), exp(scores[j + 2u] - m),
        exp(scores[j + 3u] - m), exp(scores[j + 4u] - m), exp(scores[j + 5u] - m),
        exp(scores[j + 6u] - m), exp(scores[j + 7u] - m),
    );
}

fn prob_sum(p: array<vec4<f32>, 8>) -> vec4<f32> {
    return p[0] + p[1] + p[2] + p[3] + p[4] + p[5] + p[6] + p[7];
}

// The rows' values weighted by their probabilities, summed.
fn weigh(p: array<vec4<f32>, 8>, v: Run8) -> vec4<f32> {
    return p[0] * v.a.x + p[1] * v.a.y + p[2] * v.a.z + p[3] * v.a.w + p[4] * v.b.x
        + p[5] * v.b.y + p[6] * v.b.z + p[7] * v.b.w;
}

// Sums over the workgroup's threads (`workgroup_sums`): q's sums of squares (vec4 lanes) and
// the own key's.
struct Sums {
    q: vec4<f32>,
    k: f32,
}

// The workgroup's work; `sl` and `sgs` are the thread's subgroup lane and the subgroup size
// (0 and 1 where the reductions use no subgroups).
fn attend(wg: vec3<u32>, lid: u32, sl: u32, sgs: u32) {
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
    let last = keys - 1u;
    let own = QKN && begin < keys && keys == positions[t] + 1u;  // this slice holds the own key
    let kl = lid / PARTS;
    let kp = lid % PARTS;
    // Requested before the prologue's barriers, so their latency overlaps it: the block-table
    // entry of this thread's key in the first tile, and (QKN) the RoPE table entries and gains
    // of this thread's pair of dims (d <= 256: at most one pair a thread).
    var first_block = 0u;
    if (begin + kl < keys) { first_block = tables[table + (begin + kl) / bs]; }
    let half = d / 2u;
    var rope = vec2<f32>(0.0);  // cos, sin
    var gq = vec2<f32>(0.0);
    var gk = vec2<f32>(0.0);
    if (QKN && lid < half) {
        rope = vec2<f32>(cs[(t * half + lid) * 2u], cs[(t * half + lid) * 2u + 1u]);
        gq = vec2<f32>(q_norm[lid], q_norm[lid + half]);
        gk = vec2<f32>(k_norm[lid], k_norm[lid + half]);
    }
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
        let sums = workgroup_sums(ssq, ssk, lid, sl, sgs);
        let eps = bitcast<f32>(p[9]);
        let inv_q = inverseSqrt(sums.q / f32(d) + eps);
        let inv_k = inverseSqrt(sums.k / f32(d) + eps);
        if (lid < half) {
            let i = lid;
            let c = rope.x;
            let sn = rope.y;
            let a = qs[i] * inv_q * gq.x;
            let b = qs[i + half] * inv_q * gq.y;
            qs[i] = (a * c - b * sn) * scale;
            qs[i + half] = (b * c + a * sn) * scale;
            if (own) {
                let ka = own_k[i] * inv_k * gk.x;
                let kb = own_k[i + half] * inv_k * gk.y;
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
    let has1 = lid + WG < d;
    // Value dims: thread `dim` of half `vh` (two halves only where a half covers d).
    let halves = select(1u, 2u, d <= WG / 2u);
    let dim = lid % (WG / halves);
    let vh = lid / (WG / halves);
    let ok0 = dim < d;
    for (var tile = begin; tile < keys; tile += TILE) {
        workgroupBarrier();  // qs written; the previous tile's scores and bases consumed
        let key = tile + kl;
        var acc = vec4<f32>(0.0);
        if (own && key == last) {
            if (kp == 0u) { bases[kl] = OWN; }
            for (var i = kp * RUN; i < d; i += PARTS * RUN) {
                for (var u = 0u; u < RUN; u++) { acc += qs[i + u] * own_k[i + u]; }
            }
        } else if (key < keys) {
            var block = first_block;
            if (tile != begin) { block = tables[table + key / bs]; }
            let base = (block * bs + key % bs) * w + kv * d;
            if (kp == 0u) { bases[kl] = base; }
            // Two runs' loads at a time (a thread's share of a 128-dim key at 8 threads a key).
            let far = PARTS * RUN;
            var i = kp * RUN;
            for (; i + far < d; i += 2u * far) {
                let r0 = load_run(base, i, d);
                let r1 = load_run(base, i + far, d);
                acc += dot_run(i, r0) + dot_run(i + far, r1);
            }
            if (i < d) { acc += dot_run(i, load_run(base, i, d)); }
        }
        let n = min(TILE, keys - tile);
        tile_scores(acc, lid, n);
        let big = tile_max(m, n, sl, sgs);
        let corr = exp(m - big);
        m = big;
        l *= corr;
        o0 *= corr;
        o1 *= corr;
        let per = (n + halves - 1u) / halves;
        var j = vh * per;
        let jend = min(n, j + per);
        if (halves == 2u) {
            // A half's 16 keys' value rows at its one dim in one round (no dims past WG).
            for (; j + 2u * RUN <= jend; j += 2u * RUN) {
                let va = load_rows(j, dim, ok0);
                let vb = load_rows(j + RUN, dim, ok0);
                let pa = probs(j, m);
                let pb = probs(j + RUN, m);
                l += prob_sum(pa) + prob_sum(pb);
                o0 += weigh(pa, va) + weigh(pb, vb);
            }
        }
        for (; j + RUN <= jend; j += RUN) {
            let va = load_rows(j, dim, ok0);
            let vc = load_rows(j, lid + WG, has1);
            let pa = probs(j, m);
            l += prob_sum(pa);
            o0 += weigh(pa, va);
            o1 += weigh(pa, vc);
        }
        for (; j < jend; j++) {
            let b = bases[j];
            let pj = exp(scores[j] - m);
            l += pj;
            o0 += pj * v_at(b, dim, dim < d);
            o1 += pj * v_at(b, lid + WG, has1);
        }
    }
    if (halves == 2u) {
        if (vh == 1u) {
            partial[dim] = o0;
            if (dim == 0u) { lsum = l; }
        }
        workgroupBarrier();
        if (vh == 0u) {
            o0 += partial[dim];
            l += lsum;
        }
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

// Word 8 s (sector s) of prefetch buffer b, or 0 past its sectors.
fn pf_word(b: u32, s: u32) -> u32 {
    if (s >= p[10u + b]) { return 0u; }
    switch b {
        case 0u: { return pf0[s * 8u]; }
        case 1u: { return pf1[s * 8u]; }
        case 2u: { return pf2[s * 8u]; }
        default: { return pf3[s * 8u]; }
    }
}

// A prefetching workgroup's share: thread i of all n prefetching threads reads sectors i,
// i + n, ... of each buffer, four loads issued before their words are used.
fn prefetch(wg: vec3<u32>, nw: vec3<u32>, lid: u32) {
    let i = ((wg.z - p[7]) * nw.y + wg.y) * nw.x * WG + wg.x * WG + lid;
    let n = (nw.z - p[7]) * nw.y * nw.x * WG;
    var acc = 0u;
    for (var b = 0u; b < 4u; b++) {
        for (var s = i; s < p[10u + b]; s += 4u * n) {
            let w0 = pf_word(b, s);
            let w1 = pf_word(b, s + n);
            let w2 = pf_word(b, s + 2u * n);
            let w3 = pf_word(b, s + 3u * n);
            acc ^= w0 ^ w1 ^ w2 ^ w3;
        }
    }
    sink[i] = acc;
}
