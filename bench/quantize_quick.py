"""Quick CPU bandwidth check of sft::quantize / sft::dequantize (not a test).

Effective bandwidth = (bytes read + bytes written) / time, compared with
``x.clone()`` (2 * x.nbytes) on the same tensor, and with ``y.copy_(x)`` into a
preallocated ``y`` (no page faults: a fresh allocation above glibc's mmap
threshold, 32 MiB, is page-faulted in on every call, which slows ``clone`` of a
large tensor and every op that returns a large tensor alike).  Times are the
median (and min, less sensitive to other load on the machine) of ``--reps``
runs.  Run from the repository root::

    PYTHONPATH=. python bench/quantize_quick.py [--rows 16384] [--cols 768] [--block 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft)


def timings(fn, reps: int) -> tuple[float, float]:
    """(median, min) seconds of ``reps`` calls after 3 warm-up calls."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q, dq = torch.ops.sft.quantize, torch.ops.sft.dequantize
    print(f"{args.rows}x{args.cols} block={args.block} threads={torch.get_num_threads()}")
    print("GB/s = (bytes read + written) / time; 'x clone' = fraction of clone's GB/s, 'x copy' = of copy_'s")
    hdr = f"{'case':28s} {'med ms':>8s} {'GB/s':>7s} {'x clone':>7s} {'x copy':>7s} | {'min ms':>8s} {'GB/s':>7s} {'x clone':>7s} {'x copy':>7s}"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(args.rows, args.cols).to(dtype)
        y = torch.empty_like(x)
        base = {}
        for name, fn in (("clone", lambda: x.clone()), ("copy_", lambda: y.copy_(x))):
            base[name] = [2 * x.nbytes / t / 1e9 for t in timings(fn, args.reps)]
        dname = str(dtype).replace("torch.", "")
        print(f"\n{dname}: clone {base['clone'][0]:.2f} GB/s (min-time {base['clone'][1]:.2f}), "
              f"copy_ {base['copy_'][0]:.2f} GB/s (min-time {base['copy_'][1]:.2f})")
        print(hdr)

        def report(label, fn, moved):
            cells = []
            for i, t in enumerate(timings(fn, args.reps)):
                bw = moved / t / 1e9
                cells.append(f"{t * 1e3:8.3f} {bw:7.2f} {bw / base['clone'][i]:7.2f} {bw / base['copy_'][i]:7.2f}")
            print(f"{label:28s} " + " | ".join(cells))

        for bits, sr in ((8, False), (4, False), (2, False), (8, True)):
            codes, scales = q(x, bits, args.block, sr, 0)
            report(f"quantize int{bits}{' sr' if sr else ''}", lambda: q(x, bits, args.block, sr, 0),
                   x.nbytes + codes.nbytes + scales.nbytes)
        for bits in (8, 4, 2):
            codes, scales = q(x, bits, args.block, False, 0)
            report(f"dequantize int{bits}", lambda: dq(codes, scales, bits, args.block, args.cols, dtype),
                   x.nbytes + codes.nbytes + scales.nbytes)


if __name__ == "__main__":
    main()
