"""Quick CPU bandwidth check of sft::quantize / sft::dequantize (not a test).

Effective bandwidth = (bytes read + bytes written) / median time, compared with
``x.clone()`` (2 * x.nbytes) on the same tensor.  Run from the repository root::

    PYTHONPATH=. python bench/quantize_quick.py [--rows 16384] [--cols 768] [--block 64]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft)


def median_time(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


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
    print(f"{'case':34s} {'ms':>8s} {'GB/s':>8s} {'clone GB/s':>10s} {'fraction':>8s}")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(args.rows, args.cols).to(dtype)
        t_clone = median_time(lambda: x.clone(), args.reps)
        bw_clone = 2 * x.nbytes / t_clone / 1e9
        name = str(dtype).replace("torch.", "")
        for bits, sr in ((8, False), (4, False), (2, False), (8, True)):
            codes, scales = q(x, bits, args.block, sr, 0)
            t = median_time(lambda: q(x, bits, args.block, sr, 0), args.reps)
            moved = x.nbytes + codes.nbytes + scales.nbytes
            label = f"quantize {name} int{bits}{' sr' if sr else ''}"
            print(f"{label:34s} {t * 1e3:8.3f} {moved / t / 1e9:8.2f} {bw_clone:10.2f} {moved / t / 1e9 / bw_clone:8.2f}")
        for bits in (8, 4):
            codes, scales = q(x, bits, args.block, False, 0)
            t = median_time(lambda: dq(codes, scales, bits, args.block, args.cols, dtype), args.reps)
            moved = x.nbytes + codes.nbytes + scales.nbytes
            label = f"dequantize {name} int{bits}"
            print(f"{label:34s} {t * 1e3:8.3f} {moved / t / 1e9:8.2f} {bw_clone:10.2f} {moved / t / 1e9 / bw_clone:8.2f}")


if __name__ == "__main__":
    main()
