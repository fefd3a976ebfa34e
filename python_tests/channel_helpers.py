"""Helpers for the channel tests: throwaway certificates, raw-socket handshakes and hand-made frames."""
from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

from sft_kernels.channel import Connection, Limits, Listener, auth, wire
from sft_kernels.channel.checksum import crc32c

TOKENS = {"edge": b"s3cret-token", "edge2": b"another"}


def make_certs(d: Path) -> dict[str, str]:
    """A CA, a server cert for 127.0.0.1/localhost, a client cert, an unrelated second CA and a client
    cert it signed ("stranger"; EC keys)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other_ca"):
        run("req", "-x509", *ec, "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN={ca}")
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who, ca, ext in (("server", "ca", "server"), ("client", "ca", "client"), ("stranger", "other_ca", "client")):
        run("req", *ec, "-keyout", f"{who}.key", "-out", f"{who}.csr", "-subj", f"/CN={who}")
        run("x509", "-req", "-in", f"{who}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{who}.pem", "-days", "2", "-extfile", f"{ext}.ext")
    return {name: str(d / name) for name in
            ("ca.pem", "other_ca.pem", "server.pem", "server.key", "client.pem", "client.key", "stranger.pem",
             "stranger.key")}


def wait_for(cond, timeout: float = 5.0) -> bool:
    """Poll ``cond()`` until true or ``timeout``; return the last value."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())


def raw_socket(address) -> socket.socket:
    s = socket.create_connection(address, timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_frame(sock: socket.socket) -> wire.Frame:
    return wire.read_frame(sock, wire.Limits())[1]


def raw_handshake(sock: socket.socket, client_id: str = "edge", secret: bytes = TOKENS["edge"]) -> tuple[int, bytes]:
    """Authenticate a raw socket; return ``(conn_id, the AUTH frame bytes that were sent)``."""
    sock.sendall(wire.encode_frame(wire.KIND_HELLO, None, {"client_id": client_id}))
    ch = read_frame(sock)
    assert ch.kind == wire.KIND_CHALLENGE, ch
    conn_id = ch.meta["conn_id"]
    mac = auth.compute_mac(secret, bytes.fromhex(ch.meta["nonce"]), client_id, conn_id)
    auth_frame = wire.encode_frame(wire.KIND_AUTH, None, {"mac": mac.hex()}, conn_id=conn_id)
    sock.sendall(auth_frame)
    ok = read_frame(sock)
    assert ok.kind == wire.KIND_OK, ok
    return conn_id, auth_frame


def expect_error(sock: socket.socket) -> str:
    """Read frames until an ERROR arrives; return its message."""
    while True:
        f = read_frame(sock)
        if f.kind == wire.KIND_ERROR:
            return f.meta["message"]


def uvarint(value: int) -> bytes:
    """Unsigned LEB128 of any ``value >= 0``, with no range check (so tests can encode values the
    protocol refuses); written independently of ``wire.encode_uvarint`` to cross-check it."""
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def tensor_entry(name: str | bytes, code: int, shape: list[int], data: bytes = b"", *,
                 dims: bytes | None = None, ndim: int | None = None) -> bytes:
    """One protocol-v3 tensor descriptor plus ``data``: name length (u8), name, dtype code, ndim, dims.

    ``dims`` replaces the varint encoding of ``shape`` with raw bytes and ``ndim`` overrides the
    ndim byte, for malformed descriptors.
    """
    nb = name.encode() if isinstance(name, str) else name
    body = b"".join(uvarint(d) for d in shape) if dims is None else dims
    return bytes([len(nb)]) + nb + bytes([code, len(shape) if ndim is None else ndim]) + body + data


def payload(entries: list[bytes], meta: bytes = b"", *, count: int | None = None) -> bytes:
    """A protocol-v3 payload: meta length and tensor count (varints), meta, the ``entries``."""
    return uvarint(len(meta)) + meta + uvarint(len(entries) if count is None else count) + b"".join(entries)


def frame(body: bytes, *, kind: int = 20, conn_id: int = 0, crc: bool = True, payload_len: int | None = None) -> bytes:
    """A frame with a correct header around a hand-made payload ``body``."""
    plen = len(body) if payload_len is None else payload_len
    head = wire.encode_header(kind, 0, wire.CHFLAG_PAYLOAD_CRC if crc else 0, conn_id, 0, plen)
    return head + body + (struct.pack("<I", crc32c(body)) if crc else b"")


#: Limits of the test servers: short handshake and idle timeouts.
TEST_LIMITS = Limits(handshake_timeout=3.0, idle_timeout=10.0)


def echo(conn: Connection) -> None:
    """Reply to each frame with the same tensors and meta (and kind/seq/flags); meta ``fail`` -> ERROR frame."""
    while True:
        f = conn.recv()
        if f.meta.get("fail"):
            conn.send_error(f"refusing step {f.seq}", seq=f.seq)
            continue
        conn.send(f.kind, f.tensors, f.meta, seq=f.seq, flags=f.flags)


@contextlib.contextmanager
def echo_server(limits: Limits = TEST_LIMITS):
    """A ``Listener`` with the test tokens serving :func:`echo`; shut down on exit."""
    srv = Listener(TOKENS, limits=limits).start(echo)
    try:
        yield srv
    finally:
        srv.shutdown()


@contextlib.contextmanager
def raw_server(respond):
    """A TCP server on 127.0.0.1 that calls ``respond(sock)`` for each connection (one thread each).

    Yields the bound ``(host, port)``; ``respond`` plays a peer that is not (or not quite) an sft
    server.  Each connection is closed after ``respond`` returns.
    """
    ls = socket.create_server(("127.0.0.1", 0))
    ls.settimeout(0.1)
    stop = threading.Event()

    def serve_one(s: socket.socket) -> None:
        with s:
            s.settimeout(5)
            try:
                respond(s)
            except OSError:
                pass

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                s, _ = ls.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=serve_one, args=(s,), daemon=True).start()

    t = threading.Thread(target=accept_loop, daemon=True)
    t.start()
    try:
        yield ls.getsockname()[:2]
    finally:
        stop.set()
        t.join(2)
        ls.close()
