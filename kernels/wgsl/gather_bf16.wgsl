// gather.wgsl for a bf16 table packed two to a u32 word (element i in the low half of word i/2
// when i is even). params: [rows, cols, row_start, part_rows]. dispatch (ceil(cols / 64), rows).
@group(0) @binding(1) var<storage, read> table: array<u32>;

fn element(i: u32) -> f32 {
    let word = table[i / 2u];
    if ((i & 1u) == 0u) { return bitcast<f32>(word << 16u); }
    return bitcast<f32>(word & 0xffff0000u);
}
// The rest is gather_body.wgsl, appended when the shader is built.
