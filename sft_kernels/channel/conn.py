"""Connections of the tensor channel: :class:`Connection` and :func:`connect`.

A connection is a TCP (optionally TLS) stream carrying frames (see :mod:`.wire`).  It is
authenticated by the handshake of :mod:`.handshake` before any user frame flows, keeps byte and
round-trip counters in :class:`ChannelStats`, and optionally paces its sends through a
:class:`~.limiter.LinkLimiter`.  Its reads are bounded by the deadlines of :mod:`.deadline`; its
frames reach the socket by the send paths of :mod:`.send`.  The server side is :mod:`.server`.

A connection is meant to be driven by one thread at a time for receiving (request/reply); sends
are serialised by a lock, so another thread may send concurrently.

This module must not know how the server pools and evicts connections, nor the handshake's steps.
"""
from __future__ import annotations

import socket
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Mapping

import torch

from . import auth
from .deadline import SocketSource, set_send_timeout, shutdown_close
from .handshake import client_handshake, wrap_client_tls
from .limiter import LinkLimiter
from .send import can_fuse, can_gather, send_pieces
from .tls import TLSConfig
from .tuning import CONNECT_TIMEOUT, ERROR_SEND_TIMEOUT
from .wire import (
    CHFLAG_PAYLOAD_CRC, CRC_SIZE, HEADER_SIZE, KIND_ERROR, KIND_PING, KIND_PONG, KIND_USER_MIN, BufferedReader, Frame,
    Limits, PeerClosed, ProtocolError, RemoteError, decode_header, error_meta, frame_pieces, read_payload, recv_exact,
)


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



class Connection:
    """One authenticated channel endpoint: send and receive frames of named tensors plus JSON meta.

    Created by :func:`connect` (client) or by :class:`~.server.Listener` (server); not constructed by users.
    ``conn_id`` is assigned by the server, ``client_id`` is the authenticated client's id and
    ``peer`` the remote socket address.  Use as a context manager or call :meth:`close`.
    """

    def __init__(self, sock: socket.socket, *, peer: tuple, limits: Limits, link: LinkLimiter | None,
                 crc: bool, default_timeout: float | None = None) -> None:
        # Blocking, no Python timeout: deadlines are enforced by SocketSource (poll + SO_RCVTIMEO)
        # and, for sends, by SO_SNDTIMEO = default_timeout.
        sock.settimeout(None)
        self._sock = sock
        self._source = SocketSource(sock)
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
        # The send path this socket allows (see .send): scatter/gather on plain sockets, and with
        # the payload CRC on a plain socket, tensor data checksummed and sent in C (sockio.cpp).
        self._gather = can_gather(sock)
        self._fused = can_fuse(sock, crc)
        if default_timeout is not None:
            set_send_timeout(sock, default_timeout)

    def _authenticate(self, client_id: str) -> None:
        """Mark the handshake done for ``client_id``: frames now count as traffic and must carry ``conn_id``."""
        self.client_id = client_id
        self._authenticated = True

    # ------------------------------------------------------------------ sending
    def _send_frame(self, kind: int, tensors: Mapping[str, torch.Tensor] | None, meta: Mapping | None,
                    seq: int, flags: int) -> int:
        if self._closed:
            raise ConnectionError("connection is closed")
        pieces, wire, payload, keep = frame_pieces(kind, tensors, meta, seq=seq, flags=flags,
                                                   conn_id=self.conn_id, crc=self.crc, limits=self.limits)
        with self._send_lock:
            if self._send_broken:
                raise ConnectionError("connection is broken by an earlier failed send")
            try:
                send_pieces(self._sock, pieces, crc=self.crc, link=self.link, fused=self._fused, gather=self._gather)
            except BaseException:
                self._send_broken = True
                raise
        del keep
        self.stats.count("sent", wire, payload, self._authenticated)
        return wire

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
                set_send_timeout(self._sock, ERROR_SEND_TIMEOUT)
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
        shutdown_close(self._sock)

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Connection(conn_id={self.conn_id}, client_id={self.client_id!r}, peer={self.peer}, "
                f"crc={self.crc}, closed={self._closed})")


def default_crc(tls: TLSConfig | None, crc: bool | None) -> bool:
    """Whether frames carry the payload CRC: ``crc`` if given, else on for plain TCP and off under TLS."""
    return (tls is None) if crc is None else bool(crc)


def connect(host: str, port: int, client_id: str, token: bytes | str, *, tls: TLSConfig | None = None,
            limits: Limits = Limits(), link: LinkLimiter | None = None, timeout: float = CONNECT_TIMEOUT,
            crc: bool | None = None) -> Connection:
    """Open an authenticated connection to a :class:`~.server.Listener`.

    TCP connect (``timeout`` seconds bound the connect and the whole handshake), ``TCP_NODELAY``,
    TLS when ``tls`` is given (the server is verified against ``tls.ca``; hostname
    ``tls.server_hostname`` or ``host``), then the HMAC handshake.  ``crc`` turns the payload
    CRC32 on/off; default: on for plain TCP, off under TLS (TLS already authenticates records).

    Failures, from permanent to transient:

    * :class:`~.wire.AuthError`: the server refused the client id / token;
    * :class:`~.handshake.LinkRefused`: the settings cannot work (certificate not accepted, mutual TLS without
      a valid client certificate, TLS on one side only, not an sft server, another protocol
      version); the message names the cause and the fix;
    * :class:`~.handshake.ServerBusy` (a ``ConnectionError``): all the server's connection slots are in use;
      ``retry_after`` says when to retry;
    * ``ConnectionRefusedError`` naming ``host:port``: nothing listens there (yet);
    * :class:`~.handshake.HandshakeClosed` (a :class:`~.wire.PeerClosed`): the server closed the connection during
      the handshake without a reply (busy, restarting, or misconfigured; the message says which
      setting to check);
    * other ``OSError`` / :class:`~.wire.ProtocolError` / ``TimeoutError``: network failures.
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
            sock = wrap_client_tls(sock, tls, host, where)
        conn = Connection(sock, peer=peer, limits=limits, link=link, crc=default_crc(tls, crc))
        client_handshake(conn, client_id, secret, deadline, where=where, host=host, tls=tls)
        sock.settimeout(None)
        return conn
    except BaseException:
        sock.close()
        raise

