"""Send paths of the tensor channel: how the pieces of one encoded frame reach the socket.

:func:`~.wire.frame_pieces` encodes a frame as a list of small ``bytes`` (header, descriptors,
meta) and ``memoryview`` s of tensor storage; :func:`send_pieces` puts them on the socket by one
of three paths, all writing the same bytes:

* **fused** (plain socket, payload CRC, extension with ``sockio.cpp``): tensor data is
  checksummed and sent in C, chunk by chunk, with no Python per chunk;
* **gathered** (plain socket with ``sendmsg``): scatter/gather, at most one big chunk per call
  with the small pieces riding along, so nothing big is copied;
* **coalesced** (TLS, which has no ``sendmsg``, or a paced link): ``sendall`` per big chunk with
  small pieces merged, every send metered by the :class:`~.limiter.LinkLimiter`.

This module knows sockets, buffers, the CRC trailer and the link's pacing; it must not know the
frame layout beyond :func:`~.wire.iter_send_chunks`, nor connections, locks, counters or the
handshake.  Callers serialise sends on a socket.
"""
from __future__ import annotations

import errno
import os
import socket
import ssl
import struct
from typing import Iterable

from . import checksum
from .limiter import LinkLimiter
from .tuning import COALESCE_BYTES, CRC_SEND_CHUNK_BYTES, PACED_SLICE_BYTES
from .wire import HEADER_SIZE, iter_send_chunks

_MORE = getattr(socket, "MSG_MORE", 0)
_CRC_TRAILER = struct.Struct("<I")

Buffer = bytes | bytearray | memoryview


def can_gather(sock: socket.socket) -> bool:
    """Whether ``sock`` takes scatter/gather sends (plain sockets; ``ssl`` sockets have no ``sendmsg``)."""
    return not isinstance(sock, ssl.SSLSocket) and hasattr(sock, "sendmsg")


def can_fuse(sock: socket.socket, crc: bool) -> bool:
    """Whether frames with the payload ``crc`` can take the fused path on ``sock`` (plain socket, extension)."""
    return crc and checksum.SOCKIO and not isinstance(sock, ssl.SSLSocket)


def send_pieces(sock: socket.socket, pieces: list[bytes | memoryview], *, crc: bool, link: LinkLimiter | None,
                fused: bool, gather: bool) -> None:
    """Send one frame's ``pieces`` (from :func:`~.wire.frame_pieces`), then its CRC trailer when ``crc``.

    ``link`` (None = unpaced) delays the frame and meters every send; ``fused`` and ``gather``
    say what the socket allows (:func:`can_fuse`, :func:`can_gather`).  Paced links send in
    :data:`~.tuning.PACED_SLICE_BYTES` slices; otherwise, with the CRC, tensors go out in
    :data:`~.tuning.CRC_SEND_CHUNK_BYTES` chunks, each checksummed just before its send (still in
    cache), and without it each tensor is one send.
    """
    if link is not None:
        link.frame_delay()
    if link is None and fused:
        send_fused(sock, pieces)
        return
    chunk = PACED_SLICE_BYTES if link is not None and link.mbps else (CRC_SEND_CHUNK_BYTES if crc else 0)
    chunks = iter_send_chunks(pieces, crc, chunk)
    if link is None and gather:
        send_gathered(sock, chunks)
    else:
        send_coalesced(sock, chunks, link)


def send_fused(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    """Send a checksummed frame on a plain socket: tensor data through ``sft_send_crc``.

    Small pieces (header, meta, descriptors) are checksummed here and sent with ``MSG_MORE``
    just before the tensor data that follows them; each tensor's bytes are checksummed and
    sent chunk by chunk in C (each chunk still in cache for the kernel's copy), continuing the
    running CRC; the remaining small pieces and the CRC trailer go out last.  Same bytes on
    the wire as :func:`~.wire.iter_send_chunks`.
    """
    fd = sock.fileno()
    value = 0
    skip = HEADER_SIZE
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


def send_gathered(sock: socket.socket, chunks: Iterable[Buffer]) -> None:
    """Send ``chunks`` in order with at most one big chunk per ``sendmsg`` call.

    Small pieces ride along with the neighbouring big chunk (the header and tensor descriptors
    with the first data chunk, the CRC trailer with the last), so a frame with one tensor is
    one or a few system calls and no tiny TCP segment of its own; nothing big is copied.
    """
    out: list[Buffer] = []
    big = False
    for c in chunks:
        if len(c) < COALESCE_BYTES:
            if out and isinstance(out[-1], bytearray):
                out[-1] += c
            else:
                out.append(bytearray(c))
            continue
        if big:
            _sendmsg_all(sock, out)
            out = []
        out.append(c)
        big = True
    if out:
        _sendmsg_all(sock, out)


def _sendmsg_all(sock: socket.socket, bufs: list[Buffer]) -> None:
    """``sendall`` of several buffers through ``sendmsg`` (scatter/gather), looping on short sends."""
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


def send_coalesced(sock: socket.socket, chunks: Iterable[Buffer], link: LinkLimiter | None) -> None:
    """``sendall`` each big chunk, merging runs of small ones into one send; ``link`` meters every send."""
    pending = bytearray()
    for c in chunks:
        if len(c) < COALESCE_BYTES:
            pending += c
            continue
        if pending:
            _sendall(sock, pending, link)
            pending = bytearray()
        _sendall(sock, c, link)
    if pending:
        _sendall(sock, pending, link)


def _sendall(sock: socket.socket, buf: Buffer, link: LinkLimiter | None) -> None:
    if link is not None:
        link.consume(len(buf))
    sock.sendall(buf)
