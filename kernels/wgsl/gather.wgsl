// out[r, c] = table[ids[r] - row_start, c] for the ids in this part of a table that may be split
// across bindings by rows, an f32 table. params: [rows, cols, row_start, part_rows].
// dispatch (ceil(cols / 64), rows).
@group(0) @binding(1) var<storage, read> table: array<f32>;

fn element(i: u32) -> f32 { return table[i]; }
// The rest is gather_body.wgsl, appended when the shader is built.
