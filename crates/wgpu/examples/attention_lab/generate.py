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
