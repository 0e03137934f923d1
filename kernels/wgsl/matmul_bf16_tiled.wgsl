// The bf16 products of prompt-sized T (after matmul_bf16_vec.wgsl: its bindings, fusions and
// per-column epilogue `finish`) as a tiled GEMM: a 256-thread workgroup computes a tile of 64
// rows (tokens) × 64 output columns, stepping through K 16 at a time with the tile's
// activations (gains applied, NORM) and weights (and the up half's, EPI 2) staged in workgroup
// memory, so each weight is read once per 64 tokens instead of once per token as in the GEMV
// builds. Each thread holds a 4 × 4 block of the tile (and the up half's). NORM's sums of squares
// are gathered from the staged activations' raw values.
// dispatch (ceil(part_rows / 64), ceil(T / 64)).

const TM: u32 = 64u;
const TN: u32 = 64u;
const TK: u32 = 16u;
// Staged as whole vec4s, one writer each.
var<workgroup> xt: array<vec4<f32>, 256>;  // [TK][TM / 4]: rows 4r..4r+3 of the tile at k
var<workgroup> wt: array<vec4<f32>, 256>;  // [TK][TN / 4]: columns 4c..4c+3 at k
var<workgroup> ut: array<vec4<f32>, 256>;  // the up half's (EPI 2)
var<workgroup> sq: array<vec4<f32>, 256>;  // NORM: each thread's sums of squares of its 4 rows

// Weight vector j (8 weights from k = 8 j) of row `row` (rows of k8 vectors), or zeros.
fn wvec(row: u32, j: u32, k8: u32, ok: bool) -> vec4<u32> {
    return select(vec4<u32>(0u), w[select(0u, row * k8 + j, ok)], ok);
}

// Stages the 8 k from 8 j of weight rows `row`..`row` + 3 (zeros from `rows_end` on) as
// columns 4 cq..4 cq + 3 of the tile, from k row kk0: into ut for the up half, else wt.
fn stage_w(row: u32, rows_end: u32, j: u32, k8: u32, cq: u32, kk0: u32, up: bool) {
    let ok = j < k8;
    let a = wvec(row, j, k8, ok && row < rows_end);
    let b = wvec(row + 1u, j, k8, ok && row + 1u < rows_end);
    let c = wvec(row + 2u, j, k8, ok && row + 2u < rows_end);
    let d = wvec(row + 3u, j, k8, ok && row + 3u < rows_end);
    // Element 2e of a vector is in word e's low half, 2e + 1 in its high half.
    for (var e = 0u; e < 4u; e++) {
        let words = vec4<u32>(a[e], b[e], c[e], d[e]);
        let lo = bf16_lo(words);
        let hi = bf16_hi(words);
        let i = (kk0 + 2u * e) * (TN / 4u) + cq;
        if (up) {
            ut[i] = lo;
            ut[i + TN / 4u] = hi;
        } else {
            wt[i] = lo;
            wt[i + TN / 4u] = hi;
        }
    }
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t_count = p[0];
    let k = p[1];
    let k8 = k / 8u;
    let rows = p[2];
    let n0 = wg.x * TN;
    let m0 = wg.y * TM;
    let tx = lid % 16u;  // columns 4 tx .. 4 tx + 3
    let ty = lid / 16u;  // rows 4 ty .. 4 ty + 3
    var acc = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    var accu = array<vec4<f32>, 4>(vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0), vec4<f32>(0.0));
    // Staging: every thread one k (lid % 16) of four rows (4 (lid / 16)..); threads 0-31 four
    // columns' weights at one 8-k half (32-63 the up half's, EPI 2).
    let sk = lid % TK;
    let sr = 4u * (lid / TK);
    let cq = (lid % 32u) / 2u;
    let half = lid % 2u;
    let up = lid >= 32u;
    let stages_w = lid < 32u || (EPI == 2u && lid < 64u);
    var wrow = n0 + 4u * cq;
    if (up) { wrow += rows; }
    var wend = rows;
    if (up) { wend = 2u * rows; }
    var ss = vec4<f32>(0.0);
    for (var k0 = 0u; k0 < k; k0 += TK) {
        let kx = k0 + sk;
        let kok = kx < k;
        var xv = vec4<f32>(0.0);
        for (var i = 0u; i < 4u; i++) {
            let t = m0 + sr + i;
            let good = kok && t < t_count;
            let e = select(0u, t * k + kx, good);
            xv[i] = select(0.0, x[e / 4u][e % 4u], good);
        }
        ss += xv * xv;
        if (NORM && kok) { xv *= aux[kx]; }
        xt[sk * (TM / 4u) + sr / 4u] = xv;
        if (stages_w) { stage_w(wrow, wend, k0 / 8u + half, k8, cq, 8u * half, up); }
        workgroupBarrier();
        for (var kk = 0u; kk < TK; kk++) {
            let a = xt[kk * (TM / 4u) + ty];
            let b = wt[kk * (TN / 4u) + tx];
            acc[0] += a.x * b;
            acc[1] += a.y * b;
            acc[2] += a.z * b;
            acc[3] += a.w * b;
            if (EPI == 2u) {
                let u = ut[kk * (TN / 4u) + tx];
                accu[0] += a.x * u;
                accu[1] += a.y * u;
                accu[2] += a.z * u;
                accu[3] += a.w * u;
            }
        }
        workgroupBarrier();
    }
    sq[lid] = ss;
    workgroupBarrier();
    // The sums of squares of rows 4 ty..: the 16 threads that staged them (sk = 0..15).
    var tss = vec4<f32>(0.0);
    if (NORM) {
        for (var s = 0u; s < TK; s++) { tss += sq[ty * TK + s]; }
    }
    for (var i = 0u; i < 4u; i++) {
        let t = m0 + 4u * ty + i;
        for (var j = 0u; j < 4u; j++) {
            let col = n0 + 4u * tx + j;
            if (t < t_count && col < rows) { finish(t, col, acc[i][j], accu[i][j], tss[i]); }
        }
    }
}
