"""CRC32C implementations (csrc/cpu/crc32c.cpp), each forced in turn, against a reference.

Paths: portable slicing-by-8, SSE4.2 3-lane ``crc32``, PCLMULQDQ 4 x 128-bit folding, VPCLMULQDQ +
AVX-512 4 x 512-bit folding (what the dispatch picks from 512 bytes on this project's machines).
Covered: every length 0..4200 (all fold/tail boundaries), start offsets 0..63, random lengths up to
a few MB, non-zero init values and incremental use, the check value.
"""
from __future__ import annotations

import random

import numpy as np
import pytest

from sft_kernels.channel.checksum import PATHS, crc32c, crc32c_path


def _table() -> list[int]:
    out = []
    for b in range(256):  # bitwise definition, one byte at a time
        c = b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
        out.append(c)
    return out


_T = _table()


def reference_prefixes(data: bytes, value: int = 0) -> list[int]:
    """CRC32C of ``data[:n]`` continuing from ``value``, for every n in 0..len(data)."""
    c = value ^ 0xFFFFFFFF
    out = [value]
    for b in data:
        c = (c >> 8) ^ _T[(c ^ b) & 0xFF]
        out.append(c ^ 0xFFFFFFFF)
    return out


def _path(name: str):
    if not PATHS[name]:
        pytest.skip(f"this CPU lacks the instructions of the {name} CRC32C path "
                    "(sse42: SSE4.2; pclmul: PCLMULQDQ; vpclmul: VPCLMULQDQ + AVX-512F/BW/VL)")
    return name


ALL = ["portable", "sse42", "pclmul", "vpclmul"]
_BUF = np.random.default_rng(7).integers(0, 256, 4200 + 64, dtype=np.uint8)


def test_check_value_every_path():
    for name in ALL:
        if PATHS[name]:
            assert crc32c_path(name, b"123456789") == 0xE3069283
            assert crc32c_path(name, b"") == 0 and crc32c_path(name, b"", 77) == 77


def test_dispatch_uses_fold_here():
    """Informational: which paths this machine exercises (the vpclmul test below skips without it)."""
    assert PATHS["portable"]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("start,value", [(0, 0), (5, 0xDEADBEEF)])
def test_every_length(name, start, value):
    _path(name)
    buf = memoryview(_BUF)[start:start + 4200]
    want = reference_prefixes(bytes(buf), value)
    got = [crc32c_path(name, buf[:n], value) for n in range(4201)]
    bad = [n for n in range(4201) if got[n] != want[n]]
    assert not bad, f"{name}: wrong CRC for lengths {bad[:20]}"
    if name == "portable":  # the dispatching entry point too
        assert [crc32c(buf[:n], value) for n in range(4201)] == want[:4201]


@pytest.mark.parametrize("name", ALL)
def test_unaligned_starts(name):
    _path(name)
    lengths = [0, 1, 3, 4, 15, 16, 63, 64, 65, 255, 256, 257, 511, 512, 513, 767, 768, 1023, 1024, 1100]
    for start in range(64):
        buf = memoryview(_BUF)[start:start + 1100]
        want = reference_prefixes(bytes(buf), start * 0x01010101)
        for n in lengths:
            assert crc32c_path(name, buf[:n], start * 0x01010101) == want[n], (start, n)


@pytest.mark.parametrize("name", ALL)
def test_random_lengths_incremental(name):
    _path(name)
    rng = random.Random(11)
    big = np.random.default_rng(3).integers(0, 256, 4 << 20, dtype=np.uint8)
    mv = memoryview(big)
    for _ in range(12):
        n = rng.randrange(1, 4 << 20)
        start = rng.randrange(0, (4 << 20) - n + 1)
        value = rng.randrange(1 << 32)
        got = crc32c_path(name, mv[start:start + n], value)
        assert got == crc32c_path("portable", mv[start:start + n], value)
        cut = rng.randrange(0, n + 1)
        assert crc32c_path(name, mv[start + cut:start + n], crc32c_path(name, mv[start:start + cut], value)) == got
        assert crc32c(mv[start:start + n], value) == got
