"""Property tests of the channel's wire format on in-memory streams (no sockets).

(1) encode -> decode is the identity for random tensor dicts and meta;
(2) decoding mutated or random bytes raises only ProtocolError, allocates nothing beyond the
    limits and always terminates.
"""
from __future__ import annotations

import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from channel_helpers import frame, payload, tensor_entry, uvarint
from sft_kernels.channel import Limits, ProtocolError
from sft_kernels.channel import wire

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = list(wire.DTYPE_CODES.values())
SMALL = Limits(max_frame_bytes=4096, max_tensors=8, max_ndim=4)

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**53, 2**53),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c,
                                                                                             max_size=3),
                           max_leaves=8)
metas = st.dictionaries(st.text(max_size=6), json_values, max_size=4)


@st.composite
def tensor_dicts(draw):
    n = draw(st.integers(0, 5))
    names = draw(st.lists(st.text(min_size=1, max_size=12).filter(lambda s: len(s.encode()) <= wire.MAX_NAME_BYTES),
                          min_size=n, max_size=n, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = dtype.itemsize * int(torch.tensor(shape, dtype=torch.int64).prod().item()) if shape else dtype.itemsize
        raw = draw(st.binary(min_size=nbytes, max_size=nbytes))
        t = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        if dtype == torch.bool:
            t = t & 1
        t = t.view(dtype).reshape(shape)
        if draw(st.booleans()) and t.dim() >= 2:
            t = t.transpose(0, 1)  # non-contiguous input
        out[name] = t
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so NaN payloads and -0.0 count as equal only when bit-identical)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


@SETTINGS
@given(tensors=tensor_dicts(), meta=metas, seq=st.integers(0, 2**64 - 1), flags=st.integers(0, 0xFFFF),
       kind=st.integers(16, 255), crc=st.booleans(), chunk=st.sampled_from([None, 1, 7, 100]),
       buffer=st.sampled_from([None, 16, 64 * 1024]))
def test_encode_decode_identity(tensors, meta, seq, flags, kind, crc, chunk, buffer):
    data = wire.encode_frame(kind, tensors, meta, seq=seq, flags=flags, conn_id=5, crc=crc)
    reader = wire.BytesReader(data, chunk=chunk)
    header, f = wire.read_frame(reader if buffer is None else wire.BufferedReader(reader, buffer))
    assert (f.kind, f.seq, f.flags, header.conn_id) == (kind, seq, flags, 5)
    assert f.meta == meta and list(f.tensors) == list(tensors)
    assert all(_same(tensors[k], f.tensors[k]) for k in tensors)
    assert f.wire_bytes == len(data)


def _decode_only_protocol_errors(data: bytes, limits: Limits = SMALL) -> None:
    try:
        f = wire.decode_frame(data, limits)
    except ProtocolError:
        return
    # anything accepted respects the limits
    assert sum(t.numel() * t.element_size() for t in f.tensors.values()) <= limits.max_frame_bytes
    assert len(f.tensors) <= limits.max_tensors


@SETTINGS
@given(tensors=tensor_dicts(), meta=metas, crc=st.booleans(), data=st.data())
def test_mutated_frames_raise_only_protocol_error(tensors, meta, crc, data):
    frame = bytearray(wire.encode_frame(20, tensors, meta, crc=crc, limits=SMALL))
    how = data.draw(st.sampled_from(["flip", "truncate", "overwrite", "extend", "header_ok_payload_flip"]))
    if how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(frame) - 1), min_size=1, max_size=4)):
            frame[pos] ^= 1 << data.draw(st.integers(0, 7))
    elif how == "truncate":
        frame = frame[:data.draw(st.integers(0, len(frame) - 1))]
    elif how == "overwrite":
        pos = data.draw(st.integers(0, len(frame) - 1))
        junk = data.draw(st.binary(min_size=1, max_size=16))
        frame[pos:pos + len(junk)] = junk
    elif how == "extend":
        frame += data.draw(st.binary(min_size=1, max_size=16))
    else:
        # mutate the payload and keep a valid header, so the payload parser itself is exercised
        pos = data.draw(st.integers(wire.HEADER_SIZE, max(wire.HEADER_SIZE, len(frame) - 1)))
        if pos < len(frame):
            frame[pos] = data.draw(st.integers(0, 255))
        plen = data.draw(st.one_of(st.just(len(frame) - wire.HEADER_SIZE - (4 if crc else 0)),
                                   st.integers(0, 2**64 - 1)))
        frame[:wire.HEADER_SIZE] = wire.encode_header(20, 0, wire.CHFLAG_PAYLOAD_CRC if crc else 0, 0, 0, plen)
    _decode_only_protocol_errors(bytes(frame))


@SETTINGS
@given(raw=st.binary(max_size=300), plen=st.integers(0, 2**64 - 1), crc=st.booleans(), valid_header=st.booleans())
def test_random_bytes_raise_only_protocol_error(raw, plen, crc, valid_header):
    if valid_header:
        raw = wire.encode_header(20, 0, wire.CHFLAG_PAYLOAD_CRC if crc else 0, 0, 0, min(plen, len(raw))) + raw
    _decode_only_protocol_errors(raw)


@SETTINGS
@given(dims=st.lists(st.integers(0, 2**70), max_size=12), junk=st.binary(max_size=12), code=st.integers(0, 255),
       ndim=st.integers(0, 255), data_len=st.integers(0, 64))
def test_random_tensor_descriptors_raise_only_protocol_error(dims, junk, code, ndim, data_len):
    """Payloads whose descriptor fields are arbitrary: dims up to 2**70 as varints, stray bytes, any ndim."""
    body = payload([tensor_entry("x", code, [], dims=b"".join(uvarint(d) for d in dims) + junk, ndim=ndim)])
    body += bytes(data_len)
    data = wire.encode_header(20, 0, 0, 0, 0, len(body)) + body
    _decode_only_protocol_errors(data)
    _decode_only_protocol_errors(data, Limits())


@SETTINGS
@given(raw=st.binary(min_size=1, max_size=16), count=st.integers(1, 3))
def test_random_varint_bytes_raise_only_protocol_error(raw, count):
    """Arbitrary bytes where the meta length, the tensor count or the dims are expected."""
    for body in (raw, uvarint(0) + raw, payload([tensor_entry("x", 6, [], dims=raw, ndim=count)])):
        _decode_only_protocol_errors(wire.encode_header(20, 0, 0, 0, 0, len(body)) + body)


@SETTINGS
@given(value=st.integers(0, 2**63 - 1))
def test_varint_encoding_matches_reference(value):
    """``wire.encode_uvarint`` is the shortest LEB128 (the test helper's independent encoder)."""
    enc = wire.encode_uvarint(value)
    assert enc == uvarint(value)
    assert len(enc) <= 9 and (len(enc) == 1 or enc[-1] != 0)
    # and it decodes back as a dim (with a zero dim beside it, so no data is needed)
    f = wire.decode_frame(frame(payload([tensor_entry("t", 6, [0, value])]), crc=False))
    assert tuple(f.tensors["t"].shape) == (0, value)


@pytest.mark.parametrize("raw, needle", [
    (b"\x80\x00", "overlong"),
    (b"\x80" * 9 + b"\x01", "above the varint maximum 2**63-1"),  # 2**63
    (b"\xff" * 9 + b"\x7f", "above the varint maximum 2**63-1"),  # 10 bytes: 2**70 - 1
    (b"\x80" * 10, "not terminated within 10 bytes"),
    (b"\x80" * 3, "truncated"),
])
def test_varint_edge_cases_in_memory(raw, needle):
    data = frame(payload([tensor_entry("x", 6, [], dims=raw, ndim=1)]), crc=False)
    with pytest.raises(ProtocolError, match=re.escape(needle)):
        wire.decode_frame(data)
    # a stream that ends inside the varint is a truncated frame
    with pytest.raises(wire.TruncatedFrame):
        wire.decode_frame(data[:-1], Limits())


def test_empty_stream_is_peer_closed():
    with pytest.raises(wire.PeerClosed):
        wire.decode_frame(b"")


# ---------------------------------------------------------------------------------------------
# (3) the payload checksum: the extension's CRC32C against a bitwise reference

def crc32c_reference(data: bytes, value: int = 0) -> int:
    """Bitwise CRC32C (reflected polynomial 0x82F63B78), the definition the kernels must match."""
    c = value ^ 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def test_crc32c_check_value():
    from sft_kernels.channel.checksum import crc32c, crc32c_portable
    assert crc32c_reference(b"123456789") == 0xE3069283
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c_portable(b"123456789") == 0xE3069283
    assert torch.ops.sft.crc32c(torch.frombuffer(bytearray(b"123456789"), dtype=torch.uint8), 0) == 0xE3069283
    assert crc32c(b"") == 0 and crc32c(b"", 1234) == 1234


@pytest.mark.parametrize("n", [1, 7, 8, 9, 255, 767, 768, 769, 3 * 256 + 13, 24575, 24576, 24577,
                               3 * 8192 * 2 + 3 * 256 + 5, 100_003])
@pytest.mark.parametrize("start", [0, 1, 3, 7])
def test_crc32c_matches_reference(n, start):
    """Every path (alignment prologue, 3 x 8 KiB and 3 x 256 B lanes, 8-byte and byte tails)."""
    from sft_kernels.channel.checksum import crc32c, crc32c_at, crc32c_portable
    g = torch.Generator().manual_seed(n * 8 + start)
    t = torch.randint(0, 256, (start + n,), dtype=torch.uint8, generator=g)
    data = bytes(t[start:].numpy())
    want = crc32c_reference(data, 0x1234567) if n <= 30_000 else None
    got = crc32c(memoryview(t.numpy())[start:], 0x1234567)
    if want is not None:
        assert got == want
    assert crc32c_portable(data, 0x1234567) == got
    assert crc32c(data, 0x1234567) == got  # bytes path
    assert crc32c_at(t.data_ptr() + start, n, 0x1234567) == got
    assert torch.ops.sft.crc32c(t[start:].contiguous(), 0x1234567) == got
    # incremental == one shot
    cut = n // 3
    assert crc32c(data[cut:], crc32c(data[:cut], 0x1234567)) == got


@SETTINGS
@given(data=st.binary(max_size=2000), value=st.integers(0, 2**32 - 1))
def test_crc32c_random(data, value):
    from sft_kernels.channel.checksum import crc32c, crc32c_portable
    want = crc32c_reference(data, value)
    assert crc32c(data, value) == want
    assert crc32c(bytearray(data), value) == want
    assert crc32c_portable(data, value) == want


def test_crc32c_op_checks_arguments():
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.sft.crc32c(torch.zeros(4), 0)
    with pytest.raises(RuntimeError, match="init"):
        torch.ops.sft.crc32c(torch.zeros(4, dtype=torch.uint8), -1)


def test_payload_crc_is_crc32c():
    """The trailer of a frame is CRC32C of the payload (since protocol version 2)."""
    t = torch.arange(10_000, dtype=torch.float32)
    data = wire.encode_frame(20, {"x": t}, {"a": 1}, crc=True)
    payload = data[wire.HEADER_SIZE:-4]
    assert struct.unpack("<I", data[-4:])[0] == crc32c_reference(payload)
    assert data[4] == wire.PROTOCOL_VERSION == 3
