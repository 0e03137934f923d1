// The vectorised bf16 GEMV (after matmul_bf16_vec.wgsl) with one subgroup per 2 output columns:
// each thread issues its loads of both weight rows (four of each, per loop turn) before the
// products, and the subgroup adds its threads' partials in registers: no workgroup memory and no
// barrier, so a workgroup ends as soon as its subgroups do (the CUDA decode GEMV's layout, a warp
// per output column group). GROUP is the adapter's subgroup size, which the host sets only where
// that size is fixed (subgroup_min_size == subgroup_max_size: NVIDIA 32, lavapipe 8), so the
// subgroups of a workgroup are exactly its WG / GROUP column pairs.
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / (2 WG / GROUP)).

override GROUP: u32 = 32u;
const WG: u32 = 128u;

@compute @workgroup_size(128)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
) {
    let rows = p[2];
    let c0 = ((wg.x + wg.y * 65535u) * (WG / GROUP) + sg) * 2u;
    for (var t = 0u; t < p[0]; t++) {
        let r = partials(t, c0, lane, GROUP);
        let a = vec2<f32>(subgroupAdd(r.a.x), subgroupAdd(r.a.y));
        var b = vec2<f32>(0.0);
        if (EPI == 2u) { b = vec2<f32>(subgroupAdd(r.b.x), subgroupAdd(r.b.y)); }
        var ss = 0.0;
        if (NORM) { ss = subgroupAdd(r.ss); }
        if (lane < 2u && c0 + lane < rows) {
            finish(t, c0 + lane, a[lane], b[lane], ss);
        }
    }
}
