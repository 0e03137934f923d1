#!/usr/bin/env python3
"""Reads the lines a CUDA trace build prints (QFUSE_CUDA_TRACE=1: `qfuse_trace FILE GX GY GZ BLOCK
T0 T1`, T0/T1 the %globaltimer in ns before and after each kernel's wait) and prints where the
last decode step's time goes.

A kernel's wait returns once the kernel before it has finished, so the time from one kernel's
wait returning to the next one's is that kernel's share of the critical path (its work after
the wait, its completion and the release of the next). Steps are told apart by the host's gap
between them (more than --gap µs without a wait returning).

usage: tools/timeline.py TRACE_FILE [--gap 30]
"""
import argparse
import collections
import statistics


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--gap", type=float, default=30.0, help="µs between steps")
    args = ap.parse_args()
    rows = []
    for line in open(args.trace):
        f = line.split()
        if len(f) == 8 and f[0] == "qfuse_trace":
            rows.append((f[1], f"{f[2]}x{f[3]}x{f[4]}/{f[5]}", int(f[6]), int(f[7])))
    rows.sort(key=lambda r: r[3])
    steps, cur = [], []
    for r in rows:
        if cur and (r[3] - cur[-1][3]) / 1e3 > args.gap:
            steps.append(cur)
            cur = []
        cur.append(r)
    if cur:
        steps.append(cur)
    # The last step of the most common length: a decode step, not a prefill or warm-up.
    common = collections.Counter(len(s) for s in steps).most_common(1)[0][0]
    step = [s for s in steps if len(s) == common][-1]
    print(f"{len(rows)} kernels, {len(steps)} steps; the last of {common} kernels:")
    span = (step[-1][3] - step[0][3]) / 1e3
    print(f"first wait to last wait: {span:.1f} µs")
    shares = collections.defaultdict(list)
    waits = collections.defaultdict(list)
    for i, (file, shape, t0, t1) in enumerate(step[:-1]):
        shares[(file, shape)].append((step[i + 1][3] - t1) / 1e3)
        waits[(file, shape)].append((t1 - t0) / 1e3)
    print(f"{'file':<16} {'grid/block':<22} {'n':>4} {'µs each':>8} {'total':>8} {'waited':>8}")
    for key, v in sorted(shares.items(), key=lambda kv: -sum(kv[1])):
        print(
            f"{key[0]:<16} {key[1]:<22} {len(v):>4} {statistics.mean(v):>8.2f} {sum(v):>8.1f}"
            f" {statistics.mean(waits[key]):>8.2f}"
        )


if __name__ == "__main__":
    main()
