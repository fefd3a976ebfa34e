"""Socket deadlines: blocking sockets whose every read and send is bounded in time, and closing them.

The channel keeps its sockets blocking with no Python-level timeout (``settimeout(None)``): with
one, Python makes a socket non-blocking and every read becomes poll + ``recv`` of whatever
arrived, which also rules out ``MSG_WAITALL``.  Time is bounded here instead, with ``poll`` and
the kernel's ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``.  :class:`SocketSource` is the raw byte source
under a connection's :class:`~.wire.BufferedReader`.

This module knows sockets, seconds and the fused receive-and-checksum call of :mod:`.checksum`;
it must not know frames, the handshake or the server's pool.
"""
from __future__ import annotations

import errno
import math
import os
import select
import socket
import ssl
import struct
import time
from typing import Callable

from . import checksum
from .tuning import LINGER_DRAIN_BYTES, LINGER_RECV_BYTES, RCVTIMEO_SLACK_ABS, RCVTIMEO_SLACK_REL

_WAITALL = getattr(socket, "MSG_WAITALL", 0)
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_TIMEVAL = struct.Struct("@ll")  # struct timeval for SO_RCVTIMEO / SO_SNDTIMEO


def _set_timeo(sock: socket.socket, option: int, seconds: float) -> None:
    """Set ``SO_RCVTIMEO`` / ``SO_SNDTIMEO`` to ``seconds`` (0 = none; any positive value is at least 1 us)."""
    sec = int(seconds)
    usec = max(1, int((seconds - sec) * 1e6)) if seconds > 0 else 0
    sock.setsockopt(socket.SOL_SOCKET, option, _TIMEVAL.pack(sec, usec))


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """Bound each blocked send system call on ``sock`` by ``seconds`` > 0 (``SO_SNDTIMEO``); errors ignored."""
    try:
        _set_timeo(sock, socket.SO_SNDTIMEO, seconds)
    except OSError:
        pass


class SocketSource:
    """The raw byte source under a connection's buffer: a blocking socket plus deadlines.

    Each read that may wait first polls for readability (``select.poll``) for at most the time
    left, where the time left is the smaller of ``deadline - now`` (an absolute deadline over a
    whole exchange, the handshake) and ``wait`` (the seconds any one read may wait for data: the
    idle / ``recv`` timeout).  A peer that stalls *after* poll said readable (mid-frame, or in the
    middle of a TLS record) is bounded by the kernel: ``SO_RCVTIMEO`` is set to the same time
    left, so a blocked ``recv`` returns what it has (or fails with ``EAGAIN``, raised here as
    ``TimeoutError``) once it runs out.  Bytes already decrypted inside an ``ssl`` socket
    (``pending()``) are read without polling.
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

    def _bound(self, left: float) -> None:
        """Make ``SO_RCVTIMEO`` about ``left``: cached, so a fixed idle timeout sets it once per connection."""
        if abs(left - self._rcvtimeo) > RCVTIMEO_SLACK_REL * left + RCVTIMEO_SLACK_ABS:
            _set_timeo(self.sock, socket.SO_RCVTIMEO, left)
            self._rcvtimeo = left

    def _prepare(self, left: float) -> None:
        """Wait until the socket is readable (at most ``left`` s) and bound the read that follows."""
        if not (self._tls and self.sock.pending()):
            if not self._poll.poll(max(1, math.ceil(left * 1000))):
                raise TimeoutError(f"timed out: no data within {left:.3g} s")
        self._bound(left)

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
        self._bound(left)
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
        if left is not None:
            self._bound(left)
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


def shutdown_close(sock: socket.socket) -> None:
    """Shut a socket down both ways (wakes threads blocked on it), then close it; errors ignored."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


def linger_close(sock: socket.socket, seconds: float) -> None:
    """Half-close ``sock``, drop what the peer still sends until it closes too (at most ``seconds``
    and :data:`~.tuning.LINGER_DRAIN_BYTES`), then close.

    Closing a TCP socket with unread received bytes makes the kernel answer with a reset, which
    can destroy the reply just sent before the peer reads it; waiting for the peer's end avoids
    that.  Errors are ignored.
    """
    end = time.monotonic() + seconds
    try:
        sock.shutdown(socket.SHUT_WR)
        drained = 0
        while drained < LINGER_DRAIN_BYTES:
            left = end - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(LINGER_RECV_BYTES)
            if not data:
                break
            drained += len(data)
    except OSError:
        pass
    finally:
        shutdown_close(sock)
