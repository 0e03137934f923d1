// Elementwise ops; entry points share the buffers' layout. 1-D index = g.x + g.y * 65535 * 64.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

fn index(g: vec3<u32>) -> u32 { return g.x + g.y * 65535u * 64u; }

// y = a + b. params: [n].
@compute @workgroup_size(64)
fn add(@builtin(global_invocation_id) g: vec3<u32>) {
    let i = index(g);
    if (i >= p[0]) { return; }
    y[i] = a[i] + b[i];
}
