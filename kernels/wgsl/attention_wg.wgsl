// attention.wgsl's reductions in workgroup memory and barriers, and its entry point: for
// adapters without subgroup operations (or with subgroups outside 4..=32 threads).

// Every thread's (ssq, ssk) summed by a tree over the workgroup.
fn workgroup_sums(ssq: vec4<f32>, ssk: f32, lid: u32, sl: u32, sgs: u32) -> Sums {
    partial[lid] = ssq;
    red_k[lid] = ssk;
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s >>= 1u) {
        if (lid < s) {
            partial[lid] += partial[lid + s];
            red_k[lid] += red_k[lid + s];
        }
        workgroupBarrier();
    }
    return Sums(partial[0], red_k[0]);
}

// scores[k] for the tile's keys k < n: the PARTS partial dots of key k's threads added; every
// thread sees them after it returns.
fn tile_scores(acc: vec4<f32>, lid: u32, n: u32) {
    partial[lid] = acc;
    workgroupBarrier();
    if (lid < n) {
        var sum = vec4<f32>(0.0);
        for (var u = 0u; u < PARTS; u++) { sum += partial[lid * PARTS + u]; }
        scores[lid] = sum;
    }
    workgroupBarrier();
}

// The largest of m and the tile's n scores.
fn tile_max(m: vec4<f32>, n: u32, sl: u32, sgs: u32) -> vec4<f32> {
    var big = m;
    for (var j = 0u; j < n; j++) { big = max(big, scores[j]); }
    return big;
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    attend(wg, lid, 0u, 1u);
}

// With the prefetch's workgroups past the splits (its own entry point: only it binds the weights
// and the sink, so the others stay within 16 storage buffers a stage).
@compute @workgroup_size(WG)
fn main_pf(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    if (wg.z >= p[7]) {
        prefetch(wg, nw, lid);
        return;
    }
    attend(wg, lid, 0u, 1u);
}
