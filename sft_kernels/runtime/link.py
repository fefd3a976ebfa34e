"""``TcpLink``: the split step's link over the channel -- connect, authenticate, open the session, retry.

It moves the step's requests (:mod:`sft_kernels.step.messages`) over a
:class:`~sft_kernels.channel.Connection` and counts their payload bytes in the same
:class:`~sft_kernels.step.Traffic` every link uses; it also knows the wire bytes (frames,
handshakes, reconnects).  Its owner (``EdgeTrainer``, ``RemoteSplit``) supplies what ``OPEN``
says (:attr:`TcpLink.open_meta`) and decides what a resume point below its own step means
(:attr:`TcpLink.on_resume`: roll back, or refuse).

Faults: a dropped connection is retried with exponential backoff, a bounded number of times;
each retry authenticates again and re-opens the session, which tells the edge where the cloud
stands (the newest step both sides can resume from).  What is retried and what is not:

* the server *answered* with a retryable ERROR (server full, a checkpoint it could not
  write): wait (the server's ``retry_after`` if given) and re-send, at most ``retries``
  times in a row, then :class:`CloudError` with the server's reason;
* the server answered with a permanent ERROR (bad request, wrong hash, ...): :class:`CloudError` at once;
* the link broke (server down or restarting): reconnect with backoff, ``retries`` attempts per
  break and at most ``retries`` breaks while one request is outstanding, then :class:`LinkLost`;
* the very first connection fails, or TLS, authentication or the peer's protocol is wrong: fail
  at once (:class:`~sft_kernels.channel.LinkRefused`, :class:`~sft_kernels.channel.AuthError`)
  naming the likely cause.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Union

import torch

from ..channel import Connection, Limits, LinkLimiter, LinkRefused, ProtocolError, RemoteError, TLSConfig, connect
from ..step import Reply, Traffic
from ..step.messages import KIND_NAMES, OPEN, payload_nbytes

__all__ = ["TcpLink", "CloudError", "LinkLost", "Rewind"]

log = logging.getLogger("sft_kernels.runtime")

_LINK_ERRORS = (OSError, ConnectionError, EOFError, ProtocolError, TimeoutError)


class CloudError(RuntimeError):
    """The cloud refused a request, or kept failing it (its error message is included)."""


class _Busy(Exception):
    """The cloud answered OPEN with a retryable refusal (e.g. server full)."""

    def __init__(self, message: str, retry_after: Optional[float]) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LinkLost(ConnectionError):
    """The link stayed down through every retry."""


class Rewind(Exception):
    """The cloud resumes below the edge's step; the edge rolled back to ``step`` and must recompute from there."""

    def __init__(self, step: int) -> None:
        self.step = step


class TcpLink:
    """A link to a ``sft serve`` session at ``host:port``.

    Args:
        host, port, client_id, token: where and who.
        open_meta: returns ``OPEN``'s meta (``config``, ``hashes``, ``step``, ``ckpts``) at each (re)open.
        open_tensors: returns ``OPEN``'s tensors (a calibrated run's decoders, ``fit.*``); default none.
        on_resume: called with the cloud's resume step when it is below the edge's; rolls the edge
            back and raises :class:`Rewind`, or raises :class:`CloudError`.
        retries, backoff_s: the retry bound and the first backoff (doubles each try).
        tls, limits, link, timeout: passed to :func:`sft_kernels.channel.connect`.
    """

    def __init__(self, host: str, port: int, client_id: str, token: Union[bytes, str], *,
                 open_meta: Callable[[], dict], on_resume: Callable[[int], None],
                 open_tensors: Callable[[], dict] = dict, retries: int = 8,
                 backoff_s: float = 0.25, tls: Optional[TLSConfig] = None, limits: Optional[Limits] = None,
                 link: Optional[LinkLimiter] = None, timeout: float = 120.0) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 0 < backoff_s <= 60:
            raise ValueError(f"backoff_s must be in (0, 60], got {backoff_s}")
        self._addr = (host, port)
        self._cred = (client_id, token)
        self._conn_kw = dict(tls=tls, limits=limits or Limits(), link=link, timeout=timeout)
        self.open_meta, self.open_tensors, self.on_resume = open_meta, open_tensors, on_resume
        self.retries, self.backoff_s = retries, backoff_s
        self.conn: Optional[Connection] = None
        self.traffic = Traffic()
        self.reconnects = 0
        self.last_wire = (0, 0)  # wire bytes (request, reply) of the latest answered request
        self._connected_once = False
        self._wire_closed = [0, 0]  # wire bytes (sent, received) of connections already closed

    def wire_bytes(self) -> tuple[int, int]:
        """Every byte put on / taken off the socket, (sent, received): all connections, handshakes included."""
        up, down = self._wire_closed
        if self.conn is not None:
            cu, cd = self.conn.stats.total_wire()
            up, down = up + cu, down + cd
        return up, down

    def _connect(self) -> Connection:
        host, port = self._addr
        try:
            conn = connect(host, port, *self._cred, **self._conn_kw)
        except ConnectionRefusedError as exc:
            if self._connected_once:
                raise  # the server is restarting: a link fault, retried with backoff
            raise LinkRefused(f"cannot connect to {host}:{port}: nothing listens there (wrong host or port, or "
                              f"the server is not running): {exc}") from None
        # anything else (a close during the handshake: a busy server evicting, a restart; ServerBusy) is a
        # link fault, retried with backoff by the caller
        self._connected_once = True
        return conn

    def open(self) -> None:
        """Connect, authenticate and open the session; :attr:`on_resume` when the cloud resumes earlier."""
        self.close()
        conn = self._connect()
        meta, tensors = self.open_meta(), self.open_tensors()
        try:
            reply = conn.request(OPEN, tensors, meta)
        except RemoteError as exc:
            self._close_conn(conn)
            if exc.retryable:
                raise _Busy(f"the cloud cannot open the session now: {exc}", exc.retry_after) from None
            raise CloudError(f"the cloud refused the session: {exc}") from None
        except BaseException:
            self._close_conn(conn)
            raise
        self.conn = conn
        self.traffic.handshake_up += payload_nbytes(tensors)
        resume, step = reply.meta.get("step"), meta["step"]
        if not isinstance(resume, int) or not 0 <= resume <= step:
            self.close()
            raise CloudError(f"the cloud proposed resume step {resume!r}; the edge is at step {step}")
        if resume < step:
            self.on_resume(resume)

    def _close_conn(self, conn: Connection) -> None:
        up, down = conn.stats.total_wire()
        self._wire_closed[0] += up
        self._wire_closed[1] += down
        conn.close()

    def close(self) -> None:
        """Close the connection (the session stays on the server)."""
        if self.conn is not None:
            self._close_conn(self.conn)
            self.conn = None

    def _sleep(self, delay: float) -> float:
        time.sleep(delay)
        return min(delay * 2, 10.0)

    def _reopen(self) -> None:
        delay = self.backoff_s
        last: Optional[BaseException] = None
        for attempt in range(1, self.retries + 1):
            delay = self._sleep(delay)
            try:
                self.open()
                self.reconnects += 1
                return
            except Rewind:
                self.reconnects += 1
                raise
            except _LINK_ERRORS as exc:
                last = exc
                log.warning("reconnect %d/%d failed: %s", attempt, self.retries, exc)
        raise LinkLost(f"link to {self._addr[0]}:{self._addr[1]} lost; {self.retries} reconnect(s) failed; "
                       f"last error: {type(last).__name__}: {last}")

    def request(self, kind: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], seq: int) -> Reply:
        """Send one request until it is answered; retries bounded as the module docstring says.

        Counts its payload in :attr:`traffic` and its wire bytes in :attr:`last_wire`.
        """
        what = f"{KIND_NAMES[kind]} {seq}"
        answered, breaks = 0, 0
        delay = self.backoff_s
        while True:
            try:
                if self.conn is None:
                    self.open()
                before = self.conn.stats.wire_bytes_sent
                reply = self.conn.request(kind, tensors, meta, seq=seq)
                if reply.seq != seq:
                    raise CloudError(f"reply for {KIND_NAMES[kind]} {reply.seq}, expected {seq}")
                self.last_wire = (self.conn.stats.wire_bytes_sent - before, reply.wire_bytes)
                self.traffic.count(tensors, reply.tensors)
                return Reply(reply.tensors, reply.meta)
            except (RemoteError, _Busy) as exc:
                retry = exc.retryable if isinstance(exc, RemoteError) else True
                if not retry:
                    raise CloudError(f"the cloud refused {what}: {exc}") from None
                answered += 1
                if answered > self.retries:
                    raise CloudError(f"the cloud failed {what} {answered} times in a row; giving up. "
                                     f"Its last answer: {exc}") from None
                wait = exc.retry_after if exc.retry_after is not None else delay
                log.warning("the cloud answered %s with a retryable failure (%d/%d), retrying in %.1f s: %s",
                            what, answered, self.retries, min(wait, 30.0), exc)
                delay = self._sleep(min(wait, 30.0))
            except _LINK_ERRORS as exc:
                breaks += 1
                if breaks > self.retries:
                    raise LinkLost(f"the link to {self._addr[0]}:{self._addr[1]} broke {breaks} times while "
                                   f"{what} was outstanding; giving up. Last error: {type(exc).__name__}: {exc}") \
                        from None
                log.warning("link error at %s: %s; reconnecting", what, exc)
                self.close()
                self._reopen()

