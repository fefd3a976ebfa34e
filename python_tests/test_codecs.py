"""Codecs: spec grammar, encode/decode against the reference, byte accounting, fallbacks, torch.compile.

Tests taking ``device`` also run on CUDA when present: a codec keeps every packet
tensor and its output on the input's device, and quantizing codecs produce the
same packets there as on the CPU.
"""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from sft_kernels import codecs, reference as R
from sft_kernels.codecs import LowRankCodec, Packet, QuantCodec, from_spec

ROUND_TRIP_SPECS = [
    ("none", "none"),
    ("fp16", "fp16"),
    ("bf16", "bf16"),
    ("int8", "int8"),
    ("int8,block=64", "int8"),
    ("int8,block=32,sr", "int8,block=32,sr"),
    ("int4 , sr", "int4,sr"),
    ("int2,block=512", "int2,block=512"),
    ("lowrank:r=8", "lowrank:r=8"),
    ("lowrank:r=8,oversample=4,iters=2", "lowrank:r=8,oversample=4,iters=2"),
    ("lowrank:r=4+int8", "lowrank:r=4+int8"),
    ("lowrank:r=16,iters=-1+int4,sr", "lowrank:r=16,iters=-1+int4,sr"),
    ("lowrank:r=8+fp16", "lowrank:r=8+fp16"),
]


@pytest.mark.parametrize("spec,canonical", ROUND_TRIP_SPECS)
def test_spec_round_trips_to_canonical(spec, canonical):
    codec = from_spec(spec)
    assert str(codec) == canonical
    assert from_spec(str(codec)) == codec


def test_from_spec_passes_codecs_through():
    c = QuantCodec(4)
    assert from_spec(c) is c
    assert from_spec("int4") == c


BAD_SPECS = [
    ("", "empty"),
    ("int3", "int3"),
    ("float8", "float8"),
    ("int8,block=0", "block"),
    ("int8,block=x", "block"),
    ("int8,foo", "foo"),
    ("int8,sr,sr", "sr"),
    ("fp16,sr", "fp16"),
    ("none,block=64", "none"),
    ("lowrank", "lowrank"),
    ("lowrank:", "r=R"),
    ("lowrank:r=0", "r must be >= 1"),
    ("lowrank:r=8,oversample=-1", "oversample"),
    ("lowrank:r=8,iters=-2", "iters"),
    ("lowrank:rank=8", "rank=8"),
    ("lowrank:r=8+int2", "int2"),
    ("lowrank:r=8+bf16", "bf16"),
    ("lowrank:r=8+", "'+'"),
    ("lowrank:r=8+none", "none"),
    ("int8+int4", "+"),
]


@pytest.mark.parametrize("spec,named", BAD_SPECS)
def test_bad_spec_raises_value_error_naming_the_part(spec, named):
    with pytest.raises(ValueError) as ei:
        from_spec(spec)
    msg = str(ei.value)
    assert named in msg
    assert "valid forms" in msg and "lowrank:r=R" in msg


def test_from_spec_rejects_non_string():
    with pytest.raises(TypeError, match="codec spec"):
        from_spec(8)


ALL_SPECS = [c for _, c in ROUND_TRIP_SPECS]


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_encode_decode_shape_dtype_and_nbytes(spec, dtype, device):
    x = torch.randn(4, 40, 96).to(device, dtype)
    codec = from_spec(spec)
    packet = codec.encode(x, seed=5)
    assert isinstance(packet, Packet)
    assert packet.spec == str(codec)
    assert packet.nbytes == sum(t.numel() * t.element_size() for t in packet.tensors.values())
    y = codec.decode(packet)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.isfinite(y).all()
    assert y.device == x.device and all(t.device == x.device for t in packet.tensors.values())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sr", [False, True])
def test_quant_codec_matches_reference_bit_exactly(bits, sr, device):
    x = torch.randn(33, 384).to(device)
    codec = QuantCodec(bits, sr=sr)
    packet = codec.encode(x, seed=11)
    codes, scales = R.quantize(x, bits, codec.block_size, sr, 11)
    assert torch.equal(packet.tensors["codes"], codes)
    assert torch.equal(packet.tensors["scales"], scales)
    want = R.dequantize(codes, scales, bits, codec.block_size, 384, torch.float32)
    assert torch.equal(codec.decode(packet), want)
    if device != "cpu":
        on_cpu = codec.encode(x.cpu(), seed=11)
        assert all(torch.equal(packet.tensors[k].cpu(), on_cpu.tensors[k]) for k in ("codes", "scales"))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_default_blocks_keep_scales_within_one_sixteenth_of_codes(bits, device):
    x = torch.randn(256, 4096).to(device)
    p = QuantCodec(bits).encode(x)
    assert p.tensors["scales"].nbytes * 16 <= p.tensors["codes"].nbytes


def test_short_last_dim_is_quantized_along_tokens(device):
    z = torch.randn(1024, 4).to(device)  # a rank-4 bottleneck: 4 values per token
    codec = from_spec("int8")
    p = codec.encode(z)
    assert p.transposed
    assert p.tensors["codes"].shape == (4, 1024)
    assert p.tensors["scales"].nbytes * 16 <= p.tensors["codes"].nbytes
    y = codec.decode(p)
    assert y.shape == z.shape
    # error per element within half a step of its block's scale
    assert (y - z).abs().max() <= z.abs().max() / 127 / 2 * (1 + 1e-6)


def test_int8_relative_error_is_small(device):
    x = torch.randn(512, 384).to(device)
    y = from_spec("int8").decode(from_spec("int8").encode(x))
    assert torch.linalg.norm(y - x) / torch.linalg.norm(x) < 0.01


def test_lowrank_codec_recovers_a_low_rank_matrix(device):
    x = (torch.randn(300, 8) @ torch.randn(8, 200)).to(device)
    for spec, tol in [("lowrank:r=8", 1e-4), ("lowrank:r=8+fp16", 2e-3), ("lowrank:r=8+int8", 2e-2)]:
        c = from_spec(spec)
        y = c.decode(c.encode(x, seed=3))
        assert torch.linalg.norm(y - x) / torch.linalg.norm(x) < tol, spec


def test_lowrank_int8_matches_reference_reconstruction(device):
    x = (torch.randn(256, 16) @ torch.randn(16, 384) + 0.01 * torch.randn(256, 384)).to(device)
    c = LowRankCodec(8, stage=QuantCodec(8))
    y = c.decode(c.encode(x, seed=4))
    ref = R.lowrank_dequantize(*R.lowrank_quantize(x, 8, c.oversample, c.iters, 8, 64, False, 4), 256, 384, 8, 8, 64,
                               torch.float32)
    assert torch.linalg.norm(y - ref) / torch.linalg.norm(ref) < 0.02


def test_lowrank_sends_fewer_bytes_than_int8(device):
    x = torch.randn(4096, 384).to(device)
    n_lr = from_spec("lowrank:r=8+int8").encode(x).nbytes
    n_q = from_spec("int8").encode(x).nbytes
    assert n_lr * 10 < n_q
    # P^T: 8 x 4096 codes + scales, Q^T: 8 x 384 codes + scales
    assert n_lr == 8 * 4096 + 8 * 64 * 4 + 8 * 384 + 8 * 6 * 4


@pytest.mark.parametrize("shape", [(1, 384), (3, 384), (384, 2), (8, 8), (0, 384)])
def test_lowrank_falls_back_to_its_stage_when_it_cannot_help(shape, device):
    x = torch.randn(*shape).to(device)
    c = from_spec("lowrank:r=8+int8")
    p = c.encode(x, seed=1)
    assert p.mode == "dense"
    assert "codes" in p.tensors
    y = c.decode(p)
    assert y.shape == x.shape
    if x.numel():
        assert torch.linalg.norm(y - x) / torch.linalg.norm(x) < 0.02


def test_lowrank_without_stage_falls_back_to_raw(device):
    x = torch.randn(1, 384).to(device)
    c = from_spec("lowrank:r=8")
    p = c.encode(x)
    assert p.mode == "dense" and p.nbytes == x.nbytes
    assert torch.equal(c.decode(p), x)


def test_decode_with_another_codec_raises():
    p = from_spec("int8").encode(torch.randn(4, 64))
    with pytest.raises(ValueError, match="encoded with codec 'int8'"):
        from_spec("int4").decode(p)


@pytest.mark.parametrize("spec", ["int8", "lowrank:r=4+int8", "lowrank:r=4"])
def test_non_finite_input_raises(spec, device):
    x = torch.randn(64, 128).to(device)
    x[3, 5] = float("nan")
    x[7, 1] = float("inf")
    with pytest.raises(RuntimeError, match="2 non-finite"):
        from_spec(spec).encode(x)


def test_integer_input_raises():
    with pytest.raises(ValueError, match="x must be float32"):
        from_spec("int8").encode(torch.ones(4, 4, dtype=torch.int32))


@pytest.mark.parametrize("seed", [2**62, -(2**62) - 1])
def test_seed_out_of_range_raises(seed):
    with pytest.raises(ValueError, match="seed"):
        from_spec("int8,sr").encode(torch.randn(4, 64), seed=seed)


def test_same_seed_same_packet_other_seed_differs(device):
    x = torch.randn(64, 256).to(device)
    c = from_spec("int4,sr")
    a, b, d = c.encode(x, seed=1), c.encode(x, seed=1), c.encode(x, seed=2)
    assert torch.equal(a.tensors["codes"], b.tensors["codes"])
    assert not torch.equal(a.tensors["codes"], d.tensors["codes"])


@pytest.mark.parametrize("spec", ["int8,sr", "lowrank:r=8+int8", "lowrank:r=8+int4,sr", "fp16"])
def test_compiled_round_trip_does_not_recompile_per_seed(spec, device):
    torch._dynamo.reset()
    codec = from_spec(spec)
    counter = CompileCounter()

    @torch.compile(fullgraph=True, backend=counter)
    def round_trip(x, seed):
        return codec.decode(codec.encode(x, seed))

    x = torch.randn(256, 128).to(device)
    for seed in range(20):
        y = round_trip(x, seed)
        eager = codec.decode(codec.encode(x, seed))
        torch.testing.assert_close(y, eager, rtol=0, atol=0)
    assert counter.frame_count <= 2, f"recompiled {counter.frame_count} times over 20 seeds"
    torch._dynamo.reset()


def test_module_exports():
    assert codecs.DEFAULT_BLOCK == {8: 64, 4: 128, 2: 256}
