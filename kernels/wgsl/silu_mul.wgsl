// y[t, i] = silu(gu[t, i]) * gu[t, I + i]. params: [T, I]. dispatch (ceil(I / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> gu: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let inter = p[1];
    let i = g.x;
    let t = g.y;
    if (i >= inter || t >= p[0]) { return; }
    let gate = gu[t * 2u * inter + i];
    y[t * inter + i] = gate / (1.0 + exp(-gate)) * gu[t * 2u * inter + inter + i];
}
