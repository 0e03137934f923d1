// Causal GQA attention over the paged cache, fp32 with an online softmax, split along the
// context. Workgroup (KV head × head group, token, split) of 128 threads serves up to four query
// heads of one KV head, one per vec4 lane, so each key and value row is read once for all of
// them. It walks the split's slice of keys 0..=pos through the token's block table in tiles of
// 32 keys:
// - scores: four threads a key, each taking runs of 8 dimensions (4 threads read a 128-byte
//   run of the row together) with the 8 loads issued before the products that use them;
// - one thread a key sums the four partial dots; every thread then forms the running maximum
//   from the tile's scores (all hold the same state) and one thread a key its probability;
// - values: thread i accumulates output dims i and i + 128 over the tile's rows, 8 rows' loads
//   at a time (consecutive threads read consecutive dims: coalesced).
// Shader compilers do not unroll these loops for us: issuing loads ahead of their use is what
// keeps more than one memory access in flight per thread.
// With one split it writes the normalised output; otherwise partials [o (d), max, sum] per
// (token, head, split) for attention_combine.wgsl.
// QKN (qk_norm_rope_attention, decode steps: one token per sequence): q is the QKV projection
// [T, (H + 2 KV) d] and the workgroup forms its heads' q itself (q_norm, RoPE from the batch's
// table cs [T, d/2, (cos, sin)]); the workgroups whose slice holds the token's own key form
// that key (k_norm, RoPE) and value in workgroup memory and use them for it instead of reading
// the cache, and the first head group's writes both to the token's slot. No workgroup reads
// that slot from the cache, so the write needs no ordering.
// params: [T, H, KV, d, block_size, max_blocks, scale (f32 bits), splits, chunk, eps (f32 bits)].
// dispatch (KV * ceil(H / KV / 4), T, splits); d <= 256.
@group(0) @binding(0) var<storage, read> p: array<u32>;
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read_write> kc: array<f32>;
@group(0) @binding(3) var<storage, read_write> vc: array<f32>;
@group(0) @binding(4) var<storage, read> positions: array<u32>;
@group(0) @binding(5) var<storage, read> token_seq: array<u32>;
@group(0) @binding(6) var<storage, read> tables: array<u32>;
@group(0) @binding(7) var<storage, read_write> out: array<f32>;
@group(0) @binding(8) var<storage, read_write> part: array<f32>;
// QKN only (other builds are given stand-ins).
@group(0) @binding(9) var<storage, read> q_norm: array<f32>;
@group(0) @binding(10) var<storage, read> k_norm: array<f32>;
@group(0) @binding(11) var<storage, read> cs: array<f32>;
@group(0) @binding(12) var<storage, read> slots: array<u32>;

@compute @workgroup_size(128)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    attend(wg, lid);
}
