// The vectorised bf16 GEMV (after matmul_bf16_vec.wgsl) in wider workgroups: 256 threads as 8
// groups of 32, each group 2 output columns, so a workgroup covers 16 columns and each thread
// streams several 16-byte loads per column; the 32 partial sums of a column are added by one
// thread after a single barrier (the v8 build has a 128-thread workgroup per 2 columns, one load
// per thread at K = 1024 and a seven-barrier reduction tree).
// dispatch (min(groups, 65535), ceil(groups / 65535)) for groups = ceil(part_rows / 16).

const LANES: u32 = 32u;
const GROUPS: u32 = 8u;
// The partials, one workgroup array: products a [16 columns][32] from 0, b from B0, x's sums of
// squares [8 groups][32] from SS0.
const B0: u32 = 512u;
const SS0: u32 = 1024u;
var<workgroup> part: array<f32, 1280>;

// The sum of the 32 consecutive partials from `base`, four chains at a time.
fn sum32(base: u32) -> f32 {
    var s = vec4<f32>(0.0);
    for (var i = 0u; i < LANES; i += 4u) {
        s += vec4<f32>(part[base + i], part[base + i + 1u], part[base + i + 2u], part[base + i + 3u]);
    }
    return (s.x + s.y) + (s.z + s.w);
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let rows = p[2];
    let grp = lid / LANES;
    let lane = lid % LANES;
    let c0 = (wg.x + wg.y * 65535u) * GROUPS * 2u + grp * 2u;
    for (var t = 0u; t < p[0]; t++) {
        let r = partials(t, c0, lane, LANES);
        for (var c = 0u; c < 2u; c++) {
            part[(grp * 2u + c) * LANES + lane] = r.a[c];
            part[B0 + (grp * 2u + c) * LANES + lane] = r.b[c];
        }
        part[SS0 + lid] = r.ss;
        workgroupBarrier();
        if (lane < 2u && c0 + lane < rows) {
            let col = (grp * 2u + lane) * LANES;
            var b = 0.0;
            if (EPI == 2u) { b = sum32(B0 + col); }
            var ss = 0.0;
            if (NORM) { ss = sum32(SS0 + grp * LANES); }
            finish(t, c0 + lane, sum32(col), b, ss);
        }
        workgroupBarrier();
    }
}
