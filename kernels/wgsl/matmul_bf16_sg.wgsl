// The vectorised bf16 GEMV (after matmul_bf16_vec.wgsl and matmul_bf16_sg_sums.wgsl) laid out
// as the v8 build, a 128-thread workgroup per 2 output columns, but reduced with subgroup sums:
// each subgroup adds its threads' partials in registers, its first thread stores them, and
// after one barrier two threads add the subgroups' sums (the v8 build's barrier tree takes
// seven). Needs the adapter's SUBGROUP feature (any subgroup size dividing 128).
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 2).

const WG: u32 = 128u;
// Per subgroup (at most 128 of them): a for both columns, b for both, x's sum of squares.
var<workgroup> sums: array<f32, 640>;

@compute @workgroup_size(128)
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
        store_subgroup_sums(r, lane, sg);
        workgroupBarrier();
        if (lid < 2u && c0 + lid < rows) {
            let tot = column_sums(0u, n_sg, lid);
            finish(t, c0 + lid, tot.x, tot.y, tot.z);
        }
        workgroupBarrier();
    }
}
