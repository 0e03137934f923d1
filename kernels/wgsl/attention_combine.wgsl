// out[t, h, :] = sum_s o_s e^(m_s - M) / sum_s l_s e^(m_s - M) over the splits attention.wgsl
// left in `part` ([o (d), max, sum] per (token, head, split)); splits without keys (sum 0) are
// skipped. params: as attention.wgsl's. dispatch (H, T).
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> part: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

const COMBINE_WG: u32 = 64u;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    combine(wg.x, wg.y, lid);
}
