"""Framed tensor protocol over TCP (optionally TLS) between the edge and the cloud.

What crosses the network in split fine-tuning are named tensors plus a little JSON metadata.
This package moves exactly that, and nothing about models: the wire format (:mod:`.wire`,
byte-exact in ``docs/protocol.md``), HMAC-SHA256 client authentication (:mod:`.auth`), TLS
(:mod:`.tls`), the handshake (:mod:`.handshake`), per-connection byte counters and receive limits
(:mod:`.conn`), socket deadlines (:mod:`.deadline`), the send paths (:mod:`.send`), the threaded
server (:mod:`.server`), an emulated slow link (:mod:`.limiter`), and the I/O tuning constants
(:mod:`.tuning`).  It must not import ``split``, ``data``, ``runtime``, ``codecs`` or ``cli``.

Concurrency model: **threads with blocking sockets**, one thread per server connection, bounded
by ``Limits.max_connections`` (a pool in which a newcomer evicts the oldest connection still in
its handshake, see :class:`Listener`).  Reasons:

* blocking ``recv_into`` / ``sendall`` on memoryviews of tensor storage are zero-copy, and behave
  the same on ``ssl.SSLSocket`` (asyncio streams would copy into their own buffers);
* both ``socket`` I/O and the torch compute that runs between messages release the GIL, so a
  thread per session overlaps network and compute well;
* a training session is strictly sequential request/reply, which reads naturally as blocking code
  and needs no event loop in the runtime that calls it.

Typical use::

    server = Listener({"edge-1": b"secret"}).start(handler)          # handler(conn) per client
    with connect(*server.address, "edge-1", b"secret") as conn:
        reply = conn.request(KIND_USER_MIN, {"h": h}, {"step": 3})
"""
from __future__ import annotations

from .auth import load_tokens
from .conn import ChannelStats, Connection, connect
from .handshake import HandshakeClosed, LinkRefused, ServerBusy
from .limiter import LinkLimiter
from .server import Listener
from .tls import TLSConfig
from .wire import (
    KIND_USER_MIN, PROTOCOL_VERSION, AuthError, Frame, Limits, PeerClosed, ProtocolError, RemoteError,
    TruncatedFrame,
)

__all__ = [
    "Limits", "TLSConfig", "LinkLimiter", "Frame", "Connection", "ChannelStats", "ProtocolError", "AuthError",
    "RemoteError", "PeerClosed", "TruncatedFrame", "HandshakeClosed", "LinkRefused", "ServerBusy", "connect",
    "Listener", "load_tokens", "KIND_USER_MIN", "PROTOCOL_VERSION",
]
