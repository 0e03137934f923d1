// matmul.wgsl with bf16 weights packed two to a u32 word (element i in the low half of word i/2
// when i is even): exact, half the memory and traffic of f32 weights.
// params: [T, K, part_rows, N (all rows), n_offset]. dispatch (ceil(part_rows / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn bf16_at(i: u32) -> f32 {
    let word = w[i / 2u];
    if ((i & 1u) == 0u) { return bitcast<f32>(word << 16u); }
    return bitcast<f32>(word & 0xffff0000u);
}

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let k = p[1];
    let col = g.x;
    let t = g.y;
    if (col >= p[2] || t >= p[0]) { return; }
    var acc = 0.0;
    for (var i = 0u; i < k; i++) { acc += x[t * k + i] * bf16_at(col * k + i); }
    y[t * p[3] + p[4] + col] = acc;
}
