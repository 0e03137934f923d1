// The body of gather.wgsl and gather_bf16.wgsl (appended to each by the wgpu crate): those
// declare the table binding and `element(i)`, the table's i-th element as f32.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let cols = p[1];
    let c = g.x;
    let r = g.y;
    if (c >= cols || r >= p[0]) { return; }
    let id = ids[r];
    if (id < p[2] || id >= p[2] + p[3]) { return; }
    out[r * cols + c] = element((id - p[2]) * cols + c);
}
