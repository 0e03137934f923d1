// kc[slot_t, i] = k[t, i], vc[slot_t, i] = v[t, i]. params: [T, W]. dispatch (ceil(W / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> k: array<f32>;
@group(0) @binding(2) var<storage, read> v: array<f32>;
@group(0) @binding(3) var<storage, read> slots: array<u32>;
@group(0) @binding(4) var<storage, read_write> kc: array<f32>;
@group(0) @binding(5) var<storage, read_write> vc: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let w = p[1];
    let i = g.x;
    let t = g.y;
    if (i >= w || t >= p[0]) { return; }
    let dst = slots[t] * w + i;
    kc[dst] = k[t * w + i];
    vc[dst] = v[t * w + i];
}
