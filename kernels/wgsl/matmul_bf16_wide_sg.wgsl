// The `_wide` GEMV layout (after matmul_bf16_vec.wgsl and matmul_bf16_sg_sums.wgsl): 256
// threads as 8 groups of 32, each group 2 output columns, 16 columns a workgroup; but each
// group's 32 partials are added with subgroup sums, so after the one barrier a column's thread
// adds a few subgroups' sums instead of 32 partials. Needs subgroups of 4 to 32 consecutive
// threads (a subgroup within one group); the wgpu crate picks it only there. Final norm +
// lm_head on the H200 (docs/perf.md, 18th session, gemv_lab): 144 → 122 µs.
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 16).

const LANES: u32 = 32u;
const GROUPS: u32 = 8u;
// Per subgroup (at most 256 of them): a for both columns, b for both, x's sum of squares.
var<workgroup> sums: array<f32, 1280>;

@compute @workgroup_size(256)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    let rows = p[2];
    let grp = lid / LANES;
    let lane = lid % LANES;
    let sg = lid / sgs;
    let c0 = (wg.x + wg.y * 65535u) * GROUPS * 2u + grp * 2u;
    for (var t = 0u; t < p[0]; t++) {
        let r = partials(t, c0, lane, LANES);
        store_subgroup_sums(r, sl, lid / sgs);
        workgroupBarrier();
        if (lane < 2u && c0 + lane < rows) {
            let per = LANES / sgs;
            let tot = column_sums(grp * per, per, lane);
            finish(t, c0 + lane, tot.x, tot.y, tot.z);
        }
        workgroupBarrier();
    }
}
