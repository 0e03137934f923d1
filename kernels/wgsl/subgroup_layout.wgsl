// Run once when the wgpu backend opens a device with subgroup operations: each thread writes 1
// where its subgroup is 4 to 32 threads and its lane is its index modulo that size (subgroups
// are consecutive invocations), else 0, in workgroups of 128 and 256 threads. The builds that
// lay groups of threads out on subgroups (`wide_sg`, `attention_sg`) are used only where every
// thread wrote 1.
@group(0) @binding(0) var<storage, read_write> ok: array<u32>;

fn check(lid: u32, sl: u32, sgs: u32) {
    ok[lid] = select(0u, 1u, sgs >= 4u && sgs <= 32u && sl == lid % sgs);
}

@compute @workgroup_size(128)
fn main128(
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    check(lid, sl, sgs);
}

@compute @workgroup_size(256)
fn main256(
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    check(lid, sl, sgs);
}
