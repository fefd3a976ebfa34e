"""Tests of the fused CUDA kernels of ``sft::quantize`` / ``sft::dequantize`` (csrc/cuda/quantize_*).

They must be bit-identical to the CPU kernels and to ``sft_kernels.reference``
for every dtype, bit width, rounding mode, odd shape and block size (including
blocks that take the two-pass path), accept non-contiguous input, run under
CUDA-graph capture, and report non-finite input as non-finite scales without a
host sync. Skipped without a GPU, and unless ``SFT_CUDA_FUSED=1`` (which makes
the package register the fused kernels; ``make gpu-check`` sets it).
"""
from __future__ import annotations

import ctypes
import os
import re

import pytest
import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft)
from sft_kernels import _C
from sft_kernels import reference as R

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("SFT_CUDA_FUSED") != "1", reason="set SFT_CUDA_FUSED=1 to test the fused kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [2, 4, 8]
# (shape, block): odd cols and blocks, blocks straddling packed bytes, block 1,
# warp-shuffle blocks (64/128/256), rows of several tiles (> 2048 elements),
# and blocks no tile holds (two-pass path: > 2048, or lcm(block, 8) > 2048).
SHAPES = [
    ((1, 7), 64),
    ((3, 5, 100), 64),
    ((37,), 5),
    ((6, 33), 1),
    ((2, 301), 3),
    ((4, 1000), 128),
    ((3, 5000), 256),
    ((2, 4103), 7),
    ((2, 9000), 3000),
    ((3, 4097), 4096),
    ((2, 5000), 2047),
]
SEEDS = [0, -1, 2**40 + 7]

q_op = torch.ops.sft.quantize
dq_op = torch.ops.sft.dequantize


def _rand(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 3).to(dtype)


def _check(x_cpu, x_cuda, bits, block, sr, seed):
    codes, scales = q_op(x_cuda, bits, block, sr, seed)
    assert codes.is_cuda and codes.is_contiguous() and scales.is_contiguous()
    cc, cs = q_op(x_cpu, bits, block, sr, seed)
    rc, rs = R.quantize(x_cpu, bits, block, sr, seed)
    codes, scales = codes.cpu(), scales.cpu()
    assert torch.equal(codes, cc), f"codes differ from CPU at {(codes != cc).nonzero()[:5].tolist()}"
    assert torch.equal(scales, cs), f"scales differ from CPU at {(scales != cs).nonzero()[:5].tolist()}"
    assert torch.equal(codes, rc) and torch.equal(scales, rs)
    cols = x_cpu.shape[-1] if x_cpu.dim() else 1
    for dtype in DTYPES:
        y = dq_op(codes.cuda(), scales.cuda(), bits, block, cols, dtype)
        assert y.is_contiguous() and y.dtype == dtype
        assert torch.equal(y.cpu(), dq_op(cc, cs, bits, block, cols, dtype))
        assert torch.equal(y.cpu(), R.dequantize(rc, rs, bits, block, cols, dtype))


def test_fused_kernels_are_registered():
    lib = ctypes.CDLL(_C.__file__)
    lib.sft_register_cuda_fused.restype = ctypes.c_int
    assert lib.sft_register_cuda_fused() == 0
    assert lib.sft_register_cuda_fused() == 0  # idempotent
    for op in ("quantize", "dequantize"):
        dump = torch._C._dispatch_dump(f"sft::{op}")
        assert re.search(r"^CUDA: registered at .*quantize_glue\.cpp", dump, re.M), dump


@pytest.mark.parametrize("shape,block", SHAPES, ids=[f"{s}-b{b}" for s, b in SHAPES])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sr", [False, True], ids=["nearest", "stochastic"])
def test_bit_identical(shape, block, bits, dtype, sr):
    x = _rand(shape, dtype)
    _check(x, x.cuda(), bits, block, sr, 1234)


@pytest.mark.parametrize("seed", SEEDS)
def test_stochastic_seeds(seed):
    x = _rand((5, 999), torch.float32)
    _check(x, x.cuda(), 4, 64, True, seed)


@pytest.mark.parametrize("bits", BITS)
def test_special_values(bits):
    """All-zero blocks, subnormal absmax, ties, and values at +-absmax."""
    x = torch.zeros(4, 256)
    x[1, :64] = 1e-40
    x[2] = torch.arange(256) * 0.5 - 64.0
    x[3, ::2] = -7.0
    x[3, 1::2] = 7.0
    for sr in (False, True):
        _check(x, x.cuda(), bits, 64, sr, 3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_non_contiguous_and_unaligned(dtype):
    """Transposed and sliced views: row strides != cols and starts not 16-byte aligned."""
    base = _rand((40, 301), dtype)
    gpu = base.cuda()
    views = [lambda t: t.T, lambda t: t[:, 1:], lambda t: t[::2, 3:200], lambda t: t.T[5:], lambda t: t[3:, 1:]]
    for view in views:
        _check(view(base).contiguous(), view(gpu), 8, 64, True, 5)
        _check(view(base).contiguous(), view(gpu), 4, 100, False, 0)


def test_empty_and_scalar():
    for shape in [(0, 16), (3, 0), ()]:
        x = _rand(shape, torch.float32)
        _check(x, x.cuda(), 8, 4, False, 0)


def test_non_finite_gives_non_finite_scales():
    x = torch.randn(2, 256, device="cuda")
    x[0, 3] = float("inf")
    x[1, 200] = float("nan")
    codes, scales = q_op(x, 8, 64, False, 0)  # no raise, no sync
    finite = torch.isfinite(scales.cpu())
    assert not finite[0, 0] and not finite[1, 3]
    assert finite.sum() == finite.numel() - 2


def test_argument_errors():
    x = torch.randn(4, 8, device="cuda")
    with pytest.raises(ValueError, match="bits must be one of"):
        q_op(x, 3, 4, False, 0)
    with pytest.raises(ValueError, match="block must be >= 1"):
        q_op(x, 8, 0, False, 0)
    with pytest.raises(ValueError, match="x must be float32"):
        q_op(x.double(), 8, 4, False, 0)
    codes, scales = q_op(x, 8, 4, False, 0)
    with pytest.raises(ValueError, match="codes last dim"):
        dq_op(codes, scales, 8, 4, 9, torch.float32)


def test_cuda_graph_capture():
    x = _rand((64, 4096), torch.bfloat16).cuda()
    q_op(x, 4, 128, True, 9)  # warm up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, scales = q_op(x, 4, 128, True, 9)
        y = dq_op(codes, scales, 4, 128, 4096, torch.bfloat16)
    new = _rand((64, 4096), torch.bfloat16, seed=1)
    x.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    ec, es = q_op(new, 4, 128, True, 9)
    assert torch.equal(codes.cpu(), ec) and torch.equal(scales.cpu(), es)
    assert torch.equal(y.cpu(), dq_op(ec, es, 4, 128, 4096, torch.bfloat16))


def test_large_two_pass_block_in_graph():
    """The two-pass path (memset + three kernels) is capturable too."""
    x = _rand((4, 10000), torch.float32).cuda()
    q_op(x, 8, 10000, False, 0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        codes, scales = q_op(x, 8, 10000, False, 0)
    graph.replay()
    torch.cuda.synchronize()
    ec, es = q_op(x.cpu(), 8, 10000, False, 0)
    assert torch.equal(codes.cpu(), ec) and torch.equal(scales.cpu(), es)
