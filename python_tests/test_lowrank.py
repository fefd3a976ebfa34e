"""CPU and CUDA kernels of the randomized low-rank ops against ``sft_kernels.reference``.

Randomized factors are unique only up to sign/rotation, so outputs are compared
through the reconstruction ``P @ Q.T`` (relative Frobenius distance), plus the
structural properties the spec promises (orthonormal Q, U, V; descending S).
Tolerances: the kernels and the reference run the same algorithm with the same
Philox sketch, so the difference is float rounding amplified by the spectral
gap at the truncation rank; fp16/bf16 outputs add one rounding of P and Q.
Tests taking ``device`` also run on CUDA when present, where cuBLAS/cuSOLVER
replace the CPU BLAS/LAPACK: the op is held to the same tolerances against the
reference on the same device and against the CPU kernel.
"""
from __future__ import annotations

import math

import pytest
import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft.*)
from sft_kernels import ops
from sft_kernels import reference as ref

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# relative Frobenius tolerance of P @ Q.T (vs the reference) per output dtype
RECON_TOL = {torch.float32: 2e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}
# max |Q^T Q - I| per output dtype
ORTHO_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
POWER_ITERS = (-1, 0, 1, 2)


def decaying(n: int, h: int, seed: int = 0, decay: str = "poly", dtype=torch.float32) -> torch.Tensor:
    """``n x h`` matrix with random singular vectors and singular values ``1/(1+i)`` or ``exp(-i/10)``."""
    g = torch.Generator().manual_seed(seed)
    m = min(n, h)
    u, _ = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(h, m, generator=g, dtype=torch.float64))
    i = torch.arange(m, dtype=torch.float64)
    s = 1.0 / (1.0 + i) if decay == "poly" else torch.exp(-i / 10.0)
    return ((u * s) @ v.T).to(dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b||_F / ||b||_F`` in fp32 (0 when both are 0)."""
    a, b = a.float(), b.float()
    den = b.norm().item()
    return (a - b).norm().item() / den if den > 0 else (a - b).norm().item()


def ortho_err(q: torch.Tensor) -> float:
    q = q.double()
    return (q.T @ q - torch.eye(q.shape[1], dtype=torch.float64, device=q.device)).abs().max().item()


def on_cpu(op, *args):
    """``op`` on the CPU for the same arguments (tensors copied there), to compare a CUDA result with."""
    return op(*[a.cpu() if isinstance(a, torch.Tensor) else a for a in args])


# (name, builder(dtype, device), rank): inputs covering odd sizes, leading dims and strides
CASES = {
    "contig": (lambda dt, dev: decaying(96, 48, 1, dtype=dt).to(dev), 6),
    "transposed": (lambda dt, dev: decaying(48, 96, 2, dtype=dt).to(dev).T, 6),  # non-contiguous (96, 48)
    "strided": (lambda dt, dev: decaying(96, 100, 3, dtype=dt).to(dev)[:, ::2], 5),  # non-contiguous (96, 50)
    "n1_h7": (lambda dt, dev: torch.randn(1, 7).to(dev, dt), 1),
    "3d": (lambda dt, dev: decaying(60, 40, 4, dtype=dt).reshape(3, 20, 40).to(dev), 4),
    "1d": (lambda dt, dev: torch.randn(9).to(dev, dt), 1),
    "0d": (lambda dt, dev: torch.tensor(2.5).to(dev, dt), 1),
    "tall_odd": (lambda dt, dev: decaying(1003, 37, 5, dtype=dt).to(dev), 8),  # several fused-kernel chunks, ragged tile
    "wide_k": (lambda dt, dev: decaying(300, 200, 6, decay="exp", dtype=dt).to(dev), 60),  # k = 70 > 64: MKL path
}


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("power_iters", POWER_ITERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", sorted(CASES))
def test_lowrank_matches_reference(case, dtype, power_iters, device):
    build, rank = CASES[case]
    x = build(dtype, device)
    p, q = torch.ops.sft.lowrank(x, rank, 10, power_iters, 7)
    pr, qr = ref.lowrank(x, rank, 10, power_iters, 7)
    n = x.numel() // x.shape[-1] if x.dim() else 1
    h = x.shape[-1] if x.dim() else 1
    assert p.shape == (n, rank) and q.shape == (h, rank)
    assert p.dtype == dtype and q.dtype == dtype
    assert p.is_contiguous() and q.is_contiguous()
    recon, recon_ref = p.float() @ q.float().T, pr.float() @ qr.float().T
    assert rel(recon, recon_ref) <= RECON_TOL[dtype]
    assert ortho_err(q) <= ORTHO_TOL[dtype]
    if device != "cpu":
        pc, qc = on_cpu(torch.ops.sft.lowrank, x, rank, 10, power_iters, 7)
        assert p.device == x.device and rel(recon.cpu(), pc.float() @ qc.float().T) <= RECON_TOL[dtype]


@pytest.mark.parametrize("transposed", (False, True), ids=("contig", "transposed"))
@pytest.mark.parametrize("power_iters", POWER_ITERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_randomized_svd_matches_reference(dtype, power_iters, transposed, device):
    w = decaying(120, 70, 11, decay="exp", dtype=dtype).to(device)
    if transposed:  # same values, column-major (as for a weight passed as lin.weight.T)
        w = w.T.contiguous().T
    u, s, v = torch.ops.sft.randomized_svd(w, 8, 8, power_iters, 3)
    ur, sr, vr = ref.randomized_svd(w, 8, 8, power_iters, 3)
    assert u.shape == (120, 8) and s.shape == (8,) and v.shape == (70, 8)
    assert u.dtype == s.dtype == v.dtype == dtype
    assert ortho_err(u) <= ORTHO_TOL[dtype]
    assert ortho_err(v) <= ORTHO_TOL[dtype]
    sf = s.float()
    assert torch.all(sf[:-1] >= sf[1:]), "singular values must be descending"
    assert rel(sf, sr.float()) <= RECON_TOL[dtype]
    recon = (u.float() * sf) @ v.float().T
    assert rel(recon, (ur.float() * sr.float()) @ vr.float().T) <= RECON_TOL[dtype]
    if device != "cpu":
        uc, sc, vc = on_cpu(torch.ops.sft.randomized_svd, w, 8, 8, power_iters, 3)
        assert rel(sf.cpu(), sc.float()) <= RECON_TOL[dtype]
        assert rel(recon.cpu(), (uc.float() * sc.float()) @ vc.float().T) <= RECON_TOL[dtype]


@pytest.mark.parametrize("shape", ((200, 72, 6), (1, 16, 1), (12, 1, 1), (3, 5, 33, 4)), ids=str)
@pytest.mark.parametrize("power_iters", POWER_ITERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_lowrank_quantize_matches_reference(bits, dtype, power_iters, shape, device):
    *lead, cols, rank = shape
    rows, block = math.prod(lead), 32
    x = decaying(rows, cols, 21, dtype=dtype).reshape(*lead, cols).to(device)
    got = torch.ops.sft.lowrank_quantize(x, rank, 8, power_iters, bits, block, False, 5)
    want = ref.lowrank_quantize(x, rank, 8, power_iters, bits, block, False, 5)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype and g.is_contiguous()
    rec = torch.ops.sft.lowrank_dequantize(*got, rows, cols, rank, bits, block, torch.float32)
    rec_ref = ref.lowrank_dequantize(*want, rows, cols, rank, bits, block, torch.float32)
    # P and Q differ from the reference by rounding; a code may then flip by one
    # step, so allow a fraction of one quantization step (relative to absmax).
    step = 1.0 / (2 ** (bits - 1) - 1)
    assert rel(rec, rec_ref) <= max(RECON_TOL[dtype], 0.05 * step)
    # and the reconstruction is as good as the reference's
    x2 = x.reshape(rows, cols)
    assert rel(rec, x2) <= rel(rec_ref, x2) * 1.01 + 1e-4
    if device != "cpu":
        codes_cpu = on_cpu(torch.ops.sft.lowrank_quantize, x, rank, 8, power_iters, bits, block, False, 5)
        rec_cpu = torch.ops.sft.lowrank_dequantize(*codes_cpu, rows, cols, rank, bits, block, torch.float32)
        assert rel(rec.cpu(), rec_cpu) <= max(RECON_TOL[dtype], 0.05 * step)


def test_lowrank_quantize_is_lowrank_then_quantize(device):
    """The fused op quantizes exactly the factors `lowrank` returns (P with seed, Q with seed + 1)."""
    x = decaying(150, 64, 8).to(device)
    for stochastic, seed in ((False, 0), (True, 12345), (True, -1)):  # -1: seed + 1 wraps to 0
        p, q = torch.ops.sft.lowrank(x, 5, 6, 1, seed)
        pc, ps, qc, qs = torch.ops.sft.lowrank_quantize(x, 5, 6, 1, 4, 16, stochastic, seed)
        epc, eps_ = ref.quantize(p.T.contiguous(), 4, 16, stochastic, seed)
        eqc, eqs = ref.quantize(q.T.contiguous(), 4, 16, stochastic, (seed + 1) & 0xFFFFFFFFFFFFFFFF)
        assert torch.equal(pc, epc) and torch.equal(ps, eps_)
        assert torch.equal(qc, eqc) and torch.equal(qs, eqs)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_lowrank_dequantize_matches_reference(bits, dtype, device):
    x = decaying(130, 50, 31).to(device)
    codes = ref.lowrank_quantize(x, 4, 4, 1, bits, 16, True, 9)
    got = torch.ops.sft.lowrank_dequantize(*codes, 130, 50, 4, bits, 16, dtype)
    want = ref.lowrank_dequantize(*codes, 130, 50, 4, bits, 16, dtype)
    assert got.shape == (130, 50) and got.dtype == dtype and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if device != "cpu":
        torch.testing.assert_close(got.cpu(), on_cpu(torch.ops.sft.lowrank_dequantize, *codes, 130, 50, 4, bits, 16,
                                                     dtype), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("decay", ("poly", "exp"))
@pytest.mark.parametrize("power_iters", (0, 1, 2))
def test_accuracy_vs_torch_svd_lowrank(decay, power_iters, device):
    """Mean relative error over 5 seeds <= 1.05 x torch.svd_lowrank (same k, niter), truncated to rank."""
    rank, oversample = 8, 8
    k = rank + oversample
    ours, theirs = [], []
    for seed in range(5):
        x = decaying(512, 256, 100 + seed, decay=decay).to(device)
        p, q = ops.lowrank(x, rank, oversample, power_iters, seed)
        ours.append(rel(p @ q.T, x))
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(x, q=k, niter=power_iters)
        theirs.append(rel((u[:, :rank] * s[:rank]) @ v[:, :rank].T, x))
    assert sum(ours) / 5 <= 1.05 * sum(theirs) / 5


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
def test_half_input_is_as_accurate_as_fp32(dtype, device):
    """fp16/bf16 input (fp32 Gram) loses nothing beyond its own rounding: the later CholeskyQR passes don't shrink Q."""
    x = decaying(4096, 768, 11).to(device)
    e32 = rel(torch.matmul(*_pq(ops.lowrank(x, 8, 8, 1, 0))), x)
    e16 = rel(torch.matmul(*_pq(ops.lowrank(x.to(dtype), 8, 8, 1, 0))), x)
    assert e16 <= 1.01 * e32, (e16, e32)


def _pq(pq):
    p, q = pq
    return p.float(), q.float().T


def test_single_pass_error_is_bounded(device):
    """The single-pass sketch is less accurate than two passes, but still a useful approximation."""
    x = decaying(512, 256, 7, decay="exp").to(device)
    best = torch.linalg.svdvals(x)[8:].norm() / x.norm()
    p, q = ops.lowrank(x, 8, 16, -1, 0)
    assert rel(p @ q.T, x) <= 1.5 * best.item()


# ----------------------------------------------------------------------------- determinism, edge cases


@pytest.mark.parametrize("power_iters", POWER_ITERS)
def test_same_seed_same_output(power_iters, device):
    x = decaying(300, 64, 1).to(device)
    a = torch.ops.sft.lowrank(x, 8, 8, power_iters, 42)
    b = torch.ops.sft.lowrank(x, 8, 8, power_iters, 42)
    c = torch.ops.sft.lowrank(x, 8, 8, power_iters, 43)
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_autocast_does_not_change_the_computation(dtype, device):
    """An enclosing autocast must not turn the kernels' internal fp32 GEMMs into half-precision ones."""
    x = decaying(120, 64, 2).to(device)
    want = [torch.ops.sft.lowrank(x, 6, 6, 1, 0), torch.ops.sft.randomized_svd(x, 6, 6, 1, 0),
            torch.ops.sft.lowrank_quantize(x, 6, 6, 1, 8, 32, False, 0)]
    with torch.autocast(device, dtype=dtype):
        got = [torch.ops.sft.lowrank(x, 6, 6, 1, 0), torch.ops.sft.randomized_svd(x, 6, 6, 1, 0),
               torch.ops.sft.lowrank_quantize(x, 6, 6, 1, 8, 32, False, 0)]
        rec = torch.ops.sft.lowrank_dequantize(*got[2], 120, 64, 6, 8, 32, torch.float32)
    for g, w in zip(got, want):
        assert all(torch.equal(a, b) for a, b in zip(g, w))
    assert rec.dtype == torch.float32


def test_outputs_do_not_alias_input(device):
    x = torch.randn(1, 4).to(device)
    p, q = torch.ops.sft.lowrank(x, 1, 0, 0, 0)
    for t in (p, q):
        assert t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()


def test_empty_input(device):
    x = torch.randn(0, 16, device=device)
    p, q = torch.ops.sft.lowrank(x, 4, 8, 1, 0)
    assert p.shape == (0, 4) and q.shape == (16, 4) and not q.any()
    assert p.device == q.device == x.device
    p, q = ops.lowrank(torch.randn(0, 3, 16, dtype=torch.bfloat16, device=device), 4)
    assert p.shape == (0, 4) and q.shape == (16, 4) and q.dtype == torch.bfloat16
    u, s, v = torch.ops.sft.randomized_svd(x, 4, 8, 1, 0)
    assert u.shape == (0, 4) and s.shape == (4,) and v.shape == (16, 4)
    pc, ps, qc, qs = torch.ops.sft.lowrank_quantize(x, 4, 8, 1, 4, 8, False, 0)
    assert pc.shape == (4, 0) and ps.shape == (4, 0) and qc.shape == (4, 8) and qs.shape == (4, 2)
    rec = torch.ops.sft.lowrank_dequantize(pc, ps, qc, qs, 0, 16, 4, 4, 8, torch.float16)
    assert rec.shape == (0, 16) and rec.dtype == torch.float16


@pytest.mark.parametrize("power_iters", POWER_ITERS)
def test_rank_deficient_input(power_iters, device):
    a, b = torch.randn(200, 1).to(device), torch.randn(1, 50).to(device)
    x = a @ b  # rank 1
    for xi in (x, b.expand(200, 50)):  # the second has row stride 0 and is read in place
        p, q = ops.lowrank(xi, 6, 8, power_iters)
        assert torch.isfinite(p).all() and torch.isfinite(q).all()
        assert rel(p @ q.T, xi) <= 1e-5
        assert ortho_err(q) <= ORTHO_TOL[torch.float32]
    u, s, v = ops.randomized_svd(x, 6, 8, power_iters)
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and s[1:].abs().max() <= 1e-5 * s[0]
    assert ortho_err(v) <= ORTHO_TOL[torch.float32]
    # (U's columns beyond rank(x) may be ~0: shifted CholeskyQR, as specified, cannot create
    # orthonormal directions out of an exactly rank-deficient sketch; U S V^T is still exact.)
    assert rel((u * s) @ v.T, x) <= 1e-5

    z = torch.zeros(200, 50, device=device)
    p, q = ops.lowrank(z, 6, 8, power_iters)
    assert torch.isfinite(q).all() and not p.any()
    codes = ops.lowrank_quantize(z, 6, 8, power_iters, bits=4, block=16)
    assert torch.equal(ops.lowrank_dequantize(*codes, 200, 50, 6, 4, 16), z)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_samples(device):
    x = decaying(40, 24, 3).to(device)
    codes = ref.lowrank_quantize(x, 4, 4, 1, 4, 8, False, 0)
    return [
        (torch.ops.sft.lowrank.default, (x, 4, 4, 1, 0)),
        (torch.ops.sft.lowrank.default, (x.to(torch.bfloat16).reshape(4, 10, 24), 3, 2, -1, 5)),
        (torch.ops.sft.randomized_svd.default, (x, 4, 4, 2, 1)),
        (torch.ops.sft.lowrank_quantize.default, (x, 4, 4, 1, 4, 8, True, 3)),
        (torch.ops.sft.lowrank_dequantize.default, (*codes, 40, 24, 4, 4, 8, torch.float16)),
    ]


@pytest.mark.parametrize("i", range(5))
def test_opcheck(i, device):
    op, args = _opcheck_samples(device)[i]
    torch.library.opcheck(op, args)


# ----------------------------------------------------------------------------- bad input

# Every bad input raises through both the Python wrapper and the raw op.
PATHS = ("wrapper", "raw")


def _lowrank(path, x, rank=2, oversample=4, power_iters=1, seed=0):
    if path == "wrapper":
        return ops.lowrank(x, rank, oversample, power_iters, seed)
    return torch.ops.sft.lowrank(x, rank, oversample, power_iters, seed)


def _lowrank_quantize(path, x, rank=2, bits=8, block=64):
    if path == "wrapper":
        return ops.lowrank_quantize(x, rank, 4, 1, bits, block)
    return torch.ops.sft.lowrank_quantize(x, rank, 4, 1, bits, block, False, 0)


def _svd(path, w, rank=2):
    if path == "wrapper":
        return ops.randomized_svd(w, rank)
    return torch.ops.sft.randomized_svd(w, rank, 4, 1, 0)


@pytest.mark.parametrize("path", PATHS)
def test_bad_rank_zero(path, device):
    with pytest.raises(ValueError, match="rank"):
        _lowrank(path, torch.randn(8, 6, device=device), rank=0)
    with pytest.raises(ValueError, match="rank"):
        _svd(path, torch.randn(8, 6, device=device), rank=0)


@pytest.mark.parametrize("path", PATHS)
def test_bad_rank_too_large(path, device):
    with pytest.raises(ValueError, match=r"rank must be <= min\(N, H\)"):
        _lowrank(path, torch.randn(8, 6, device=device), rank=7)
    with pytest.raises(ValueError, match=r"rank must be <= min\(N, H\)"):
        _lowrank_quantize(path, torch.randn(3, 6, device=device), rank=4)


@pytest.mark.parametrize("path", PATHS)
def test_bad_oversample(path, device):
    with pytest.raises(ValueError, match="oversample"):
        _lowrank(path, torch.randn(8, 6, device=device), oversample=-1)


@pytest.mark.parametrize("path", PATHS)
def test_bad_power_iters(path, device):
    with pytest.raises(ValueError, match="power_iters"):
        _lowrank(path, torch.randn(8, 6, device=device), power_iters=-2)


@pytest.mark.parametrize("path", PATHS)
def test_bad_bits(path, device):
    with pytest.raises(ValueError, match="bits"):
        _lowrank_quantize(path, torch.randn(8, 6, device=device), bits=3)


@pytest.mark.parametrize("path", PATHS)
def test_bad_block(path, device):
    with pytest.raises(ValueError, match="block"):
        _lowrank_quantize(path, torch.randn(8, 6, device=device), block=0)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", (torch.int32, torch.float64), ids=str)
def test_bad_dtype(path, dtype, device):
    x = torch.ones(8, 6, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        _lowrank(path, x)
    with pytest.raises(ValueError, match="x must be float32, float16 or bfloat16"):
        _lowrank_quantize(path, x)
    with pytest.raises(ValueError, match="w must be float32, float16 or bfloat16"):
        _svd(path, x)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("bad", (float("nan"), float("inf"), -float("inf")))
@pytest.mark.parametrize("power_iters", (-1, 1))
def test_non_finite_input(path, bad, power_iters, device):
    x = torch.randn(40, 6, device=device)
    x[3, 2] = bad
    x[17, 0] = bad
    with pytest.raises(RuntimeError, match="x has 2 non-finite value"):
        _lowrank(path, x, power_iters=power_iters)
    with pytest.raises(RuntimeError, match="x has 2 non-finite value"):
        _lowrank_quantize(path, x.to(torch.bfloat16))
    with pytest.raises(RuntimeError, match="w has 2 non-finite value"):
        _svd(path, x)


@pytest.mark.parametrize("path", PATHS)
def test_bad_w_not_2d(path, device):
    with pytest.raises(ValueError, match="w must be 2-D"):
        _svd(path, torch.randn(2, 8, 6, device=device))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("what", ("rows", "cols", "rank", "bits", "block", "p_scales", "q_codes_1d"))
def test_bad_lowrank_dequantize_shapes(path, what, device):
    rows, cols, rank, bits, block = 40, 24, 4, 4, 8
    pc, ps, qc, qs = ref.lowrank_quantize(decaying(rows, cols, 0).to(device), rank, 4, 1, bits, block, False, 0)
    args = dict(rows=rows, cols=cols, rank=rank, bits=bits, block=block)
    if what in ("rows", "cols", "rank"):
        args[what] += 1
    elif what == "bits":
        args["bits"] = 8  # valid value, but the codes were packed with 4 bits
    elif what == "block":
        args["block"] = 16  # valid value, but the scales were computed with block 8
    elif what == "p_scales":
        ps = ps[:, :-1]
    else:
        qc = qc[0]
    call = ops.lowrank_dequantize if path == "wrapper" else torch.ops.sft.lowrank_dequantize
    with pytest.raises(ValueError, match="codes|scales"):
        call(pc, ps, qc, qs, args["rows"], args["cols"], args["rank"], args["bits"], args["block"], torch.float32)

