"""CRC32C (Castagnoli) of byte buffers: the payload checksum of the channel (protocol version 2).

The work is done in the compiled extension (``csrc/cpu/crc32c.cpp``: carry-less-multiply folding
with VPCLMULQDQ/AVX-512 from 512 bytes, SSE4.2 ``crc32`` on three interleaved streams below that or
without AVX-512, slicing-by-8 without SSE4.2), ~6-13x faster than ``zlib.crc32`` on this project's
machines.  The same kernel is the custom op ``torch.ops.sft.crc32c(Tensor uint8, int init) -> int``;
the channel calls its C entry point ``sft_crc32c`` through :mod:`ctypes` instead, because building
a tensor per small buffer costs more than checksumming it, and because ``ctypes`` drops the GIL for
the duration of the call.

``crc32c(b, crc32c(a)) == crc32c(a + b)``, like ``zlib.crc32``.
"""
from __future__ import annotations

import ctypes

from .. import _C

_lib = ctypes.CDLL(_C.__file__)
_crc = _lib.sft_crc32c
_crc.restype = ctypes.c_uint32
_crc.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
_crc_portable = _lib.sft_crc32c_portable
_crc_portable.restype = ctypes.c_uint32
_crc_portable.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
_hw = _lib.sft_crc32c_hw
_hw.restype = ctypes.c_int
_hw.argtypes = []

#: True when the SSE4.2 implementation runs on this CPU.
HARDWARE: bool = bool(_hw())

_lib.sft_crc32c_features.restype = ctypes.c_int
_lib.sft_crc32c_features.argtypes = []
_FEATURES = _lib.sft_crc32c_features()
#: Implementation name -> whether this CPU can run it (for tests and benchmarks).
PATHS: dict[str, bool] = {
    "portable": True,
    "sse42": bool(_FEATURES & 1),
    "pclmul": bool(_FEATURES & 2),
    "vpclmul": bool(_FEATURES & 4),
}
_forced = {}
for _name in PATHS:
    _f = getattr(_lib, f"sft_crc32c_{_name}")
    _f.restype = ctypes.c_uint32
    _f.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
    _forced[_name] = _f


def crc32c_at(address: int, nbytes: int, value: int = 0) -> int:
    """CRC32C of ``nbytes`` bytes at raw ``address``, continuing from ``value``.

    The caller guarantees the memory is valid and stays alive (e.g. ``tensor.data_ptr() + offset``).
    """
    return _crc(value, address, nbytes) if nbytes else value


def _address(data: bytes | bytearray | memoryview) -> tuple[object, int]:
    """``(keepalive, address)`` of a C-contiguous buffer (no copy)."""
    if isinstance(data, bytes):
        # ctypes passes a bytes object as a pointer to its internal buffer.
        return data, ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value or 0
    mv = memoryview(data)
    if not mv.c_contiguous:
        raise ValueError("crc32c needs a C-contiguous buffer")
    mv = mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv
    if not mv.readonly:
        arr = (ctypes.c_char * len(mv)).from_buffer(mv)
        return arr, ctypes.addressof(arr)
    import numpy as np  # read-only views (slices of bytes): numpy exposes the address without copying
    arr = np.frombuffer(mv, dtype=np.uint8)
    return arr, arr.ctypes.data


def crc32c(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C of ``data`` (any C-contiguous buffer), continuing from ``value`` (0 to start)."""
    n = memoryview(data).nbytes
    if n == 0:
        return value
    if isinstance(data, bytes):
        return _crc(value, data, n)
    keep, addr = _address(data)
    out = _crc(value, addr, n)
    del keep
    return out


def crc32c_portable(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """The same CRC32C through the portable slicing-by-8 code, whatever the CPU (for tests)."""
    n = memoryview(data).nbytes
    if n == 0:
        return value
    keep, addr = _address(bytes(data) if not isinstance(data, (bytes, bytearray)) else data)
    out = _crc_portable(value, addr, n)
    del keep
    return out


def crc32c_path(path: str, data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """CRC32C through one named implementation (a key of :data:`PATHS`), bypassing the dispatch.

    A path the CPU lacks falls back to the portable code; check ``PATHS[path]`` first.
    """
    fn = _forced[path]
    n = memoryview(data).nbytes
    if n == 0:
        return value
    keep, addr = _address(data)
    out = fn(value, addr, n)
    del keep
    return out
