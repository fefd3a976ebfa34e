"""Small driver of the fused CUDA quantize / dequantize for compute-sanitizer (``make gpu-check``).

Runs a few cases that reach every kernel path (one-pass warp-shuffle and
shared-memory tiles, the two-pass large-block path, unaligned rows, partial
bytes, stochastic rounding) and checks them against the CPU kernels. Small, so
that memcheck and racecheck finish in seconds. Exits 2 without a CUDA device.
"""
from __future__ import annotations

import os
import sys

import torch

os.environ.setdefault("SFT_CUDA_FUSED", "1")
import sft_kernels  # noqa: E402,F401

CASES = [  # (shape, bits, block, stochastic, dtype)
    ((4, 300), 8, 64, False, torch.float32),       # warp-shuffle absmax
    ((3, 5000), 4, 128, True, torch.bfloat16),      # several tiles per row
    ((5, 77), 2, 7, False, torch.float16),          # shared-memory absmax, partial bytes
    ((2, 9000), 8, 3000, True, torch.float32),      # two-pass path
    ((3, 4099), 4, 4099, False, torch.bfloat16),    # two-pass, one block per row
]


def main() -> int:
    if not torch.cuda.is_available():
        print("cuda_sanitize: no CUDA device")
        return 2
    bad = 0
    for shape, bits, block, sr, dtype in CASES:
        x = (torch.randn(shape) * 3).to(dtype)
        xs = x.cuda()[..., 1:]  # a row stride != cols, and an unaligned start
        x = x[..., 1:]
        c, s = torch.ops.sft.quantize(xs, bits, block, sr, 7)
        y = torch.ops.sft.dequantize(c, s, bits, block, x.shape[-1], dtype)
        rc, rs = torch.ops.sft.quantize(x, bits, block, sr, 7)
        ry = torch.ops.sft.dequantize(rc, rs, bits, block, x.shape[-1], dtype)
        torch.cuda.synchronize()
        same = torch.equal(c.cpu(), rc) and torch.equal(s.cpu(), rs) and torch.equal(y.cpu(), ry)
        bad += not same
        print(f"{shape} bits={bits} block={block} sr={sr} {dtype}: {'ok' if same else 'MISMATCH'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
