// qkv [T, (H + 2 KV) d]: per-head RMSNorm (q_norm / k_norm over d) then split-half RoPE for q and
// k heads, q to q_out [T, H d], k and v to the f32 cache pools at each token's slot. One
// workgroup of 64 threads per (head, token). cs is the batch's RoPE table [T, d/2, (cos, sin)].
// params: [T, H, KV, d, eps (f32 bits)]. dispatch (H + 2 KV, T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> qkv: array<f32>;
@group(0) @binding(2) var<storage, read> q_norm: array<f32>;
@group(0) @binding(3) var<storage, read> k_norm: array<f32>;
@group(0) @binding(4) var<storage, read> cs: array<f32>;
@group(0) @binding(5) var<storage, read> slots: array<u32>;
@group(0) @binding(6) var<storage, read_write> q_out: array<f32>;
@group(0) @binding(7) var<storage, read_write> kc: array<f32>;
@group(0) @binding(8) var<storage, read_write> vc: array<f32>;

var<workgroup> red: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let heads = p[1];
    let kvh = p[2];
    let d = p[3];
    let h = wg.x;
    let t = wg.y;
    if (t >= p[0] || h >= heads + 2u * kvh) { return; }
    let src = (t * (heads + 2u * kvh) + h) * d;
    let dst = slots[t] * kvh * d;
    if (h >= heads + kvh) {
        for (var i = lid; i < d; i += 64u) { vc[dst + (h - heads - kvh) * d + i] = qkv[src + i]; }
        return;
    }
    var ss = 0.0;
    for (var i = lid; i < d; i += 64u) { let v = qkv[src + i]; ss += v * v; }
    red[lid] = ss;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (lid < s) { red[lid] += red[lid + s]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(red[0] / f32(d) + bitcast<f32>(p[4]));
    let half = d / 2u;
    for (var i = lid; i < half; i += 64u) {
        var ga = k_norm[i];
        var gb = k_norm[i + half];
        if (h < heads) {
            ga = q_norm[i];
            gb = q_norm[i + half];
        }
        let a = qkv[src + i] * inv * ga;
        let b = qkv[src + i + half] * inv * gb;
        let c = cs[(t * half + i) * 2u];
        let s = cs[(t * half + i) * 2u + 1u];
        let ra = a * c - b * s;
        let rb = b * c + a * s;
        if (h < heads) {
            q_out[(t * heads + h) * d + i] = ra;
            q_out[(t * heads + h) * d + i + half] = rb;
        } else {
            kc[dst + (h - heads) * d + i] = ra;
            kc[dst + (h - heads) * d + i + half] = rb;
        }
    }
}
