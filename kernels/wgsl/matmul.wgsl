// y[t, n_offset + n] = sum_k x[t, k] * w[n, k], fp32, for one part of a weight that may be split
// across bindings by rows. params: [T, K, part_rows, N (all rows), n_offset]. One thread per
// output: dispatch (ceil(part_rows / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let k = p[1];
    let col = g.x;
    let t = g.y;
    if (col >= p[2] || t >= p[0]) { return; }
    var acc = 0.0;
    for (var i = 0u; i < k; i++) { acc += x[t * k + i] * w[col * k + i]; }
    y[t * p[3] + p[4] + col] = acc;
}
