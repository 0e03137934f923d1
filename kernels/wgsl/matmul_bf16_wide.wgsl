// matmul_bf16_v8.wgsl's loads (8 bf16 weights a vec4<u32>, x as vec4<f32>) in wider workgroups:
// 256 threads as 8 groups of 32, each group 2 output columns, so a workgroup covers 16 columns
// and each thread streams several 16-byte loads per column; the 32 partial sums of a column are
// added by one thread after a single barrier (the v8 build had a 128-thread workgroup per 2
// columns, one load per thread at K = 1024 and a seven-barrier reduction tree). Same fusions
// (override constants NORM, EPI), same params: [T, K, part_rows, y row stride, n_offset, eps].
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 16).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

override NORM: bool = false;
override EPI: u32 = 0u;

const LANES: u32 = 32u;
const GROUPS: u32 = 8u;
const CPG: u32 = 2u;
var<workgroup> part_a: array<f32, 512>;
var<workgroup> part_b: array<f32, 512>;
var<workgroup> part_ss: array<f32, 256>;

fn dot8(even: vec4<f32>, odd: vec4<f32>, wv: vec4<u32>) -> f32 {
    let lo = bitcast<vec4<f32>>(wv << vec4<u32>(16u));
    let hi = bitcast<vec4<f32>>(wv & vec4<u32>(0xffff0000u));
    return dot(even, lo) + dot(odd, hi);
}

// The sum of 32 consecutive workgroup values from `base`, four chains at a time.
fn sum32_a(base: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < LANES; i += 4u) {
        s += vec4<f32>(part_a[base + i], part_a[base + i + 1u], part_a[base + i + 2u], part_a[base + i + 3u]);
    }
    return (s.x + s.y) + (s.z + s.w);
}
fn sum32_b(base: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < LANES; i += 4u) {
        s += vec4<f32>(part_b[base + i], part_b[base + i + 1u], part_b[base + i + 2u], part_b[base + i + 3u]);
    }
    return (s.x + s.y) + (s.z + s.w);
}
fn sum32_ss(base: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < LANES; i += 4u) {
        s += vec4<f32>(part_ss[base + i], part_ss[base + i + 1u], part_ss[base + i + 2u], part_ss[base + i + 3u]);
    }
    return (s.x + s.y) + (s.z + s.w);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = p[1];
    let rows = p[2];
    let stride = p[3];
    let off = p[4];
    let k8 = k / 8u;
    let grp = lid / LANES;
    let lane = lid % LANES;
    let c0 = (wg.x + wg.y * 65535u) * GROUPS * CPG + grp * CPG;
    for (var t = 0u; t < p[0]; t++) {
        var acc = array<f32, 2>(0.0, 0.0);
        var up = array<f32, 2>(0.0, 0.0);
        var ss = 0.0;
        for (var j = lane; j < k8; j += LANES) {
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
            for (var c = 0u; c < CPG; c++) {
                if (c0 + c < rows) {
                    acc[c] += dot8(even, odd, w[(c0 + c) * k8 + j]);
                    if (EPI == 2u) { up[c] += dot8(even, odd, w[(c0 + c + rows) * k8 + j]); }
                }
            }
        }
        for (var c = 0u; c < CPG; c++) {
            part_a[(grp * CPG + c) * LANES + lane] = acc[c];
            part_b[(grp * CPG + c) * LANES + lane] = up[c];
        }
        part_ss[lid] = ss;
        workgroupBarrier();
        if (lane < CPG && c0 + lane < rows) {
            let col = grp * CPG + lane;
            var inv = 1.0;
            if (NORM) { inv = inverseSqrt(sum32_ss(grp * LANES) / f32(k) + bitcast<f32>(p[5])); }
            let v = sum32_a(col * LANES) * inv;
            let o = t * stride + off + c0 + lane;
            if (EPI == 1u) {
                y[o] = aux[o] + v;
            } else if (EPI == 2u) {
                y[o] = v / (1.0 + exp(-v)) * (sum32_b(col * LANES) * inv);
            } else {
                y[o] = v;
            }
        }
        workgroupBarrier();
    }
}
