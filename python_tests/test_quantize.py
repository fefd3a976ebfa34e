"""Tests of the CPU and CUDA kernels of ``sft::quantize`` / ``sft::dequantize``.

The compiled ops must be bit-identical to ``sft_kernels.reference`` (the
executable spec), and must reject bad arguments with a clear exception both
through the Python wrappers (``sft_kernels.ops``) and when ``torch.ops.sft`` is
called directly (the C++ checks).  Tests taking ``device`` also run on CUDA when
present: there the op must equal both the reference on the same device and the
CPU kernel, bit for bit.
"""
from __future__ import annotations

import math

import pytest
import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft)
from sft_kernels import ops
from sft_kernels import reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BITS = [2, 4, 8]
# (shape, block): odd cols, cols < block, cols not a multiple of block, block 1,
# odd block sizes whose boundaries fall inside packed bytes, 3-D and 1-D input.
SHAPES = [
    ((1, 7), 64),
    ((3, 5, 100), 64),
    ((1, 1), 4),
    ((4, 1000), 32),
    ((2, 10), 64),
    ((5, 13), 7),
    ((6, 33), 1),
    ((2, 301), 3),
    ((37,), 5),
    ((3, 4097), 4096),
]
SEEDS = [0, 1234, -1, 2**40 + 7]

q_op = torch.ops.sft.quantize
dq_op = torch.ops.sft.dequantize


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _rand(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def _assert_same_on_cpu(got, op, *args):
    """Off the CPU: ``got`` (a tensor or a tuple) equals the CPU kernel's output for the same arguments."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if tensors[0].device.type == "cpu":
        return
    want = op(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])
    got, want = (got, want) if isinstance(got, tuple) else ((got,), (want,))
    for g, w in zip(got, want):
        assert g.device == tensors[0].device
        assert torch.equal(g.cpu(), w), f"differs from the CPU kernel at {(g.cpu() != w).nonzero()[:5].tolist()}"


def _assert_same_as_reference(x, bits, block, stochastic=False, seed=0):
    codes, scales = q_op(x, bits, block, stochastic, seed)
    rc, rs = R.quantize(x, bits, block, stochastic, seed)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float32
    assert codes.shape == rc.shape and scales.shape == rs.shape
    assert codes.is_contiguous() and scales.is_contiguous()
    assert torch.equal(codes, rc), f"codes differ at {(codes != rc).nonzero()[:5].tolist()}"
    assert torch.equal(scales, rs), f"scales differ at {(scales != rs).nonzero()[:5].tolist()}"
    _assert_same_on_cpu((codes, scales), q_op, x, bits, block, stochastic, seed)
    return codes, scales


# ----------------------------------------------------------------------------- bit-exact quantize


@pytest.mark.parametrize("shape,block", SHAPES, ids=[f"{s}-b{b}" for s, b in SHAPES])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_matches_reference(dtype, bits, stochastic, shape, block, device):
    x = _rand(shape, dtype, seed=hash((shape, block)) % 1000).to(device)
    _assert_same_as_reference(x, bits, block, stochastic, seed=77)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_seeds_match_reference(bits, seed, device):
    """Seeds are reinterpreted as uint64 (negative and > 32-bit seeds included)."""
    _assert_same_as_reference(_rand((9, 130), torch.float32, 3).to(device), bits, 16, True, seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_zero_dim_input(dtype, device):
    x = torch.tensor(-2.5).to(device, dtype)
    codes, scales = _assert_same_as_reference(x, 8, 4)
    assert codes.shape == (1,) and scales.shape == (1,)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("make", ["transpose", "strided_slice", "expand"])
@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("bits", BITS)
def test_non_contiguous_input(bits, stochastic, make, dtype, device):
    base = _rand((64, 90), dtype, 5).to(device)
    x = {"transpose": base.t(), "strided_slice": base[1::3, ::2], "expand": base[:1].expand(5, 90)}[make]
    assert not x.is_contiguous()
    codes, scales = _assert_same_as_reference(x, bits, 16, stochastic, 3)
    c2, s2 = q_op(x.contiguous(), bits, 16, stochastic, 3)
    assert torch.equal(codes, c2) and torch.equal(scales, s2)


@pytest.mark.parametrize("block", [1, 5, 64])
@pytest.mark.parametrize("bits", BITS)
def test_empty_rows(bits, block, device):
    x = torch.empty(0, 16, device=device)
    codes, scales = q_op(x, bits, block, False, 0)
    assert codes.shape == (0, math.ceil(16 * bits / 8)) and codes.dtype == torch.uint8
    assert scales.shape == (0, math.ceil(16 / block)) and scales.dtype == torch.float32
    _assert_same_as_reference(x, bits, block)
    y = dq_op(codes, scales, bits, block, 16, torch.bfloat16)
    assert y.shape == (0, 16) and y.dtype == torch.bfloat16 and y.device == x.device


@pytest.mark.parametrize("bits", BITS)
def test_empty_cols(bits, device):
    x = torch.empty(3, 0, device=device)
    codes, scales = q_op(x, bits, 8, False, 0)
    assert codes.shape == (3, 0) and scales.shape == (3, 0)
    assert dq_op(codes, scales, bits, 8, 0, torch.float32).shape == (3, 0)


@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_random_tensor(dtype, bits, stochastic, device):
    """Many blocks and rows, spread over threads; also zero blocks and wide dynamic range."""
    x = _rand((257, 1000), torch.float32, 11)
    x[3] = 0.0  # whole row of zero blocks
    x[7, 64:128] = 0.0  # one zero block
    x[9] *= 1e-3
    x[10] *= 1e3
    _assert_same_as_reference(x.to(device, dtype), bits, 64, stochastic, 99)


@pytest.mark.parametrize("bits", BITS)
def test_huge_block_is_one_block_per_row(bits, device):
    """block far beyond cols (no overflow in ceil(cols / block)) is the same as block = cols."""
    x = _rand((3, 50), torch.float32, 12).to(device)
    for stochastic in (False, True):
        c, s = q_op(x, bits, 2**62, stochastic, 1)
        rc, rs = q_op(x, bits, 50, stochastic, 1)
        assert torch.equal(c, rc) and torch.equal(s, rs) and s.shape == (3, 1)
        assert torch.equal(dq_op(c, s, bits, 2**62, 50, torch.float32), dq_op(rc, rs, bits, 50, 50, torch.float32))


@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("bits", BITS)
def test_one_long_row(bits, stochastic, device):
    """A single row is split into several parallel spans; blocks straddle code windows."""
    _assert_same_as_reference(_rand((1, 70001), torch.float32, 4).to(device), bits, 3000, stochastic, 5)
    _assert_same_as_reference(_rand((2, 9001), torch.bfloat16, 4).to(device), bits, 7, stochastic, 5)


def _tie_blocks(bits: int, dtype: torch.dtype, nblocks: int = 64) -> torch.Tensor:
    """Rows (one block each) whose scale is an exact power of two s and whose
    elements sit on the .5 ties of t = x / s, and a relative eps below and above them."""
    qmax = _qmax(bits)
    k = torch.arange(-qmax, qmax, dtype=torch.float64) + 0.5  # the ties k + 0.5
    eps = torch.finfo(dtype).eps
    body = torch.cat([k, k * (1 - eps), k * (1 + eps), torch.tensor([0.5, -0.5, 0.0, -0.0], dtype=torch.float64)])
    rows = []
    for i in range(nblocks):
        s = 2.0 ** (i % 9 - 4)
        vals = (body * s).to(dtype).clamp(-qmax * s, qmax * s)  # keep absmax = qmax * s
        row = torch.cat([torch.tensor([qmax * s if i % 2 else -qmax * s], dtype=dtype), vals])
        rows.append(row[torch.randperm(row.numel(), generator=torch.Generator().manual_seed(i))])
    return torch.stack(rows)


@pytest.mark.parametrize("stochastic", [False, True], ids=["rn", "sr"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_exact_ties(dtype, bits, stochastic, device):
    x = _tie_blocks(bits, dtype).to(device)
    codes, scales = _assert_same_as_reference(x, bits, x.shape[1], stochastic, 21)
    # every block's scale is a power of two, so the ties really are exact
    assert torch.equal(scales, torch.exp2(torch.floor(torch.log2(scales))))


@pytest.mark.parametrize("bits", BITS)
def test_round_half_away_from_zero(bits, device):
    qmax = _qmax(bits)
    below = 0.49999997  # largest fp32 below 0.5
    tie, rounded = (1.5, 2) if qmax > 1 else (0.5, 1)  # int2 has qmax = 1
    x = torch.tensor([[qmax, 0.5, -0.5, tie, -tie, below, -below, -0.0]], device=device)
    codes, scales = q_op(x, bits, 8, False, 0)
    assert scales.item() == 1.0  # so t = x exactly
    q = dq_op(codes, scales, bits, 8, 8, torch.float32)[0].tolist()
    assert q == [qmax, 1, -1, rounded, -rounded, 0, 0, 0]


def test_clamp_edge_subnormal_scale(device):
    """absmax / qmax rounds to a subnormal scale, so |t| can exceed qmax and the clamp decides;
    or it underflows to 0, and the whole block must quantize to q = 0."""
    ulp = 2.0**-149  # smallest fp32 subnormal
    for bits in BITS:
        qmax = _qmax(bits)
        rows = []
        for m in (int(1.45 * qmax) + 1, qmax + 1, 2 * qmax + 1, 1, 3):  # absmax in units of ulp
            rows.append(torch.tensor([m * ulp, -m * ulp, (m - 1) * ulp, -(m // 2) * ulp], dtype=torch.float32))
        x = torch.stack(rows).to(device)
        for stochastic in (False, True):
            codes, scales = _assert_same_as_reference(x, bits, 4, stochastic, 8)
        if qmax > 1:
            assert (scales == 0).any()
            assert (scales > 0).any()
            t = x[scales[:, 0] > 0].abs().amax(1) / scales[scales[:, 0] > 0, 0]
            assert (t > qmax).any(), "no block exercised the clamp"


@pytest.mark.parametrize("bits", BITS)
def test_clamp_edge_extreme_values(bits, device):
    x32 = torch.tensor([[3.0e38, -3.4028235e38, 1.0, -1e38], [1e-38, -1e-45, 0.0, 1e-40]])
    x16 = torch.tensor([[65504.0, -65504.0, 1.0, 0.0], [6e-8, -6e-8, 0.0, 1e-7]], dtype=torch.float16)
    for x in (x32, x16):
        for stochastic in (False, True):
            _assert_same_as_reference(x.to(device), bits, 4, stochastic, 2)


def test_results_do_not_depend_on_thread_count():
    x = _rand((300, 515), torch.float32, 13)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [q_op(x, b, 32, sr, 4) for b in BITS for sr in (False, True)]
        torch.set_num_threads(max(2, prev))
        many = [q_op(x, b, 32, sr, 4) for b in BITS for sr in (False, True)]
    finally:
        torch.set_num_threads(prev)
    for (c1, s1), (c2, s2) in zip(one, many):
        assert torch.equal(c1, c2) and torch.equal(s1, s2)


def test_outputs_are_fresh_tensors(device):
    x = _rand((4, 64), torch.float32).to(device)
    codes, scales = q_op(x, 8, 64, False, 0)
    assert codes.data_ptr() != x.data_ptr() and scales.data_ptr() != x.data_ptr()
    y = dq_op(codes, scales, 8, 64, 64, torch.float32)
    assert y.data_ptr() not in (codes.data_ptr(), scales.data_ptr())


# ----------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("shape,block", SHAPES, ids=[f"{s}-b{b}" for s, b in SHAPES])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_matches_reference(dtype, bits, shape, block, device):
    """Arbitrary code bytes (non-zero pad bits included) and scales over a wide range."""
    lead, cols = shape[:-1], shape[-1]
    g = torch.Generator().manual_seed(cols * 31 + bits)
    codes = torch.randint(0, 256, (*lead, math.ceil(cols * bits / 8)), dtype=torch.uint8, generator=g)
    scales = torch.exp(torch.randn(*lead, math.ceil(cols / block), generator=g) * 8).to(torch.float32)
    scales.view(-1)[::3] *= -1
    codes, scales = codes.to(device), scales.to(device)
    y = dq_op(codes, scales, bits, block, cols, dtype)
    ry = R.dequantize(codes, scales, bits, block, cols, dtype)
    assert y.dtype == dtype and y.shape == (*lead, cols) and y.is_contiguous()
    assert torch.equal(y, ry)
    _assert_same_on_cpu(y, dq_op, codes, scales, bits, block, cols, dtype)
    # the wrapper gives the same
    assert torch.equal(ops.dequantize(codes, scales, bits, block, cols, dtype), ry)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dequantize_non_contiguous_inputs(dtype, bits, device):
    x = _rand((40, 96), torch.float32, 6).to(device)
    codes, scales = q_op(x, bits, 16, False, 0)
    ct, st = codes.t().contiguous().t(), scales.t().contiguous().t()
    assert not ct.is_contiguous() and not st.is_contiguous()
    y = dq_op(ct, st, bits, 16, 96, dtype)
    assert torch.equal(y, R.dequantize(codes, scales, bits, 16, 96, dtype))
    _assert_same_on_cpu(y, dq_op, ct, st, bits, 16, 96, dtype)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_error_bound(dtype, bits, device):
    """Deterministic rounding: |x - deq(q(x))| <= scale / 2 per element, up to fp32 rounding.

    t = x / scale and q * scale are each rounded to fp32 (relative error <= 2^-24
    of a value <= qmax), so the exact bound is scale * (1/2 + 2 qmax 2^-24).
    """
    x = _rand((64, 333), dtype, 8).to(device)
    block = 32
    codes, scales = ops.quantize(x, bits, block)
    y = ops.dequantize(codes, scales, bits, block, x.shape[-1], torch.float32)
    s = scales.repeat_interleave(block, dim=-1)[:, : x.shape[-1]].double()
    err = (x.double() - y.double()).abs()
    assert (err <= s * (0.5 + 2 * _qmax(bits) * 2.0**-24)).all(), float((err / s).max())


@pytest.mark.parametrize("bits", BITS)
def test_stochastic_rounding_is_unbiased(bits, device):
    """Mean over 200 seeds of deq(q(x, sr)) -> x.

    Each draw has |error| < scale and variance <= scale^2 / 4, so the mean of 200
    draws has standard deviation <= scale / (2 sqrt(200)) = 0.035 scale. We allow
    6 sigma (0.21 scale) per element and 6 sigma of the grand mean for the average
    signed error; deterministic rounding misses the latter by far.
    """
    g = torch.Generator().manual_seed(bits)
    block, nseeds = 64, 200
    x = torch.randn(8, 256, generator=g).clamp(-3.9, 3.9).to(device)
    x[:, ::block] = 4.0  # every block has absmax 4, so every block has the same scale
    scale = 4.0 / _qmax(bits)
    acc = torch.zeros_like(x, dtype=torch.float64)
    for seed in range(nseeds):
        c, s = ops.quantize(x, bits, block, True, seed)
        acc += ops.dequantize(c, s, bits, block, x.shape[-1]).double()
    err = (acc / nseeds - x.double()) / scale
    sigma = 0.5 / math.sqrt(nseeds)
    assert err.abs().max() < 6 * sigma
    assert abs(float(err.mean())) < 6 * sigma / math.sqrt(x.numel())
    c, s = ops.quantize(x, bits, block)
    det = (ops.dequantize(c, s, bits, block, x.shape[-1]).double() - x.double()) / scale
    assert det.abs().max() > 0.3  # deterministic error is not small, so the test has teeth


def test_stochastic_seeds(device):
    x = _rand((16, 256), torch.float32, 9).to(device)
    a = q_op(x, 4, 64, True, 1)
    b = q_op(x, 4, 64, True, 1)
    c = q_op(x, 4, 64, True, 2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(a[1], c[1])  # scales do not depend on the seed
    # the seed is used as a full 64-bit value
    assert not torch.equal(q_op(x, 4, 64, True, 2**32 + 1)[0], a[0])


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples(device):
    base = _rand((12, 80), torch.float32, 10).to(device)
    return [
        (base, 8, 16, False, 0),
        (base.to(torch.bfloat16), 4, 32, True, 5),
        (base.t(), 2, 7, False, 0),
        (base[::2, 1::3].to(torch.bfloat16), 8, 64, True, 3),
        (_rand((2, 3, 33), torch.float16, 2).to(device), 4, 8, False, 0),
    ]


@pytest.mark.parametrize("idx", range(5))
def test_opcheck_quantize(idx, device):
    args = _opcheck_samples(device)[idx]
    torch.library.opcheck(q_op, args)


@pytest.mark.parametrize("idx", range(5))
def test_opcheck_dequantize(idx, device):
    x, bits, block, sr, seed = _opcheck_samples(device)[idx]
    codes, scales = q_op(x, bits, block, sr, seed)
    if idx % 2:
        codes, scales = codes.t().contiguous().t(), scales.t().contiguous().t()
    torch.library.opcheck(dq_op, (codes, scales, bits, block, x.shape[-1], x.dtype))


# ----------------------------------------------------------------------------- bad arguments
# Each case is checked through the Python wrapper and directly through the
# compiled op: both raise ValueError naming the argument.


def _both_quantize(x, bits=8, block=64, stochastic=False, seed=0):
    return [
        lambda: ops.quantize(x, bits, block, stochastic, seed),
        lambda: q_op(x, bits, block, stochastic, seed),
    ]


def _both_dequantize(codes, scales, bits=8, block=64, cols=64, dtype=torch.float32):
    return [
        lambda: ops.dequantize(codes, scales, bits, block, cols, dtype),
        lambda: dq_op(codes, scales, bits, block, cols, dtype),
    ]


def _expect(calls, exc, *words):
    for call in calls:
        with pytest.raises(exc) as info:
            call()
        msg = str(info.value)
        for w in words:
            assert w in msg, f"{w!r} not in {msg!r}"


X = torch.randn(4, 64)


@pytest.mark.parametrize("bits", [3, 16, 0, -8])
def test_quantize_bad_bits(bits, device):
    _expect(_both_quantize(X.to(device), bits=bits), ValueError, "bits", "(2, 4, 8)", str(bits))


@pytest.mark.parametrize("block", [0, -1])
def test_quantize_bad_block(block, device):
    _expect(_both_quantize(X.to(device), block=block), ValueError, "block", ">= 1", str(block))


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64, torch.bool, torch.uint8, torch.int64])
def test_quantize_bad_dtype(dtype, device):
    _expect(_both_quantize(torch.ones(4, 64, dtype=dtype, device=device)), ValueError,
            "x must be float32, float16 or bfloat16")


def _expect_non_finite(x, bits=8, block=64, stochastic=False):
    """On CPU the op raises with the count; elsewhere (no host sync) exactly the blocks holding one get a non-finite scale."""
    n = int((~torch.isfinite(x)).sum())
    if x.device.type == "cpu":
        _expect(_both_quantize(x, bits, block, stochastic), RuntimeError, f"x has {n} non-finite value(s)")
        return
    rows, cols = x.numel() // x.shape[-1], x.shape[-1]
    bad = torch.nn.functional.pad(~torch.isfinite(x.reshape(rows, cols)), (0, -cols % block))
    bad_blocks = bad.reshape(rows, -1, block).any(-1).reshape(*x.shape[:-1], -1)
    for call in _both_quantize(x, bits, block, stochastic):
        _, scales = call()
        assert torch.equal(~torch.isfinite(scales), bad_blocks)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_nan(dtype, device):
    x = torch.randn(4, 100).to(device, dtype)
    x[0, 3] = float("nan")
    x[2, 99] = float("nan")
    _expect_non_finite(x, bits=4, block=16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_quantize_inf(dtype, device):
    x = torch.randn(3, 5, 50).to(device, dtype)
    x[0, 0, 0] = float("inf")
    x[1, 4, 7] = float("-inf")
    x[1, 4, 8] = float("inf")
    _expect_non_finite(x, bits=2, block=7, stochastic=True)


def test_quantize_nonfinite_everywhere(device):
    x = torch.full((50, 300), float("nan"), device=device)
    x[::2] = float("inf")
    _expect_non_finite(x)


def _packed(bits=8, block=64, cols=64, rows=4, device="cpu"):
    codes, scales = q_op(torch.randn(rows, cols, device=device), bits, block, False, 0)
    return codes, scales


def test_dequantize_codes_wrong_last_dim(device):
    codes, scales = _packed(bits=4, device=device)
    _expect(_both_dequantize(codes[:, :-1], scales, bits=4), ValueError, "codes last dim", "32", "31")


def test_dequantize_scales_wrong_last_dim(device):
    codes, scales = _packed(block=16, device=device)
    _expect(_both_dequantize(codes, scales[:, :3], block=16), ValueError, "scales last dim", "4", "3")


def test_dequantize_leading_shape_mismatch(device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes, scales[:3]), ValueError, "leading shapes must match")
    _expect(_both_dequantize(codes.reshape(2, 2, 64), scales), ValueError, "leading shapes must match")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.float32])
def test_dequantize_codes_wrong_dtype(dtype, device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes.to(dtype), scales), ValueError, "codes must be uint8")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.int32])
def test_dequantize_scales_wrong_dtype(dtype, device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes, scales.to(dtype)), ValueError, "scales must be float32")


def test_dequantize_negative_cols(device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes, scales, cols=-1), ValueError, "cols must be >= 0")


@pytest.mark.parametrize("bits,block", [(3, 64), (8, 0)])
def test_dequantize_bad_bits_block(bits, block, device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes, scales, bits=bits, block=block), ValueError, "bits" if bits == 3 else "block")


def test_dequantize_zero_dim_codes(device):
    _expect(_both_dequantize(torch.tensor(3, dtype=torch.uint8, device=device), torch.tensor(1.0, device=device),
                             cols=1), ValueError,
            "at least 1 dimension")


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8])
def test_dequantize_bad_output_dtype(dtype, device):
    codes, scales = _packed(device=device)
    _expect(_both_dequantize(codes, scales, dtype=dtype), ValueError, "dtype must be float32, float16 or bfloat16")
