// The body of matmul.wgsl and matmul_bf16.wgsl (appended to each by the wgpu crate): those
// declare the bindings and `weight(i)`, the i-th weight as f32.

const COLS: u32 = 4u;
var<workgroup> part_a: array<f32, 256>;
var<workgroup> part_b: array<f32, 256>;
var<workgroup> part_ss: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = p[1];
    let rows = p[2];
    let stride = p[3];
    let off = p[4];
    let c0 = wg.x * COLS;
    for (var t = 0u; t < p[0]; t++) {
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        var up = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        var ss = 0.0;
        for (var i = lid; i < k; i += 64u) {
            var xv = x[t * k + i];
            if (NORM) {
                ss += xv * xv;
                xv *= aux[i];
            }
            for (var c = 0u; c < COLS; c++) {
                if (c0 + c < rows) {
                    acc[c] += xv * weight((c0 + c) * k + i);
                    if (EPI == 2u) { up[c] += xv * weight((c0 + c + rows) * k + i); }
                }
            }
        }
        for (var c = 0u; c < COLS; c++) {
            part_a[c * 64u + lid] = acc[c];
            part_b[c * 64u + lid] = up[c];
        }
        part_ss[lid] = ss;
        workgroupBarrier();
        for (var s = 32u; s > 0u; s >>= 1u) {
            if (lid < s) {
                for (var c = 0u; c < COLS; c++) {
                    part_a[c * 64u + lid] += part_a[c * 64u + lid + s];
                    part_b[c * 64u + lid] += part_b[c * 64u + lid + s];
                }
                part_ss[lid] += part_ss[lid + s];
            }
            workgroupBarrier();
        }
        if (lid < COLS && c0 + lid < rows) {
            var inv = 1.0;
            if (NORM) { inv = inverseSqrt(part_ss[0] / f32(k) + bitcast<f32>(p[5])); }
            let v = part_a[lid * 64u] * inv;
            let o = t * stride + off + c0 + lid;
            if (EPI == 1u) {
                y[o] = aux[o] + v;
            } else if (EPI == 2u) {
                y[o] = v / (1.0 + exp(-v)) * (part_b[lid * 64u] * inv);
            } else {
                y[o] = v;
            }
        }
        workgroupBarrier();
    }
}
