// lab variant (generated from attention.wgsl by generate.py): design: keys a dim a thread, coalesced, one round; subgroup sums
// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (KV head × head group, token, split) of 128 threads serves up to four query
// heads of one KV head, one per vec4 lane, so each key and value row is read once for all of
// them. It walks the split's slice of keys 0..=pos through the token's block table in tiles of
// 32 keys:
// - scores: four threads a key, each taking runs of 8 dimensions (4 threads read a 128-byte
//   run of the row together) with the 8 loads issued before the products that use them;
// - one thread a key sums the four partial dots; every thread then forms the running maximum
//   from the tile's scores (all hold the same state) and one thread a key its probability;
// - values: thread i accumulates output dims i and i + 128 over the tile's rows, 8 rows' loads
//   at a time (consecutive threads read consecutive dims: coalesced).
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
var<workgroup> qs: array<vec4<f32>, 264>;  // (lab: + WG read past d as zeros)   // q of the 4 heads by dim (d <= 256, + a run)
var<workgroup> partial: array<vec4<f32>, 128>;
var<workgroup> scores: array<vec4<f32>, 32>;
var<workgroup> probs: array<vec4<f32>, 32>;
var<workgroup> bases: array<u32, 32>;
var<workgroup> red: array<vec4<f32>, 512>;  // per key and subgroup (>= 8 lanes)
var<workgroup> own_k: array<f32, 264>;     // QKN: the token's own key and value
var<workgroup> own_v: array<f32, 264>;
var<workgroup> red_k: array<f32, 128>;
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

// Dim i of the tile's key j (0 past the tile or the head), from the cache or the token's own key.
fn key_dim(j: u32, i: u32, ok: bool, n: u32) -> f32 {
    var x = 0.0;
    if (ok && j < n) {
        let base = bases[j];
        if (QKN && base == OWN) {
            x = own_k[i];
        } else {
            x = kc[base + i];
        }
    }
    return x;
}

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
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
    for (var tile = begin; tile < keys; tile += TILE) {
        workgroupBarrier();  // qs written; the previous tile's probs and bases consumed
        let n = min(TILE, keys - tile);
        if (lid < n) {
            let key = tile + lid;
            if (own && key == last) {
                bases[lid] = OWN;
            } else {
                bases[lid] = (tables[table + key / bs] * bs + key % bs) * w + kv * d;
            }
        }
        workgroupBarrier();
        let q0 = qs[lid];
        let q1 = qs[lid + WG];
        let k0 = key_dim(0u, lid, lid < d, n);
        let h0 = key_dim(0u, lid + WG, has1, n);
        let k1 = key_dim(1u, lid, lid < d, n);
        let h1 = key_dim(1u, lid + WG, has1, n);
        let k2 = key_dim(2u, lid, lid < d, n);
        let h2 = key_dim(2u, lid + WG, has1, n);
        let k3 = key_dim(3u, lid, lid < d, n);
        let h3 = key_dim(3u, lid + WG, has1, n);
        let k4 = key_dim(4u, lid, lid < d, n);
        let h4 = key_dim(4u, lid + WG, has1, n);
        let k5 = key_dim(5u, lid, lid < d, n);
        let h5 = key_dim(5u, lid + WG, has1, n);
        let k6 = key_dim(6u, lid, lid < d, n);
        let h6 = key_dim(6u, lid + WG, has1, n);
        let k7 = key_dim(7u, lid, lid < d, n);
        let h7 = key_dim(7u, lid + WG, has1, n);
        let k8 = key_dim(8u, lid, lid < d, n);
        let h8 = key_dim(8u, lid + WG, has1, n);
        let k9 = key_dim(9u, lid, lid < d, n);
        let h9 = key_dim(9u, lid + WG, has1, n);
        let k10 = key_dim(10u, lid, lid < d, n);
        let h10 = key_dim(10u, lid + WG, has1, n);
        let k11 = key_dim(11u, lid, lid < d, n);
        let h11 = key_dim(11u, lid + WG, has1, n);
        let k12 = key_dim(12u, lid, lid < d, n);
        let h12 = key_dim(12u, lid + WG, has1, n);
        let k13 = key_dim(13u, lid, lid < d, n);
        let h13 = key_dim(13u, lid + WG, has1, n);
        let k14 = key_dim(14u, lid, lid < d, n);
        let h14 = key_dim(14u, lid + WG, has1, n);
        let k15 = key_dim(15u, lid, lid < d, n);
        let h15 = key_dim(15u, lid + WG, has1, n);
        let k16 = key_dim(16u, lid, lid < d, n);
        let h16 = key_dim(16u, lid + WG, has1, n);
        let k17 = key_dim(17u, lid, lid < d, n);
        let h17 = key_dim(17u, lid + WG, has1, n);
        let k18 = key_dim(18u, lid, lid < d, n);
        let h18 = key_dim(18u, lid + WG, has1, n);
        let k19 = key_dim(19u, lid, lid < d, n);
        let h19 = key_dim(19u, lid + WG, has1, n);
        let k20 = key_dim(20u, lid, lid < d, n);
        let h20 = key_dim(20u, lid + WG, has1, n);
        let k21 = key_dim(21u, lid, lid < d, n);
        let h21 = key_dim(21u, lid + WG, has1, n);
        let k22 = key_dim(22u, lid, lid < d, n);
        let h22 = key_dim(22u, lid + WG, has1, n);
        let k23 = key_dim(23u, lid, lid < d, n);
        let h23 = key_dim(23u, lid + WG, has1, n);
        let k24 = key_dim(24u, lid, lid < d, n);
        let h24 = key_dim(24u, lid + WG, has1, n);
        let k25 = key_dim(25u, lid, lid < d, n);
        let h25 = key_dim(25u, lid + WG, has1, n);
        let k26 = key_dim(26u, lid, lid < d, n);
        let h26 = key_dim(26u, lid + WG, has1, n);
        let k27 = key_dim(27u, lid, lid < d, n);
        let h27 = key_dim(27u, lid + WG, has1, n);
        let k28 = key_dim(28u, lid, lid < d, n);
        let h28 = key_dim(28u, lid + WG, has1, n);
        let k29 = key_dim(29u, lid, lid < d, n);
        let h29 = key_dim(29u, lid + WG, has1, n);
        let k30 = key_dim(30u, lid, lid < d, n);
        let h30 = key_dim(30u, lid + WG, has1, n);
        let k31 = key_dim(31u, lid, lid < d, n);
        let h31 = key_dim(31u, lid + WG, has1, n);
        let s0 = subgroupAdd(q0 * k0 + q1 * h0);
        let s1 = subgroupAdd(q0 * k1 + q1 * h1);
        let s2 = subgroupAdd(q0 * k2 + q1 * h2);
        let s3 = subgroupAdd(q0 * k3 + q1 * h3);
        let s4 = subgroupAdd(q0 * k4 + q1 * h4);
        let s5 = subgroupAdd(q0 * k5 + q1 * h5);
        let s6 = subgroupAdd(q0 * k6 + q1 * h6);
        let s7 = subgroupAdd(q0 * k7 + q1 * h7);
        let s8 = subgroupAdd(q0 * k8 + q1 * h8);
        let s9 = subgroupAdd(q0 * k9 + q1 * h9);
        let s10 = subgroupAdd(q0 * k10 + q1 * h10);
        let s11 = subgroupAdd(q0 * k11 + q1 * h11);
        let s12 = subgroupAdd(q0 * k12 + q1 * h12);
        let s13 = subgroupAdd(q0 * k13 + q1 * h13);
        let s14 = subgroupAdd(q0 * k14 + q1 * h14);
        let s15 = subgroupAdd(q0 * k15 + q1 * h15);
        let s16 = subgroupAdd(q0 * k16 + q1 * h16);
        let s17 = subgroupAdd(q0 * k17 + q1 * h17);
        let s18 = subgroupAdd(q0 * k18 + q1 * h18);
        let s19 = subgroupAdd(q0 * k19 + q1 * h19);
        let s20 = subgroupAdd(q0 * k20 + q1 * h20);
        let s21 = subgroupAdd(q0 * k21 + q1 * h21);
        let s22 = subgroupAdd(q0 * k22 + q1 * h22);
        let s23 = subgroupAdd(q0 * k23 + q1 * h23);
        let s24 = subgroupAdd(q0 * k24 + q1 * h24);
        let s25 = subgroupAdd(q0 * k25 + q1 * h25);
        let s26 = subgroupAdd(q0 * k26 + q1 * h26);
        let s27 = subgroupAdd(q0 * k27 + q1 * h27);
        let s28 = subgroupAdd(q0 * k28 + q1 * h28);
        let s29 = subgroupAdd(q0 * k29 + q1 * h29);
        let s30 = subgroupAdd(q0 * k30 + q1 * h30);
        let s31 = subgroupAdd(q0 * k31 + q1 * h31);
        if (lane == 0u) {
            red[0u * n_sg + sg] = s0;
            red[1u * n_sg + sg] = s1;
            red[2u * n_sg + sg] = s2;
            red[3u * n_sg + sg] = s3;
            red[4u * n_sg + sg] = s4;
            red[5u * n_sg + sg] = s5;
            red[6u * n_sg + sg] = s6;
            red[7u * n_sg + sg] = s7;
            red[8u * n_sg + sg] = s8;
            red[9u * n_sg + sg] = s9;
            red[10u * n_sg + sg] = s10;
            red[11u * n_sg + sg] = s11;
            red[12u * n_sg + sg] = s12;
            red[13u * n_sg + sg] = s13;
            red[14u * n_sg + sg] = s14;
            red[15u * n_sg + sg] = s15;
            red[16u * n_sg + sg] = s16;
            red[17u * n_sg + sg] = s17;
            red[18u * n_sg + sg] = s18;
            red[19u * n_sg + sg] = s19;
            red[20u * n_sg + sg] = s20;
            red[21u * n_sg + sg] = s21;
            red[22u * n_sg + sg] = s22;
            red[23u * n_sg + sg] = s23;
            red[24u * n_sg + sg] = s24;
            red[25u * n_sg + sg] = s25;
            red[26u * n_sg + sg] = s26;
            red[27u * n_sg + sg] = s27;
            red[28u * n_sg + sg] = s28;
            red[29u * n_sg + sg] = s29;
            red[30u * n_sg + sg] = s30;
            red[31u * n_sg + sg] = s31;
        }
        workgroupBarrier();
        if (lid < n) {
            var s = vec4<f32>(0.0);
            for (var g = 0u; g < n_sg; g++) { s += red[lid * n_sg + g]; }
            scores[lid] = s;
        }
        workgroupBarrier();
        var big = m;
        for (var j = 0u; j < n; j++) { big = max(big, scores[j]); }
        let corr = exp(m - big);
        m = big;
        l *= corr;
        o0 *= corr;
        o1 *= corr;
        if (lid < n) { probs[lid] = exp(scores[lid] - m); }
        workgroupBarrier();
        var j = 0u;
        for (; j + RUN <= n; j += RUN) {
            let b0 = bases[j];
            let b1 = bases[j + 1u];
            let b2 = bases[j + 2u];
            let b3 = bases[j + 3u];
            let b4 = bases[j + 4u];
            let b5 = bases[j + 5u];
            let b6 = bases[j + 6u];
            let b7 = bases[j + 7u];
            let ok0 = lid < d;
            let a0 = v_at(b0, lid, ok0);
            let a1 = v_at(b1, lid, ok0);
            let a2 = v_at(b2, lid, ok0);
            let a3 = v_at(b3, lid, ok0);
            let a4 = v_at(b4, lid, ok0);
            let a5 = v_at(b5, lid, ok0);
            let a6 = v_at(b6, lid, ok0);
            let a7 = v_at(b7, lid, ok0);
            let c0 = v_at(b0, lid + WG, has1);
            let c1 = v_at(b1, lid + WG, has1);
            let c2 = v_at(b2, lid + WG, has1);
            let c3 = v_at(b3, lid + WG, has1);
            let c4 = v_at(b4, lid + WG, has1);
            let c5 = v_at(b5, lid + WG, has1);
            let c6 = v_at(b6, lid + WG, has1);
            let c7 = v_at(b7, lid + WG, has1);
            let p0 = probs[j];
            let p1 = probs[j + 1u];
            let p2 = probs[j + 2u];
            let p3 = probs[j + 3u];
            let p4 = probs[j + 4u];
            let p5 = probs[j + 5u];
            let p6 = probs[j + 6u];
            let p7 = probs[j + 7u];
            l += p0 + p1 + p2 + p3 + p4 + p5 + p6 + p7;
            o0 += p0 * a0 + p1 * a1 + p2 * a2 + p3 * a3 + p4 * a4 + p5 * a5 + p6 * a6 + p7 * a7;
            o1 += p0 * c0 + p1 * c1 + p2 * c2 + p3 * c3 + p4 * c4 + p5 * c5 + p6 * c6 + p7 * c7;
        }
        for (; j < n; j++) {
            let b = bases[j];
            let pj = probs[j];
            l += pj;
            o0 += pj * v_at(b, lid, lid < d);
            o1 += pj * v_at(b, lid + WG, has1);
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
