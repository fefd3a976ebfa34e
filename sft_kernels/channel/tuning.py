"""I/O tuning of the tensor channel: buffer and chunk sizes, send-path thresholds, timeouts, backlog.

Every number here changes how fast or how patiently bytes move, never which bytes move: the
wire format (``docs/protocol.md``) is the same whatever these are set to.  Receive limits that
bound what a peer may make us allocate, and the timeouts a caller configures, are
:class:`~.wire.Limits`, not tuning.

This module imports nothing and knows nothing of sockets, frames or tensors; the modules that
use a number import it from here.
"""
from __future__ import annotations

# ---------------------------------------------------------------------------------------- sending

#: Send buffers below this are copied into their small neighbours (fewer syscalls); larger ones go out uncopied.
COALESCE_BYTES = 16 * 1024
#: Largest piece one send call takes when a frame is cut into chunks without a stated size.
SEND_CHUNK_BYTES = 1 << 20
#: Bytes per checksummed chunk on the Python send paths (checksummed just before its send, still in cache).
CRC_SEND_CHUNK_BYTES = 4 << 20
#: Bytes per send call on a paced (bandwidth-limited) link: smooth pacing instead of one burst per tensor.
PACED_SLICE_BYTES = 64 * 1024
#: Bytes checksummed per send/recv system call in the fused C path (``csrc/cpu/sockio.cpp``).
#: ``bench/channel.py --quick`` on a quiet 2-core machine, plain TCP with CRC, ratio to a plain
#: socket at 1 / 4 / 16 MB: 256 KiB 0.66 / 0.44 / 0.79, 1 MiB 0.81 / 1.17 / 0.95, 4 MiB
#: 0.82 / 0.94 / 0.95 (single noisy runs; small chunks lose to the extra system calls).
SOCKIO_CHUNK = 1 << 20
#: Token-bucket depth of an emulated link: at most this many bytes go out back-to-back above its rate.
BURST_BYTES = 64 * 1024

# -------------------------------------------------------------------------------------- receiving

#: A connection's receive buffer: small fields are served from it, reads of half its size or more bypass it.
RECV_BUFFER_BYTES = 64 * 1024
#: Received tensor data is checksummed once this many bytes arrived unchecked.  Measured on
#: loopback (2-core EPYC): 4 MiB runs beat 1 MiB and 256 KiB ones (fewer, larger MSG_WAITALL reads).
CRC_RECV_RUN_BYTES = 4 << 20
#: SO_RCVTIMEO is set again only when the time left differs from it by more than this fraction of it ...
RCVTIMEO_SLACK_REL = 0.01
#: ... plus this many seconds (so a steady idle timeout costs one setsockopt per connection).
RCVTIMEO_SLACK_ABS = 0.001

# ------------------------------------------------------------------------------ timeouts, closing

#: Default seconds :func:`~.conn.connect` allows for the TCP connect and the whole handshake.
CONNECT_TIMEOUT = 30.0
#: Seconds a send may block while telling the peer about its protocol error (then the connection closes).
ERROR_SEND_TIMEOUT = 1.0
#: Most seconds a server lingers so that its TLS alert reaches the client before the socket closes.
ALERT_LINGER = 1.0
#: Most bytes drained from a peer while waiting for it to close after our last reply.
LINGER_DRAIN_BYTES = 64 * 1024
#: Bytes per recv call while draining a closing peer.
LINGER_RECV_BYTES = 4096
#: Seconds between peeks while a client's first bytes are a prefix of the magic (TLS or plain?).
PEEK_RETRY_INTERVAL = 0.01

# ----------------------------------------------------------------------------------------- server

#: Length of the server socket's queue of connections not yet accepted (``listen`` backlog).
LISTEN_BACKLOG = 128
#: Seconds the accept loop waits for a connection before it checks whether to stop.
ACCEPT_POLL_INTERVAL = 0.2
#: Seconds a full server gives the busy reply to a newcomer (TLS handshake, ERROR frame, close).
BUSY_REPLY_TIMEOUT = 1.0
#: The retry_after (seconds) a full server suggests to a newcomer.
BUSY_RETRY_AFTER = 1.0
#: At most this many busy replies run at once; beyond, newcomers of a full server are closed unanswered.
MAX_BUSY_REPLIES = 8
#: Default seconds :meth:`~.server.Listener.shutdown` waits for the connection threads to end.
SHUTDOWN_TIMEOUT = 5.0
