// out[r, c] = table[ids[r], c]. params: [rows, cols]. dispatch (ceil(cols / 64), rows).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let cols = p[1];
    let c = g.x;
    let r = g.y;
    if (c >= cols || r >= p[0]) { return; }
    out[r * cols + c] = table[ids[r] * cols + c];
}
