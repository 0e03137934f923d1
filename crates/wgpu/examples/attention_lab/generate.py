#!/usr/bin/env python3
"""Writes the attention lab's variants of kernels/wgsl/attention.wgsl next to this script.

Ablations take a part out (their outputs differ, which the lab flags); designs must match.
Run from the repository root: python3 crates/wgpu/examples/attention_lab/generate.py
"""
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# The backend's build for adapters with subgroups, as the lab's baseline runs it.
SRC = (open(os.path.join(HERE, "../../../../kernels/wgsl/attention.wgsl")).read()
       + open(os.path.join(HERE, "../../../../kernels/wgsl/attention_sg.wgsl")).read())


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

# The designs measured before (a tile's key loads or value rows in one round, keys read a dim a
# thread, the reductions in subgroup operations: docs/perf.md, 17th and 18th sessions) were
# dropped from here when the last of them became the backend's build.


# Design wg256: the backend shader at 256 threads, 8 a key (its WG and PARTS overrides), where
# the halves of the workgroup add the values of a tile's halves of keys (d <= 128).
w = sub(SRC, "override WG: u32 = 128u;", "override WG: u32 = 256u;")
w = sub(w, "override PARTS: u32 = 4u;", "override PARTS: u32 = 8u;")
write("wg256", "256 threads: 8 a key, and two halves over the tile's values (d <= 128)", w)
