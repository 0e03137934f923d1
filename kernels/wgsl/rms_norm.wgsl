// y = x * inverseSqrt(mean(x^2) + eps) * w over each group of G elements. params: [groups, G,
// eps (f32 bits)]. One workgroup per group: dispatch (min(groups, 65535), ceil(groups / 65535)).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) l: u32) {
    let group = wg.x + wg.y * 65535u;
    let g = p[1];
    if (group >= p[0]) { return; }
    let base = group * g;
    var ss = 0.0;
    for (var i = l; i < g; i += 64u) { let v = x[base + i]; ss += v * v; }
    partial[l] = ss;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s >>= 1u) {
        if (l < s) { partial[l] += partial[l + s]; }
        workgroupBarrier();
    }
    let inv = inverseSqrt(partial[0] / f32(g) + bitcast<f32>(p[2]));
    for (var i = l; i < g; i += 64u) { y[base + i] = x[base + i] * inv * w[i]; }
}
