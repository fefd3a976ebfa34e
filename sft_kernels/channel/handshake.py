"""The handshake of a connection: TLS on either side, the HMAC exchange, and what its failures mean.

Client: :func:`wrap_client_tls`, then :func:`client_handshake` (HELLO, CHALLENGE, AUTH, OK; see
``docs/protocol.md``).  Both turn the ways a misconfigured link fails (certificate refused,
mutual TLS, TLS on one side only, not an sft server, another protocol version, a silent close)
into :class:`LinkRefused` or :class:`HandshakeClosed` with a message naming the fix.

Server: :func:`wrap_server_tls` (answers a plain sft client with a TLS alert) and
:func:`finish_server_tls`, then :func:`server_handshake`, which tells a refused client only
"authentication failed" and raises :class:`~.wire.AuthError` with the real reason.

The HMAC exchange drives a :class:`~.conn.Connection` through its frame-level internals
(``_send_frame``, ``_recv_any``, ``_failed_head``, ``_authenticate``).  This module must not
know the send paths, how a connection bounds its reads, or the server's connection pool (the
server passes ``admit`` to decide at the last moment).
"""
from __future__ import annotations

import contextlib
import hmac
import secrets
import socket
import ssl
import time
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, NoReturn

from . import auth
from .deadline import linger_close
from .tls import TLSConfig
from .tuning import ALERT_LINGER, PEEK_RETRY_INTERVAL
from .wire import (
    HANDSHAKE_LIMITS, KIND_AUTH, KIND_CHALLENGE, KIND_ERROR, KIND_HELLO, KIND_OK, MAGIC, PROTOCOL_VERSION, AuthError,
    Frame, PeerClosed, ProtocolError, RemoteError,
)

if TYPE_CHECKING:
    from .conn import Connection

#: A fatal TLS alert record (TLS 1.2 record version, alert "unexpected_message"): what a TLS
#: Listener answers a plain sft client with, so that the client can tell it to use TLS.
TLS_ALERT_UNEXPECTED_MESSAGE = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x0A])

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


class LinkRefused(Exception):
    """The connection cannot work as configured: retrying will not help, a setting must change.

    Raised by :func:`~.conn.connect` for permanent causes (TLS certificate not accepted, mutual TLS
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


class NotAdmitted(Exception):
    """The server's ``admit()`` turned an authenticated client away (the connection is closed, no OK sent)."""


# ------------------------------------------------------------------------------------------ client

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


def wrap_client_tls(sock: socket.socket, tls: TLSConfig, host: str, where: str) -> ssl.SSLSocket:
    """Run the client side of the TLS handshake on ``sock`` (connected to ``host``, shown as ``where``).

    The server is verified against ``tls.ca`` under the name ``tls.server_hostname`` or ``host``.
    Raises :class:`LinkRefused` or :class:`HandshakeClosed` for the failures they describe.
    """
    ctx = tls.client_context()
    try:
        with _ssl_errors(where, host, tls, "the TLS handshake"):
            return ctx.wrap_socket(sock, server_hostname=tls.server_hostname or host)
    except ConnectionResetError as e:
        raise HandshakeClosed(_closed_hint(where, tls, "the TLS handshake")) from e


def _handshake_refusal(f: Frame) -> Exception:
    """The exception for an ERROR frame received in the handshake: ServerBusy if retryable, else AuthError."""
    err = RemoteError.from_meta(f.meta, "authentication failed")
    if err.retryable:
        return ServerBusy(str(err), retry_after=err.retry_after)
    return AuthError(str(err))


def _client_exchange(conn: Connection, client_id: str, secret: bytes, deadline: float) -> None:
    conn._send_frame(KIND_HELLO, None, {"client_id": client_id}, 0, 0)
    f = conn._recv_any(None, HANDSHAKE_LIMITS, deadline)
    if f.kind == KIND_ERROR:
        raise _handshake_refusal(f)
    if f.kind != KIND_CHALLENGE:
        raise ProtocolError(f"expected CHALLENGE (kind {KIND_CHALLENGE}), got kind {f.kind}")
    try:
        nonce = bytes.fromhex(f.meta["nonce"])
        conn_id = int(f.meta["conn_id"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("CHALLENGE meta must hold 'nonce' (hex) and 'conn_id' (int)") from None
    if len(nonce) != auth.NONCE_BYTES or not 0 < conn_id <= 0xFFFFFFFF:
        raise ProtocolError(f"CHALLENGE nonce must be {auth.NONCE_BYTES} bytes and conn_id in [1, 2**32-1]")
    conn.conn_id = conn_id
    mac = auth.compute_mac(secret, nonce, client_id, conn_id)
    conn._send_frame(KIND_AUTH, None, {"mac": mac.hex()}, 0, 0)
    f = conn._recv_any(None, HANDSHAKE_LIMITS, deadline)
    if f.kind == KIND_ERROR:
        raise _handshake_refusal(f)
    if f.kind != KIND_OK:
        raise ProtocolError(f"expected OK (kind {KIND_OK}), got kind {f.kind}")
    conn._authenticate(client_id)


def client_handshake(conn: Connection, client_id: str, secret: bytes, deadline: float, *, where: str, host: str,
                     tls: TLSConfig | None) -> None:
    """Authenticate ``conn`` as ``client_id`` with ``secret`` before ``deadline`` (``time.monotonic()``).

    ``where`` (``host:port``), ``host`` and ``tls`` only shape the explanation of a failure:
    :class:`~.wire.AuthError` (refused), :class:`ServerBusy` (retryable refusal),
    :class:`LinkRefused` (the reply shows a misconfiguration), :class:`HandshakeClosed` (silent
    close), else the :class:`ProtocolError` / ``OSError`` / ``TimeoutError`` itself.
    """
    try:
        with _ssl_errors(where, host, tls, "the handshake"):
            _client_exchange(conn, client_id, secret, deadline)
    except ProtocolError as e:
        refusal = _head_refusal(conn._failed_head, where, tls)
        if refusal is not None:
            raise refusal from e
        if isinstance(e, PeerClosed) and not conn._failed_head:
            raise HandshakeClosed(_closed_hint(where, tls, "the handshake")) from e
        raise
    except (ConnectionResetError, BrokenPipeError) as e:
        raise HandshakeClosed(_closed_hint(where, tls, "the handshake")) from e


# ------------------------------------------------------------------------------------------ server

def _starts_plain_sft(sock: socket.socket, deadline: float) -> bool:
    """Whether a client that should start TLS instead sent an sft frame header (peeked, not consumed).

    Waits (until ``deadline``, ``TimeoutError`` after) for the first bytes; False at EOF or as soon
    as they differ from :data:`~.wire.MAGIC` (a TLS ClientHello starts with 0x16).
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
        time.sleep(PEEK_RETRY_INTERVAL)  # a prefix of the magic so far: wait for the rest


def _alert_linger(deadline: float) -> float:
    """Seconds to linger so that an alert reaches the client: at most ALERT_LINGER, never past ``deadline``."""
    return min(ALERT_LINGER, max(0.0, deadline - time.monotonic()))


def wrap_server_tls(csock: socket.socket, ctx: ssl.SSLContext, deadline: float) -> ssl.SSLSocket:
    """Wrap an accepted socket in TLS, the TLS handshake not yet done (see :func:`finish_server_tls`).

    A client that sends an sft frame header instead of a TLS ClientHello gets a TLS alert record,
    the one answer it cannot mistake for a busy server, and :class:`~.wire.AuthError` is raised.
    ``TimeoutError`` when the client sends nothing before ``deadline``.
    """
    if _starts_plain_sft(csock, deadline):
        csock.sendall(TLS_ALERT_UNEXPECTED_MESSAGE)
        linger_close(csock, _alert_linger(deadline))
        raise AuthError("plain (non-TLS) sft client; this server requires TLS")
    csock.settimeout(max(0.001, deadline - time.monotonic()))
    return ctx.wrap_socket(csock, server_side=True, do_handshake_on_connect=False)


def finish_server_tls(sock: ssl.SSLSocket, deadline: float) -> None:
    """Run the server side of the TLS handshake (bounded by the timeout :func:`wrap_server_tls` set)."""
    try:
        sock.do_handshake()
    except ssl.SSLError:
        # Let the alert OpenSSL just sent reach the client: closing with its unread bytes queued
        # would reset the connection and could destroy it.
        linger_close(sock, _alert_linger(deadline))
        raise


def _refuse(conn: Connection, reason: str) -> NoReturn:
    """Tell the client only 'authentication failed', close, and raise AuthError with the real reason."""
    try:
        conn.send_error("authentication failed")
    except Exception:  # noqa: BLE001 - best effort only
        pass
    conn.close()
    raise AuthError(reason)


def server_handshake(conn: Connection, tokens: Mapping[str, bytes], conn_id: int, deadline: float,
                     admit: Callable[[], bool] | None = None) -> None:
    """Authenticate the client on ``conn`` against ``tokens`` (id -> secret), naming the connection ``conn_id``.

    ``admit()`` runs once the MAC is verified, just before OK; returning False closes the
    connection without OK and raises :class:`NotAdmitted`.  A refused client raises
    :class:`~.wire.AuthError` (the client is told only "authentication failed").
    """
    f = conn._recv_any(None, HANDSHAKE_LIMITS, deadline)
    if f.kind != KIND_HELLO:
        _refuse(conn, f"expected HELLO (kind {KIND_HELLO}) as the first frame, got kind {f.kind}")
    client_id = f.meta.get("client_id")
    if not isinstance(client_id, str):
        _refuse(conn, "HELLO without a string 'client_id'")
    try:
        auth.check_client_id(client_id)
    except ValueError as e:
        _refuse(conn, f"HELLO: {e}")
    nonce = secrets.token_bytes(auth.NONCE_BYTES)
    conn.conn_id = conn_id
    conn._send_frame(KIND_CHALLENGE, None, {"nonce": nonce.hex(), "conn_id": conn_id}, 0, 0)
    f = conn._recv_any(None, HANDSHAKE_LIMITS, deadline)
    if f.kind != KIND_AUTH:
        _refuse(conn, f"expected AUTH (kind {KIND_AUTH}) from client {client_id!r}, got kind {f.kind}")
    try:
        got = bytes.fromhex(f.meta["mac"])
    except (KeyError, TypeError, ValueError):
        got = b""
    secret = tokens.get(client_id)
    # Unknown ids are checked against a random key so both failures cost the same.
    want = auth.compute_mac(secret if secret is not None else secrets.token_bytes(32), nonce, client_id, conn_id)
    ok = hmac.compare_digest(got, want)
    if secret is None:
        _refuse(conn, f"unknown client id {client_id!r}")
    if not ok:
        _refuse(conn, f"wrong token (bad HMAC) for client id {client_id!r}")
    if admit is not None and not admit():
        conn.close()
        raise NotAdmitted()
    conn._send_frame(KIND_OK, None, {"conn_id": conn_id}, 0, 0)
    conn._authenticate(client_id)
