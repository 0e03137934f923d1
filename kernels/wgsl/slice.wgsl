// y[t, i] = x[t, start + i]. params: [T, C, start, len]. dispatch (ceil(len / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let len = p[3];
    let i = g.x;
    let t = g.y;
    if (i >= len || t >= p[0]) { return; }
    y[t * len + i] = x[t * p[1] + p[2] + i];
}
