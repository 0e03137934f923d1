// The vectorised bf16 GEMV (after matmul_bf16_vec.wgsl) with a 128-thread workgroup per 2 output
// columns, so each weight row streams in 16-byte loads shared by many threads in flight; a
// barrier tree adds the threads' partials.
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 2).

const WG: u32 = 128u;
var<workgroup> part_a: array<f32, 256>;
var<workgroup> part_b: array<f32, 256>;
var<workgroup> part_ss: array<f32, 128>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let rows = p[2];
    let c0 = (wg.x + wg.y * 65535u) * 2u;
    for (var t = 0u; t < p[0]; t++) {
        let r = partials(t, c0, lid, WG);
        for (var c = 0u; c < 2u; c++) {
            part_a[c * WG + lid] = r.a[c];
            part_b[c * WG + lid] = r.b[c];
        }
        part_ss[lid] = r.ss;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                for (var c = 0u; c < 2u; c++) {
                    part_a[c * WG + lid] += part_a[c * WG + lid + s];
                    part_b[c * WG + lid] += part_b[c * WG + lid + s];
                }
                part_ss[lid] += part_ss[lid + s];
            }
            workgroupBarrier();
        }
        if (lid < 2u && c0 + lid < rows) {
            finish(t, c0 + lid, part_a[lid * WG], part_b[lid * WG], part_ss[0]);
        }
        workgroupBarrier();
    }
}
