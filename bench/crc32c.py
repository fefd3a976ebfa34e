"""Micro-benchmark of the CRC32C implementations (csrc/cpu/crc32c.cpp): GB/s per path.

    PYTHONPATH=. python bench/crc32c.py [--sizes 1M,64M] [--reps 20]

Each cell is the median of ``--reps`` calls on one buffer (1 MB stays in cache; 64 MB does not).
Paths the CPU lacks are printed as "n/a". ``zlib.crc32`` (a different polynomial) is a reference point.
"""
from __future__ import annotations

import argparse
import ctypes
import statistics
import time
import zlib

import numpy as np

from sft_kernels import _C

_lib = ctypes.CDLL(_C.__file__)
_lib.sft_crc32c_features.restype = ctypes.c_int
FEATURES = _lib.sft_crc32c_features()
PATHS = {  # name -> (C function, feature bit needed)
    "dispatch (sft_crc32c)": ("sft_crc32c", 0),
    "vpclmul (AVX-512, 4x512-bit fold)": ("sft_crc32c_vpclmul", 4),
    "pclmul (4x128-bit fold)": ("sft_crc32c_pclmul", 2),
    "sse4.2 (crc32, 3 lanes)": ("sft_crc32c_sse42", 1),
    "portable (slicing-by-8)": ("sft_crc32c_portable", 0),
}


def _parse_size(s: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(s[:-1]) * mult[s[-1].upper()] if s[-1].upper() in mult else int(s)


def _time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1M,64M")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    sizes = [_parse_size(s) for s in args.sizes.split(",")]
    bufs = {n: np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8) for n in sizes}
    labels = [f"{n >> 20} MB" if n >= 1 << 20 else f"{n >> 10} KB" for n in sizes]
    print("| path | " + " | ".join(f"{l} GB/s" for l in labels) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, (sym, bit) in PATHS.items():
        fn = getattr(_lib, sym)
        fn.restype = ctypes.c_uint32
        fn.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        cells = []
        for n in sizes:
            if bit and not FEATURES & bit:
                cells.append("n/a")
                continue
            addr = bufs[n].ctypes.data
            cells.append(f"{n / _time(lambda: fn(0, addr, n), args.reps) / 1e9:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    cells = []
    for n in sizes:
        mv = memoryview(bufs[n])
        cells.append(f"{n / _time(lambda: zlib.crc32(mv), args.reps) / 1e9:.1f}")
    print("| zlib.crc32 (reference, other polynomial) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
