// What the subgroup GEMV builds (matmul_bf16_sg.wgsl, matmul_bf16_wide_sg.wgsl; each follows
// matmul_bf16_vec.wgsl and this file) share: a subgroup's sums of its threads' partials, kept
// in the build's workgroup array `sums` (5 slots a subgroup), and a column's total over a run
// of subgroups.

// Adds the subgroup's partials r; its first thread (lane 0) stores them at slot * 5: a for both
// columns, b for both, x's sum of squares.
fn store_subgroup_sums(r: Partials, lane: u32, slot: u32) {
    let a = vec2<f32>(subgroupAdd(r.a.x), subgroupAdd(r.a.y));
    var b = vec2<f32>(0.0);
    if (EPI == 2u) { b = vec2<f32>(subgroupAdd(r.b.x), subgroupAdd(r.b.y)); }
    var ss = 0.0;
    if (NORM) { ss = subgroupAdd(r.ss); }
    if (lane == 0u) {
        sums[slot * 5u] = a.x;
        sums[slot * 5u + 1u] = a.y;
        sums[slot * 5u + 2u] = b.x;
        sums[slot * 5u + 3u] = b.y;
        sums[slot * 5u + 4u] = ss;
    }
}

// Column c's (0 or 1) a, b and x's sum of squares over subgroups first..first + count, stored by
// store_subgroup_sums (after a barrier).
fn column_sums(first: u32, count: u32, c: u32) -> vec3<f32> {
    var t = vec3<f32>(0.0);
    for (var s = first; s < first + count; s++) {
        t += vec3<f32>(sums[s * 5u + c], sums[s * 5u + 2u + c], sums[s * 5u + 4u]);
    }
    return t;
}
