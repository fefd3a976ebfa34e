"""Client authentication: the tokens file and the HMAC-SHA256 challenge-response.

The shared secret never crosses the network.  The server sends a fresh 32-byte nonce and the
connection id; the client answers ``HMAC-SHA256(secret, transcript)`` where the transcript binds
the protocol version, the nonce, the client id and the connection id (see ``docs/protocol.md``).
A recorded answer is useless on another connection because the nonce differs.
"""
from __future__ import annotations

import hashlib
import hmac
import logging
import os
import stat
import struct

from .wire import PROTOCOL_VERSION

log = logging.getLogger("sft_kernels.channel")

NONCE_BYTES = 32
MAX_CLIENT_ID_BYTES = 128
_LABEL = b"sft-channel-auth\x00"


def transcript(nonce: bytes, client_id: str, conn_id: int) -> bytes:
    """The bytes the client MACs: label, version (u8), nonce, conn_id (u32), id length (u16), id."""
    cid = client_id.encode("utf-8")
    return _LABEL + struct.pack("<B", PROTOCOL_VERSION) + nonce + struct.pack("<IH", conn_id, len(cid)) + cid


def compute_mac(secret: bytes, nonce: bytes, client_id: str, conn_id: int) -> bytes:
    """``HMAC-SHA256(secret, transcript(...))``, 32 bytes."""
    return hmac.new(secret, transcript(nonce, client_id, conn_id), hashlib.sha256).digest()


def as_secret(token: bytes | str) -> bytes:
    """A token as secret bytes (str tokens are UTF-8 encoded, exactly as in the tokens file)."""
    if isinstance(token, str):
        token = token.encode("utf-8")
    if not isinstance(token, (bytes, bytearray)) or not token:
        raise ValueError("token must be a non-empty bytes or str")
    return bytes(token)


def check_client_id(client_id: str) -> None:
    """Raise ``ValueError`` unless ``client_id`` is 1..128 UTF-8 bytes without whitespace."""
    if not isinstance(client_id, str):
        raise TypeError(f"client_id must be str, got {type(client_id).__name__}")
    n = len(client_id.encode("utf-8"))
    if not 1 <= n <= MAX_CLIENT_ID_BYTES or any(c.isspace() for c in client_id):
        raise ValueError(f"client_id must be 1..{MAX_CLIENT_ID_BYTES} UTF-8 bytes without whitespace, "
                         f"got {client_id!r}")


def load_tokens(path: str | os.PathLike) -> dict[str, bytes]:
    """Read a tokens file: one ``client_id secret`` per line; ``#`` comments and blank lines allowed.

    Secrets are taken as written (hex or any string) and used as their UTF-8 bytes.  A malformed
    line or a duplicate id raises ``ValueError`` naming the file and line; a file readable by group
    or others only logs a warning.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"tokens file {path!r} does not exist") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("tokens file %s is readable by group/others (mode %o); chmod 600 it", path, mode & 0o777)
    tokens: dict[str, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            parts = text.split()
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected 'client_id secret', got {len(parts)} fields")
            cid, secret = parts
            try:
                check_client_id(cid)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
            if cid in tokens:
                raise ValueError(f"{path}:{lineno}: duplicate client id {cid!r}")
            tokens[cid] = secret.encode("utf-8")
    return tokens
