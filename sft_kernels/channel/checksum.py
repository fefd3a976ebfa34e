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
from .tuning import SOCKIO_CHUNK

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


# ----------------------------------------------------------------------------------------------
# socket I/O fused with the CRC (csrc/cpu/sockio.cpp): plain sockets only
# ----------------------------------------------------------------------------------------------

try:
    _send_crc = _lib.sft_send_crc
    _send_crc.restype = ctypes.c_int64
    _send_crc.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                          ctypes.POINTER(ctypes.c_uint32), ctypes.c_int]
    _recv_crc = _lib.sft_recv_crc
    _recv_crc.restype = ctypes.c_int64
    _recv_crc.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                          ctypes.POINTER(ctypes.c_uint32)]
    _lib.sft_sockio_available.restype = ctypes.c_int
    _lib.sft_sockio_available.argtypes = []
    #: True when :func:`send_crc_at` / :func:`recv_crc_at` work (a POSIX build of the extension).
    SOCKIO: bool = bool(_lib.sft_sockio_available())
except AttributeError:  # an extension built before sockio.cpp existed
    SOCKIO = False


def send_crc_at(fd: int, address: int, nbytes: int, value: int, more: bool = True,
                chunk: int = 0) -> tuple[int, int]:
    """Send ``nbytes`` at ``address`` on socket ``fd``, CRC32C-ing each chunk just before sending it.

    Returns ``(result, crc)``: ``result`` is the bytes sent (fewer than ``nbytes`` only after a
    signal; call again for the rest) or ``-errno``; ``crc`` continues ``value`` over exactly the
    bytes sent.  ``more`` sets ``MSG_MORE`` (more of the frame follows).
    """
    c = ctypes.c_uint32(value)
    r = _send_crc(fd, address, nbytes, chunk or SOCKIO_CHUNK, ctypes.byref(c), 1 if more else 0)
    return r, c.value


def recv_crc_at(fd: int, address: int, nbytes: int, value: int, chunk: int = 0) -> tuple[int, int]:
    """Receive up to ``nbytes`` into ``address`` from socket ``fd``, CRC32C-ing each piece as it lands.

    Returns ``(result, crc)``: ``result`` is the bytes received (fewer than ``nbytes`` after a
    short read: EOF, a timeout with part read, a signal; 0 = EOF) or ``-errno``; ``crc`` continues
    ``value`` over exactly the bytes received.
    """
    c = ctypes.c_uint32(value)
    r = _recv_crc(fd, address, nbytes, chunk or SOCKIO_CHUNK, ctypes.byref(c))
    return r, c.value
