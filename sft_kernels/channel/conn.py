"""Connections of the tensor channel: :class:`Connection`, :func:`connect` and :class:`Listener`.

A connection is a TCP (optionally TLS) stream carrying frames (see :mod:`.wire`).  It is
authenticated by the HMAC handshake of :mod:`.auth` before any user frame flows, keeps byte and
round-trip counters in :class:`ChannelStats`, and optionally paces its sends through a
:class:`~.limiter.LinkLimiter`.

A connection is meant to be driven by one thread at a time for receiving (request/reply); sends
are serialised by a lock, so another thread may send concurrently.
"""
from __future__ import annotations

import errno
import hmac
import itertools
import logging
import math
import os
import secrets
import select
import socket
import ssl
import statistics
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

import torch

from . import auth, checksum
from .limiter import LinkLimiter
from .tls import TLSConfig
from .wire import (
    CHFLAG_PAYLOAD_CRC, COALESCE_BYTES, CRC_SIZE, HANDSHAKE_LIMITS, HEADER_SIZE as _HEADER_SIZE, HEADER_SIZE, KIND_AUTH, KIND_CHALLENGE,
    BufferedReader, KIND_ERROR, KIND_HELLO, KIND_OK, KIND_PING, KIND_PONG, KIND_USER_MIN, AuthError, Frame, Limits, PeerClosed,
    ProtocolError, RemoteError, TruncatedFrame, decode_header, frame_pieces, iter_send_chunks, read_payload,
    recv_exact,
)

log = logging.getLogger("sft_kernels.channel")

_MAX_ERROR_CHARS = 4096
_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_MORE = getattr(socket, "MSG_MORE", 0)
_CRC_TRAILER = struct.Struct("<I")
_MAX_RECORDED_ERRORS = 1000
#: Bytes per checksummed send chunk (the receiver checksums in runs of the same size).
_CRC_CHUNK = 4 << 20
_TIMEVAL = struct.Struct("@ll")  # struct timeval for SO_RCVTIMEO / SO_SNDTIMEO


@dataclass
class ChannelStats:
    """Per-connection counters (frames after the handshake only; the handshake has its own two fields).

    ``payload_bytes_*`` count tensor data plus meta JSON; ``wire_bytes_*`` count everything on the
    stream (headers, tensor descriptors, CRC trailers).  ``rtt_s`` holds the round-trip time of
    every :meth:`Connection.request`.  TLS record overhead is below this layer and not counted.
    """

    payload_bytes_sent: int = 0
    payload_bytes_received: int = 0
    wire_bytes_sent: int = 0
    wire_bytes_received: int = 0
    frames_sent: int = 0
    frames_received: int = 0
    handshake_wire_bytes_sent: int = 0
    handshake_wire_bytes_received: int = 0
    rtt_s: list[float] = field(default_factory=list)

    def count(self, direction: str, wire: int, payload: int, authenticated: bool) -> None:
        """Add one frame ``direction`` ("sent" or "received"); handshake frames count apart."""
        if authenticated:
            setattr(self, f"wire_bytes_{direction}", getattr(self, f"wire_bytes_{direction}") + wire)
            setattr(self, f"payload_bytes_{direction}", getattr(self, f"payload_bytes_{direction}") + payload)
            setattr(self, f"frames_{direction}", getattr(self, f"frames_{direction}") + 1)
        else:
            name = f"handshake_wire_bytes_{direction}"
            setattr(self, name, getattr(self, name) + wire)

    @property
    def last_rtt_s(self) -> float | None:
        """The latest request round-trip time, or None before the first request."""
        return self.rtt_s[-1] if self.rtt_s else None

    @property
    def mean_rtt_s(self) -> float | None:
        """The mean request round-trip time, or None before the first request."""
        return statistics.fmean(self.rtt_s) if self.rtt_s else None

    def summary(self) -> dict:
        """The counters as a flat JSON-friendly dict (rtt list reduced to count/last/mean/median)."""
        return {
            "payload_bytes_sent": self.payload_bytes_sent,
            "payload_bytes_received": self.payload_bytes_received,
            "wire_bytes_sent": self.wire_bytes_sent,
            "wire_bytes_received": self.wire_bytes_received,
            "frames_sent": self.frames_sent,
            "frames_received": self.frames_received,
            "handshake_wire_bytes_sent": self.handshake_wire_bytes_sent,
            "handshake_wire_bytes_received": self.handshake_wire_bytes_received,
            "requests": len(self.rtt_s),
            "rtt_last_s": self.last_rtt_s,
            "rtt_mean_s": self.mean_rtt_s,
            "rtt_median_s": statistics.median(self.rtt_s) if self.rtt_s else None,
        }


class _SocketSource:
    """The raw byte source under a connection's buffer: a blocking socket plus deadlines.

    The socket itself never has a Python-level timeout (``settimeout(None)``): with one, Python
    makes it non-blocking and every read becomes poll + ``recv`` of whatever arrived, which also
    rules out ``MSG_WAITALL``.  Instead each read that may wait first polls for readability
    (``select.poll``) for at most the time left, where the time left is the smaller of
    ``deadline - now`` (an absolute deadline over a whole exchange, the handshake) and ``wait``
    (the seconds any one read may wait for data: the idle / ``recv`` timeout).  A peer that stalls
    *after* poll said readable (mid-frame, or in the middle of a TLS record) is bounded by the
    kernel: ``SO_RCVTIMEO`` is set to the same time left, so a blocked ``recv`` returns what it has
    (or fails with ``EAGAIN``, raised here as ``TimeoutError``) once it runs out.  Bytes already
    decrypted inside an ``ssl`` socket (``pending()``) are read without polling.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None
        self.wait: float | None = None
        self._tls = isinstance(sock, ssl.SSLSocket)
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._rcvtimeo = 0.0  # SO_RCVTIMEO now set on the socket (0 = none)
        self._fd = sock.fileno()
        self._fused = checksum.SOCKIO and not self._tls

    def _time_left(self) -> float | None:
        """Seconds the next read may wait (None = forever); ``TimeoutError`` if none are left."""
        left = self.wait
        if self.deadline is not None:
            d = self.deadline - time.monotonic()
            left = d if left is None else min(left, d)
            if left <= 0:
                raise TimeoutError("handshake deadline passed")
        return left

    def _prepare(self, left: float) -> None:
        """Wait until the socket is readable (at most ``left`` s) and bound the read that follows."""
        if not (self._tls and self.sock.pending()):
            if not self._poll.poll(max(1, math.ceil(left * 1000))):
                raise TimeoutError(f"timed out: no data within {left:.3g} s")
        # Cached: the steady state (a fixed idle timeout) sets the option once per connection.
        if abs(left - self._rcvtimeo) > 0.01 * left + 0.001:
            self._set_rcvtimeo(left)

    def _set_rcvtimeo(self, seconds: float) -> None:
        sec = int(seconds)
        usec = max(1, int((seconds - sec) * 1e6)) if seconds > 0 else 0
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(sec, usec))
        self._rcvtimeo = seconds

    def recv_into(self, buf: memoryview, nbytes: int = 0, /) -> int:
        """``recv_into`` of the socket within the time left (``TimeoutError`` when it runs out)."""
        left = self._time_left()
        if left is None:
            return self.sock.recv_into(buf, nbytes)
        if _DONTWAIT and not self._tls:
            # Data already there (the common case when frames stream): read it without the poll.
            try:
                return self.sock.recv_into(buf, nbytes, _DONTWAIT)
            except BlockingIOError:
                pass
        self._prepare(left)
        try:
            return self.sock.recv_into(buf, nbytes)
        except (BlockingIOError, ssl.SSLWantReadError):  # SO_RCVTIMEO ran out with nothing read
            raise TimeoutError(f"timed out: no data within {left:.3g} s") from None

    def _recv_waitall(self, buf: memoryview) -> int:
        left = self._time_left()
        if left is None:
            return self.sock.recv_into(buf, 0, _WAITALL)
        # Bulk data, mid-frame: no poll (it would cost an extra sleep/wake-up per read); the
        # blocking read itself is bounded by SO_RCVTIMEO = the time left.
        if abs(left - self._rcvtimeo) > 0.01 * left + 0.001:
            self._set_rcvtimeo(left)
        try:
            return self.sock.recv_into(buf, 0, _WAITALL)
        except BlockingIOError:
            raise TimeoutError(f"timed out: no data within {left:.3g} s") from None

    def _recv_crc(self, address: int, nbytes: int, value: int) -> tuple[int, int]:
        """Receive up to ``nbytes`` at ``address`` and CRC32C them in C (``sft_recv_crc``).

        Returns ``(bytes received, crc)``; fewer than ``nbytes`` after a short read (0 = EOF).
        Bounded like :meth:`_recv_waitall`: ``SO_RCVTIMEO`` = the time left bounds each blocking
        read (``TimeoutError`` when one runs out with nothing read).
        """
        left = self._time_left()
        if left is not None and abs(left - self._rcvtimeo) > 0.01 * left + 0.001:
            self._set_rcvtimeo(left)
        while True:
            r, value = checksum.recv_crc_at(self._fd, address, nbytes, value)
            if r >= 0:
                return r, value
            if r == -errno.EINTR:
                continue  # signal handlers ran (or raised) between the calls
            if r == -errno.EAGAIN:
                raise TimeoutError(f"timed out: no data within {left:.3g} s")
            raise OSError(-r, os.strerror(-r))

    def fused_recv_crc(self) -> Callable[[int, int, int], tuple[int, int]] | None:
        """:meth:`_recv_crc` on a plain socket when the extension has it, else None (TLS)."""
        return self._recv_crc if self._fused else None

    def bulk_reader(self) -> Callable[[memoryview], int]:
        """``recv_into`` for bulk data: on a plain socket, with ``MSG_WAITALL``.

        ``MSG_WAITALL`` makes one system call fill the whole buffer; it returns less on a signal,
        at EOF, or when ``SO_RCVTIMEO`` (the time left) runs out with part of it read (callers
        loop, and the next call checks the deadline again).  ``ssl`` sockets refuse flags, so they
        keep the plain :meth:`recv_into`.
        """
        if _WAITALL and not self._tls:
            return self._recv_waitall
        return self.recv_into


def _shutdown_close(sock: socket.socket) -> None:
    """Shut a socket down both ways (wakes threads blocked on it), then close it; errors ignored."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


class Connection:
    """One authenticated channel endpoint: send and receive frames of named tensors plus JSON meta.

    Created by :func:`connect` (client) or by :class:`Listener` (server); not constructed by users.
    ``conn_id`` is assigned by the server, ``client_id`` is the authenticated client's id and
    ``peer`` the remote socket address.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, sock: socket.socket, *, peer: tuple, limits: Limits, link: LinkLimiter | None,
                 crc: bool, default_timeout: float | None = None) -> None:
        # Blocking, no Python timeout: deadlines are enforced by _SocketSource (poll + SO_RCVTIMEO)
        # and, for sends, by SO_SNDTIMEO = default_timeout.
        sock.settimeout(None)
        self._sock = sock
        self._source = _SocketSource(sock)
        self._reader = BufferedReader(self._source)
        self.peer = peer
        self.limits = limits
        self.link = None if link is None or link.unlimited else link
        self.crc = crc
        self.default_timeout = default_timeout
        self.conn_id = 0
        self.client_id = ""
        self.stats = ChannelStats()
        self._authenticated = False
        self._send_lock = threading.Lock()
        self._send_broken = False
        self._closed = False
        # scatter/gather sends on plain sockets (ssl sockets have no sendmsg)
        self._gather = not isinstance(sock, ssl.SSLSocket) and hasattr(sock, "sendmsg")
        # plain socket with the payload CRC: tensor data is checksummed and sent in C (sockio.cpp)
        self._fused = crc and checksum.SOCKIO and not isinstance(sock, ssl.SSLSocket)
        if default_timeout is not None:
            self._set_send_timeout(default_timeout)

    def _set_send_timeout(self, seconds: float) -> None:
        """Bound each blocked send system call by ``seconds`` (``SO_SNDTIMEO``; the socket stays blocking)."""
        sec = int(seconds)
        usec = max(1, int((seconds - sec) * 1e6))
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _TIMEVAL.pack(sec, usec))
        except OSError:
            pass

    # ------------------------------------------------------------------ sending
    def _send_frame(self, kind: int, tensors: Mapping[str, torch.Tensor] | None, meta: Mapping | None,
                    seq: int, flags: int) -> int:
        if self._closed:
            raise ConnectionError("connection is closed")
        pieces, wire, payload, keep = frame_pieces(kind, tensors, meta, seq=seq, flags=flags,
                                                   conn_id=self.conn_id, crc=self.crc, limits=self.limits)
        link = self.link
        # Paced links send in 64 KiB slices; with the CRC, tensors go out in 4 MiB chunks, each
        # checksummed just before its sendmsg (still in cache); otherwise each tensor is one sendmsg.
        # Plain sockets with the CRC (self._fused) checksum and send tensor data in C instead
        # (_send_fused: SOCKIO_CHUNK-sized pieces, no Python per piece).
        chunk = 64 * 1024 if link is not None and link.mbps else (_CRC_CHUNK if self.crc else 0)
        with self._send_lock:
            if self._send_broken:
                raise ConnectionError("connection is broken by an earlier failed send")
            try:
                if link is not None:
                    link.frame_delay()
                if link is None and self._fused:
                    self._send_fused(pieces)
                elif link is None and self._gather:
                    self._send_gathered(iter_send_chunks(pieces, self.crc, chunk))
                else:
                    pending = bytearray()
                    for c in iter_send_chunks(pieces, self.crc, chunk):
                        if len(c) < COALESCE_BYTES:
                            pending += c
                            continue
                        if pending:
                            self._sendall(pending, link)
                            pending = bytearray()
                        self._sendall(c, link)
                    if pending:
                        self._sendall(pending, link)
            except BaseException:
                self._send_broken = True
                raise
        del keep
        self.stats.count("sent", wire, payload, self._authenticated)
        return wire

    def _send_fused(self, pieces: list[bytes | memoryview]) -> None:
        """Send a checksummed frame on a plain socket: tensor data through ``sft_send_crc``.

        Small pieces (header, meta, descriptors) are checksummed here and sent with ``MSG_MORE``
        just before the tensor data that follows them; each tensor's bytes are checksummed and
        sent chunk by chunk in C (each chunk still in cache for the kernel's copy), continuing the
        running CRC; the remaining small pieces and the CRC trailer go out last.  Same bytes on
        the wire as :func:`iter_send_chunks`.
        """
        sock = self._sock
        fd = sock.fileno()
        value = 0
        skip = _HEADER_SIZE
        pending = bytearray()
        for p in pieces:
            if not isinstance(p, memoryview) or len(p) < COALESCE_BYTES:
                b = bytes(p)
                if skip:
                    value = checksum.crc32c(b[skip:], value) if len(b) > skip else value
                    skip = max(0, skip - len(b))
                else:
                    value = checksum.crc32c(b, value)
                pending += b
                continue
            if pending:
                sock.sendall(pending, _MORE)
                pending = bytearray()
            keep, address = checksum._address(p)
            n = p.nbytes
            done = 0
            while done < n:
                r, value = checksum.send_crc_at(fd, address + done, n - done, value, True)
                if r < 0:
                    if r == -errno.EINTR:
                        continue
                    raise OSError(-r, os.strerror(-r))
                done += r
            del keep
        pending += _CRC_TRAILER.pack(value)
        sock.sendall(pending)

    def _send_gathered(self, chunks: Iterator[bytes | memoryview]) -> None:
        """Send ``chunks`` in order with at most one big chunk per ``sendmsg`` call.

        Small pieces ride along with the neighbouring big chunk (the header and tensor descriptors
        with the first data chunk, the CRC trailer with the last), so a frame with one tensor is
        one or a few system calls and no tiny TCP segment of its own; nothing big is copied.
        """
        out: list[bytes | bytearray | memoryview] = []
        big = False
        for c in chunks:
            if len(c) < COALESCE_BYTES:
                if out and isinstance(out[-1], bytearray):
                    out[-1] += c
                else:
                    out.append(bytearray(c))
                continue
            if big:
                self._sendmsg_all(out)
                out = []
            out.append(c)
            big = True
        if out:
            self._sendmsg_all(out)

    def _sendmsg_all(self, bufs: list[bytes | bytearray | memoryview]) -> None:
        """``sendall`` of several buffers through ``sendmsg`` (scatter/gather), looping on short sends."""
        sock = self._sock
        if len(bufs) == 1:
            sock.sendall(bufs[0])
            return
        views = [memoryview(b).cast("B") for b in bufs]
        while views:
            sent = sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _sendall(self, buf: bytes | bytearray | memoryview, link: LinkLimiter | None) -> None:
        if link is not None:
            link.consume(len(buf))
        self._sock.sendall(buf)

    def send(self, kind: int, tensors: Mapping[str, torch.Tensor] | None = None, meta: Mapping | None = None,
             seq: int = 0, flags: int = 0) -> int:
        """Send one frame of ``kind`` (>= ``KIND_USER_MIN``); return the bytes it took on the wire.

        ``tensors`` (name -> CPU or device tensor of a supported dtype; made contiguous, sent from
        its storage without copies) and ``meta`` (JSON-serialisable dict) are optional.  ``seq`` and
        ``flags`` (16 bits) are the application's and come back unchanged in :class:`Frame`.
        """
        if not KIND_USER_MIN <= kind <= 255:
            raise ValueError(f"kind must be in [{KIND_USER_MIN}, 255] (lower kinds are the channel's), got {kind}")
        return self._send_frame(kind, tensors, meta, seq, flags)

    def send_error(self, message: str, seq: int = 0) -> None:
        """Send an ERROR frame carrying ``message``; the peer's :meth:`recv` raises :class:`RemoteError`."""
        self._send_frame(KIND_ERROR, None, {"message": str(message)[:_MAX_ERROR_CHARS]}, seq, 0)

    # ------------------------------------------------------------------ receiving
    def _recv_any(self, timeout: float | None, limits: Limits, deadline: float | None = None) -> Frame:
        """Read one frame of any kind; on a protocol violation tell the peer (best effort) and close."""
        if self._closed:
            raise ConnectionError("connection is closed")
        reader = self._reader
        source = self._source
        source.deadline = deadline
        source.wait = timeout
        raw = bytearray(HEADER_SIZE)
        view = memoryview(raw)
        started = False
        try:
            # The first read may time out without harm: nothing of the frame was consumed yet.
            got = reader.recv_into(view)
            if got == 0:
                raise PeerClosed("connection closed by peer")
            started = True
            recv_exact(reader, view[got:], "header")
            header = decode_header(raw, limits)
            if self._authenticated and header.conn_id != self.conn_id:
                raise ProtocolError(f"frame carries connection id {header.conn_id}, this connection is "
                                    f"{self.conn_id}")
            tensors, meta, payload = read_payload(reader, header, limits)
        except PeerClosed:
            self.close()
            raise
        except ProtocolError as e:
            self._fail(str(e))
            raise
        except (TimeoutError, socket.timeout) as e:
            if started or deadline is not None:
                self.close()
            if started and deadline is None:
                raise ProtocolError("timed out in the middle of a frame; connection closed") from e
            raise
        except OSError:
            self.close()
            raise
        finally:
            source.deadline = None
        wire = HEADER_SIZE + header.payload_len + (CRC_SIZE if header.chflags & CHFLAG_PAYLOAD_CRC else 0)
        self.stats.count("received", wire, payload, self._authenticated)
        return Frame(header.kind, header.seq, header.flags, tensors, meta, wire, payload)

    def _fail(self, message: str) -> None:
        """Best-effort ERROR frame to the peer, then close (our send stream is still in sync)."""
        if not self._send_broken and not self._closed:
            try:
                self._set_send_timeout(1.0)
                self.send_error(f"protocol error: {message}")
            except Exception:  # noqa: BLE001 - best effort only
                pass
        self.close()

    def recv(self, timeout: float | None = None) -> Frame:
        """Receive the next application frame (kind >= ``KIND_USER_MIN``).

        ``timeout`` (seconds) bounds the wait for a frame to start (``TimeoutError``; the connection
        stays usable); ``None`` uses the connection's default (the server's ``idle_timeout``).
        Raises :class:`RemoteError` for an ERROR frame, :class:`PeerClosed` when the peer closed,
        :class:`ProtocolError` for malformed input (the connection is then closed).  PINGs are
        answered transparently.
        """
        if timeout is None:
            timeout = self.default_timeout
        while True:
            f = self._recv_any(timeout, self.limits)
            if f.kind >= KIND_USER_MIN:
                return f
            if f.kind == KIND_ERROR:
                raise RemoteError(str(f.meta.get("message", "remote error")))
            if f.kind == KIND_PING:
                self._send_frame(KIND_PONG, None, None, f.seq, 0)
                continue
            if f.kind == KIND_PONG:
                continue
            self._fail(f"unexpected handshake frame of kind {f.kind} after authentication")
            raise ProtocolError(f"unexpected handshake frame of kind {f.kind} after authentication")

    def request(self, kind: int, tensors: Mapping[str, torch.Tensor] | None = None, meta: Mapping | None = None,
                seq: int = 0) -> Frame:
        """Send a frame and wait for the reply; the round-trip time is appended to ``stats.rtt_s``."""
        t0 = time.perf_counter()
        self.send(kind, tensors, meta, seq=seq)
        reply = self.recv()
        self.stats.rtt_s.append(time.perf_counter() - t0)
        return reply

    def ping(self, timeout: float | None = None) -> float:
        """Round trip of an empty PING/PONG exchange in seconds (only while no user frames are in flight)."""
        t0 = time.perf_counter()
        self._send_frame(KIND_PING, None, None, 0, 0)
        while True:
            f = self._recv_any(timeout, self.limits)
            if f.kind == KIND_PONG:
                return time.perf_counter() - t0
            if f.kind == KIND_ERROR:
                raise RemoteError(str(f.meta.get("message", "remote error")))
            if f.kind == KIND_PING:
                self._send_frame(KIND_PONG, None, None, f.seq, 0)
                continue
            raise ProtocolError(f"expected PONG, got a frame of kind {f.kind}")

    # ------------------------------------------------------------------ lifetime
    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran (or the connection failed)."""
        return self._closed

    def close(self) -> None:
        """Close the socket (idempotent)."""
        if self._closed:
            return
        self._closed = True
        _shutdown_close(self._sock)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Connection(conn_id={self.conn_id}, client_id={self.client_id!r}, peer={self.peer}, "
                f"crc={self.crc}, closed={self._closed})")

    # ------------------------------------------------------------------ handshake
    def _client_handshake(self, client_id: str, secret: bytes, deadline: float) -> None:
        self._send_frame(KIND_HELLO, None, {"client_id": client_id}, 0, 0)
        f = self._recv_any(None, HANDSHAKE_LIMITS, deadline)
        if f.kind == KIND_ERROR:
            raise AuthError(str(f.meta.get("message", "authentication failed")))
        if f.kind != KIND_CHALLENGE:
            raise ProtocolError(f"expected CHALLENGE (kind {KIND_CHALLENGE}), got kind {f.kind}")
        try:
            nonce = bytes.fromhex(f.meta["nonce"])
            conn_id = int(f.meta["conn_id"])
        except (KeyError, TypeError, ValueError):
            raise ProtocolError("CHALLENGE meta must hold 'nonce' (hex) and 'conn_id' (int)") from None
        if len(nonce) != auth.NONCE_BYTES or not 0 < conn_id <= 0xFFFFFFFF:
            raise ProtocolError(f"CHALLENGE nonce must be {auth.NONCE_BYTES} bytes and conn_id in [1, 2**32-1]")
        self.conn_id = conn_id
        mac = auth.compute_mac(secret, nonce, client_id, conn_id)
        self._send_frame(KIND_AUTH, None, {"mac": mac.hex()}, 0, 0)
        f = self._recv_any(None, HANDSHAKE_LIMITS, deadline)
        if f.kind == KIND_ERROR:
            raise AuthError(str(f.meta.get("message", "authentication failed")))
        if f.kind != KIND_OK:
            raise ProtocolError(f"expected OK (kind {KIND_OK}), got kind {f.kind}")
        self.client_id = client_id
        self._authenticated = True

    def _server_handshake(self, tokens: Mapping[str, bytes], conn_id: int, deadline: float) -> None:
        f = self._recv_any(None, HANDSHAKE_LIMITS, deadline)
        if f.kind != KIND_HELLO:
            self._refuse(f"expected HELLO (kind {KIND_HELLO}) as the first frame, got kind {f.kind}")
        client_id = f.meta.get("client_id")
        if not isinstance(client_id, str):
            self._refuse("HELLO without a string 'client_id'")
        try:
            auth.check_client_id(client_id)
        except ValueError as e:
            self._refuse(f"HELLO: {e}")
        nonce = secrets.token_bytes(auth.NONCE_BYTES)
        self.conn_id = conn_id
        self._send_frame(KIND_CHALLENGE, None, {"nonce": nonce.hex(), "conn_id": conn_id}, 0, 0)
        f = self._recv_any(None, HANDSHAKE_LIMITS, deadline)
        if f.kind != KIND_AUTH:
            self._refuse(f"expected AUTH (kind {KIND_AUTH}) from client {client_id!r}, got kind {f.kind}")
        try:
            got = bytes.fromhex(f.meta["mac"])
        except (KeyError, TypeError, ValueError):
            got = b""
        secret = tokens.get(client_id)
        # Unknown ids are checked against a random key so both failures cost the same.
        want = auth.compute_mac(secret if secret is not None else secrets.token_bytes(32), nonce, client_id, conn_id)
        ok = hmac.compare_digest(got, want)
        if secret is None:
            self._refuse(f"unknown client id {client_id!r}")
        if not ok:
            self._refuse(f"wrong token (bad HMAC) for client id {client_id!r}")
        self._send_frame(KIND_OK, None, {"conn_id": conn_id}, 0, 0)
        self.client_id = client_id
        self._authenticated = True

    def _refuse(self, reason: str) -> None:
        """Tell the client only 'authentication failed', close, and raise AuthError with the real reason."""
        try:
            self.send_error("authentication failed")
        except Exception:  # noqa: BLE001 - best effort only
            pass
        self.close()
        raise AuthError(reason)


def _default_crc(tls: TLSConfig | None, crc: bool | None) -> bool:
    return (tls is None) if crc is None else bool(crc)


def connect(host: str, port: int, client_id: str, token: bytes | str, *, tls: TLSConfig | None = None,
            limits: Limits = Limits(), link: LinkLimiter | None = None, timeout: float = 30.0,
            crc: bool | None = None) -> Connection:
    """Open an authenticated connection to a :class:`Listener`.

    TCP connect (``timeout`` seconds bound the connect and the whole handshake), ``TCP_NODELAY``,
    TLS when ``tls`` is given (the server is verified against ``tls.ca``; hostname
    ``tls.server_hostname`` or ``host``), then the HMAC handshake.  ``crc`` turns the payload
    CRC32 on/off; default: on for plain TCP, off under TLS (TLS already authenticates records).
    Raises :class:`AuthError` if the server refuses the client id / token.
    """
    auth.check_client_id(client_id)
    secret = auth.as_secret(token)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    deadline = time.monotonic() + timeout
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = sock.getpeername()
        if tls is not None:
            ctx = tls.client_context()
            sock = ctx.wrap_socket(sock, server_hostname=tls.server_hostname or host)
        conn = Connection(sock, peer=peer, limits=limits, link=link, crc=_default_crc(tls, crc))
        conn._client_handshake(client_id, secret, deadline)
        sock.settimeout(None)
        return conn
    except BaseException:
        sock.close()
        raise


class Listener:
    """A server socket that authenticates clients and runs ``handler(conn)`` for each, one thread each.

    ``tokens`` maps client ids to secrets (see :func:`~.auth.load_tokens`).  ``address`` is the bound
    ``(host, port)`` (port 0 picks a free one).  At most ``limits.max_connections`` connections are
    served at once; further ones are closed at once.  Failed handshakes, protocol errors and handler
    exceptions are logged on logger ``sft_kernels.channel`` and recorded in ``errors`` (most recent
    1000); they only drop that connection.
    """

    def __init__(self, tokens: Mapping[str, bytes], host: str = "127.0.0.1", port: int = 0, *,
                 tls: TLSConfig | None = None, limits: Limits = Limits(), link: LinkLimiter | None = None,
                 crc: bool | None = None) -> None:
        self._tokens = {}
        for cid, secret in tokens.items():
            auth.check_client_id(cid)
            self._tokens[cid] = auth.as_secret(secret)
        self._ctx = tls.server_context() if tls is not None else None
        self.limits = limits
        self.link = link
        self.crc = _default_crc(tls, crc)
        self._sock = socket.create_server((host, port), backlog=128)
        self.address: tuple[str, int] = tuple(self._sock.getsockname()[:2])  # type: ignore[assignment]
        self.errors: list[str] = []
        self.refused = 0
        self.accepted = 0
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(limits.max_connections)
        self._active: dict[int, socket.socket] = {}
        self._threads: set[threading.Thread] = set()
        self._serve_thread: threading.Thread | None = None

    # ------------------------------------------------------------------ bookkeeping
    def _record(self, message: str, *, refused: bool = False) -> None:
        log.warning("%s", message)
        with self._lock:
            self.errors.append(message)
            del self.errors[:-_MAX_RECORDED_ERRORS]
            if refused:
                self.refused += 1

    @property
    def active_connections(self) -> int:
        """Connections currently being served (handshake or handler)."""
        with self._lock:
            return len(self._active)

    # ------------------------------------------------------------------ serving
    def serve_forever(self, handler: Callable[[Connection], None]) -> None:
        """Accept connections until :meth:`shutdown`; each gets a thread: TLS, auth, then ``handler``."""
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                csock, addr = self._sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            if not self._slots.acquire(blocking=False):
                self._record(f"refused {addr}: max_connections {self.limits.max_connections} reached",
                             refused=True)
                csock.close()
                continue
            cid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            t = threading.Thread(target=self._serve_one, args=(csock, addr, cid, handler),
                                 name=f"sft-channel-{cid}", daemon=True)
            with self._lock:
                self.accepted += 1
                self._active[cid] = csock
                self._threads.add(t)
            t.start()

    def _serve_one(self, csock: socket.socket, addr: tuple, cid: int, handler: Callable[[Connection], None]) -> None:
        conn: Connection | None = None
        sock: socket.socket = csock
        try:
            deadline = time.monotonic() + self.limits.handshake_timeout
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                csock.settimeout(self.limits.handshake_timeout)
                sock = self._ctx.wrap_socket(csock, server_side=True, do_handshake_on_connect=False)
                with self._lock:
                    self._active[cid] = sock
                sock.do_handshake()
            conn = Connection(sock, peer=addr, limits=self.limits, link=self.link, crc=self.crc,
                              default_timeout=self.limits.idle_timeout)
            try:
                conn._server_handshake(self._tokens, cid, deadline)
            except (TimeoutError, socket.timeout):
                raise AuthError(f"handshake not completed within {self.limits.handshake_timeout} s") from None
            log.info("connection %d from %s authenticated as %r", cid, addr, conn.client_id)
            try:
                handler(conn)
            except TruncatedFrame as e:
                self._record(f"connection {cid} ({conn.client_id!r}) from {addr}: {e}")
            except PeerClosed:
                log.info("connection %d (%r) closed by peer", cid, conn.client_id)
            except (ProtocolError, RemoteError, OSError) as e:
                self._record(f"connection {cid} ({conn.client_id!r}) from {addr}: {type(e).__name__}: {e}")
            except Exception as e:  # noqa: BLE001 - a handler bug must not take the server down
                log.exception("handler failed on connection %d", cid)
                self._record(f"connection {cid} ({conn.client_id!r}) from {addr}: handler raised "
                             f"{type(e).__name__}: {e}")
        except AuthError as e:
            self._record(f"refused connection {cid} from {addr}: {e}", refused=True)
        except (ProtocolError, ssl.SSLError, OSError) as e:
            self._record(f"refused connection {cid} from {addr} during handshake: {type(e).__name__}: {e}",
                         refused=True)
        except Exception as e:  # noqa: BLE001
            log.exception("unexpected failure on connection %d", cid)
            self._record(f"connection {cid} from {addr}: {type(e).__name__}: {e}", refused=True)
        finally:
            if conn is not None:
                conn.close()
            else:
                try:
                    sock.close()
                except OSError:
                    pass
            with self._lock:
                self._active.pop(cid, None)
                self._threads.discard(threading.current_thread())
            self._slots.release()

    def start(self, handler: Callable[[Connection], None]) -> "Listener":
        """Run :meth:`serve_forever` with ``handler`` in a daemon thread; return ``self``."""
        if self._serve_thread is not None:
            raise RuntimeError("Listener already started")
        self._serve_thread = threading.Thread(target=self.serve_forever, args=(handler,),
                                              name="sft-channel-accept", daemon=True)
        self._serve_thread.start()
        return self

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop accepting, close every open connection and join the threads (up to ``timeout`` s)."""
        self._stop.set()
        _shutdown_close(self._sock)  # the shutdown wakes a blocked accept() at once on Linux
        if self._serve_thread is not None and self._serve_thread is not threading.current_thread():
            self._serve_thread.join(timeout)
        with self._lock:
            socks = list(self._active.values())
            threads = list(self._threads)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        end = time.monotonic() + timeout
        for t in threads:
            if t is not threading.current_thread():
                t.join(max(0.0, end - time.monotonic()))

    def __enter__(self) -> "Listener":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
