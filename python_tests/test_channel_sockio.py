"""The fused send/recv + CRC32C path of the channel (csrc/cpu/sockio.cpp) on plain sockets."""
from __future__ import annotations

import ctypes
import os
import socket
import threading
import time

import pytest
import torch

from channel_helpers import TEST_LIMITS, TOKENS, echo, echo_server, raw_handshake, raw_socket, wait_for
from sft_kernels.channel import KIND_USER_MIN, Connection, Limits, Listener, checksum, connect, wire

pytestmark = pytest.mark.skipif(not checksum.SOCKIO, reason="extension built without sockio")

K = KIND_USER_MIN + 4
LIMITS = TEST_LIMITS
SIZES = [0, 1, 4095, (1 << 20) + 3, 5 << 20]


@pytest.fixture
def server():
    with echo_server(LIMITS) as srv:
        yield srv


def _errors_with(srv: Listener, *needles: str) -> bool:
    return wait_for(lambda: any(all(n in e for n in needles) for e in srv.errors))


@pytest.mark.parametrize("n", SIZES)
def test_functions_round_trip_and_crc(n):
    a, b = socket.socketpair()
    try:
        data = os.urandom(n)
        out = bytearray(max(n, 1))
        res = {}

        def reader():
            arr = (ctypes.c_char * len(out)).from_buffer(out)
            got, v = 0, 0
            while got < n:
                r, v = checksum.recv_crc_at(b.fileno(), ctypes.addressof(arr) + got, n - got, v, 64 << 10)
                assert r > 0, r
                got += r
            res["crc"] = v
            del arr

        t = threading.Thread(target=reader)
        t.start()
        keep, addr = checksum._address(data) if n else (None, 0)
        r, v = checksum.send_crc_at(a.fileno(), addr, n, 7 if n == 0 else 0, False, 64 << 10)
        t.join(10)
        assert r == n
        if n:
            assert v == checksum.crc32c(data) == res["crc"] and bytes(out[:n]) == data
        else:
            assert v == 7  # nothing sent, the running CRC is unchanged
    finally:
        a.close()
        b.close()


def test_recv_crc_eof_and_errors():
    a, b = socket.socketpair()
    a.sendall(b"abc")
    a.close()
    buf = (ctypes.c_char * 16)()
    r, v = checksum.recv_crc_at(b.fileno(), ctypes.addressof(buf), 16, 0)
    assert r == 3 and v == checksum.crc32c(b"abc")
    assert checksum.recv_crc_at(b.fileno(), ctypes.addressof(buf), 16, v) == (0, v)  # EOF
    b.close()
    r, _ = checksum.send_crc_at(b.fileno() if b.fileno() >= 0 else 10**6, ctypes.addressof(buf), 16, 0)
    assert r < 0  # a closed descriptor: -EBADF


@pytest.mark.parametrize("n", SIZES)
def test_frames_round_trip_bit_exact_through_fused_path(server, n):
    x = torch.randint(0, 256, (n,), dtype=torch.uint8)
    y = torch.randn(1000)
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        assert c._fused and c._source.fused_recv_crc() is not None
        r = c.request(K, {"x": x, "y": y, "z": x[: n // 2]}, {"n": n}, seq=n)
        assert r.seq == n and r.meta == {"n": n}
        assert torch.equal(r.tensors["x"], x) and torch.equal(r.tensors["y"], y)
        assert torch.equal(r.tensors["z"], x[: n // 2])
        assert r.wire_bytes == c.stats.wire_bytes_sent


@pytest.mark.parametrize("n", [4095, (1 << 20) + 3, 5 << 20])
def test_fused_sender_bytes_equal_encode_frame(n):
    """The fused sender puts exactly the bytes of ``encode_frame`` on the wire (same CRC)."""
    a, b = socket.socketpair()
    try:
        conn = Connection(a, peer=("x", 0), limits=Limits(), link=None, crc=True)
        assert conn._fused
        x = torch.randint(0, 256, (n,), dtype=torch.uint8)
        tensors = {"x": x, "s": torch.ones(3), "w": x[:5000]}
        want = wire.encode_frame(K, tensors, {"m": 1}, seq=3, conn_id=0)
        got = bytearray()

        def reader():
            while len(got) < len(want):
                got.extend(b.recv(1 << 20))

        t = threading.Thread(target=reader)
        t.start()
        conn._send_frame(K, tensors, {"m": 1}, 3, 0)
        t.join(10)
        assert bytes(got) == want
        f = wire.decode_frame(got)
        assert torch.equal(f.tensors["x"], x)
    finally:
        a.close()
        b.close()


def test_corrupted_tensor_byte_is_a_payload_crc_mismatch(server):
    with raw_socket(server.address) as s:
        conn_id, _ = raw_handshake(s)
        b = bytearray(wire.encode_frame(K, {"x": torch.randn(1 << 20)}, conn_id=conn_id))
        b[len(b) // 2] ^= 0x10  # inside the 4 MiB of tensor data
        s.sendall(b)
        assert _errors_with(server, "payload CRC mismatch"), server.errors


# A peer closing mid-tensor on the fused path: test_channel.py::test_server_closes_mid_frame_client_sees_truncation.


def test_server_sees_truncation_mid_tensor(server):
    with raw_socket(server.address) as s:
        conn_id, _ = raw_handshake(s)
        data = wire.encode_frame(K, {"x": torch.randn(1 << 20)}, conn_id=conn_id)
        s.sendall(data[: len(data) // 3])
    assert _errors_with(server, "closed mid-frame", "tensor 'x' data"), server.errors


def test_stall_mid_tensor_with_crc_is_timed_out():
    with Listener(TOKENS, limits=Limits(idle_timeout=0.5)).start(echo) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            frame = wire.encode_frame(K, {"x": torch.zeros(2 << 20)}, conn_id=c.conn_id)
            t0 = time.monotonic()
            c._sock.sendall(frame[: len(frame) // 3])
            assert _errors_with(srv, "timed out in the middle of a frame"), srv.errors
            assert time.monotonic() - t0 < 3


def test_crc_off_and_tls_keep_python_path(server):
    with connect(*server.address, "edge", TOKENS["edge"], crc=False) as c:
        assert not c._fused
        x = torch.randn(300_000)
        assert torch.equal(c.request(K, {"x": x}).tensors["x"], x)
