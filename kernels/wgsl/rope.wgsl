// Split-half RoPE with per-token cos/sin tables computed on the host in f64:
// cs[(t * d / 2 + i) * 2 + {0, 1}] = cos, sin of pos_t * theta^(-2i / d).
// params: [T, C, d]. One thread per (pair, token): dispatch (ceil(C / 2 / 64), T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> cs: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) g: vec3<u32>) {
    let cols = p[1];
    let d = p[2];
    let half = d / 2u;
    let pair = g.x;
    let t = g.y;
    if (pair >= cols / 2u || t >= p[0]) { return; }
    let head = pair / half;
    let i = pair % half;
    let a = t * cols + head * d + i;
    let b = a + half;
    let c = cs[(t * half + i) * 2u];
    let s = cs[(t * half + i) * 2u + 1u];
    let xa = x[a];
    let xb = x[b];
    y[a] = xa * c - xb * s;
    y[b] = xb * c + xa * s;
}
