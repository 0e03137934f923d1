// y[t, n_offset + n] = sum_k x[t, k] * w[n, k], fp32, for one part of a weight that may be split
// across bindings by rows. One workgroup of 64 threads per 4 output columns: the threads stride
// over k together (coalesced reads of each weight row), then reduce in workgroup memory; the
// columns' weights are re-read for each of the T rows from cache.
// params: [T, K, part_rows, N (all rows), n_offset]. dispatch (ceil(part_rows / 4), 1).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;

const COLS: u32 = 4u;
var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let k = p[1];
    let rows = p[2];
    let c0 = wg.x * COLS;
    for (var t = 0u; t < p[0]; t++) {
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        for (var i = lid; i < k; i += 64u) {
            let xv = x[t * k + i];
            for (var c = 0u; c < COLS; c++) {
                if (c0 + c < rows) { acc[c] += xv * w[(c0 + c) * k + i]; }
            }
        }
        for (var c = 0u; c < COLS; c++) { partial[c * 64u + lid] = acc[c]; }
        workgroupBarrier();
        for (var s = 32u; s > 0u; s >>= 1u) {
            if (lid < s) {
                for (var c = 0u; c < COLS; c++) { partial[c * 64u + lid] += partial[c * 64u + lid + s]; }
            }
            workgroupBarrier();
        }
        if (lid < COLS && c0 + lid < rows) { y[t * p[3] + p[4] + c0 + lid] = partial[lid * 64u]; }
        workgroupBarrier();
    }
}
