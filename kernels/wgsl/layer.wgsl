// A whole decoder layer of a batch-1 decode step in one dispatch. Between dependent dispatches
// this driver stack spends ~7 µs (barrier, launch, drain: docs/perf.md), six of them a layer;
// here the layer's phases follow one another inside the dispatch, ordered by counters:
//   0 QKV: rms_norm(x) · w_qkv -> q                      (rows of the fused projection)
//   1 attention (attention_body.wgsl, QKN): q/k-norm, RoPE, own key and value to the cache,
//     then one (KV head × head group, split) -> out, or partials -> part
//   2 combine (attention_combine_body.wgsl): a head's splits -> out (no items with one split)
//   3 o_proj: h = x + out · w_o
//   4 gate/up: act = silu(rms_norm(h) · w_gate) * (rms_norm(h) · w_up)
//   5 down: y = h + act · w_down
// Work is handed out by tickets: a workgroup takes the next ticket (an atomic counter) as it
// starts its current item, and tickets number the items phase by phase. An item first waits
// until every item of the phase before has signalled (a done counter a phase), so a workgroup
// only ever waits for items taken by workgroups that are running and wait for nothing later:
// no deadlock whatever the number of workgroups the device runs at once (one, on a CPU driver).
// A product item requests its first weight vectors before that wait (weights do not depend on
// the layer's earlier phases), stages its activations (gains applied) in workgroup memory, and
// each row's `tpr` threads reduce their dots with the sum of squares in one tree.
// Ordering: an item's writes, a storage barrier (device-scope acquire/release), then its done
// increment; a waiter's atomic load, a storage barrier, then its reads. Every address an item
// reads was written earlier in this dispatch or before it, never read before its write in it,
// so no cache holds a stale copy. The last workgroup to leave resets the counters.
// params: [0, 10) attention.wgsl's (T = 1); 10 hidden, 11 attention width (H d),
// 12 intermediate, 13 QKV rows, 14 eps (f32 bits), [15, 21) items of phases 0-5,
// 21 workgroups, [22, 26) rows an item of the products QKV, o_proj, gate/up (gate and up rows
// of rows/2 columns), down, 26 head groups (attention items a split).
// counters (ctr): [0] ticket, [1] workgroups done, [2, 8) items done a phase.
// dispatch (workgroups, 1, 1), 128 threads; every K <= 4096 and a multiple of 8.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w_qkv: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read> w_o: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> w_gu: array<vec4<u32>>;
@group(0) @binding(5) var<storage, read> w_down: array<vec4<u32>>;
@group(0) @binding(6) var<storage, read> in_norm: array<f32>;
@group(0) @binding(7) var<storage, read> post_norm: array<f32>;
@group(0) @binding(8) var<storage, read> q_norm: array<f32>;
@group(0) @binding(9) var<storage, read> k_norm: array<f32>;
@group(0) @binding(10) var<storage, read_write> kc: array<f32>;
@group(0) @binding(11) var<storage, read_write> vc: array<f32>;
@group(0) @binding(12) var<storage, read> positions: array<u32>;
@group(0) @binding(13) var<storage, read> token_seq: array<u32>;
@group(0) @binding(14) var<storage, read> tables: array<u32>;
@group(0) @binding(15) var<storage, read> slots: array<u32>;
@group(0) @binding(16) var<storage, read> cs: array<f32>;
@group(0) @binding(17) var<storage, read_write> q: array<f32>;
@group(0) @binding(18) var<storage, read_write> part: array<f32>;
@group(0) @binding(19) var<storage, read_write> out: array<f32>;
@group(0) @binding(20) var<storage, read_write> h: array<f32>;
@group(0) @binding(21) var<storage, read_write> act: array<f32>;
@group(0) @binding(22) var<storage, read_write> y: array<f32>;
@group(0) @binding(23) var<storage, read_write> ctr: array<atomic<u32>>;

const COMBINE_WG: u32 = 128u;
var<workgroup> xs: array<vec4<f32>, 1024>;  // a product's activations, gains applied
var<workgroup> rowsum: array<f32, 8>;
var<workgroup> ticket: u32;

// Eight weight vectors of one row: j, j + s, ..., j + 7s.
struct W8 {
    w0: vec4<u32>,
    w1: vec4<u32>,
    w2: vec4<u32>,
    w3: vec4<u32>,
    w4: vec4<u32>,
    w5: vec4<u32>,
    w6: vec4<u32>,
    w7: vec4<u32>,
}

// Weight vector i of a matrix, or zeros (index 0 is read instead, so the loads need no branch).
fn ld_qkv(i: u32, ok: bool) -> vec4<u32> { return select(vec4<u32>(0u), w_qkv[select(0u, i, ok)], ok); }
fn ld_o(i: u32, ok: bool) -> vec4<u32> { return select(vec4<u32>(0u), w_o[select(0u, i, ok)], ok); }
fn ld_gu(i: u32, ok: bool) -> vec4<u32> { return select(vec4<u32>(0u), w_gu[select(0u, i, ok)], ok); }
fn ld_down(i: u32, ok: bool) -> vec4<u32> { return select(vec4<u32>(0u), w_down[select(0u, i, ok)], ok); }

// Row `row`'s weight vectors j, j + s, ..., j + 7s of matrix m (0 QKV, 1 o_proj, 2 gate/up,
// 3 down), zeros past its k8 vectors or for a row past the matrix (ok false). All eight loads
// are issued before any is used: the driver does not unroll loops for us.
fn batch(m: u32, row: u32, j: u32, s: u32, k8: u32, ok: bool) -> W8 {
    let b = row * k8 + j;
    let o0 = ok && j < k8;
    let o1 = ok && j + s < k8;
    let o2 = ok && j + 2u * s < k8;
    let o3 = ok && j + 3u * s < k8;
    let o4 = ok && j + 4u * s < k8;
    let o5 = ok && j + 5u * s < k8;
    let o6 = ok && j + 6u * s < k8;
    let o7 = ok && j + 7u * s < k8;
    var r: W8;
    switch m {
        case 0u: {
            r = W8(ld_qkv(b, o0), ld_qkv(b + s, o1), ld_qkv(b + 2u * s, o2), ld_qkv(b + 3u * s, o3),
                ld_qkv(b + 4u * s, o4), ld_qkv(b + 5u * s, o5), ld_qkv(b + 6u * s, o6), ld_qkv(b + 7u * s, o7));
        }
        case 1u: {
            r = W8(ld_o(b, o0), ld_o(b + s, o1), ld_o(b + 2u * s, o2), ld_o(b + 3u * s, o3),
                ld_o(b + 4u * s, o4), ld_o(b + 5u * s, o5), ld_o(b + 6u * s, o6), ld_o(b + 7u * s, o7));
        }
        case 2u: {
            r = W8(ld_gu(b, o0), ld_gu(b + s, o1), ld_gu(b + 2u * s, o2), ld_gu(b + 3u * s, o3),
                ld_gu(b + 4u * s, o4), ld_gu(b + 5u * s, o5), ld_gu(b + 6u * s, o6), ld_gu(b + 7u * s, o7));
        }
        default: {
            r = W8(ld_down(b, o0), ld_down(b + s, o1), ld_down(b + 2u * s, o2), ld_down(b + 3u * s, o3),
                ld_down(b + 4u * s, o4), ld_down(b + 5u * s, o5), ld_down(b + 6u * s, o6), ld_down(b + 7u * s, o7));
        }
    }
    return r;
}

// Weight vector wv (elements 8j..8j+7) times the staged activations; 0 past the row.
fn dot_at(wv: vec4<u32>, j: u32, k8: u32) -> f32 {
    let i = 2u * min(j, k8 - 1u);
    let xa = xs[i];
    let xb = xs[i + 1u];
    let v = dot8(vec4<f32>(xa.x, xa.z, xb.x, xb.z), vec4<f32>(xa.y, xa.w, xb.y, xb.w), wv);
    return select(0.0, v, j < k8);
}

fn dot_batch(wv: W8, j: u32, s: u32, k8: u32) -> f32 {
    return dot_at(wv.w0, j, k8) + dot_at(wv.w1, j + s, k8) + dot_at(wv.w2, j + 2u * s, k8)
        + dot_at(wv.w3, j + 3u * s, k8) + dot_at(wv.w4, j + 4u * s, k8)
        + dot_at(wv.w5, j + 5u * s, k8) + dot_at(wv.w6, j + 6u * s, k8)
        + dot_at(wv.w7, j + 7u * s, k8);
}

// Activations i*4..i*4+3 of matrix m's input (x, attention's out, h, act), zeros past k4.
fn src4(m: u32, i: u32, k4: u32) -> vec4<f32> {
    let ok = i < k4;
    let e = 4u * select(0u, i, ok);
    var v: vec4<f32>;
    switch m {
        case 0u: { v = vec4<f32>(x[e], x[e + 1u], x[e + 2u], x[e + 3u]); }
        case 1u: { v = vec4<f32>(out[e], out[e + 1u], out[e + 2u], out[e + 3u]); }
        case 2u: { v = vec4<f32>(h[e], h[e + 1u], h[e + 2u], h[e + 3u]); }
        default: { v = vec4<f32>(act[e], act[e + 1u], act[e + 2u], act[e + 3u]); }
    }
    return select(vec4<f32>(0.0), v, ok);
}

// The norm's gains for activations i*4..i*4+3 (ones for the products without a norm).
fn gain4(m: u32, i: u32) -> vec4<f32> {
    let e = 4u * i;
    if (m == 0u) { return vec4<f32>(in_norm[e], in_norm[e + 1u], in_norm[e + 2u], in_norm[e + 3u]); }
    if (m == 2u) {
        return vec4<f32>(post_norm[e], post_norm[e + 1u], post_norm[e + 2u], post_norm[e + 3u]);
    }
    return vec4<f32>(1.0);
}

// Stages matrix m's input (k4 vectors of 4) in xs, four vectors a thread at a time; returns this
// thread's sum of squares of the unscaled activations.
fn stage(m: u32, k4: u32, lid: u32) -> f32 {
    var ss = 0.0;
    for (var i = lid; i < k4; i += 4u * WG) {
        let a = src4(m, i, k4);
        let b = src4(m, i + WG, k4);
        let c = src4(m, i + 2u * WG, k4);
        let d = src4(m, i + 3u * WG, k4);
        ss += dot(a, a) + dot(b, b) + dot(c, c) + dot(d, d);
        xs[i] = a * gain4(m, i);
        if (i + WG < k4) { xs[i + WG] = b * gain4(m, i + WG); }
        if (i + 2u * WG < k4) { xs[i + 2u * WG] = c * gain4(m, i + 2u * WG); }
        if (i + 3u * WG < k4) { xs[i + 3u * WG] = d * gain4(m, i + 3u * WG); }
    }
    return ss;
}

// Items of phase ph.
fn items(ph: u32) -> u32 {
    return p[15u + ph];
}

// Waits until every item of the nearest earlier phase with items has signalled.
fn wait_for(ph: u32, lid: u32) {
    if (ph == 0u) { return; }
    var before = ph - 1u;
    while (before > 0u && items(before) == 0u) { before -= 1u; }
    if (lid == 0u) {
        let need = items(before);
        while (atomicLoad(&ctr[2u + before]) < need) {}
    }
    storageBarrier();
}

// Item `item` of product phase ph (0 QKV, 3 o_proj, 4 gate/up, 5 down).
fn product(ph: u32, item: u32, lid: u32) {
    let m = select(ph - 2u, 0u, ph == 0u);
    let hidden = p[10];
    let inter = p[12];
    var k = hidden;
    var n = hidden;
    if (m == 0u) { n = p[13]; }
    if (m == 1u) { k = p[11]; }
    if (m == 2u) { n = 2u * inter; }
    if (m == 3u) { k = inter; }
    let k8 = k / 8u;
    let rows = p[22u + m];
    let tpr = WG / rows;
    let r = lid / tpr;
    let lane = lid % tpr;
    // gate/up items: rows/2 output columns, their gate rows then their up rows.
    let half = rows / 2u;
    var row = item * rows + r;
    if (m == 2u) {
        let c = item * half + r % half;
        row = select(c, c + inter, r >= half);
    }
    let ok = row < n && (m != 2u || item * half + r % half < inter);
    var wv = batch(m, row, lane, tpr, k8, ok);
    wait_for(ph, lid);
    let ss = stage(m, k / 4u, lid);
    workgroupBarrier();
    var acc = 0.0;
    var j = lane;
    loop {
        acc += dot_batch(wv, j, tpr, k8);
        j += 8u * tpr;
        if (j >= k8) { break; }
        wv = batch(m, row, j, tpr, k8, ok);
    }
    // One tree: .x sums within each row's tpr threads, .y (the sum of squares) over all.
    partial[lid] = vec4<f32>(acc, ss, 0.0, 0.0);
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        workgroupBarrier();
        if (lid < s) { partial[lid].y += partial[lid + s].y; }
        if (s < tpr && lane < s) { partial[lid].x += partial[lid + s].x; }
    }
    workgroupBarrier();
    if (lid < rows) {
        var v = partial[lid * tpr].x;
        if (m == 0u || m == 2u) {
            v *= inverseSqrt(partial[0].y / f32(k) + bitcast<f32>(p[14]));
        }
        rowsum[lid] = v;
        let o = item * rows + lid;
        if (m == 0u && o < n) { q[o] = v; }
        if (m == 1u && o < n) { h[o] = x[o] + v; }
        if (m == 3u && o < n) { y[o] = h[o] + v; }
    }
    workgroupBarrier();
    if (m == 2u && lid < half) {
        let c = item * half + lid;
        let g = rowsum[lid];
        if (c < inter) { act[c] = g / (1.0 + exp(-g)) * rowsum[lid + half]; }
    }
}

@compute @workgroup_size(128)
fn main(@builtin(local_invocation_index) lid: u32) {
    let total = items(0u) + items(1u) + items(2u) + items(3u) + items(4u) + items(5u);
    if (lid == 0u) { ticket = atomicAdd(&ctr[0], 1u); }
    var t = workgroupUniformLoad(&ticket);
    loop {
        if (t >= total) { break; }
        // The next ticket now: its round trip overlaps this item.
        if (lid == 0u) { ticket = atomicAdd(&ctr[0], 1u); }
        var ph = 0u;
        var item = t;
        while (item >= items(ph)) {
            item -= items(ph);
            ph += 1u;
        }
        if (ph == 1u) {
            wait_for(ph, lid);
            attend(vec3<u32>(item % p[26], 0u, item / p[26]), lid);
        } else if (ph == 2u) {
            wait_for(ph, lid);
            combine(item, 0u, lid);
        } else {
            product(ph, item, lid);
        }
        storageBarrier();
        if (lid == 0u) { atomicAdd(&ctr[2u + ph], 1u); }
        t = workgroupUniformLoad(&ticket);
    }
    if (lid == 0u && atomicAdd(&ctr[1], 1u) == p[21] - 1u) {
        for (var i = 0u; i < 8u; i++) { atomicStore(&ctr[i], 0u); }
    }
}
