// attention.wgsl's reductions with subgroup operations, and its entry point: for subgroups of
// 4 to 32 threads made of consecutive invocations (the wgpu crate picks it there). Against the
// workgroup build on the H200 (attention_lab, 18th session): 16.6 → 15.3 µs at 160 keys,
// 32.3 → 30.1 at 2,048, attention + combine.

// Every thread's (ssq, ssk) summed: a subgroup sum, then one barrier and a sum of the
// subgroups' (was a seven-barrier tree).
fn workgroup_sums(ssq: vec4<f32>, ssk: f32, lid: u32, sl: u32, sgs: u32) -> Sums {
    let q = subgroupAdd(ssq);
    let k = subgroupAdd(ssk);
    if (sl == 0u) {
        partial[lid / sgs] = q;
        red_k[lid / sgs] = k;
    }
    workgroupBarrier();
    var r = Sums(vec4<f32>(0.0), 0.0);
    for (var s = 0u; s < WG / sgs; s++) {
        r.q += partial[s];
        r.k += red_k[s];
    }
    return r;
}

// scores[k] for the tile's keys k < n: key k's PARTS threads (in one subgroup) add their
// partial dots by shuffles, and the first stores the sum; every thread sees them after it
// returns.
fn tile_scores(acc: vec4<f32>, lid: u32, n: u32) {
    var sum = acc + subgroupShuffleXor(acc, 1u);
    sum += subgroupShuffleXor(sum, 2u);
    if (PARTS == 8u) { sum += subgroupShuffleXor(sum, 4u); }
    if (lid % PARTS == 0u && lid / PARTS < n) { scores[lid / PARTS] = sum; }
    workgroupBarrier();
}

// The largest of m and the tile's n scores: each lane reads a share, a subgroup maximum.
fn tile_max(m: vec4<f32>, n: u32, sl: u32, sgs: u32) -> vec4<f32> {
    var big = m;
    for (var j = sl; j < n; j += sgs) { big = max(big, scores[j]); }
    return subgroupMax(big);
}

@compute @workgroup_size(WG)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    attend(wg, lid, sl, sgs);
}

// With the prefetch's workgroups past the splits (its own entry point: only it binds the weights
// and the sink, so the others stay within 16 storage buffers a stage).
@compute @workgroup_size(WG)
fn main_pf(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nw: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    if (wg.z >= p[7]) {
        prefetch(wg, nw, lid);
        return;
    }
    attend(wg, lid, sl, sgs);
}
