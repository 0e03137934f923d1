// y[t, n_offset + n] = sum_k x[t, k] * w[n, k] for one part of a weight that may be split across
// bindings by rows, with the model's fusions chosen per pipeline by override constants:
//   NORM: x is replaced by rms_norm(x) * aux (aux = the norm gain [K]; the statistic is reduced
//         with the products, 1/rms scales the finished sums);
//   EPI 1: y = aux + x w^T (aux = the residual, indexed like y);
//   EPI 2: rows n and n + part_rows are gate and up: y[t, n] = silu(gate) * up.
// One workgroup of 64 threads per 4 output columns: the threads stride over k together
// (coalesced reads of each weight row), then reduce in workgroup memory; for T > 1 the columns'
// weights are re-read per row from cache.
// params: [T, K, part_rows, y row stride, n_offset, eps (f32 bits)].
// dispatch (ceil(part_rows / 4), 1).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> aux: array<f32>;

override NORM: bool = false;
override EPI: u32 = 0u;

fn weight(i: u32) -> f32 { return w[i]; }
// The rest is matmul_body.wgsl, appended when the shader is built.
