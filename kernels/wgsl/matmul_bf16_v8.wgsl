// matmul_bf16.wgsl for K a multiple of 8: weights read as vec4<u32> (8 bf16 a load) and x as
// vec4<f32>, a 128-thread workgroup per 2 output columns, so each weight row streams in 16-byte
// loads shared by many more threads in flight. Same fusions (override constants NORM, EPI), same
// params: [T, K, part_rows, y row stride, n_offset, eps (f32 bits)].
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 2).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

override NORM: bool = false;
override EPI: u32 = 0u;

const COLS: u32 = 2u;
const WG: u32 = 128u;
var<workgroup> part_a: array<f32, 256>;
var<workgroup> part_b: array<f32, 256>;
var<workgroup> part_ss: array<f32, 128>;

// The dot product of 8 activations with 8 bf16 weights packed in `wv` (element 2i in the low
// half of word i, 2i + 1 in the high half).
fn dot8(even: vec4<f32>, odd: vec4<f32>, wv: vec4<u32>) -> f32 {
    let lo = bitcast<vec4<f32>>(wv << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(wv & vec4<u32>(0xffff0000u));
    return dot(even, lo) + dot(odd, hi);
}

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = p[1];
    let rows = p[2];
    let stride = p[3];
    let off = p[4];
    let k8 = k / 8u;
    let c0 = (wg.x + wg.y * 65535u) * COLS;
    for (var t = 0u; t < p[0]; t++) {
        var acc = array<f32, 2>(0.0, 0.0);
        var up = array<f32, 2>(0.0, 0.0);
        var ss = 0.0;
        for (var j = lid; j < k8; j += WG) {
            let xa = x[t * (k / 4u) + 2u * j];
            let xb = x[t * (k / 4u) + 2u * j + 1u];
            var even = vec4<f32>(xa.x, xa.z, xb.x, xb.z);
            var odd = vec4<f32>(xa.y, xa.w, xb.y, xb.w);
            if (NORM) {
                ss += dot(xa, xa) + dot(xb, xb);
                let g = 8u * j;
                even *= vec4<f32>(aux[g], aux[g + 2u], aux[g + 4u], aux[g + 6u]);
                odd *= vec4<f32>(aux[g + 1u], aux[g + 3u], aux[g + 5u], aux[g + 7u]);
            }
            for (var c = 0u; c < COLS; c++) {
                if (c0 + c < rows) {
                    acc[c] += dot8(even, odd, w[(c0 + c) * k8 + j]);
                    if (EPI == 2u) { up[c] += dot8(even, odd, w[(c0 + c + rows) * k8 + j]); }
                }
            }
        }
        for (var c = 0u; c < COLS; c++) {
            part_a[c * WG + lid] = acc[c];
            part_b[c * WG + lid] = up[c];
        }
        part_ss[lid] = ss;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                for (var c = 0u; c < COLS; c++) {
                    part_a[c * WG + lid] += part_a[c * WG + lid + s];
                    part_b[c * WG + lid] += part_b[c * WG + lid + s];
                }
                part_ss[lid] += part_ss[lid + s];
            }
            workgroupBarrier();
        }
        if (lid < COLS && c0 + lid < rows) {
            var inv = 1.0;
            if (NORM) { inv = inverseSqrt(part_ss[0] / f32(k) + bitcast<f32>(p[5])); }
            let v = part_a[lid * WG] * inv;
            let o = t * stride + off + c0 + lid;
            if (EPI == 1u) {
                y[o] = aux[o] + v;
            } else if (EPI == 2u) {
                y[o] = v / (1.0 + exp(-v)) * (part_b[lid * WG] * inv);
            } else {
                y[o] = v;
            }
        }
        workgroupBarrier();
    }
}
