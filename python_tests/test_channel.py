"""Tests of sft_kernels.channel over real sockets on 127.0.0.1 with real server threads.

Every bad-input test checks two things: the error is clear (names the field/value), and the same
server then still serves a well-behaved client.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import ssl
import threading
import time

import pytest
import torch

from channel_helpers import (
    TEST_LIMITS, TOKENS, echo, echo_server, expect_error, frame, make_certs, payload, raw_handshake, raw_server,
    raw_socket, read_frame, tensor_entry, uvarint, wait_for,
)
from sft_kernels.channel import (
    KIND_USER_MIN, AuthError, ChannelStats, Connection, Frame, HandshakeClosed, Limits, LinkLimiter, LinkRefused,
    Listener, PeerClosed, ProtocolError, RemoteError, ServerBusy, TLSConfig, TruncatedFrame, connect, load_tokens,
)
from sft_kernels.channel import wire

K = KIND_USER_MIN + 4
LIMITS = TEST_LIMITS


@pytest.fixture
def server():
    with echo_server(LIMITS) as srv:
        yield srv


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def assert_serves(srv: Listener, **kw) -> None:
    """A well-behaved client still gets a bit-exact echo."""
    x = torch.randn(5, 7)
    with connect(*srv.address, "edge", TOKENS["edge"], **kw) as c:
        r = c.request(K, {"x": x}, {"ok": True}, seq=11)
    assert r.seq == 11 and r.meta == {"ok": True} and torch.equal(r.tensors["x"], x)


def assert_error_logged(srv: Listener, *needles: str) -> None:
    assert wait_for(lambda: any(all(n in e for n in needles) for e in srv.errors)), srv.errors


# ---------------------------------------------------------------- round trips

ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
              torch.int16, torch.int32, torch.int64, torch.bool]


def _sample(dtype: torch.dtype, shape) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, dtype=dtype)


def test_round_trip_every_dtype_bit_exact(server):
    tensors = {f"t_{str(d).split('.')[-1]}": _sample(d, (3, 4)) for d in ALL_DTYPES}
    tensors["nan_inf"] = torch.tensor([float("nan"), float("inf"), -0.0])  # carried bit-exactly, not judged
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        r = c.request(K, tensors)
    assert list(r.tensors) == list(tensors)
    for name, t in tensors.items():
        got = r.tensors[name]
        assert got.dtype == t.dtype and got.shape == t.shape, name
        assert torch.equal(got.view(torch.uint8) if t.dtype != torch.bool else got, t.view(torch.uint8)
                           if t.dtype != torch.bool else t), name


def test_round_trip_special_shapes_and_meta(server):
    base = torch.randn(6, 8)
    tensors = {
        "scalar": torch.tensor(3.25),
        "scalar_bf16": torch.tensor(-1.5, dtype=torch.bfloat16),
        "empty": torch.empty(0),
        "empty2d": torch.empty(3, 0, dtype=torch.int32),
        "transposed": base.T,
        "strided": base[::2, 1::3],
        "expanded": torch.arange(4.0).expand(3, 4),
        "bf16_nc": torch.randn(4, 6, dtype=torch.bfloat16).T,
        "big": torch.randn(300, 257),  # above the coalescing threshold: sent from storage
        "grad": torch.randn(3, requires_grad=True),
        "ünïcode-名前": torch.ones(2, dtype=torch.int8),
    }
    meta = {"step": 3, "lr": 1e-4, "names": ["a", "b"], "nested": {"x": None, "y": True}, "s": "é"}
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        r = c.request(K, tensors, meta, seq=2**64 - 1)
        r2 = c.request(K)  # no tensors, no meta
    assert r.meta == meta and r.seq == 2**64 - 1
    for name, t in tensors.items():
        assert r.tensors[name].shape == t.shape and torch.equal(r.tensors[name], t.detach()), name
        assert r.tensors[name].is_contiguous()
    assert r2.tensors == {} and r2.meta == {}


def test_many_tensors_and_flags(server):
    tensors = {f"t{i}": torch.full((i % 5,), float(i)) for i in range(LIMITS.max_tensors)}
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        c.send(K + 1, tensors, seq=5, flags=0xBEEF)
        r = c.recv(timeout=5)
    assert (r.kind, r.seq, r.flags) == (K + 1, 5, 0xBEEF)
    assert all(torch.equal(r.tensors[k], v) for k, v in tensors.items())


def test_remote_error_and_connection_stays_usable(server):
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        with pytest.raises(RemoteError, match="refusing step 4"):
            c.request(K, meta={"fail": True}, seq=4)
        assert c.request(K, {"a": torch.ones(2)}).tensors["a"].sum() == 2
        assert c.ping() > 0


def test_send_argument_errors(server):
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        with pytest.raises(ValueError, match="kind must be in"):
            c.send(3)
        with pytest.raises(ValueError, match="dtype"):
            c.send(K, {"z": torch.zeros(2, dtype=torch.complex64)})
        with pytest.raises(ValueError, match="JSON"):
            c.send(K, meta={"x": float("nan")})
        with pytest.raises(TypeError, match="meta keys"):
            c.send(K, meta={1: 2})
        with pytest.raises(ValueError, match="name"):
            c.send(K, {"n" * 300: torch.zeros(1)})
        with pytest.raises(ValueError, match="max_tensors"):
            c.send(K, {f"t{i}": torch.zeros(1) for i in range(LIMITS.max_tensors + 1)})
        with pytest.raises(ValueError, match="max_ndim"):
            c.send(K, {"t": torch.zeros([1] * 9)})
        assert c.request(K, {"a": torch.ones(1)}).tensors["a"].item() == 1  # nothing was sent


# ---------------------------------------------------------------- counters

def test_counters_exact():
    x = torch.randn(10, 3)                       # 120 bytes
    y = torch.arange(5, dtype=torch.int64)       # 40 bytes
    meta = {"step": 7}
    meta_len = len(b'{"step":7}')
    # per tensor: name length, name, dtype, ndim, one byte per dim (all < 128), data
    tensor_part = (1 + 1 + 2 + 2 + 120) + (1 + 1 + 2 + 1 + 40)
    payload_len = 1 + meta_len + 1 + tensor_part
    want_wire = wire.HEADER_SIZE + payload_len + 4  # CRC trailer on plain TCP
    with Listener(TOKENS, limits=LIMITS).start(echo) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            assert c.send(K, {"x": x, "y": y}, meta) == want_wire
            r = c.recv()
            assert r.wire_bytes == want_wire and r.payload_bytes == 160 + meta_len
            c.request(K, {"x": x, "y": y}, meta)
            s = c.stats
            assert isinstance(s, ChannelStats)
            assert s.wire_bytes_sent == s.wire_bytes_received == 2 * want_wire
            assert s.payload_bytes_sent == s.payload_bytes_received == 2 * (160 + meta_len)
            assert s.frames_sent == s.frames_received == 2
            assert len(s.rtt_s) == 1 and s.last_rtt_s > 0 and s.summary()["requests"] == 1
            assert s.handshake_wire_bytes_sent > 0
            # an empty frame: header + meta length + tensor count (one byte each) + CRC
            assert c.send(K) == wire.HEADER_SIZE + 2 + 4


# ---------------------------------------------------------------- bad input, before authentication

def test_wrong_magic(server):
    with raw_socket(server.address) as s:
        s.sendall(b"XXXX" + bytes(32))
        assert "bad magic" in expect_error(s)
    assert_error_logged(server, "bad magic b'XXXX'")
    assert_serves(server)


def test_wrong_version(server):
    head = bytearray(wire.encode_header(wire.KIND_HELLO, 0, 0, 0, 0, 8))
    head[4] = 9
    with raw_socket(server.address) as s:
        s.sendall(bytes(head) + bytes(8))
        assert "protocol version 9" in expect_error(s)
    assert_error_logged(server, "protocol version 9 is not supported")
    assert_serves(server)


def test_first_frame_not_hello(server):
    with raw_socket(server.address) as s:
        s.sendall(wire.encode_frame(K, meta={"step": 1}))
        assert expect_error(s) == "authentication failed"
    assert_error_logged(server, "expected HELLO")
    with raw_socket(server.address) as s:  # tensors before authentication: refused by the handshake limits
        s.sendall(wire.encode_frame(K, {"x": torch.ones(2)}))
        assert "tensor count 1 exceeds max_tensors 0" in expect_error(s)
    assert_serves(server)


@pytest.mark.parametrize("client_id, token, logged", [
    ("stranger", TOKENS["edge"], "unknown client id 'stranger'"),
    ("edge", b"wrong", "wrong token"),
    ("edge", TOKENS["edge2"], "wrong token"),
])
def test_unknown_id_and_wrong_token_look_the_same(server, client_id, token, logged):
    with pytest.raises(AuthError, match="^authentication failed$"):
        connect(*server.address, client_id, token, timeout=5)
    assert_error_logged(server, logged)
    assert server.refused >= 1
    assert_serves(server)


def test_replayed_auth_is_refused(server):
    with raw_socket(server.address) as s:
        _, recorded = raw_handshake(s)
    with raw_socket(server.address) as s:
        s.sendall(wire.encode_frame(wire.KIND_HELLO, None, {"client_id": "edge"}))
        assert read_frame(s).kind == wire.KIND_CHALLENGE
        s.sendall(recorded)
        assert expect_error(s) == "authentication failed"
    assert_error_logged(server, "wrong token")
    assert_serves(server)


def test_handshake_frame_too_big(server):
    with raw_socket(server.address) as s:
        s.sendall(wire.encode_header(wire.KIND_HELLO, 0, 0, 0, 0, 10**6))
        assert "exceeds max_frame_bytes 65536" in expect_error(s)
    assert_serves(server)


def test_silent_client_is_timed_out():
    with Listener(TOKENS, limits=Limits(handshake_timeout=0.5)).start(echo) as srv:
        with raw_socket(srv.address) as s:
            t0 = time.monotonic()
            s.settimeout(5)
            assert s.recv(1) == b""  # the server dropped us
            elapsed = time.monotonic() - t0
        assert 0.4 <= elapsed < 4, elapsed
        assert_error_logged(srv, "handshake not completed within 0.5 s")
        assert_serves(srv)


def test_slow_drip_client_is_timed_out():
    """One byte at a time still has to finish within the handshake deadline."""
    with Listener(TOKENS, limits=Limits(handshake_timeout=0.5)).start(echo) as srv:
        hello = wire.encode_frame(wire.KIND_HELLO, None, {"client_id": "edge"})
        with raw_socket(srv.address) as s:
            t0 = time.monotonic()
            with pytest.raises(OSError):
                for b in hello:
                    s.sendall(bytes([b]))
                    time.sleep(0.1)
                s.settimeout(3)
                if s.recv(1) == b"":
                    raise ConnectionError("closed")
            assert time.monotonic() - t0 < 3
        assert_error_logged(srv, "handshake not completed")
        assert_serves(srv)


def test_many_connections_opened_and_dropped(server):
    assert_serves(server)
    before = threading.active_count()
    for i in range(200):
        s = socket.create_connection(server.address)
        if i % 3 == 1:
            s.sendall(wire.encode_frame(wire.KIND_HELLO, None, {"client_id": "edge"})[:20])
        s.close()
    assert wait_for(lambda: server.active_connections == 0, 20), server.active_connections
    assert wait_for(lambda: threading.active_count() <= before + 2, 5), (before, threading.active_count())
    assert_serves(server)


def test_max_connections():
    with Listener(TOKENS, limits=Limits(max_connections=1, handshake_timeout=3)).start(echo) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]):
            with pytest.raises(ServerBusy):
                connect(*srv.address, "edge", TOKENS["edge"], timeout=3)
            assert_error_logged(srv, "max_connections 1 reached")
        assert wait_for(lambda: srv.active_connections == 0)
        assert_serves(srv)


# ---------------------------------------------------------------- bad input, after authentication

def _authed_bad(server, data: bytes, *needles: str, expect_reply: bool = True) -> None:
    with raw_socket(server.address) as s:
        conn_id, _ = raw_handshake(s)
        s.sendall(data(conn_id) if callable(data) else data)
        if expect_reply:
            msg = expect_error(s)
            assert all(n in msg for n in needles), msg
    assert_error_logged(server, *needles)
    assert_serves(server)


def test_oversized_length_field(server):
    _authed_bad(server, lambda cid: wire.encode_header(K, 0, 0, cid, 0, 5_000_000_000),
                "payload length 5000000000 exceeds max_frame_bytes 1073741824")


def test_header_crc_mismatch(server):
    def bad(cid):
        b = bytearray(wire.encode_frame(K, {"x": torch.ones(3)}, conn_id=cid))
        b[32] ^= 0xFF  # first byte of the header CRC
        return bytes(b)
    _authed_bad(server, bad, "header CRC mismatch")


def test_payload_crc_mismatch(server):
    def bad(cid):
        b = bytearray(wire.encode_frame(K, {"x": torch.ones(3)}, conn_id=cid))
        b[-6] ^= 0x01  # inside the tensor data
        return bytes(b)
    _authed_bad(server, bad, "payload CRC mismatch")


def test_wrong_connection_id(server):
    _authed_bad(server, lambda cid: wire.encode_frame(K, conn_id=cid + 1000), "connection id")


def test_unknown_dtype_code(server):
    body = payload([tensor_entry("x", 99, [2], bytes(8))])
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "unknown dtype code 99", "'x'")


def test_huge_dims_overflow(server):
    body = payload([tensor_entry("x", 1, [2**62, 2**62])])
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "overflows int64")


def test_huge_dims_exceeding_frame(server):
    n = 1 << 40
    body = payload([tensor_entry("x", 1, [n])])
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), f"byte length {4 * n} (numel {n} x itemsize 4",
                "exceeds the")


def test_data_shorter_than_shape(server):
    """The byte length is derived from the shape: 3 float32 need 12 bytes, the payload holds 8."""
    body = payload([tensor_entry("x", 1, [3], bytes(8))])
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "byte length 12", "exceeds the 8 bytes left")


def test_too_many_tensors_and_ndim(server):
    body = uvarint(0) + uvarint(1000)
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "tensor count 1000 exceeds max_tensors 64")
    body = payload([tensor_entry("x", 1, [1] * 9, bytes(4))])
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "ndim 9 exceeds max_ndim 8")


# Malformed descriptor varints and name lengths (protocol v3), each over a real socket.
VARINT_CASES = [
    pytest.param(payload([tensor_entry("x", 1, [], dims=b"\x82\x00", ndim=1)]),
                 ("tensor 'x' dim 0 varint is overlong",), id="overlong-dim"),
    pytest.param(payload([tensor_entry("x", 6, [], dims=b"\x80\x80\x00", ndim=1)]),
                 ("dim 0 varint is overlong (3 bytes",), id="overlong-zero"),
    pytest.param(payload([tensor_entry("x", 6, [0, 2**63])]),
                 ("tensor 'x' dim 1 is 9223372036854775808, above the varint maximum 2**63-1",), id="above-2**63-1"),
    pytest.param(payload([tensor_entry("x", 6, [], dims=b"\xff" * 10 + b"\x01", ndim=1)]),
                 ("tensor 'x' dim 0 varint is not terminated within 10 bytes",), id="unterminated"),
    pytest.param(payload([tensor_entry("x", 6, [], dims=b"\x05\x80", ndim=2)]),
                 ("tensor 'x' dim 1 is truncated", "after 1 of its bytes"), id="truncated-mid-varint"),
    pytest.param(payload([tensor_entry("x", 6, [], dims=b"\x05", ndim=3)]),
                 ("tensor 'x' dim 1 is truncated", "before its first byte"), id="truncated-before-varint"),
    pytest.param(payload([tensor_entry(b"", 1, [1], bytes(4))]),
                 ("tensor 0 name length 0 is outside [1, 255]",), id="name-length-0"),
    pytest.param(b"\x80\x00" + uvarint(0), ("meta length varint is overlong",), id="overlong-meta-length"),
    pytest.param(uvarint(0) + b"\x81", ("tensor count is truncated",), id="truncated-count"),
    pytest.param(uvarint(2**63 - 1) + uvarint(0), ("meta length 9223372036854775807 exceeds the",),
                 id="meta-length-max"),
]


@pytest.mark.parametrize("body, needles", VARINT_CASES)
def test_malformed_varints_and_names(server, body, needles):
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), *needles)


def test_varint_boundaries_decode(server):
    """Dims at the varint size boundaries, up to 2**63-1 (legal with a zero dim beside it)."""
    values = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 2**32, 2**56 - 1, 2**63 - 1]
    for v in values:
        assert wire.encode_uvarint(v) == uvarint(v)
        assert len(uvarint(v)) == max(1, math.ceil(v.bit_length() / 7))
    with pytest.raises(ValueError, match=r"\[0, 2\*\*63-1\]"):
        wire.encode_uvarint(2**63)
    tensors = {f"t{i}": torch.empty(0, v, dtype=torch.uint8) for i, v in enumerate(values)}
    tensors["data"] = torch.arange(200, dtype=torch.int16).reshape(100, 2)
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        r = c.request(K, tensors)
    assert {k: tuple(t.shape) for k, t in r.tensors.items()} == {k: tuple(t.shape) for k, t in tensors.items()}
    assert torch.equal(r.tensors["data"], tensors["data"])


def test_name_length_255(server):
    name = "n" * wire.MAX_NAME_BYTES
    assert wire.MAX_NAME_BYTES == 255
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        assert c.request(K, {name: torch.ones(2)}).tensors[name].sum() == 2
        with pytest.raises(ValueError, match=r"must be 1\.\.255 UTF-8 bytes, got 256"):
            c.send(K, {"n" * 256: torch.ones(1)})


def test_small_training_frame_overhead_under_10_percent(server):
    """A small training step's frame: wire bytes (header + payload + CRC) within 10% of its tensor data."""
    tensors = {
        "h.codes": torch.randint(-128, 127, (800, 4), dtype=torch.int8),
        "h.scales": torch.rand(13, 4),
        "lengths": torch.full((32,), 25, dtype=torch.int32),
        "seq_len": torch.tensor([25], dtype=torch.int32),
        "labels": torch.randint(0, 2, (32,), dtype=torch.int64),
    }
    meta = {"b": {"h": [800, 4, 2, 1]}}
    data_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert data_bytes == 3200 + 208 + 128 + 4 + 256
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        wire_bytes = c.send(K, tensors, meta)
        r = c.recv()
    assert wire_bytes == r.wire_bytes == len(wire.encode_frame(K, tensors, meta, crc=True))
    ratio = wire_bytes / data_bytes
    print(f"small training frame: {wire_bytes} wire bytes for {data_bytes} tensor bytes, ratio {ratio:.4f}")
    assert ratio <= 1.10, (wire_bytes, data_bytes)


def test_bad_meta_and_trailing_payload(server):
    body = payload([], meta=b"{not json")
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "meta is not valid UTF-8 JSON")
    body = payload([], meta=b"[1, 2]")
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "meta must be a JSON object")
    body = payload([tensor_entry("x", 1, [1], bytes(4))]) + b"junk"
    _authed_bad(server, lambda cid: frame(body, conn_id=cid), "4 bytes after the last tensor")


def test_truncated_frame_in_header(server):
    _authed_bad(server, lambda cid: wire.encode_frame(K, {"x": torch.ones(3)}, conn_id=cid)[:20],
                "closed mid-frame", "header", expect_reply=False)


def test_client_disconnects_mid_tensor_data(server):
    def cut(cid):
        return wire.encode_frame(K, {"x": torch.randn(1000)}, conn_id=cid)[:2000]
    _authed_bad(server, cut, "closed mid-frame", "tensor 'x' data", expect_reply=False)


@pytest.mark.parametrize("numel,match", [(100, "closed mid-frame"), (1 << 20, "tensor 'x' data")],
                         ids=["small-python-path", "1MB-fused-crc-path"])
def test_server_closes_mid_frame_client_sees_truncation(numel, match):
    def half(conn: Connection) -> None:
        conn.recv()
        data = wire.encode_frame(K, {"x": torch.randn(numel)}, conn_id=conn.conn_id)
        conn._sock.sendall(data[: len(data) // 2])
        conn.close()

    with Listener(TOKENS, limits=LIMITS).start(half) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            with pytest.raises(TruncatedFrame, match=match):
                c.request(K)
            assert c.closed


def test_client_gets_protocol_error_for_garbage_reply():
    def garbage(conn: Connection) -> None:
        conn.recv()
        conn._sock.sendall(b"GARBAGE!" * 10)
        time.sleep(0.5)

    with Listener(TOKENS, limits=LIMITS).start(garbage) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            with pytest.raises(ProtocolError, match="bad magic"):
                c.request(K)


def test_idle_timeout_drops_connection():
    with Listener(TOKENS, limits=Limits(idle_timeout=0.3)).start(echo) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            time.sleep(0.8)
            with pytest.raises((ConnectionError, ProtocolError, OSError)):
                c.request(K)
        assert_error_logged(srv, "timed out")
        assert_serves(srv)


def test_stall_mid_tensor_is_timed_out():
    """A peer that stops in the middle of a big tensor (inside a MSG_WAITALL read) is dropped in time."""
    with Listener(TOKENS, limits=Limits(idle_timeout=0.5)).start(echo) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"], crc=False) as c:
            frame = wire.encode_frame(K, {"x": torch.zeros(2 << 20)}, conn_id=c.conn_id, crc=False)
            t0 = time.monotonic()
            c._sock.sendall(frame[: len(frame) // 3])  # header, descriptors and a third of the data
            assert_error_logged(srv, "timed out in the middle of a frame")
            assert time.monotonic() - t0 < 3
        assert_serves(srv)


def test_recv_timeout_keeps_connection_usable(server):
    with connect(*server.address, "edge", TOKENS["edge"]) as c:
        with pytest.raises(TimeoutError):
            c.recv(timeout=0.1)
        assert not c.closed
        assert c.request(K, {"a": torch.ones(1)}).tensors["a"].item() == 1


def test_handler_exception_is_logged_and_server_survives(caplog):
    def boom(conn: Connection) -> None:
        f = conn.recv()
        if f.meta.get("boom"):
            raise RuntimeError("handler bug")
        echo_once = conn.send(f.kind, f.tensors, f.meta, seq=f.seq)
        assert echo_once
        echo(conn)

    with caplog.at_level(logging.ERROR, logger="sft_kernels.channel"):
        with Listener(TOKENS, limits=LIMITS).start(boom) as srv:
            with connect(*srv.address, "edge", TOKENS["edge"]) as c:
                c.send(K, meta={"boom": True})
                with pytest.raises((PeerClosed, ConnectionError)):
                    c.recv(timeout=5)
            assert_error_logged(srv, "handler raised RuntimeError: handler bug")
            assert_serves(srv)
    assert any("handler failed" in r.message for r in caplog.records)


# ---------------------------------------------------------------- large-frame arithmetic

def test_frames_over_2gib_are_representable_with_a_raised_limit():
    big = 3 << 30
    head = wire.encode_header(K, 0, 0, 1, 0, big)
    with pytest.raises(ProtocolError, match=f"payload length {big} exceeds max_frame_bytes"):
        wire.decode_header(head, Limits())
    h = wire.decode_header(head, Limits(max_frame_bytes=1 << 33))
    assert h.payload_len == big
    # a 2.5 GiB tensor descriptor passes the shape arithmetic and is refused only for not fitting
    n = (5 << 29) // 4
    body = payload([tensor_entry("x", 1, [n])])
    data = frame(body, crc=False, payload_len=len(body) + 4 * n - 8)
    with pytest.raises(ProtocolError, match="exceeds the .* bytes left"):
        wire.decode_frame(data, Limits(max_frame_bytes=1 << 33))


# ---------------------------------------------------------------- TLS

def test_tls_round_trip(certs):
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"])
    with Listener(TOKENS, limits=LIMITS, tls=tls_srv).start(echo) as srv:
        tls_cli = TLSConfig(ca=certs["ca.pem"])
        with connect(*srv.address, "edge", TOKENS["edge"], tls=tls_cli) as c:
            assert c.crc is False  # TLS authenticates records: no payload CRC by default
            x = torch.randn(64, 33, dtype=torch.bfloat16)
            r = c.request(K, {"x": x}, {"tls": 1})
            assert torch.equal(r.tensors["x"], x) and r.meta == {"tls": 1}
            assert c.send(K) == wire.HEADER_SIZE + 2
            c.recv()
        with connect("localhost", srv.address[1], "edge", TOKENS["edge"], tls=tls_cli, crc=True) as c:
            assert c.request(K, {"x": torch.ones(3)}).tensors["x"].sum() == 3
        # plain TCP client against a TLS server: refused (see test_plain_client_against_tls_server)
        with pytest.raises(LinkRefused, match="speaks TLS"):
            connect(*srv.address, "edge", TOKENS["edge"], timeout=3)
        assert_error_logged(srv, "plain (non-TLS) sft client")
        assert_serves(srv, tls=tls_cli)


def test_mutual_tls(certs):
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"], ca=certs["ca.pem"])
    with Listener(TOKENS, limits=LIMITS, tls=tls_srv).start(echo) as srv:
        with pytest.raises(LinkRefused, match="mutual TLS"):
            connect(*srv.address, "edge", TOKENS["edge"], tls=TLSConfig(ca=certs["ca.pem"]), timeout=5)
        assert_error_logged(srv, "during handshake")
        good = TLSConfig(cert=certs["client.pem"], key=certs["client.key"], ca=certs["ca.pem"])
        assert_serves(srv, tls=good)


def test_tls_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="TLSConfig.cert"):
        TLSConfig(cert=str(tmp_path / "nope.pem"), key=str(tmp_path / "k")).server_context()
    with pytest.raises(ValueError, match="required on the server"):
        TLSConfig().server_context()
    with pytest.raises(FileNotFoundError, match="TLSConfig.ca"):
        TLSConfig(ca=str(tmp_path / "ca.pem")).client_context()


# ---------------------------------------------------------------- why connect() failed

@contextlib.contextmanager
def fails_fast(exc_type, *needles: str, within: float = 3.0):
    """Expect ``exc_type`` whose message holds every needle, raised within ``within`` seconds."""
    t0 = time.monotonic()
    with pytest.raises(exc_type) as info:
        yield info
    elapsed = time.monotonic() - t0
    assert elapsed < within, f"took {elapsed:.2f} s"
    for n in needles:
        assert n in str(info.value), (n, str(info.value))


def test_nothing_listening_names_host_and_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with fails_fast(ConnectionRefusedError, f"nothing listens on 127.0.0.1:{port}") as info:
        connect("127.0.0.1", port, "edge", TOKENS["edge"], timeout=5)
    assert isinstance(info.value, OSError) and not isinstance(info.value, LinkRefused)


def test_untrusted_server_certificate(certs):
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"])
    with Listener(TOKENS, limits=LIMITS, tls=tls_srv).start(echo) as srv:
        with fails_fast(LinkRefused, "TLS certificate of the server", "not accepted", "--tls-ca") as info:
            connect(*srv.address, "edge", TOKENS["edge"], tls=TLSConfig(ca=certs["other_ca.pem"]), timeout=5)
        assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
        assert not isinstance(info.value, (OSError, ProtocolError))
        with fails_fast(LinkRefused, "--server-hostname", "example.com"):  # wrong host name
            connect(*srv.address, "edge", TOKENS["edge"],
                    tls=TLSConfig(ca=certs["ca.pem"], server_hostname="example.com"), timeout=5)
        assert_serves(srv, tls=TLSConfig(ca=certs["ca.pem"]))


@pytest.mark.parametrize("client_cert", [None, "stranger"], ids=["no-client-cert", "cert-of-another-ca"])
@pytest.mark.parametrize("tls13", [True, False], ids=["tls1.3", "tls1.2"])
def test_mutual_tls_without_valid_client_cert(certs, monkeypatch, client_cert, tls13):
    """Under TLS 1.3 the refusal arrives on the first read after the TLS handshake, under 1.2 during it."""
    if not tls13:
        plain_context = TLSConfig.client_context

        def tls12_context(self):
            ctx = plain_context(self)
            ctx.maximum_version = ssl.TLSVersion.TLSv1_2
            return ctx
        monkeypatch.setattr(TLSConfig, "client_context", tls12_context)
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"], ca=certs["ca.pem"])
    cli = TLSConfig(ca=certs["ca.pem"])
    if client_cert:
        cli = TLSConfig(ca=certs["ca.pem"], cert=certs[f"{client_cert}.pem"], key=certs[f"{client_cert}.key"])
    with Listener(TOKENS, limits=LIMITS, tls=tls_srv).start(echo) as srv:
        for _ in range(3):  # the alert must arrive every time, not just usually
            with fails_fast(LinkRefused, "requires a client certificate (mutual TLS)", "--tls-cert", "--tls-key"):
                connect(*srv.address, "edge", TOKENS["edge"], tls=cli, timeout=5)
        good = TLSConfig(cert=certs["client.pem"], key=certs["client.key"], ca=certs["ca.pem"])
        assert_serves(srv, tls=good)


def test_tls_client_against_plain_server(certs):
    with echo_server(LIMITS) as srv:
        for _ in range(3):
            with fails_fast(LinkRefused, "does not speak TLS", "drop --tls-"):
                connect(*srv.address, "edge", TOKENS["edge"], tls=TLSConfig(ca=certs["ca.pem"]), timeout=5)
        assert_serves(srv)


def test_plain_client_against_tls_server(certs):
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"])
    with Listener(TOKENS, limits=LIMITS, tls=tls_srv).start(echo) as srv:
        for _ in range(3):
            with fails_fast(LinkRefused, f"the server at {srv.address[0]}:{srv.address[1]} speaks TLS",
                            "--tls-ca"):
                connect(*srv.address, "edge", TOKENS["edge"], timeout=5)
        assert_error_logged(srv, "plain (non-TLS) sft client; this server requires TLS")
        assert_serves(srv, tls=TLSConfig(ca=certs["ca.pem"]))


def test_silent_close_after_hello_stays_retryable():
    """A server that closes without a word looks busy or restarting: a retryable PeerClosed with a hint."""
    def close_after_hello(s: socket.socket) -> None:
        s.recv(4096)

    with raw_server(close_after_hello) as addr:
        with fails_fast(HandshakeClosed, "closed the connection during the handshake", "busy or restarting",
                        "--tls-ca") as info:
            connect(*addr, "edge", TOKENS["edge"], timeout=5)
    assert isinstance(info.value, PeerClosed) and isinstance(info.value, ConnectionError)


def test_http_server_is_not_an_sft_server():
    def http(s: socket.socket) -> None:
        s.recv(4096)
        s.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

    with raw_server(http) as addr:
        with fails_fast(LinkRefused, f"the peer at {addr[0]}:{addr[1]} is not an sft server",
                        "bad magic b'HTTP'"):
            connect(*addr, "edge", TOKENS["edge"], timeout=5)


def test_other_protocol_version_is_named():
    def old_server(s: socket.socket) -> None:
        s.recv(4096)
        reply = bytearray(wire.encode_frame(wire.KIND_ERROR, None, {"message": "protocol version 3 is not supported"}))
        reply[4] = 2  # a version-2 peer's header
        s.sendall(bytes(reply))

    with raw_server(old_server) as addr:
        with fails_fast(LinkRefused, "speaks sft protocol version 2",
                        f"this client speaks version {wire.PROTOCOL_VERSION}"):
            connect(*addr, "edge", TOKENS["edge"], timeout=5)


# ---------------------------------------------------------------- ERROR frames: retryable, retry_after

def test_error_frames_carry_retryable_and_retry_after():
    def errors(conn: Connection) -> None:
        while True:
            f = conn.recv()
            how = f.meta["how"]
            if how == "plain":
                conn.send_error("no")
            elif how == "retry":
                conn.send_error("later", seq=f.seq, retryable=True, retry_after=2.5)
            elif how == "retry-no-wait":
                conn.send_error("again", retryable=True)
            else:  # a peer sending malformed fields: ignored, never an exception
                conn._send_frame(wire.KIND_ERROR, None, {"message": "odd", **f.meta["fields"]}, f.seq, 0)

    with Listener(TOKENS, limits=LIMITS).start(errors) as srv:
        with connect(*srv.address, "edge", TOKENS["edge"]) as c:
            with pytest.raises(RemoteError, match="^no$") as info:
                c.request(K, meta={"how": "plain"})
            assert info.value.retryable is False and info.value.retry_after is None
            with pytest.raises(RemoteError, match="^later$") as info:
                c.request(K, meta={"how": "retry"}, seq=9)
            assert info.value.retryable is True and info.value.retry_after == 2.5
            with pytest.raises(RemoteError) as info:
                c.request(K, meta={"how": "retry-no-wait"})
            assert info.value.retryable is True and info.value.retry_after is None
            for fields in ({"retryable": "yes", "retry_after": -1}, {"retryable": 1, "retry_after": 3601},
                           {"retryable": None, "retry_after": "soon"}, {"retry_after": True},
                           {"retry_after": [1]}, {"message": 42}):
                with pytest.raises(RemoteError) as info:
                    c.request(K, meta={"how": "odd", "fields": fields})
                assert info.value.retryable is False and info.value.retry_after is None, fields
            # JSON's 1e400 parses to infinity: not a usable wait either
            assert RemoteError.from_meta({"message": "x", "retryable": True, "retry_after": 1e400}).retry_after is None
            with pytest.raises(ValueError, match=r"retry_after must be a finite number of seconds in \[0, 3600\]"):
                c.send_error("x", retry_after=float("nan"))
            with pytest.raises(ValueError, match="retry_after"):
                c.send_error("x", retry_after=3600.5)
            with pytest.raises(ValueError, match="retry_after"):
                c.send_error("x", retry_after=-0.1)


# ---------------------------------------------------------------- connection pool: eviction, busy

def _idle_socket(address, index: int) -> socket.socket:
    """A TCP connection from 127.0.0.(2 + index % 250) that never says anything."""
    s = socket.socket()
    s.bind((f"127.0.0.{2 + index % 250}", 0))
    s.settimeout(5)
    s.connect(address)
    return s


def test_idle_handshakes_are_evicted_for_a_newcomer():
    with Listener(TOKENS, limits=Limits(max_connections=2, handshake_timeout=30)).start(echo) as srv:
        idle = [_idle_socket(srv.address, i) for i in range(2)]
        assert wait_for(lambda: srv.active_connections == 2)
        t0 = time.monotonic()
        assert_serves(srv)  # takes the slot of the oldest idle socket at once, not after 30 s
        assert time.monotonic() - t0 < 3
        assert srv.evicted >= 1
        idle[0].settimeout(3)
        assert idle[0].recv(1) == b""  # the evicted socket was shut down
        assert_error_logged(srv, "evicted connection", "in its handshake", "all 2 connection slots")
        assert not any("refused" in e for e in srv.errors)  # eviction is recorded once, not as a failure too
        for s in idle:
            s.close()
        assert wait_for(lambda: srv.active_connections == 0)


def test_flood_of_idle_sockets_does_not_starve_a_client():
    """3x the pool of idle sockets plus a new one every 50 ms; a real client still gets its round trips."""
    pool = 8
    with Listener(TOKENS, limits=Limits(max_connections=pool, idle_timeout=10)).start(echo) as srv:
        idle = [_idle_socket(srv.address, i) for i in range(3 * pool)]
        stop = threading.Event()
        opened = []

        def keep_flooding() -> None:
            i = len(idle)
            while not stop.is_set():
                try:
                    opened.append(_idle_socket(srv.address, i))
                except OSError:
                    pass
                i += 1
                stop.wait(0.05)

        flooder = threading.Thread(target=keep_flooding, daemon=True)
        flooder.start()
        try:
            assert wait_for(lambda: len(opened) >= 3)
            x = torch.randn(16, 8)
            # Sessions of 20 round trips, 10 ms apart, so that the flood goes on all through each
            # session's handshake and requests; at least 5 sessions and 1.5 s of flood.
            t_start = time.monotonic()
            sessions = 0
            while sessions < 5 or time.monotonic() - t_start < 1.5:
                t0 = time.monotonic()
                with connect(*srv.address, "edge", TOKENS["edge"], timeout=5) as c:
                    for step in range(20):
                        r = c.request(K, {"x": x}, {"step": step}, seq=step)
                        assert r.seq == step and torch.equal(r.tensors["x"], x)
                        time.sleep(0.01)
                assert time.monotonic() - t0 < 5, sessions
                sessions += 1
        finally:
            stop.set()
            flooder.join(5)
            for s in idle + opened:
                s.close()
        assert len(opened) >= 20
        assert srv.evicted >= 3 * pool
        assert srv.active_connections <= pool


@pytest.mark.parametrize("use_tls", [False, True], ids=["plain", "tls"])
def test_pool_of_authenticated_connections_answers_busy(certs, use_tls):
    tls_srv = TLSConfig(cert=certs["server.pem"], key=certs["server.key"]) if use_tls else None
    tls_cli = TLSConfig(ca=certs["ca.pem"]) if use_tls else None
    with Listener(TOKENS, limits=Limits(max_connections=2), tls=tls_srv).start(echo) as srv:
        held = [connect(*srv.address, "edge", TOKENS["edge"], tls=tls_cli) for _ in range(2)]
        try:
            for _ in range(2):
                with fails_fast(ServerBusy, "all 2 connection slots are in use") as info:
                    connect(*srv.address, "edge", TOKENS["edge"], tls=tls_cli, timeout=5)
                assert info.value.retry_after == 1.0
                assert isinstance(info.value, ConnectionError) and not isinstance(info.value, AuthError)
            assert srv.evicted == 0 and srv.refused >= 2
            assert_error_logged(srv, "max_connections 2 reached")
            for c in held:  # the held connections are unaffected
                assert c.request(K, {"a": torch.ones(1)}).tensors["a"].item() == 1
        finally:
            held[0].close()
        assert wait_for(lambda: srv.active_connections == 1)
        assert_serves(srv, tls=tls_cli)
        held[1].close()


# ---------------------------------------------------------------- link limiter

def test_link_limiter_paces_bandwidth(server):
    x = torch.zeros(250_000)  # 1 MB
    with connect(*server.address, "edge", TOKENS["edge"], link=LinkLimiter(mbps=80)) as c:
        t0 = time.perf_counter()
        c.send(K, {"x": x})
        elapsed = time.perf_counter() - t0
        c.recv()
    assert 0.08 <= elapsed < 2.0, elapsed


def test_link_limiter_latency(server):
    with connect(*server.address, "edge", TOKENS["edge"], link=LinkLimiter(latency_ms=60)) as c:
        t0 = time.perf_counter()
        c.request(K)
        assert time.perf_counter() - t0 >= 0.06


def test_link_limiter_alone_and_validation():
    lim = LinkLimiter(mbps=8)  # 1 MB/s
    t0 = time.perf_counter()
    for _ in range(10):
        lim.consume(16 * 1024)
    # 160 KiB minus the 64 KiB burst at 1 MB/s
    assert time.perf_counter() - t0 >= 0.09
    assert LinkLimiter().unlimited and LinkLimiter(mbps=0).unlimited and not LinkLimiter(latency_ms=1).unlimited
    for kw in ({"mbps": -1}, {"mbps": float("inf")}, {"latency_ms": -5}, {"latency_ms": float("nan")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            LinkLimiter(**kw)


# ---------------------------------------------------------------- limits and tokens

def test_limits_validation():
    with pytest.raises(ValueError, match="max_frame_bytes"):
        Limits(max_frame_bytes=0)
    with pytest.raises(ValueError, match="handshake_timeout"):
        Limits(handshake_timeout=0)
    with pytest.raises(ValueError, match="max_connections"):
        Limits(max_connections=0)


def test_load_tokens(tmp_path, caplog):
    p = tmp_path / "tokens"
    p.write_text("# edge devices\n\nedge  deadbeef\nedge2 any-string_ok  \n")
    os.chmod(p, 0o600)
    assert load_tokens(p) == {"edge": b"deadbeef", "edge2": b"any-string_ok"}
    os.chmod(p, 0o644)
    with caplog.at_level(logging.WARNING, logger="sft_kernels.channel"):
        load_tokens(p)
    assert any("readable by group/others" in r.message for r in caplog.records)
    p.write_text("edge a\nedge b\n")
    with pytest.raises(ValueError, match=f"{p}:2: duplicate client id 'edge'"):
        load_tokens(p)
    p.write_text("ok x\nbroken\n")
    with pytest.raises(ValueError, match=f"{p}:2: expected 'client_id secret'"):
        load_tokens(p)
    with pytest.raises(FileNotFoundError, match="tokens file"):
        load_tokens(tmp_path / "missing")


def test_frame_dataclass_and_exports():
    f = Frame(K, 1, 0, {}, {})
    assert f == Frame(K, 1, 0, {}, {}, wire_bytes=99)
    assert KIND_USER_MIN == 16
