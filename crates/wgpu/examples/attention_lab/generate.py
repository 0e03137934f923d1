#!/usr/bin/env python3
"""Writes the attention lab's variants of kernels/wgsl/attention.wgsl next to this script.

Ablations take a part out (their outputs differ, which the lab flags); designs must match.
Run from the repository root: python3 crates/wgpu/examples/attention_lab/generate.py
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = open(os.path.join(HERE, "../../../../kernels/wgsl/attention.wgsl")).read()


def write(name, desc, src):
    with open(os.path.join(HERE, name + ".wgsl"), "w") as f:
        f.write("// lab variant (generated from attention.wgsl by generate.py): %s\n" % desc + src)


def sub(src, old, new):
    assert src.count(old) == 1, old
    return src.replace(old, new)


# Ablations.
write("abl_qkn0", "ablation: without the q/k-norm + RoPE prologue (output differs)\n// lab: qkn=0", SRC)
write("abl_one_split", "ablation: the whole context in one split, no combine\n// lab: chunk=4096", SRC)
write("abl_chunk32", "ablation: splits of 32 keys\n// lab: chunk=32", SRC)
write("abl_chunk64", "ablation: splits of 64 keys (the rule before the 17th session)\n// lab: chunk=64", SRC)
write("abl_no_values", "ablation: no value loads (output differs)", sub(SRC, "x = vc[base + i];", "x = 0.0;"))
write("abl_no_keys", "ablation: no key loads (output differs)", sub(SRC, "if (ok) { x = kc[i]; }", "if (ok) { x = 0.0; }"))

# Designs: a thread's loads of a tile in one round instead of several.
KEY_LOOP = """            for (var i = kp * RUN; i < d; i += PARTS * RUN) {
                let k0 = k_at(base + i, true);"""
loads = "\n".join(
    "                let k%d = kc[base + i + %du];" % (r * 8 + u, r * 32 + u) for r in range(4) for u in range(8)
)
fmas = " +\n".join(
    "                    qs[i + %du] * k%d" % (r * 32 + u, r * 8 + u) for r in range(4) for u in range(8)
)
KEYS_ALL = """            var i = kp * RUN;
            // A thread's four runs of 8 dims (d = 128: all of them) loaded in one round.
            for (; i + 3u * PARTS * RUN + RUN <= d; i += 4u * PARTS * RUN) {
%s
                acc +=
%s;
            }
            for (; i < d; i += PARTS * RUN) {
                let k0 = k_at(base + i, true);""" % (loads, fmas)
keys = sub(SRC, KEY_LOOP, KEYS_ALL)

VAL_LOOP = """        var j = 0u;
        for (; j + RUN <= n; j += RUN) {"""
vloads = "\n".join(
    "            let a%d = v_at(bases[j + %du], lid, ok0);\n            let c%d = v_at(bases[j + %du], lid + WG, has1);" % (r, r, r, r)
    for r in range(32)
)
vsum_p = " + ".join("probs[j + %du]" % r for r in range(32))
vsum_a = " +\n".join("                probs[j + %du] * a%d" % (r, r) for r in range(32))
vsum_c = " +\n".join("                probs[j + %du] * c%d" % (r, r) for r in range(32))
VALS_ALL = """        var j = 0u;
        // A whole tile's value rows loaded in one round.
        if (n == TILE) {
            let ok0 = lid < d;
%s
            l += %s;
            o0 +=
%s;
            o1 +=
%s;
            j = TILE;
        }
        for (; j + RUN <= n; j += RUN) {""" % (vloads, vsum_p, vsum_a, vsum_c)
vals = sub(SRC, VAL_LOOP, VALS_ALL)
both = sub(keys, VAL_LOOP, VALS_ALL)
write("keys_one_round", "design: a thread's key loads of a tile in one round", keys)
write("values_one_round", "design: a tile's value rows in one round", vals)
write("both_one_round", "design: key loads and value rows each in one round", both)
write("both_one_round_c32", "design: both in one round, splits of 32 keys\n// lab: chunk=32", both)

# Design: keys read like values, a thread a dim (lanes of a subgroup read consecutive words of
# one key row, coalesced), every key of the tile in one round; each key's dot summed by
# subgroupAdd, then across the workgroup's subgroups in workgroup memory. Needs subgroups of at
# least 8 lanes (the `red` array holds 32 keys x 16 subgroups).
start = SRC.index("        let key = tile + kl;")
end_marker = """            scores[lid] = partial[b] + partial[b + 1u] + partial[b + 2u] + partial[b + 3u];
        }
        workgroupBarrier();
"""
end = SRC.index(end_marker) + len(end_marker)
kl = "\n".join(
    "        let k%d = key_dim(%du, lid, lid < d, n);\n        let h%d = key_dim(%du, lid + WG, has1, n);" % (j, j, j, j)
    for j in range(32)
)
red = "\n".join(
    "        let s%d = subgroupAdd(q0 * k%d + q1 * h%d);" % (j, j, j) for j in range(32)
)
store = "\n".join("            red[%du * n_sg + sg] = s%d;" % (j, j) for j in range(32))
COALESCED = """        let n = min(TILE, keys - tile);
        if (lid < n) {
            let key = tile + lid;
            if (own && key == last) {
                bases[lid] = OWN;
            } else {
                bases[lid] = (tables[table + key / bs] * bs + key %% bs) * w + kv * d;
            }
        }
        workgroupBarrier();
        let q0 = qs[lid];
        let q1 = qs[lid + WG];
%s
%s
        if (lane == 0u) {
%s
        }
        workgroupBarrier();
        if (lid < n) {
            var s = vec4<f32>(0.0);
            for (var g = 0u; g < n_sg; g++) { s += red[lid * n_sg + g]; }
            scores[lid] = s;
        }
        workgroupBarrier();
""" % (kl, red, store)
co = SRC[:start] + COALESCED + SRC[end:]
co = sub(co, "var<workgroup> bases: array<u32, 32>;", "var<workgroup> bases: array<u32, 32>;\nvar<workgroup> red: array<vec4<f32>, 512>;  // per key and subgroup (>= 8 lanes)")
co = sub(co, "var<workgroup> qs: array<vec4<f32>, 264>;", "var<workgroup> qs: array<vec4<f32>, 264>;  // (lab: + WG read past d as zeros)")
co = sub(co, """fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {""",
         """fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) lane: u32,
    @builtin(subgroup_id) sg: u32,
    @builtin(num_subgroups) n_sg: u32,
) {""")
co = sub(co, """@compute @workgroup_size(128)""", """// Dim i of the tile's key j (0 past the tile or the head), from the cache or the token's own key.
fn key_dim(j: u32, i: u32, ok: bool, n: u32) -> f32 {
    var x = 0.0;
    if (ok && j < n) {
        let base = bases[j];
        if (QKN && base == OWN) {
            x = own_k[i];
        } else {
            x = kc[base + i];
        }
    }
    return x;
}

@compute @workgroup_size(128)""")
write("keys_coalesced", "design: keys a dim a thread, coalesced, one round; subgroup sums", co)
write("keys_coalesced_c32", "design: keys coalesced, splits of 32 keys\n// lab: chunk=32", co)

# Design: subgroup operations instead of workgroup-memory passes and barriers (any subgroup
# size of at least 4 that divides 128, with subgroups made of consecutive invocations, as on
# NVIDIA and lavapipe):
# - the q/k-norm prologue's sums of squares: a subgroup sum, then one barrier and a few adds
#   (was a seven-barrier tree);
# - a key's four partial dots added by two shuffles within its four lanes (was a workgroup-memory
#   pass and a barrier);
# - the tile's maximum: a subgroup maximum over the scores (was every thread reading all 32);
# - each probability computed where the value loop uses it (was a pass and a barrier).
sgv = sub(SRC, "fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {",
          """fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
    @builtin(subgroup_invocation_id) sl: u32,
    @builtin(subgroup_size) sgs: u32,
) {
    let sg = lid / sgs;
    let nsg = WG / sgs;""")
sgv = sub(sgv, """        partial[lid] = ssq;
        red_k[lid] = ssk;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s >>= 1u) {
            if (lid < s) {
                partial[lid] += partial[lid + s];
                red_k[lid] += red_k[lid + s];
            }
            workgroupBarrier();
        }
        let eps = bitcast<f32>(p[9]);
        let inv_q = inverseSqrt(partial[0] / f32(d) + eps);
        let inv_k = inverseSqrt(red_k[0] / f32(d) + eps);""", """        let sq = subgroupAdd(ssq);
        let sk = subgroupAdd(ssk);
        if (sl == 0u) {
            partial[sg] = sq;
            red_k[sg] = sk;
        }
        workgroupBarrier();
        var tq = vec4<f32>(0.0);
        var tk = 0.0;
        for (var s = 0u; s < nsg; s++) {
            tq += partial[s];
            tk += red_k[s];
        }
        let eps = bitcast<f32>(p[9]);
        let inv_q = inverseSqrt(tq / f32(d) + eps);
        let inv_k = inverseSqrt(tk / f32(d) + eps);""")
sgv = sub(sgv, """        partial[lid] = acc;
        workgroupBarrier();
        let n = min(TILE, keys - tile);
        if (lid < n) {
            let b = lid * PARTS;
            scores[lid] = partial[b] + partial[b + 1u] + partial[b + 2u] + partial[b + 3u];
        }
        workgroupBarrier();
        var big = m;
        for (var j = 0u; j < n; j++) { big = max(big, scores[j]); }
        let corr = exp(m - big);
        m = big;
        l *= corr;
        o0 *= corr;
        o1 *= corr;
        if (lid < n) { probs[lid] = exp(scores[lid] - m); }
        workgroupBarrier();""", """        var sdot = acc + subgroupShuffleXor(acc, 1u);
        sdot += subgroupShuffleXor(sdot, 2u);
        let n = min(TILE, keys - tile);
        if (kp == 0u && kl < n) { scores[kl] = sdot; }
        workgroupBarrier();
        var big = m;
        for (var j = sl; j < n; j += sgs) { big = max(big, scores[j]); }
        big = subgroupMax(big);
        let corr = exp(m - big);
        m = big;
        l *= corr;
        o0 *= corr;
        o1 *= corr;""")
for i in range(8):
    sgv = sub(sgv, "            let p%d = probs[j + %du];" % (i, i) if i else "            let p0 = probs[j];",
              "            let p%d = exp(scores[j + %du] - m);" % (i, i) if i else "            let p0 = exp(scores[j] - m);")
sgv = sub(sgv, "            let pj = probs[j];", "            let pj = exp(scores[j] - m);")
write("sg_tile", "subgroup sums, shuffles and maximum instead of workgroup passes and barriers", sgv)
