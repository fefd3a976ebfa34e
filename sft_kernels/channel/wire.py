"""Wire format of the tensor channel: frame header, payload layout, dtype codes, limits and errors.

Everything here works on byte buffers and on *readers* (any object with a socket-like
``recv_into(buffer) -> int`` method), so the decoder runs unchanged on a socket, an
``ssl.SSLSocket`` or an in-memory :class:`BytesReader` (used by the fuzz tests).  The byte-exact
layout is documented in ``docs/protocol.md``; keep the two in step.

Design rules:

* every length, count and code read from the wire is bounds-checked *before* anything is
  allocated from it, and every violation raises :class:`ProtocolError` naming the field, the value
  and the valid range;
* tensor data is never concatenated: senders hand out ``memoryview`` s of the tensor storage and
  receivers ``recv_into`` preallocated ``torch.uint8`` buffers that become the received tensors;
* ``meta`` travels as UTF-8 JSON (never pickle);
* the optional payload checksum is CRC32C (:mod:`.checksum`, SSE4.2 in the extension); the header
  keeps ``zlib.crc32`` (36 bytes: the call overhead dominates there).

This module knows tensors and bytes only: nothing about models, codecs or sockets' lifetimes.
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol

import torch

from .checksum import crc32c, crc32c_at
from .tuning import COALESCE_BYTES, CRC_RECV_RUN_BYTES, RECV_BUFFER_BYTES, SEND_CHUNK_BYTES

MAGIC = b"SFTC"
#: 3: compact tensor descriptors (varint lengths and dims, u8 name length, no per-tensor byte
#: length); 2: the payload checksum is CRC32C; 1: zlib's CRC32.
PROTOCOL_VERSION = 3

# --- message kinds (one byte).  Kinds below KIND_USER_MIN belong to the channel. ---
KIND_HELLO = 1
KIND_CHALLENGE = 2
KIND_AUTH = 3
KIND_OK = 4
KIND_ERROR = 5
KIND_PING = 6
KIND_PONG = 7
RESERVED_KINDS = frozenset({KIND_HELLO, KIND_CHALLENGE, KIND_AUTH, KIND_OK, KIND_ERROR, KIND_PING, KIND_PONG})
KIND_USER_MIN = 16
KIND_MAX = 255

# --- channel flags (a separate 16-bit field; the 16-bit ``flags`` field is the application's) ---
CHFLAG_PAYLOAD_CRC = 0x0001
KNOWN_CHFLAGS = CHFLAG_PAYLOAD_CRC

#: magic, version, kind, flags (app), chflags (channel), reserved (0), conn_id, seq, payload_len
_HEAD = struct.Struct("<4sBBHHHIQQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HEAD.size + _CRC.size  # 36
CRC_SIZE = _CRC.size

#: A tensor name's length is one byte on the wire (0 is refused).
MAX_NAME_BYTES = 255
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
#: An unsigned LEB128 varint on the wire is at most this many bytes and at most ``I64_MAX``.
MAX_VARINT_BYTES = 10
#: ERROR frames carry at most this many characters of message.
MAX_ERROR_CHARS = 4096
#: The largest ``retry_after`` (seconds) an ERROR frame may carry.
MAX_RETRY_AFTER = 3600.0

#: dtype code (one byte) -> torch dtype.  Codes are part of the protocol: never renumber.
DTYPE_CODES: dict[int, torch.dtype] = {
    1: torch.float32,
    2: torch.float64,
    3: torch.float16,
    4: torch.bfloat16,
    5: torch.int8,
    6: torch.uint8,
    7: torch.int16,
    8: torch.int32,
    9: torch.int64,
    10: torch.bool,
}
CODE_OF_DTYPE: dict[torch.dtype, int] = {v: k for k, v in DTYPE_CODES.items()}



class ProtocolError(Exception):
    """The peer sent bytes that break the protocol (bad field, bad checksum, limit exceeded, truncation)."""


class PeerClosed(ProtocolError, ConnectionError):
    """The peer closed the stream between frames (the normal end of a session)."""


class TruncatedFrame(PeerClosed):
    """The stream ended in the middle of a frame; the message says how far it got."""


class AuthError(Exception):
    """The handshake was refused (unknown client id and wrong token look the same to the client)."""


class RemoteError(Exception):
    """The peer sent an ERROR frame; the message is the peer's text.

    ``retryable`` says whether the peer expects the same request to succeed later (e.g. a full
    server), and ``retry_after`` (seconds, or None) how long it suggests waiting first.
    """

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after

    @classmethod
    def from_meta(cls, meta: Mapping, default: str = "remote error") -> "RemoteError":
        """The error an ERROR frame's ``meta`` describes; malformed optional fields are ignored.

        ``retryable`` counts only when it is the JSON ``true``; ``retry_after`` only when it is a
        finite number in [0, :data:`MAX_RETRY_AFTER`].  Never raises for any JSON object.
        """
        message = meta.get("message", default)
        return cls(str(message)[:MAX_ERROR_CHARS], retryable=meta.get("retryable") is True,
                   retry_after=parse_retry_after(meta.get("retry_after")))


def parse_retry_after(value: object) -> float | None:
    """``value`` as seconds if it is a finite number in [0, MAX_RETRY_AFTER] (not a bool), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    seconds = float(value)
    return seconds if 0.0 <= seconds <= MAX_RETRY_AFTER else None  # NaN fails both comparisons


def error_meta(message: str, *, retryable: bool = False, retry_after: float | None = None) -> dict:
    """The meta of an ERROR frame: ``message`` (truncated), ``retryable`` and, if given, ``retry_after``.

    Raises ``ValueError`` if ``retry_after`` is not a finite number of seconds in [0, 3600].
    """
    meta: dict = {"message": str(message)[:MAX_ERROR_CHARS], "retryable": bool(retryable)}
    if retry_after is not None:
        if parse_retry_after(retry_after) is None:
            raise ValueError(f"retry_after must be a finite number of seconds in [0, {MAX_RETRY_AFTER:g}], "
                             f"got {retry_after!r}")
        meta["retry_after"] = float(retry_after)
    return meta


@dataclass(frozen=True)
class Limits:
    """Bounds the receiver enforces on every frame, and the timeouts of a connection.

    ``max_frame_bytes`` bounds the payload length of one frame (and so every allocation made for
    it); ``max_tensors`` and ``max_ndim`` bound the tensor table; ``handshake_timeout`` is the time
    a new connection has to finish TLS + authentication; ``idle_timeout`` bounds how long a server
    connection waits for the next frame (``None`` = forever); ``max_connections`` is the size of
    the server's connection pool (and so bounds its connection threads).  When the pool is full a
    new connection evicts the oldest one still in its handshake; if every slot holds an
    authenticated connection the newcomer gets a retryable ERROR (see ``docs/protocol.md``).
    """

    max_frame_bytes: int = 1 << 30
    max_tensors: int = 64
    max_ndim: int = 8
    handshake_timeout: float = 5.0
    idle_timeout: float | None = 300.0
    max_connections: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.max_frame_bytes <= U64_MAX:
            raise ValueError(f"Limits.max_frame_bytes must be in [1, 2**64-1], got {self.max_frame_bytes}")
        if not 0 <= self.max_tensors <= 0xFFFFFFFF:
            raise ValueError(f"Limits.max_tensors must be in [0, 2**32-1], got {self.max_tensors}")
        if not 0 <= self.max_ndim <= 255:
            raise ValueError(f"Limits.max_ndim must be in [0, 255], got {self.max_ndim}")
        if not self.handshake_timeout > 0:
            raise ValueError(f"Limits.handshake_timeout must be > 0 seconds, got {self.handshake_timeout}")
        if self.idle_timeout is not None and not self.idle_timeout > 0:
            raise ValueError(f"Limits.idle_timeout must be > 0 seconds or None, got {self.idle_timeout}")
        if self.max_connections < 1:
            raise ValueError(f"Limits.max_connections must be >= 1, got {self.max_connections}")


#: Limits applied to frames before authentication: an unauthenticated peer can make us allocate little.
HANDSHAKE_LIMITS = Limits(max_frame_bytes=64 * 1024, max_tensors=0, max_ndim=0)


@dataclass
class Frame:
    """One received message: the kind, the application's sequence number and flags, tensors and meta.

    ``wire_bytes`` is the frame's total size on the wire (header, payload, CRC trailer) and
    ``payload_bytes`` the tensor data plus meta JSON bytes in it.
    """

    kind: int
    seq: int
    flags: int
    tensors: dict[str, torch.Tensor]
    meta: dict
    wire_bytes: int = field(default=0, compare=False)
    payload_bytes: int = field(default=0, compare=False)


@dataclass(frozen=True)
class Header:
    """The decoded fixed-size frame header."""

    kind: int
    flags: int
    chflags: int
    conn_id: int
    seq: int
    payload_len: int


class Reader(Protocol):
    """Anything with socket semantics for ``recv_into``: fills a prefix, returns its length, 0 at EOF."""

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int: ...


class BytesReader:
    """An in-memory :class:`Reader` over ``data`` (for tests and fuzzing the decoder without sockets).

    ``chunk`` limits how many bytes one ``recv_into`` returns, to exercise partial reads.
    """

    def __init__(self, data: bytes | bytearray | memoryview, chunk: int | None = None) -> None:
        self._data = memoryview(bytes(data))
        self._pos = 0
        self._chunk = chunk

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        n = len(buffer) if nbytes == 0 else min(nbytes, len(buffer))
        n = min(n, len(self._data) - self._pos)
        if self._chunk is not None:
            n = min(n, self._chunk)
        buffer[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._data) - self._pos


class BufferedReader:
    """A :class:`Reader` that serves small reads from a buffer and large ones straight from ``raw``.

    Frame headers and tensor descriptors are a few bytes each; reading them one ``recv`` at a time
    would cost a system call per field.  Reads of at least half the buffer size (tensor data) go
    directly into the caller's buffer after the buffered bytes are used up, so bulk data is still
    received without an extra copy.  Bytes of the next frame may wait in the buffer.
    """

    def __init__(self, raw: Reader, size: int = RECV_BUFFER_BYTES) -> None:
        self.raw = raw
        self._buf = bytearray(size)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0

    @property
    def buffered(self) -> int:
        """Bytes read from ``raw`` but not yet handed out."""
        return self._end - self._start

    def recv_into(self, buffer: memoryview, nbytes: int = 0, /) -> int:
        n = len(buffer) if nbytes == 0 else min(nbytes, len(buffer))
        if n == 0:
            return 0
        if self._end == self._start:
            if n >= len(self._buf) // 2:
                return self.raw.recv_into(buffer, n)
            k = self.raw.recv_into(self._view)
            if k == 0:
                return 0
            self._start, self._end = 0, k
        k = min(n, self._end - self._start)
        buffer[:k] = self._view[self._start:self._start + k]
        self._start += k
        return k

    def take(self, n: int) -> bytearray | None:
        """A copy of the next ``n`` buffered bytes (consumed), or None if fewer are buffered (no I/O)."""
        start = self._start
        if self._end - start < n:
            return None
        self._start = start + n
        return self._buf[start:start + n]

    def bulk_reader(self) -> Callable[[memoryview], int]:
        """The fastest ``recv_into(buffer) -> int`` for bulk data once the buffered bytes are used up.

        While bytes are buffered this is :meth:`recv_into`; afterwards it is ``raw.bulk_reader()``
        when the raw source has one (e.g. a plain socket's ``recv_into`` with ``MSG_WAITALL``: one
        system call per buffer instead of one per arriving segment), else ``raw.recv_into``.  Valid
        until the next read from this object.
        """
        if self._end != self._start:
            return self.recv_into
        bulk = getattr(self.raw, "bulk_reader", None)
        return bulk() if bulk is not None else self.raw.recv_into

    def fused_recv_crc(self) -> Callable[[int, int, int], tuple[int, int]] | None:
        """The raw source's receive-and-checksum call (see :meth:`.deadline.SocketSource.fused_recv_crc`), or None.

        None while bytes are buffered (they must be handed out first) or when the source has none.
        Valid until the next read from this object.
        """
        if self._end != self._start:
            return None
        fused = getattr(self.raw, "fused_recv_crc", None)
        return fused() if fused is not None else None


# ----------------------------------------------------------------------------------------------
# encoding
# ----------------------------------------------------------------------------------------------

def encode_header(kind: int, flags: int, chflags: int, conn_id: int, seq: int, payload_len: int) -> bytes:
    """The 36 header bytes (fields then CRC32 of them)."""
    head = _HEAD.pack(MAGIC, PROTOCOL_VERSION, kind, flags, chflags, 0, conn_id, seq, payload_len)
    return head + _CRC.pack(zlib.crc32(head))


def encode_uvarint(value: int) -> bytes:
    """``value`` (0 .. 2**63-1) as an unsigned LEB128 varint: 7 bits per byte, low bits first,
    the top bit of every byte but the last set; 1 byte below 128, at most 9 bytes."""
    if not 0 <= value <= I64_MAX:
        raise ValueError(f"varint value must be in [0, 2**63-1], got {value}")
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _append_uvarint(out: bytearray, value: int) -> None:
    """Append ``value`` (already known to be in range) to ``out`` as a varint; one byte is the common case."""
    if value < 0x80:
        out.append(value)
    else:
        out += encode_uvarint(value)


def _meta_bytes(meta: Mapping | None) -> bytes:
    if not meta:
        return b""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a Mapping with str keys, got {type(meta).__name__}")
    for k in meta:
        if not isinstance(k, str):
            raise TypeError(f"meta keys must be str, got key {k!r} of type {type(k).__name__}")
    try:
        return json.dumps(dict(meta), allow_nan=False, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable (finite numbers, str keys): {e}") from None


def tensor_bytes_view(t: torch.Tensor) -> tuple[torch.Tensor, memoryview]:
    """A contiguous CPU version of ``t`` and a zero-copy uint8 ``memoryview`` of its storage.

    The returned tensor must be kept alive while the view is in use.
    """
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.numel() == 0:
        return t, memoryview(b"")
    flat = t.reshape(-1).view(torch.uint8)  # works for bfloat16 and bool too
    return t, memoryview(flat.numpy()).cast("B")


def _check_tensor(name: Any, t: Any, limits: Limits) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"tensor names must be str, got {name!r} of type {type(name).__name__}")
    nb = name.encode("utf-8")
    if not 0 < len(nb) <= MAX_NAME_BYTES:
        raise ValueError(f"tensor name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(nb)}")
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"tensor {name!r} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ValueError(f"tensor {name!r} must be dense (strided layout), got {t.layout}")
    if t.dtype not in CODE_OF_DTYPE:
        raise ValueError(f"tensor {name!r} has dtype {t.dtype}; supported: "
                         f"{', '.join(str(d) for d in CODE_OF_DTYPE)}")
    if t.dim() > limits.max_ndim:
        raise ValueError(f"tensor {name!r} has {t.dim()} dims; max_ndim is {limits.max_ndim}")
    return nb


def frame_pieces(kind: int, tensors: Mapping[str, torch.Tensor] | None, meta: Mapping | None, *,
                 seq: int = 0, flags: int = 0, conn_id: int = 0, crc: bool = True,
                 limits: Limits = Limits()) -> tuple[list[bytes | memoryview], int, int, list[torch.Tensor]]:
    """Lay out one frame as a list of buffers (small pieces joined, tensor data as memoryviews).

    Returns ``(pieces, wire_bytes, payload_bytes, keepalive)``; ``keepalive`` holds the contiguous
    tensors the memoryviews point into.  If ``crc`` is set the CRC trailer is *not* in ``pieces``:
    the sender computes it while sending (see :func:`iter_send_chunks`).  Raises ``ValueError`` /
    ``TypeError`` for arguments the peer would refuse.
    """
    if not 0 <= kind <= KIND_MAX:
        raise ValueError(f"kind must be in [0, {KIND_MAX}], got {kind}")
    if not 0 <= flags <= 0xFFFF:
        raise ValueError(f"flags must be in [0, 65535], got {flags}")
    if not 0 <= seq <= U64_MAX:
        raise ValueError(f"seq must be in [0, 2**64-1], got {seq}")
    if not 0 <= conn_id <= 0xFFFFFFFF:
        raise ValueError(f"conn_id must be in [0, 2**32-1], got {conn_id}")
    tensors = tensors or {}
    if len(tensors) > limits.max_tensors:
        raise ValueError(f"{len(tensors)} tensors exceed max_tensors {limits.max_tensors}")
    mb = _meta_bytes(meta)
    payload: list[bytes | memoryview] = []
    small = bytearray()
    _append_uvarint(small, len(mb))
    small += mb
    _append_uvarint(small, len(tensors))
    keep: list[torch.Tensor] = []
    data_bytes = 0
    for name, t in tensors.items():
        nb = _check_tensor(name, t, limits)
        tc, view = tensor_bytes_view(t)
        keep.append(tc)
        # name length (u8), name, dtype code (u8), ndim (u8), dims (varints); the byte length is
        # not sent: the receiver derives it as numel x itemsize.
        small.append(len(nb))
        small += nb
        small.append(CODE_OF_DTYPE[tc.dtype])
        small.append(tc.dim())
        for d in tc.shape:
            _append_uvarint(small, d)
        data_bytes += len(view)
        if len(view) < COALESCE_BYTES:
            small += view
        else:
            payload.append(bytes(small))
            payload.append(view)
            small = bytearray()
    if small:
        payload.append(bytes(small))
    payload_len = sum(len(p) for p in payload)
    if payload_len > limits.max_frame_bytes:
        raise ValueError(f"frame payload of {payload_len} bytes exceeds max_frame_bytes {limits.max_frame_bytes}")
    header = encode_header(kind, flags, CHFLAG_PAYLOAD_CRC if crc else 0, conn_id, seq, payload_len)
    if payload and not isinstance(payload[0], memoryview):
        pieces: list[bytes | memoryview] = [header + payload[0], *payload[1:]]
    else:
        pieces = [header, *payload]
    wire = HEADER_SIZE + payload_len + (CRC_SIZE if crc else 0)
    return pieces, wire, data_bytes + len(mb), keep


def iter_send_chunks(pieces: list[bytes | memoryview], crc: bool,
                     chunk: int = SEND_CHUNK_BYTES) -> Iterator[bytes | memoryview]:
    """Yield the buffers to send, at most ``chunk`` bytes each, then the CRC trailer when ``crc``.

    The payload CRC32C is computed incrementally over the very chunks being sent, just before
    each is yielded (so the kernel's copy finds it in cache), skipping the header (the first
    :data:`HEADER_SIZE` bytes).  Without ``crc`` big pieces are yielded whole when ``chunk`` is 0.
    """
    value = 0
    skip = HEADER_SIZE
    for p in pieces:
        mv = memoryview(p)
        if not crc and (chunk <= 0 or len(mv) <= chunk):
            yield mv
            continue
        step = chunk if chunk > 0 else SEND_CHUNK_BYTES
        for off in range(0, len(mv), step):
            c = mv[off:off + step]
            if crc:
                if skip >= len(c):
                    skip -= len(c)
                else:
                    if skip:  # the small head piece: a bytes copy is cheaper than a view's address
                        value = crc32c(bytes(c[skip:]), value)
                    else:
                        value = crc32c(c, value)
                    skip = 0
            yield c
    if crc:
        yield _CRC.pack(value)


def encode_frame(kind: int, tensors: Mapping[str, torch.Tensor] | None = None, meta: Mapping | None = None, *,
                 seq: int = 0, flags: int = 0, conn_id: int = 0, crc: bool = True,
                 limits: Limits = Limits()) -> bytes:
    """The whole frame as one ``bytes`` object (copies; for tests, fuzzing and tiny control frames)."""
    pieces, _, _, _ = frame_pieces(kind, tensors, meta, seq=seq, flags=flags, conn_id=conn_id, crc=crc,
                                   limits=limits)
    return b"".join(bytes(c) for c in iter_send_chunks(pieces, crc))


# ----------------------------------------------------------------------------------------------
# decoding
# ----------------------------------------------------------------------------------------------

def recv_exact(reader: Reader, buf: memoryview, what: str, started: bool = True) -> None:
    """Fill ``buf`` from ``reader``; raise :class:`PeerClosed` naming ``what`` if the stream ends first.

    ``started`` says whether bytes of the current frame were already read (the message then says
    the frame was truncated).
    """
    got = 0
    n = len(buf)
    while got < n:
        k = reader.recv_into(buf[got:])
        if k == 0:
            if got == 0 and not started:
                raise PeerClosed("connection closed by peer")
            raise TruncatedFrame(f"connection closed mid-frame: got {got} of {n} bytes of the {what}")
        got += k


def decode_header(raw: bytes | bytearray | memoryview, limits: Limits) -> Header:
    """Check and decode the 36 header bytes; raise :class:`ProtocolError` naming the bad field."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(raw)}")
    magic, version, kind, flags, chflags, reserved, conn_id, seq, plen = _HEAD.unpack_from(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r} (not an sft channel peer?)")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version} is not supported; this side speaks version "
                            f"{PROTOCOL_VERSION}")
    (hcrc,) = _CRC.unpack_from(raw, _HEAD.size)
    actual = zlib.crc32(raw[:_HEAD.size])
    if hcrc != actual:
        raise ProtocolError(f"header CRC mismatch: header says {hcrc:#010x}, computed {actual:#010x}")
    if kind < KIND_USER_MIN and kind not in RESERVED_KINDS:
        raise ProtocolError(f"message kind {kind} is reserved and unknown; valid: {sorted(RESERVED_KINDS)} "
                            f"or {KIND_USER_MIN}..{KIND_MAX}")
    if chflags & ~KNOWN_CHFLAGS:
        raise ProtocolError(f"channel flags {chflags:#06x} set unknown bits (known: {KNOWN_CHFLAGS:#06x})")
    if reserved != 0:
        raise ProtocolError(f"reserved header field is {reserved}, must be 0")
    if plen > limits.max_frame_bytes:
        raise ProtocolError(f"payload length {plen} exceeds max_frame_bytes {limits.max_frame_bytes}")
    return Header(kind, flags, chflags, conn_id, seq, plen)


def _field_name(what: str | Callable[[], str], arg: object) -> str:
    """The field name for an error message (see :meth:`_PayloadReader.small`)."""
    if callable(what):
        return what()
    return what if arg is None else what.format(repr(arg))


class _PayloadReader:
    """Reads the payload of one frame, refusing to read past the declared payload length.

    The payload checksum is computed lazily and in large pieces: small fields are collected in a
    bytearray and checksummed in one call just before the next tensor's data (or at the end), and
    tensor data is checksummed in runs of up to :data:`CRC_RUN` bytes as they arrive.
    """

    #: Tensor data is checksummed once this many bytes arrived unchecked (see :mod:`.tuning`).
    CRC_RUN = CRC_RECV_RUN_BYTES

    def __init__(self, reader: Reader, length: int, crc: bool) -> None:
        self.reader = reader
        self.remaining = length
        self.crc = crc
        self._value = 0
        self._pending = bytearray()
        self._take: Callable[[int], bytearray | None] | None = getattr(reader, "take", None)

    @property
    def value(self) -> int:
        """The CRC32C of everything read so far."""
        if self._pending:
            self._value = crc32c(self._pending, self._value)
            self._pending = bytearray()
        return self._value

    def _check_room(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise ProtocolError(f"{what} needs {n} bytes but only {self.remaining} remain "
                                f"in the declared payload length")

    def small(self, n: int, what: str | Callable[[], str], arg: object = None) -> bytes | bytearray:
        """Read a small field of ``n`` bytes (descriptors, names, meta).

        ``what`` names the field in error messages; when ``arg`` is given it is a ``str.format``
        template filled with ``repr(arg)`` only if an error is raised (no formatting per field),
        and a callable ``what`` is called only then.
        Served straight from a :class:`BufferedReader`'s buffer when it holds the bytes (the
        common case: one frame's descriptors arrive together), else read with :func:`recv_exact`.
        """
        if n > self.remaining:
            self._check_room(n, _field_name(what, arg))
        take = self._take
        b = take(n) if take is not None else None
        if b is None:
            b = bytearray(n)
            recv_exact(self.reader, memoryview(b), _field_name(what, arg))
        self.remaining -= n
        if self.crc:
            self._pending += b
        return b

    def uvarints(self, count: int, field: Callable[[int], str]) -> list[int]:
        """Read ``count`` consecutive unsigned LEB128 varints (see :func:`encode_uvarint`).

        ``field(j)`` names the j-th value in error messages (called only to raise).  Every varint
        must end within :data:`MAX_VARINT_BYTES` bytes, have no redundant trailing zero group
        (overlong) and be at most ``I64_MAX``; it must also end inside the declared payload.
        The bytes are read in as few calls as possible without reading past the last varint:
        each value still unfinished needs at least one more byte.
        """
        out: list[int] = []
        value = shift = used = 0  # the varint being decoded: bits so far, next shift, bytes so far
        while len(out) < count:
            n = min(count - len(out), self.remaining)
            if n == 0:
                state = f"after {used} of its bytes" if used else "before its first byte"
                raise ProtocolError(f"{field(len(out))} is truncated: the declared payload length ends "
                                    f"{state}")
            for b in self.small(n, lambda: field(len(out))):
                used += 1
                value |= (b & 0x7F) << shift
                if b & 0x80:
                    if used == MAX_VARINT_BYTES:
                        raise ProtocolError(f"{field(len(out))} varint is not terminated within "
                                            f"{MAX_VARINT_BYTES} bytes")
                    shift += 7
                    continue
                if b == 0 and used > 1:
                    raise ProtocolError(f"{field(len(out))} varint is overlong ({used} bytes ending in a zero "
                                        f"byte); the shortest encoding is required")
                if value > I64_MAX:
                    raise ProtocolError(f"{field(len(out))} is {value}, above the varint maximum 2**63-1")
                out.append(value)
                value = shift = used = 0
        return out

    def data(self, buf: torch.Tensor, what: str) -> None:
        """Fill the contiguous uint8 CPU tensor ``buf`` (tensor data) straight from the stream.

        Buffered bytes are copied first; the rest is received directly into ``buf`` through the
        reader's bulk path (see :meth:`BufferedReader.bulk_reader`), in pieces of at most
        :data:`CRC_RUN` bytes when the payload is checksummed (each piece is checksummed right
        after it arrives, while it is still in cache), else in one piece.  With the checksum on
        a plain socket, once the buffered bytes are used up the rest goes through the reader's
        fused receive-and-checksum call (``csrc/cpu/sockio.cpp``) instead.
        """
        n = buf.numel()
        self._check_room(n, what)
        view = memoryview(buf.numpy())
        crc = self.crc
        value = self.value if crc else 0
        base = buf.data_ptr()
        run = self.CRC_RUN if crc else n
        fused_of = getattr(self.reader, "fused_recv_crc", None) if crc else None
        got = 0
        while got < n:
            fused = fused_of() if fused_of is not None else None
            if fused is not None:
                # Plain socket: receive and checksum in C, chunk by chunk while cache-hot.
                k, value = fused(base + got, n - got, value)
                if k == 0:
                    raise TruncatedFrame(f"connection closed mid-frame: got {got} of {n} bytes of the {what}")
                got += k
                continue
            bulk = getattr(self.reader, "bulk_reader", None)
            recv = bulk() if bulk is not None else self.reader.recv_into
            end = min(n, got + run)
            k = recv(view[got:end])
            if k == 0:
                raise TruncatedFrame(f"connection closed mid-frame: got {got} of {n} bytes of the {what}")
            if crc:
                value = crc32c_at(base + got, k, value)
            got += k
        self._value = value
        self.remaining -= n


def _parse_meta(raw: bytes) -> dict:
    if not raw:
        return {}
    def _no_const(c: str) -> Any:
        raise ValueError(f"non-JSON constant {c}")
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_const)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(f"meta is not valid UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"meta must be a JSON object, got {type(value).__name__}")
    return value


def read_payload(reader: Reader, header: Header, limits: Limits) -> tuple[dict[str, torch.Tensor], dict, int]:
    """Read and check the payload (and CRC trailer) announced by ``header``.

    Returns ``(tensors, meta, payload_bytes)``.  Every count and length is checked against
    ``limits`` and against what is left of the declared payload length before anything is allocated.
    """
    crc = bool(header.chflags & CHFLAG_PAYLOAD_CRC)
    pr = _PayloadReader(reader, header.payload_len, crc)
    (meta_len,) = pr.uvarints(1, lambda _: "meta length")
    if meta_len > pr.remaining:
        raise ProtocolError(f"meta length {meta_len} exceeds the {pr.remaining} bytes left in the payload")
    meta = _parse_meta(pr.small(meta_len, "meta"))
    (count,) = pr.uvarints(1, lambda _: "tensor count")
    if count > limits.max_tensors:
        raise ProtocolError(f"tensor count {count} exceeds max_tensors {limits.max_tensors}")
    tensors: dict[str, torch.Tensor] = {}
    data_bytes = 0
    for i in range(count):
        name_len = pr.small(1, "tensor {} name length", i)[0]
        if name_len == 0:
            raise ProtocolError(f"tensor {i} name length 0 is outside [1, {MAX_NAME_BYTES}]")
        try:
            name = pr.small(name_len, "tensor {} name", i).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(f"tensor {i} name is not valid UTF-8") from None
        if name in tensors:
            raise ProtocolError(f"tensor name {name!r} appears twice in one frame")
        code, ndim = pr.small(2, "tensor {} dtype/ndim", name)
        dtype = DTYPE_CODES.get(code)
        if dtype is None:
            raise ProtocolError(f"tensor {name!r} has unknown dtype code {code}; valid codes: "
                                f"{min(DTYPE_CODES)}..{max(DTYPE_CODES)}")
        if ndim > limits.max_ndim:
            raise ProtocolError(f"tensor {name!r} ndim {ndim} exceeds max_ndim {limits.max_ndim}")
        shape = pr.uvarints(ndim, lambda j: f"tensor {name!r} dim {j}") if ndim else []
        numel = 1
        span = 1  # product of max(dim, 1): the contiguous strides, which must fit int64 even when numel is 0
        for d in shape:
            numel *= d
            span *= d or 1
        itemsize = dtype.itemsize
        if span * itemsize > I64_MAX:
            raise ProtocolError(f"tensor {name!r} shape {shape} x itemsize {itemsize} overflows int64")
        # The data length is implied by the descriptor; bound it by what the payload still holds
        # before allocating anything.
        nbytes = numel * itemsize
        if nbytes > pr.remaining:
            raise ProtocolError(f"tensor {name!r} byte length {nbytes} (numel {numel} x itemsize {itemsize} "
                                f"for shape {shape} {dtype}) exceeds the {pr.remaining} bytes left in the "
                                f"payload")
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            pr.data(buf, f"tensor {name!r} data")
        if dtype == torch.bool and nbytes and int(buf.max()) > 1:
            raise ProtocolError(f"bool tensor {name!r} holds bytes other than 0 and 1")
        tensors[name] = buf.view(dtype).reshape(shape)
        data_bytes += nbytes
    if pr.remaining:
        raise ProtocolError(f"payload has {pr.remaining} bytes after the last tensor (declared payload "
                            f"length {header.payload_len})")
    if crc:
        raw_crc = bytearray(CRC_SIZE)
        recv_exact(reader, memoryview(raw_crc), "payload CRC")
        (want,) = _CRC.unpack(raw_crc)
        have = pr.value
        if want != have:
            raise ProtocolError(f"payload CRC mismatch: frame says {want:#010x}, computed CRC32C {have:#010x}")
    return tensors, meta, data_bytes + meta_len


def read_frame(reader: Reader, limits: Limits = Limits()) -> tuple[Header, Frame]:
    """Read one whole frame from ``reader``.

    Raises :class:`PeerClosed` on EOF (clean between frames or mid-frame) and
    :class:`ProtocolError` on any malformed field; nothing else for any byte sequence.
    """
    raw = bytearray(HEADER_SIZE)
    recv_exact(reader, memoryview(raw), "header", started=False)
    header = decode_header(raw, limits)
    tensors, meta, payload_bytes = read_payload(reader, header, limits)
    wire = HEADER_SIZE + header.payload_len + (CRC_SIZE if header.chflags & CHFLAG_PAYLOAD_CRC else 0)
    return header, Frame(header.kind, header.seq, header.flags, tensors, meta, wire, payload_bytes)


def decode_frame(data: bytes | bytearray | memoryview, limits: Limits = Limits()) -> Frame:
    """Decode one frame from bytes; trailing bytes are a :class:`ProtocolError`."""
    r = BytesReader(data)
    _, frame = read_frame(r, limits)
    if r.remaining:
        raise ProtocolError(f"{r.remaining} bytes follow the frame")
    return frame
