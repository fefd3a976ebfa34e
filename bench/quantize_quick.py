"""Quick CPU bandwidth check of sft::quantize / sft::dequantize (not a test).

Effective bandwidth = (bytes read + bytes written) / time.  Each op is compared
with two baselines on the same tensor, timed interleaved with it (so that other
load on the machine hits both alike):

* ``x.clone()``: 2 * x.nbytes.  A fresh allocation above glibc's mmap threshold
  (32 MiB at most) is page-faulted in on every call, which dominates ``clone``
  of a large tensor (and also any op whose *output* is that large, e.g. an fp32
  dequantize of 48 MiB).
* ``y.copy_(x)`` into a preallocated ``y``: the machine's copy bandwidth.

Times are the median and the minimum of ``--reps`` runs.  Run from the
repository root::

    PYTHONPATH=. python bench/quantize_quick.py [--rows 16384] [--cols 768] [--block 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft)


def interleaved(fns, reps: int) -> list[tuple[float, float]]:
    """(median, min) seconds of each of ``fns``, called in turn ``reps`` times after warm-up."""
    for fn in fns:
        for _ in range(3):
            fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [(statistics.median(ts), min(ts)) for ts in times]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="float32,bfloat16,float16", help="comma-separated")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q, dq = torch.ops.sft.quantize, torch.ops.sft.dequantize
    print(f"{args.rows}x{args.cols} block={args.block} threads={torch.get_num_threads()}; GB/s = (read + written) / time")
    print(f"{'case':26s} {'stat':>6s} {'ms':>8s} {'GB/s':>7s} {'clone':>7s} {'x clone':>7s} {'copy_':>7s} {'x copy':>7s}")
    for dtype in (getattr(torch, name) for name in args.dtypes.split(",")):
        x = torch.randn(args.rows, args.cols).to(dtype)
        y = torch.empty_like(x)
        dname = str(dtype).replace("torch.", "")
        cases = []
        for bits, sr in ((8, False), (4, False), (2, False), (8, True)):
            codes, scales = q(x, bits, args.block, sr, 0)
            cases.append((f"{dname} quantize int{bits}{' sr' if sr else ''}",
                          lambda bits=bits, sr=sr: q(x, bits, args.block, sr, 0),
                          x.nbytes + codes.nbytes + scales.nbytes))
        for bits in (8, 4, 2):
            codes, scales = q(x, bits, args.block, False, 0)
            cases.append((f"{dname} dequantize int{bits}",
                          lambda c=codes, s=scales, bits=bits: dq(c, s, bits, args.block, args.cols, dtype),
                          x.nbytes + codes.nbytes + scales.nbytes))
        for label, fn, moved in cases:
            op_t, clone_t, copy_t = interleaved([fn, lambda: x.clone(), lambda: y.copy_(x)], args.reps)
            for i, stat in enumerate(("median", "min")):
                bw = moved / op_t[i] / 1e9
                bw_clone, bw_copy = 2 * x.nbytes / clone_t[i] / 1e9, 2 * x.nbytes / copy_t[i] / 1e9
                print(f"{label if i == 0 else '':26s} {stat:>6s} {op_t[i] * 1e3:8.3f} {bw:7.2f} {bw_clone:7.2f} "
                      f"{bw / bw_clone:7.2f} {bw_copy:7.2f} {bw / bw_copy:7.2f}")


if __name__ == "__main__":
    main()
