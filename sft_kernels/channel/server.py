"""The threaded server of the tensor channel: :class:`Listener`, its connection pool and its threads.

One thread accepts; each admitted connection gets a thread of its own that runs TLS, the HMAC
handshake (:mod:`.handshake`) and then the caller's ``handler(conn)``.  The pool of
``Limits.max_connections`` slots, the eviction of connections still in their handshake, the busy
reply to newcomers of a full pool, and the record of failures all live here.

This module must not know the frame layout, the send paths or how a :class:`~.conn.Connection`
bounds its reads; it creates connections, drives their handshake and closes sockets.
"""
from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping

from . import auth
from .conn import Connection, default_crc
from .deadline import linger_close, shutdown_close
from .handshake import NotAdmitted, finish_server_tls, server_handshake, wrap_server_tls
from .limiter import LinkLimiter
from .tls import TLSConfig
from .tuning import (
    ACCEPT_POLL_INTERVAL, BUSY_REPLY_TIMEOUT, BUSY_RETRY_AFTER, LISTEN_BACKLOG, MAX_BUSY_REPLIES, SHUTDOWN_TIMEOUT,
)
from .wire import HANDSHAKE_LIMITS, AuthError, Limits, PeerClosed, ProtocolError, RemoteError, TruncatedFrame

log = logging.getLogger("sft_kernels.channel")

#: ``Listener.errors`` keeps the most recent this many messages.
_MAX_RECORDED_ERRORS = 1000


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
        self.crc = default_crc(tls, crc)
        self._sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG)
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
        """Point ``slot`` at the wrapped TLS socket; raise :class:`~.handshake.NotAdmitted` if it was evicted."""
        with self._lock:
            if slot.evicted:
                raise NotAdmitted()
            slot.sock = sock

    # ------------------------------------------------------------------ serving
    def serve_forever(self, handler: Callable[[Connection], None]) -> None:
        """Accept connections until :meth:`shutdown`; each gets a thread: TLS, auth, then ``handler``."""
        self._sock.settimeout(ACCEPT_POLL_INTERVAL)
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
            answer = self._busy_replies < MAX_BUSY_REPLIES
            if answer:
                self._busy_replies += 1
                self._threads.add(t)
        if answer:
            t.start()
        else:
            shutdown_close(csock)

    def _reply_busy(self, csock: socket.socket, addr: tuple) -> None:
        """Best effort, within about 2 x ``BUSY_REPLY_TIMEOUT``: TLS if configured, a retryable ERROR, close."""
        n = self.limits.max_connections
        sock = csock
        try:
            csock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ctx is not None:
                csock.settimeout(BUSY_REPLY_TIMEOUT)
                sock = self._ctx.wrap_socket(csock, server_side=True)
            conn = Connection(sock, peer=addr, limits=HANDSHAKE_LIMITS, link=None, crc=self.crc,
                              default_timeout=BUSY_REPLY_TIMEOUT)
            conn.send_error(f"server busy: all {n} connection slots are in use; retry in "
                            f"{BUSY_RETRY_AFTER:g} s", retryable=True, retry_after=BUSY_RETRY_AFTER)
            linger_close(sock, BUSY_REPLY_TIMEOUT)
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            log.info("busy reply to %s failed: %s: %s", addr, type(e).__name__, e)
        finally:
            shutdown_close(sock)
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
                    sock = wrap_server_tls(csock, self._ctx, deadline)
                    self._set_slot_sock(slot, sock)
                    finish_server_tls(sock, deadline)
                conn = Connection(sock, peer=addr, limits=self.limits, link=self.link, crc=self.crc,
                                  default_timeout=self.limits.idle_timeout)
                server_handshake(conn, self._tokens, cid, deadline, admit=lambda: self._mark_authenticated(slot))
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
        except NotAdmitted:
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

    def shutdown(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop accepting, close every open connection and join the threads (up to ``timeout`` s)."""
        self._stop.set()
        shutdown_close(self._sock)  # the shutdown wakes a blocked accept() at once on Linux
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
