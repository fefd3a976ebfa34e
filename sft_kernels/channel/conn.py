"""Connections of the tensor channel: :class:`Connection`, :func:`connect` and :class:`Listener`.

A connection is a TCP (optionally TLS) stream carrying frames (see :mod:`.wire`).  It is
authenticated by the HMAC handshake of :mod:`.auth` before any user frame flows, keeps byte and
round-trip counters in :class:`ChannelStats`, and optionally paces its sends through a
:class:`~.limiter.LinkLimiter`.

A connection is meant to be driven by one thread at a time for receiving (request/reply); sends
are serialised by a lock, so another thread may send concurrently.
"""
from __future__ import annotations

import contextlib
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
    CHFLAG_PAYLOAD_CRC, COALESCE_BYTES, CRC_SIZE, HANDSHAKE_LIMITS, HEADER_SIZE as _HEADER_SIZE, HEADER_SIZE, KIND_AUTH,
    KIND_CHALLENGE, MAGIC, PROTOCOL_VERSION, BufferedReader, KIND_ERROR, KIND_HELLO, KIND_OK, KIND_PING, KIND_PONG,
    KIND_USER_MIN, AuthError, Frame, Limits, PeerClosed, ProtocolError, RemoteError, TruncatedFrame, decode_header,
    error_meta, frame_pieces, iter_send_chunks, read_payload, recv_exact,
)

log = logging.getLogger("sft_kernels.channel")

_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_MORE = getattr(socket, "MSG_MORE", 0)
_CRC_TRAILER = struct.Struct("<I")
_MAX_RECORDED_ERRORS = 1000
#: Bytes per checksummed send chunk (the receiver checksums in runs of the same size).
_CRC_CHUNK = 4 << 20
_TIMEVAL = struct.Struct("@ll")  # struct timeval for SO_RCVTIMEO / SO_SNDTIMEO
#: Seconds a full server gives the busy reply to a newcomer (TLS handshake, ERROR frame, close).
_BUSY_REPLY_TIMEOUT = 1.0
#: The retry_after a full server suggests to a newcomer.
_BUSY_RETRY_AFTER = 1.0
#: At most this many busy replies run at once; beyond, newcomers of a full server are closed unanswered.
_MAX_BUSY_REPLIES = 8
#: A fatal TLS alert record (TLS 1.2 record version, alert "unexpected_message"): what a TLS
#: Listener answers a plain sft client with, so that the client can tell it to use TLS.
_TLS_ALERT_UNEXPECTED_MESSAGE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0A])


class LinkRefused(Exception):
    """The connection cannot work as configured: retrying will not help, a setting must change.

    Raised by :func:`connect` for permanent causes (TLS certificate not accepted, mutual TLS
    without a valid client certificate, TLS on one side only, not an sft server, another protocol
    version); the message names the likely cause and the fix.  Deliberately not an ``OSError`` /
    ``ConnectionError`` / :class:`ProtocolError`: callers retry those.
    """


class ServerBusy(ConnectionError):
    """The server answered the handshake with a retryable ERROR (e.g. all its connection slots are in use).

    ``retry_after`` is the wait the server suggests in seconds (None if it gave none).
    """

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class HandshakeClosed(PeerClosed):
    """The server closed the connection during the handshake without a word.

    Stays a retryable :class:`PeerClosed`: a busy or restarting server looks the same as a
    misconfigured one; the message says what else it may mean.
    """


class _Evicted(Exception):
    """Ends the thread of a connection that the accept loop evicted (the eviction is recorded there)."""


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

    def total_wire(self) -> tuple[int, int]:
        """Every byte on the stream, (sent, received): the frames after the handshake and the handshake's own."""
        return (self.wire_bytes_sent + self.handshake_wire_bytes_sent,
                self.wire_bytes_received + self.handshake_wire_bytes_received)

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
        # The header bytes of the last frame that failed to arrive or decode (what connect()
        # inspects to explain a failed handshake: a TLS record, another protocol's bytes...).
        self._failed_head = b""
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

    def send_error(self, message: str, seq: int = 0, *, retryable: bool = False,
                   retry_after: float | None = None) -> None:
        """Send an ERROR frame carrying ``message``; the peer's :meth:`recv` raises :class:`RemoteError`.

        ``retryable`` tells the peer whether the same request may succeed later, and
        ``retry_after`` (finite seconds in [0, 3600], optional) how long it should wait first; both
        arrive as the attributes of the peer's :class:`RemoteError`.  Raises ``ValueError`` for a
        ``retry_after`` out of range.
        """
        meta = error_meta(message, retryable=retryable, retry_after=retry_after)
        self._send_frame(KIND_ERROR, None, meta, seq, 0)

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
        got = 0
        try:
            # The first read may time out without harm: nothing of the frame was consumed yet.
            got = reader.recv_into(view)
            if got == 0:
                raise PeerClosed("connection closed by peer")
            started = True
            recv_exact(reader, view[got:], "header")
            got = HEADER_SIZE
            header = decode_header(raw, limits)
            if self._authenticated and header.conn_id != self.conn_id:
                raise ProtocolError(f"frame carries connection id {header.conn_id}, this connection is "
                                    f"{self.conn_id}")
            tensors, meta, payload = read_payload(reader, header, limits)
        except PeerClosed:
            self._failed_head = bytes(raw[:got])
            self.close()
            raise
        except ProtocolError as e:
            self._failed_head = bytes(raw[:got])
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
        Raises :class:`RemoteError` for an ERROR frame (with the peer's ``retryable`` and
        ``retry_after``), :class:`PeerClosed` when the peer closed,
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
                raise RemoteError.from_meta(f.meta)
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
                raise RemoteError.from_meta(f.meta)
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
    @staticmethod
    def _handshake_refusal(f: Frame) -> Exception:
        """The exception for an ERROR frame received in the handshake: ServerBusy if retryable, else AuthError."""
        err = RemoteError.from_meta(f.meta, "authentication failed")
        if err.retryable:
            return ServerBusy(str(err), retry_after=err.retry_after)
        return AuthError(str(err))

    def _client_handshake(self, client_id: str, secret: bytes, deadline: float) -> None:
        self._send_frame(KIND_HELLO, None, {"client_id": client_id}, 0, 0)
        f = self._recv_any(None, HANDSHAKE_LIMITS, deadline)
        if f.kind == KIND_ERROR:
            raise self._handshake_refusal(f)
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
            raise self._handshake_refusal(f)
        if f.kind != KIND_OK:
            raise ProtocolError(f"expected OK (kind {KIND_OK}), got kind {f.kind}")
        self.client_id = client_id
        self._authenticated = True

    def _server_handshake(self, tokens: Mapping[str, bytes], conn_id: int, deadline: float,
                          admit: Callable[[], bool] | None = None) -> None:
        """Authenticate the client; ``admit()`` runs once the MAC is verified, just before OK.

        ``admit`` returning False (the Listener evicted this connection meanwhile) closes the
        connection without OK and raises ``_Evicted``.
        """
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
        if admit is not None and not admit():
            self.close()
            raise _Evicted()
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


# ---------------------------------------------------------------------------------------- connect

#: OpenSSL reasons (and alert texts) a client sees when a mutual-TLS server refuses it for lacking
#: a client certificate it accepts: under TLS 1.2 during the TLS handshake, under TLS 1.3 on the
#: first read after it (the server checks the client's certificate after the client finished).
_MTLS_REASONS = ("TLSV13_ALERT_CERTIFICATE_REQUIRED", "SSLV3_ALERT_HANDSHAKE_FAILURE", "SSLV3_ALERT_BAD_CERTIFICATE",
                 "TLSV1_ALERT_UNKNOWN_CA")
_MTLS_TEXTS = ("certificate required", "handshake failure", "bad certificate", "unknown ca")
#: OpenSSL reasons when the bytes that came back are not TLS records (a plain server answered).
_NOT_TLS_REASONS = ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "HTTP_REQUEST",
                    "UNKNOWN_PROTOCOL")
_NOT_TLS_TEXTS = ("wrong version number", "record layer failure", "packet length too long")


def _tls_refusal(e: ssl.SSLError, where: str, host: str, tls: TLSConfig) -> LinkRefused | None:
    """The :class:`LinkRefused` explaining a TLS failure with a permanent cause, or None."""
    reason = str(getattr(e, "reason", None) or "")
    text = str(e).lower()
    if isinstance(e, ssl.SSLCertVerificationError):
        return LinkRefused(
            f"the TLS certificate of the server at {where} is not accepted ({e.verify_message}): pass the CA "
            f"that signed it with --tls-ca, and with --server-hostname the name in the certificate if it is "
            f"not {tls.server_hostname or host!r}")
    if reason in _MTLS_REASONS or any(t in text for t in _MTLS_TEXTS):
        given = ("the client certificate given was not accepted" if tls.cert is not None
                 else "no client certificate was given")
        return LinkRefused(
            f"the server at {where} requires a client certificate (mutual TLS): pass --tls-cert and --tls-key "
            f"with a certificate signed by a CA the server trusts ({given}; TLS alert: {reason or text})")
    if reason in _NOT_TLS_REASONS or any(t in text for t in _NOT_TLS_TEXTS):
        return LinkRefused(
            f"the server at {where} does not speak TLS (its answer is not a TLS record: {reason or text}): "
            f"drop --tls-* to connect over plain TCP, or start the server with TLS")
    return None


def _head_refusal(head: bytes, where: str, tls: TLSConfig | None) -> LinkRefused | None:
    """The :class:`LinkRefused` explaining the first bytes of a handshake reply that is no sft frame, or None."""
    if tls is None and len(head) >= 2 and head[0] in (0x15, 0x16) and head[1] == 0x03:
        # TLS record header: content type alert (0x15) or handshake (0x16), version 3.x.
        return LinkRefused(
            f"the server at {where} speaks TLS (it answered with a TLS record, bytes {head[:7].hex(' ')}): pass "
            f"--tls-ca with the CA that signed its certificate (and --server-hostname if its name differs)")
    n = min(len(head), len(MAGIC))
    if n and head[:n] != MAGIC[:n]:
        return LinkRefused(
            f"the peer at {where} is not an sft server (bad magic {head[:len(MAGIC)]!r}, expected {MAGIC!r}): "
            f"check the host and port")
    if len(head) > 4 and head[4] != PROTOCOL_VERSION:
        return LinkRefused(
            f"the server at {where} speaks sft protocol version {head[4]}, this client speaks version "
            f"{PROTOCOL_VERSION}: run the same sft_kernels version on both sides")
    return None


def _closed_hint(where: str, tls: TLSConfig | None, during: str) -> str:
    """The message of a :class:`HandshakeClosed`: what a silent close during the handshake may mean."""
    other = ("it may not speak TLS (then drop --tls-*)" if tls is not None
             else "it may serve TLS only (then pass --tls-ca)")
    return (f"the server at {where} closed the connection during {during} without a reply: it may be busy or "
            f"restarting (retrying may help), or {other}")


@contextlib.contextmanager
def _ssl_errors(where: str, host: str, tls: TLSConfig | None, phase: str) -> Iterator[None]:
    """Turn an SSL error during ``phase`` of ``connect`` into what it means: a permanent refusal
    (:class:`LinkRefused`), a silent close (:class:`HandshakeClosed`), or the error itself."""
    try:
        yield
    except ssl.SSLError as e:
        refusal = _tls_refusal(e, where, host, tls) if tls is not None else None
        if refusal is not None:
            raise refusal from e
        if isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
            raise HandshakeClosed(_closed_hint(where, tls, phase)) from e
        raise


def connect(host: str, port: int, client_id: str, token: bytes | str, *, tls: TLSConfig | None = None,
            limits: Limits = Limits(), link: LinkLimiter | None = None, timeout: float = 30.0,
            crc: bool | None = None) -> Connection:
    """Open an authenticated connection to a :class:`Listener`.

    TCP connect (``timeout`` seconds bound the connect and the whole handshake), ``TCP_NODELAY``,
    TLS when ``tls`` is given (the server is verified against ``tls.ca``; hostname
    ``tls.server_hostname`` or ``host``), then the HMAC handshake.  ``crc`` turns the payload
    CRC32 on/off; default: on for plain TCP, off under TLS (TLS already authenticates records).

    Failures, from permanent to transient:

    * :class:`AuthError`: the server refused the client id / token;
    * :class:`LinkRefused`: the settings cannot work (certificate not accepted, mutual TLS without
      a valid client certificate, TLS on one side only, not an sft server, another protocol
      version); the message names the cause and the fix;
    * :class:`ServerBusy` (a ``ConnectionError``): all the server's connection slots are in use;
      ``retry_after`` says when to retry;
    * ``ConnectionRefusedError`` naming ``host:port``: nothing listens there (yet);
    * :class:`HandshakeClosed` (a :class:`PeerClosed`): the server closed the connection during
      the handshake without a reply (busy, restarting, or misconfigured; the message says which
      setting to check);
    * other ``OSError`` / :class:`ProtocolError` / ``TimeoutError``: network failures.
    """
    auth.check_client_id(client_id)
    secret = auth.as_secret(token)
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    deadline = time.monotonic() + timeout
    where = f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError as e:
        raise ConnectionRefusedError(e.errno, f"nothing listens on {where} (connection refused): is the server "
                                              f"running, on this host and port?") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = sock.getpeername()
        if tls is not None:
            ctx = tls.client_context()
            try:
                with _ssl_errors(where, host, tls, "the TLS handshake"):
                    sock = ctx.wrap_socket(sock, server_hostname=tls.server_hostname or host)
            except ConnectionResetError as e:
                raise HandshakeClosed(_closed_hint(where, tls, "the TLS handshake")) from e
        conn = Connection(sock, peer=peer, limits=limits, link=link, crc=_default_crc(tls, crc))
        try:
            with _ssl_errors(where, host, tls, "the handshake"):
                conn._client_handshake(client_id, secret, deadline)
        except ProtocolError as e:
            refusal = _head_refusal(conn._failed_head, where, tls)
            if refusal is not None:
                raise refusal from e
            if isinstance(e, PeerClosed) and not conn._failed_head:
                raise HandshakeClosed(_closed_hint(where, tls, "the handshake")) from e
            raise
        except (ConnectionResetError, BrokenPipeError) as e:
            raise HandshakeClosed(_closed_hint(where, tls, "the handshake")) from e
        sock.settimeout(None)
        return conn
    except BaseException:
        sock.close()
        raise


# ---------------------------------------------------------------------------------------- server

def _linger_close(sock: socket.socket, seconds: float) -> None:
    """Half-close ``sock``, drop what the peer still sends until it closes too (at most ``seconds``
    and 64 KiB), then close.

    Closing a TCP socket with unread received bytes makes the kernel answer with a reset, which
    can destroy the reply just sent before the peer reads it; waiting for the peer's end avoids
    that.  Errors are ignored.
    """
    end = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < 64 * 1024:
            left = end - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(4096)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        _shutdown_close(sock)


def _starts_plain_sft(sock: socket.socket, deadline: float) -> bool:
    """Whether a client that should start TLS instead sent an sft frame header (peeked, not consumed).

    Waits (until ``deadline``, ``TimeoutError`` after) for the first bytes; False at EOF or as soon
    as they differ from :data:`MAGIC` (a TLS ClientHello starts with 0x16).
    """
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("handshake deadline passed")
        sock.settimeout(left)
        head = sock.recv(len(MAGIC), socket.MSG_PEEK)
        if not head or head != MAGIC[:len(head)]:
            return False
        if len(head) == len(MAGIC):
            return True
        time.sleep(0.01)  # a prefix of the magic so far: wait for the rest


@dataclass
class _Slot:
    """One place in the Listener's connection pool: the connection's socket and its state.

    ``sock`` is the socket the accept loop shuts down to evict the connection (the TLS socket
    once it is wrapped); ``authenticated`` turns true when the HMAC handshake succeeded (such a
    connection is never evicted); ``evicted`` is set by the accept loop when it takes the slot.
    All fields are read and written under ``Listener._lock``.
    """

    cid: int
    addr: tuple
    sock: socket.socket
    accepted_at: float
    authenticated: bool = False
    evicted: bool = False


class Listener:
    """A server socket that authenticates clients and runs ``handler(conn)`` for each, one thread each.

    ``tokens`` maps client ids to secrets (see :func:`~.auth.load_tokens`).  ``address`` is the bound
    ``(host, port)`` (port 0 picks a free one).

    The connections share a pool of ``limits.max_connections`` slots.  When the pool is full, a
    new connection evicts the oldest connection still in its handshake (TLS or HMAC; its socket is
    shut down, ``evicted`` counts these); if every slot holds an authenticated connection, the
    newcomer gets a retryable ERROR frame (``retry_after`` 1 s) and is closed, so a flood of idle
    sockets cannot lock legitimate clients out.  A TLS listener answers a plain sft client with a
    TLS alert record so that the client can say what is wrong.

    Failed handshakes, evictions, protocol errors and handler exceptions are logged on logger
    ``sft_kernels.channel`` and recorded in ``errors`` (most recent 1000); they only drop that
    connection.  ``accepted`` counts admitted connections, ``refused`` failed handshakes and
    newcomers turned away by a full pool.
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
        self.evicted = 0
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # the pool: cid -> slot, in accept order (so the first unauthenticated one is the oldest)
        self._active: dict[int, _Slot] = {}
        self._busy_replies = 0
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
        """Connections currently holding a slot (in their handshake or served by the handler)."""
        with self._lock:
            return len(self._active)

    def _admit(self, slot: _Slot) -> tuple[bool, str | None]:
        """Give ``slot`` a place in the pool, evicting the oldest unauthenticated connection if full.

        Called with ``_lock`` held.  Returns ``(admitted, eviction message or None)``; not admitted
        means every slot holds an authenticated connection.
        """
        note = None
        if len(self._active) >= self.limits.max_connections:
            victim = next((s for s in self._active.values() if not s.authenticated), None)
            if victim is None:
                return False, None
            # Take the slot now; the victim's thread wakes up on the shutdown, sees ``evicted``
            # and leaves without recording a failure (its cleanup finds the slot already gone).
            del self._active[victim.cid]
            victim.evicted = True
            self.evicted += 1
            try:
                victim.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its own thread
            note = (f"evicted connection {victim.cid} from {victim.addr} after "
                    f"{time.monotonic() - victim.accepted_at:.2f} s in its handshake: all "
                    f"{self.limits.max_connections} connection slots were in use")
        self._active[slot.cid] = slot
        return True, note

    def _mark_authenticated(self, slot: _Slot) -> bool:
        """Make ``slot`` non-evictable once its client is authenticated; False if it was evicted already."""
        with self._lock:
            if slot.evicted:
                return False
            slot.authenticated = True
            return True

    def _set_slot_sock(self, slot: _Slot, sock: socket.socket) -> None:
        """Point ``slot`` at the wrapped TLS socket; raise ``_Evicted`` if it was evicted meanwhile."""
        with self._lock:
            if slot.evicted:
                raise _Evicted()
            slot.sock = sock

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
            cid = next(self._ids) & 0xFFFFFFFF or next(self._ids)
            slot = _Slot(cid, addr, csock, time.monotonic())
            t = threading.Thread(target=self._serve_one, args=(slot, handler), name=f"sft-channel-{cid}",
                                 daemon=True)
            with self._lock:
                admitted, note = self._admit(slot)
                if admitted:
                    self.accepted += 1
                    self._threads.add(t)
            if note is not None:
                self._record(note)
            if admitted:
                t.start()
            else:
                self._turn_away(csock, addr)

    def _turn_away(self, csock: socket.socket, addr: tuple) -> None:
        """Answer a newcomer of a pool full of authenticated connections (in a short-lived thread)."""
        n = self.limits.max_connections
        self._record(f"refused {addr}: all {n} connection slots hold authenticated connections "
                     f"(max_connections {n} reached)", refused=True)
        t = threading.Thread(target=self._reply_busy, args=(csock, addr), name="sft-channel-busy", daemon=True)
        with self._lock:
            answer = self._busy_replies < _MAX_BUSY_REPLIES
            if answer:
                self._busy_replies += 1
                self._threads.add(t)
        if answer:
            t.start()
        else:
            _shutdown_close(csock)

    def _reply_busy(self, csock: socket.socket, addr: tuple) -> None:
        """Best effort, within about 2 x ``_BUSY_REPLY_TIMEOUT``: TLS if configured, a retryable ERROR, close."""
        n = self.limits.max_connections
        sock = csock
        try:
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                csock.settimeout(_BUSY_REPLY_TIMEOUT)
                sock = self._ctx.wrap_socket(csock, server_side=True)
            conn = Connection(sock, peer=addr, limits=HANDSHAKE_LIMITS, link=None, crc=self.crc,
                              default_timeout=_BUSY_REPLY_TIMEOUT)
            conn.send_error(f"server busy: all {n} connection slots are in use; retry in "
                            f"{_BUSY_RETRY_AFTER:g} s", retryable=True, retry_after=_BUSY_RETRY_AFTER)
            _linger_close(sock, _BUSY_REPLY_TIMEOUT)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.info("busy reply to %s failed: %s: %s", addr, type(e).__name__, e)
        finally:
            _shutdown_close(sock)
            with self._lock:
                self._busy_replies -= 1
                self._threads.discard(threading.current_thread())

    def _serve_one(self, slot: _Slot, handler: Callable[[Connection], None]) -> None:
        cid, addr = slot.cid, slot.addr
        csock = slot.sock
        conn: Connection | None = None
        sock: socket.socket = csock
        try:
            deadline = time.monotonic() + self.limits.handshake_timeout
            try:
                csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ctx is not None:
                    if _starts_plain_sft(csock, deadline):
                        # A plain client: answer in the only language it cannot mistake for a
                        # busy server, a TLS alert record where it expects an sft header.
                        csock.sendall(_TLS_ALERT_UNEXPECTED_MESSAGE)
                        _linger_close(csock, min(1.0, max(0.0, deadline - time.monotonic())))
                        raise AuthError("plain (non-TLS) sft client; this server requires TLS")
                    csock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock = self._ctx.wrap_socket(csock, server_side=True, do_handshake_on_connect=False)
                    self._set_slot_sock(slot, sock)
                    try:
                        sock.do_handshake()
                    except ssl.SSLError:
                        # Let the alert OpenSSL just sent reach the client: closing with its
                        # unread bytes queued would reset the connection and could destroy it.
                        _linger_close(sock, min(1.0, max(0.0, deadline - time.monotonic())))
                        raise
                conn = Connection(sock, peer=addr, limits=self.limits, link=self.link, crc=self.crc,
                                  default_timeout=self.limits.idle_timeout)
                conn._server_handshake(self._tokens, cid, deadline, admit=lambda: self._mark_authenticated(slot))
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
        except _Evicted:
            pass
        except AuthError as e:
            if not slot.evicted:
                self._record(f"refused connection {cid} from {addr}: {e}", refused=True)
        except (ProtocolError, ssl.SSLError, OSError) as e:
            if not slot.evicted:  # an evicted connection fails on its shut-down socket: already recorded
                self._record(f"refused connection {cid} from {addr} during handshake: {type(e).__name__}: {e}",
                             refused=True)
        except Exception as e:  # noqa: BLE001
            log.exception("unexpected failure on connection %d", cid)
            self._record(f"connection {cid} from {addr}: {type(e).__name__}: {e}", refused=True)
        finally:
            # Leave the pool before closing: a socket the accept loop may still shut down is open.
            with self._lock:
                if self._active.get(cid) is slot:
                    del self._active[cid]
                self._threads.discard(threading.current_thread())
            if conn is not None:
                conn.close()
            else:
                try:
                    sock.close()
                except OSError:
                    pass

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
            socks = [s.sock for s in self._active.values()]
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
