// gather.wgsl for a bf16 table packed two to a u32 word. params: [rows, cols, row_start,
// part_rows]. dispatch (ceil(cols / 64), rows).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> table: array<u32>;
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
    let i = (id - p[2]) * cols + c;
    let word = table[i / 2u];
    var v = bitcast<f32>(word & 0xffff0000u);
    if ((i & 1u) == 0u) { v = bitcast<f32>(word << 16u); }
    out[r * cols + c] = v;
}
