// lab variant (generated from matmul_bf16_vec.wgsl + matmul_bf16_sg.wgsl): all loads in one round; 32-thread workgroups
// lab: columns=2
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
    return dot(even, bf16_lo(wv)) + dot(odd, bf16_hi(wv));
}

// The bf16 values in the low (even elements) or high (odd elements) halves of four words.
fn bf16_lo(v: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(v << vec4<u32>(16u));
}

fn bf16_hi(v: vec4<u32>) -> vec4<f32> {
    return bitcast<vec4<f32>>(v & vec4<u32>(0xffff0000u));
}

// One thread's share of row t: the products with columns c0 and c0 + 1 (a; b the up half for
// EPI 2) over weight vectors j = first, first + step, ..., and with NORM x's sum of squares.
struct Partials {
    a: vec2<f32>,
    b: vec2<f32>,
    ss: f32,
}

// Row t's activations for weight vector j, split into even and odd elements (scaled by the
// norm's gains with NORM), and their sum of squares.
struct Act {
    even: vec4<f32>,
    odd: vec4<f32>,
    ss: f32,
}

fn act(t: u32, j: u32) -> Act {
    let xa = x[t * (p[1] / 4u) + 2u * j];
    let xb = x[t * (p[1] / 4u) + 2u * j + 1u];
    var r = Act(vec4<f32>(xa.x, xa.z, xb.x, xb.z), vec4<f32>(xa.y, xa.w, xb.y, xb.w), 0.0);
    if (NORM) {
        r.ss = dot(xa, xa) + dot(xb, xb);
        let g = 8u * j;
        r.even *= vec4<f32>(aux[g], aux[g + 2u], aux[g + 4u], aux[g + 6u]);
        r.odd *= vec4<f32>(aux[g + 1u], aux[g + 3u], aux[g + 5u], aux[g + 7u]);
    }
    return r;
}

// act(t, j), or zeros (no sum of squares) where !ok.
fn act_ok(t: u32, j: u32, ok: bool) -> Act {
    var r = Act(vec4<f32>(0.0), vec4<f32>(0.0), 0.0);
    if (ok) { r = act(t, j); }
    return r;
}

// Weight vector j of row `row`, or zeros past the matrix.
fn wv(row: u32, j: u32, ok: bool) -> vec4<u32> {
    var v = vec4<u32>(0u);
    if (ok) { v = w[row * (p[1] / 8u) + j]; }
    return v;
}

// The products of one activation vector with the weight vectors of both columns (and their up
// halves).
fn accumulate(r: ptr<function, Partials>, x8: Act, wa: vec4<u32>, wb: vec4<u32>, ua: vec4<u32>, ub: vec4<u32>) {
    (*r).a += vec2<f32>(dot8(x8.even, x8.odd, wa), dot8(x8.even, x8.odd, wb));
    if (EPI == 2u) {
        (*r).b += vec2<f32>(dot8(x8.even, x8.odd, ua), dot8(x8.even, x8.odd, ub));
    }
    (*r).ss += x8.ss;
}

fn partials(t: u32, c0: u32, first: u32, step: u32) -> Partials {
    let rows = p[2];
    let k8 = p[1] / 8u;
    let ok0 = c0 < rows;
    let ok1 = c0 + 1u < rows;
    let up = EPI == 2u;
    var r = Partials(vec2<f32>(0.0), vec2<f32>(0.0), 0.0);
    var j = first;
    // Lab: every weight vector of the thread's share issued at once, four a round, masked past
    // k8 (so K = 2,048 and 3,072 take one round, not two or three).
    for (; j < k8; j += 4u * step) {
        let j1 = j + step;
        let j2 = j + 2u * step;
        let j3 = j + 3u * step;
        let o1 = j1 < k8;
        let o2 = j2 < k8;
        let o3 = j3 < k8;
        let wa0 = wv(c0, j, ok0);
        let wa1 = wv(c0, j1, ok0 && o1);
        let wa2 = wv(c0, j2, ok0 && o2);
        let wa3 = wv(c0, j3, ok0 && o3);
        let wb0 = wv(c0 + 1u, j, ok1);
        let wb1 = wv(c0 + 1u, j1, ok1 && o1);
        let wb2 = wv(c0 + 1u, j2, ok1 && o2);
        let wb3 = wv(c0 + 1u, j3, ok1 && o3);
        let ua0 = wv(c0 + rows, j, ok0 && up);
        let ua1 = wv(c0 + rows, j1, ok0 && up && o1);
        let ua2 = wv(c0 + rows, j2, ok0 && up && o2);
        let ua3 = wv(c0 + rows, j3, ok0 && up && o3);
        let ub0 = wv(c0 + 1u + rows, j, ok1 && up);
        let ub1 = wv(c0 + 1u + rows, j1, ok1 && up && o1);
        let ub2 = wv(c0 + 1u + rows, j2, ok1 && up && o2);
        let ub3 = wv(c0 + 1u + rows, j3, ok1 && up && o3);
        let x0 = act(t, j);
        let x1 = act_ok(t, j1, o1);
        let x2 = act_ok(t, j2, o2);
        let x3 = act_ok(t, j3, o3);
        accumulate(&r, x0, wa0, wb0, ua0, ub0);
        accumulate(&r, x1, wa1, wb1, ua1, ub1);
        accumulate(&r, x2, wa2, wb2, ua2, ub2);
        accumulate(&r, x3, wa3, wb3, ua3, ub3);
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
// The vectorised bf16 GEMV (after matmul_bf16_vec.wgsl) laid out as the v8 build, a 128-thread
// workgroup per 2 output columns, but reduced with subgroup sums: each subgroup adds its
// threads' partials in registers, its first thread stores them, and after one barrier two
// threads add the subgroups' sums (the v8 build's barrier tree takes seven). Needs the adapter's
// SUBGROUP feature (any subgroup size dividing 128).
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 2).

const WG: u32 = 32u;
// Per subgroup (at most 128 of them): a for both columns, b for both, x's sum of squares.
var<workgroup> sums: array<f32, 640>;

@compute @workgroup_size(32)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {
    let rows = p[2];
    let c0 = (wg.x + wg.y * 65535u) * 2u;
    for (var t = 0u; t < p[0]; t++) {
        let r = partials(t, c0, lid, WG);
        let a = vec2<f32>(subgroupAdd(r.a.x), subgroupAdd(r.a.y));
        var b = vec2<f32>(0.0);
        if (EPI == 2u) { b = vec2<f32>(subgroupAdd(r.b.x), subgroupAdd(r.b.y)); }
        var ss = 0.0;
        if (NORM) { ss = subgroupAdd(r.ss); }
        if (lane == 0u) {
            sums[sg * 5u] = a.x;
            sums[sg * 5u + 1u] = a.y;
            sums[sg * 5u + 2u] = b.x;
            sums[sg * 5u + 3u] = b.y;
            sums[sg * 5u + 4u] = ss;
        }
        workgroupBarrier();
        if (lid < 2u && c0 + lid < rows) {
            var ta = 0.0;
            var tb = 0.0;
            var tss = 0.0;
            for (var s = 0u; s < n_sg; s++) {
                ta += sums[s * 5u + lid];
                tb += sums[s * 5u + 2u + lid];
                tss += sums[s * 5u + 4u];
            }
            finish(t, c0 + lid, ta, tb, tss);
        }
        workgroupBarrier();
    }
}
