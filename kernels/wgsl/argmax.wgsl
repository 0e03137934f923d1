// Row-wise argmax of x [rows, cols] in two passes, so only the ids reach the host. The larger
// value wins, the lower index on ties; a row holding a NaN gets id 0xffffffff.
// partial: workgroup (p, row) reduces columns [p * chunk, (p + 1) * chunk) to (value, index),
//   the value NaN when the slice holds one. params: [rows, cols, chunk, parts].
//   dispatch (parts, rows).
// final: workgroup row reduces its parts. dispatch (rows, 1).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> part_v: array<f32>;
@group(0) @binding(3) var<storage, read_write> part_i: array<u32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;

var<workgroup> sv: array<f32, 256>;
var<workgroup> si: array<u32, 256>;
var<workgroup> nan: array<u32, 256>;

fn better(v: f32, i: u32, bv: f32, bi: u32) -> bool {
    return v > bv || (v == bv && i < bi);
}

// Reduces the workgroup's (sv, si, nan) to element 0.
fn reduce(lid: u32) {
    workgroupBarrier();
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            if (better(sv[lid + s], si[lid + s], sv[lid], si[lid])) {
                sv[lid] = sv[lid + s];
                si[lid] = si[lid + s];
            }
            nan[lid] = max(nan[lid], nan[lid + s]);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    _ = &ids;  // both entry points bind every buffer (one bind group layout)
    let cols = p[1];
    let chunk = p[2];
    let row = wg.y;
    let begin = wg.x * chunk;
    let end = min(cols, begin + chunk);
    var bv = bitcast<f32>(0xff800000u);  // -inf: a row of -inf still yields an index
    var bi = 0xfffffffeu;
    var saw_nan = 0u;
    for (var c = begin + lid; c < end; c += 256u) {
        let v = x[row * cols + c];
        if (v != v) { saw_nan = 1u; }
        if (better(v, c, bv, bi)) {
            bv = v;
            bi = c;
        }
    }
    sv[lid] = bv;
    si[lid] = bi;
    nan[lid] = saw_nan;
    reduce(lid);
    if (lid == 0u) {
        let o = row * p[3] + wg.x;
        part_v[o] = sv[0];
        part_i[o] = si[0] | (nan[0] << 31u);
    }
}

@compute @workgroup_size(256)
fn final_pass(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    _ = &x;
    let parts = p[3];
    let row = wg.x;
    var bv = bitcast<f32>(0xff800000u);  // -inf: a row of -inf still yields an index
    var bi = 0xfffffffeu;
    var saw_nan = 0u;
    for (var q = lid; q < parts; q += 256u) {
        let v = part_v[row * parts + q];
        let packed = part_i[row * parts + q];
        saw_nan = max(saw_nan, packed >> 31u);
        let i = packed & 0x7fffffffu;
        if (better(v, i, bv, bi)) {
            bv = v;
            bi = i;
        }
    }
    sv[lid] = bv;
    si[lid] = bi;
    nan[lid] = saw_nan;
    reduce(lid);
    if (lid == 0u) {
        if (nan[0] != 0u) { ids[row] = 0xffffffffu; } else { ids[row] = si[0]; }
    }
}
