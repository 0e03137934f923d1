// What the vectorised bf16 GEMV builds (matmul_bf16_v8.wgsl, matmul_bf16_wide.wgsl; each is this
// file followed by its own workgroup layout and reduction, joined by the wgpu crate) share: the
// bindings, the fusions (override constants NORM, EPI), the 16-byte weight loads and the
// per-column epilogue. Weights are read as vec4<u32> (8 bf16 a load) and x as vec4<f32>, K a
// multiple of 8. params: [T, K, part_rows, y row stride, n_offset, eps (f32 bits)]. Each thread
// covers two adjacent output columns.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

override NORM: bool = false;
override EPI: u32 = 0u;

// The dot product of 8 activations with 8 bf16 weights packed in `wv` (element 2i in the low
// half of word i, 2i + 1 in the high half).
fn dot8(even: vec4<f32>, odd: vec4<f32>, wv: vec4<u32>) -> f32 {
    let lo = bitcast<vec4<f32>>(wv << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(wv & vec4<u32>(0xffff0000u));
    return dot(even, lo) + dot(odd, hi);
}

// One thread's share of row t: the products with columns c0 and c0 + 1 (a; b the up half for
// EPI 2) over weight vectors j = first, first + step, ..., and with NORM x's sum of squares.
struct Partials {
    a: array<f32, 2>,
    b: array<f32, 2>,
    ss: f32,
}

fn partials(t: u32, c0: u32, first: u32, step: u32) -> Partials {
    let k = p[1];
    let rows = p[2];
    let k8 = k / 8u;
    var r = Partials(array<f32, 2>(0.0, 0.0), array<f32, 2>(0.0, 0.0), 0.0);
    for (var j = first; j < k8; j += step) {
        let xa = x[t * (k / 4u) + 2u * j];
        let xb = x[t * (k / 4u) + 2u * j + 1u];
        var even = vec4<f32>(xa.x, xa.z, xb.x, xb.z);
        var odd = vec4<f32>(xa.y, xa.w, xb.y, xb.w);
        if (NORM) {
            r.ss += dot(xa, xa) + dot(xb, xb);
            let g = 8u * j;
            even *= vec4<f32>(aux[g], aux[g + 2u], aux[g + 4u], aux[g + 6u]);
            odd *= vec4<f32>(aux[g + 1u], aux[g + 3u], aux[g + 5u], aux[g + 7u]);
        }
        for (var c = 0u; c < 2u; c++) {
            if (c0 + c < rows) {
                r.a[c] += dot8(even, odd, w[(c0 + c) * k8 + j]);
                if (EPI == 2u) { r.b[c] += dot8(even, odd, w[(c0 + c + rows) * k8 + j]); }
            }
        }
    }
    return r;
}

// Column `col` of row t from its whole products a (and b) and x's sum of squares ss.
fn finish(t: u32, col: u32, a: f32, b: f32, ss: f32) {
    var inv = 1.0;
    if (NORM) { inv = inverseSqrt(ss / f32(p[1]) + bitcast<f32>(p[5])); }
    let v = a * inv;
    let o = t * p[3] + p[4] + col;
    if (EPI == 1u) {
        y[o] = aux[o] + v;
    } else if (EPI == 2u) {
        y[o] = v / (1.0 + exp(-v)) * (b * inv);
    } else {
        y[o] = v;
    }
}
