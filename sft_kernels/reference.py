"""Pure-PyTorch reference of every ``sft::`` op: the executable spec.

The compiled kernels (``csrc/cpu``, later ``csrc/cuda``) are tested against the
functions here.  They are written for clarity, not speed, and are never used as
a silent runtime fallback: production code calls ``torch.ops.sft.*``.

This module must not import anything from the rest of the package except the
argument checks in :mod:`sft_kernels._checks`.

Every function works on any device: each tensor it creates (index ranges,
Philox counters, sketches, identity matrices) lives on its input's device, so
the same code is the CUDA path where no fused kernel is registered
(:mod:`sft_kernels._cuda`).  Quantization uses only exactly rounded fp32
operations, so it is bit-identical on every device; the low-rank ops run
through the device's BLAS and LAPACK and agree within rounding.  Constants are
device tensors, not CPU scalars: CUDA divides by a CPU scalar as a multiply by
its reciprocal, which is not IEEE division.

Non-finite input: on CPU every op raises ``RuntimeError`` with the count.  On
other devices :func:`quantize` does not check (raising would need a host
sync); non-finite input gives non-finite scales there, which the codecs
report.  The low-rank ops check on every device: their LAPACK calls
synchronise anyway.

Quantization format (bit-exact contract)
----------------------------------------
* Symmetric absmax in blocks of ``block`` consecutive elements of the last dim.
* ``qmax = 2**(bits-1) - 1``; int2 is ternary {-1, 0, 1}.
* ``scale = fp32(absmax(block)) / qmax`` (IEEE fp32 division).  An all-zero
  block has scale 0 and every element of it has ``q = 0``.
* ``t = fp32(x) / scale`` (IEEE fp32 division, never a reciprocal multiply).
  Deterministic: ``q = round_half_away_from_zero(t)``.  Stochastic:
  ``q = floor(t + u)`` with the fp32 sum ``t + u`` rounded to nearest.  Then
  ``q`` is clamped to ``[-qmax, qmax]``.
* Stored code ``q + 2**(bits-1)``, packed little-endian within a byte: element
  ``j`` of a row sits in byte ``j*bits//8`` at bit offset ``(j*bits) % 8``.
  Each row is padded to a whole byte (pad bits are 0).
* ``codes``: ``(..., ceil(cols*bits/8))`` uint8, ``scales``: ``(..., ceil(cols/block))`` fp32.
* Decode: ``fp32(code - 2**(bits-1)) * scale``, then cast to the output dtype.

Stochastic rounding draws ``u`` from Philox4x32-10: for the element with
row-major index ``i`` in the logical input, ``key = (seed mod 2**32, seed >> 32)``
(the seed taken as an unsigned 64-bit value), ``counter = (i//4 mod 2**32, i//4 >> 32, 0, 0)``;
the element takes output word ``i % 4`` as ``r`` and ``u = (r >> 8) * 2**-24``.

Random test matrix of the low-rank ops
--------------------------------------
Entry ``(i, j)`` of the ``H x k`` sketch Omega has index ``e = i*k + j``; it is
drawn from Philox with the same key but counter ``(e//4 mod 2**32, e//4 >> 32, 1, 0)``
(stream 1, so the sketch never shares random words with stochastic rounding),
word ``e % 4``: Omega[i, j] = +1 if the word's top bit is 0 else -1 (Rademacher).

Low-rank algorithm (Halko-Martinsson-Tropp range finder)
--------------------------------------------------------
``x`` is viewed as ``N x H``; ``k = min(rank + oversample, N, H)``.
``Y = X Omega``, ``Q = orth(Y)``; each power iteration: ``Z = orth(X^T Q)``,
``Q = orth(X Z)``.  ``B = Q^T X`` (k x H), ``B = Ub S Vb^T``,
``P = Q Ub[:, :r] diag(S[:r])`` and ``Qout = Vb[:, :r]``.  ``orth`` is shifted
CholeskyQR3: three Cholesky-QR passes; the first with the diagonal shift
``s = 11 (m k + k (k+1)) u ||Y||_F^2 + tiny`` (``u`` the unit roundoff of the
Gram dtype) so that Cholesky cannot fail, the other two with the small floor
``s = k u ||Q||_F^2 + tiny`` that keeps exactly rank-deficient columns finite
without shrinking the near-orthonormal Q; Gram and Cholesky in fp64 for fp32 input and fp32 for
fp16/bf16.  ``power_iters = -1`` selects the single-pass sketch (Tropp et al.
2017): ``Y = X Omega`` and ``W = Psi X`` come from one read of ``X`` with a
second sketch ``Psi`` (``l x N``, ``l = 2k + 1``, Philox stream 2, index
``e = i*N + j``); ``Q = orth(Y)``, ``B = lstsq(Psi Q, W)``.

``lowrank_quantize`` quantizes ``P^T`` (rank x N) and ``Q^T`` (rank x H) with
the format above: blocks run along the token axis for P.  P uses ``seed``, Q
uses ``seed + 1`` (mod 2**64) for stochastic rounding.
"""
from __future__ import annotations

import math

import torch

from ._checks import (
    check_bits_block,
    check_float_input,
    check_lowrank_args,
    check_out_dtype,
    check_packed_shapes,
    lowrank_k,
)

__all__ = [
    "philox4x32",
    "philox_uniform",
    "rademacher",
    "quantize",
    "dequantize",
    "lowrank",
    "randomized_svd",
    "lowrank_quantize",
    "lowrank_dequantize",
]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57
_W0, _W1 = 0x9E3779B9, 0xBB67AE85
STREAM_ROUNDING, STREAM_SKETCH, STREAM_SKETCH2 = 0, 1, 2


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """32x32->64-bit multiply of constant ``a`` by int64 tensor ``b`` (< 2**32), without int64 overflow."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ll = a_lo * b_lo
    lh = a_lo * b_hi
    hl = a_hi * b_lo
    hh = a_hi * b_hi
    mid = (ll >> 16) + (lh & 0xFFFF) + (hl & 0xFFFF)
    lo = ((mid & 0xFFFF) << 16) | (ll & 0xFFFF)
    hi = hh + (lh >> 16) + (hl >> 16) + (mid >> 16)
    return hi & _MASK32, lo & _MASK32


def philox4x32(counter: tuple[torch.Tensor, ...], seed: int) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 on int64 tensors holding 32-bit words; returns the 4 output words."""
    s = seed & 0xFFFFFFFFFFFFFFFF
    k0, k1 = s & _MASK32, s >> 32
    c0, c1, c2, c3 = counter
    for rnd in range(10):
        if rnd:
            k0 = (k0 + _W0) & _MASK32
            k1 = (k1 + _W1) & _MASK32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _philox_words(index: torch.Tensor, seed: int, stream: int) -> torch.Tensor:
    """The 32-bit Philox word (as int64) for each element index of ``index``."""
    block = index // 4
    c0 = block & _MASK32
    c1 = block >> 32
    c2 = torch.full_like(block, stream)
    c3 = torch.zeros_like(block)
    words = torch.stack(philox4x32((c0, c1, c2, c3), seed), dim=-1)
    return torch.gather(words, -1, (index % 4).unsqueeze(-1)).squeeze(-1)


def philox_uniform(
    numel: int, seed: int, stream: int = STREAM_ROUNDING, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Uniforms ``u = (r >> 8) * 2**-24`` in [0, 1), fp32 on ``device``, for element indices 0..numel-1."""
    idx = torch.arange(numel, dtype=torch.int64, device=device)
    r = _philox_words(idx, seed, stream)
    return (r >> 8).to(torch.float32) * (2.0**-24)


def rademacher(
    rows: int, cols: int, seed: int, stream: int = STREAM_SKETCH, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The ``rows x cols`` +-1 fp32 test matrix on ``device``: entry (i, j) uses index i*cols + j."""
    idx = torch.arange(rows * cols, dtype=torch.int64, device=device)
    r = _philox_words(idx, seed, stream)
    return torch.where((r >> 31) == 0, 1.0, -1.0).to(torch.float32).reshape(rows, cols)


# Python indexing (``t[:, :n]``) and ``Tensor.contiguous()`` take a device guard, which a
# CPU-only build of torch lacks for CUDA; the two helpers below avoid them so that this
# module also runs on fake CUDA tensors, which is how CPU CI checks it creates nothing
# on the wrong device.


def _first(t: torch.Tensor, n: int) -> torch.Tensor:
    """The first ``n`` entries of ``t`` along its last dim, as a view (``t[..., :n]``)."""
    return t.narrow(-1, 0, n)


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t.contiguous()``."""
    return t if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format)


def _check_finite(x: torch.Tensor, op: str, name: str, hint: str = "") -> None:
    """Raise ``RuntimeError`` with the count of non-finite values of ``x`` (a host sync off the CPU)."""
    if x.numel() and not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise RuntimeError(f"{op}: {name} has {bad} non-finite value(s){hint}")


# ----------------------------------------------------------------------------- quantization


def quantize(
    x: torch.Tensor, bits: int, block: int, stochastic: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``sft::quantize``: returns ``(codes uint8, scales fp32)``."""
    check_float_input(x, "x")
    check_bits_block(bits, block)
    lead, cols = tuple(x.shape[:-1]), (x.shape[-1] if x.dim() else 1)
    xf = x.detach().reshape(-1, cols).to(torch.float32) if x.dim() else x.detach().reshape(1, 1).float()
    rows = xf.shape[0]
    nblk = -(-cols // block)
    nbytes = -(-cols * bits // 8)
    if x.device.type == "cpu":
        _check_finite(xf, "sft::quantize", "x", "; only finite input can be quantized")
    qmax = 2 ** (bits - 1) - 1
    pad = nblk * block - cols
    xp = torch.nn.functional.pad(xf, (0, pad)).reshape(rows, nblk, block)
    absmax = xp.abs().amax(dim=-1) if rows else xf.new_zeros(rows, nblk)
    scales = absmax / xf.new_full((), float(qmax))  # a device tensor: a true fp32 division on every device
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    t = _first((xp / safe.unsqueeze(-1)).reshape(rows, nblk * block), cols)
    if stochastic:
        u = philox_uniform(rows * cols, seed, device=xf.device).reshape(rows, cols)
        q = torch.floor(t + u)
    else:
        a = t.abs()
        f = torch.floor(a)
        q = torch.sign(t) * (f + ((a - f) >= 0.5).to(torch.float32))
    q = torch.clamp(q, -qmax, qmax)
    zero_blk = _first((scales == 0).repeat_interleave(block, dim=-1), cols)
    q = torch.where(zero_blk, torch.zeros_like(q), q)
    ucode = (q.to(torch.int64) + 2 ** (bits - 1))
    per_byte = 8 // bits
    ucode = torch.nn.functional.pad(ucode, (0, nbytes * per_byte - cols)).reshape(rows, nbytes, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64, device=ucode.device) * bits
    # pad elements were filled with 0 after the offset was added, so pad bits are 0
    packed = (ucode << shifts).sum(dim=-1).to(torch.uint8)
    return packed.reshape(*lead, nbytes), scales.reshape(*lead, nblk)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, cols: int, dtype: torch.dtype
) -> torch.Tensor:
    """Reference ``sft::dequantize``: the inverse of :func:`quantize` up to rounding."""
    check_bits_block(bits, block)
    check_out_dtype(dtype)
    check_packed_shapes(codes, scales, bits, block, cols)
    lead = tuple(codes.shape[:-1])
    rows = math.prod(lead)
    per_byte = 8 // bits
    c = codes.reshape(rows, codes.shape[-1]).to(torch.int64)
    shifts = torch.arange(per_byte, dtype=torch.int64, device=c.device) * bits
    vals = _first(((c.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(rows, c.shape[-1] * per_byte), cols)
    q = (vals - 2 ** (bits - 1)).to(torch.float32)
    s = _first(scales.reshape(rows, scales.shape[-1]).to(torch.float32).repeat_interleave(block, dim=-1), cols)
    return (q * s).to(dtype).reshape(*lead, cols)


# ----------------------------------------------------------------------------- low rank


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _orth(y: torch.Tensor, gram_dtype: torch.dtype) -> torch.Tensor:
    """Shifted CholeskyQR3 of a tall-skinny ``m x k`` matrix; returns Q in ``y``'s dtype."""
    m, k = y.shape
    u = _unit_roundoff(gram_dtype)
    tiny = torch.finfo(gram_dtype).tiny * 1e4
    eye = torch.eye(k, dtype=gram_dtype, device=y.device)
    q = y
    for p in range(3):
        yg = q.to(gram_dtype)
        g = yg.T @ yg
        rel = 11.0 * (m * k + k * (k + 1)) if p == 0 else float(k)
        shift = rel * u * torch.trace(g) + tiny
        # the shift makes g + shift * eye positive definite, so skip the error check (a host sync on CUDA)
        r = torch.linalg.cholesky_ex(g + shift * eye, upper=True).L
        q = torch.linalg.solve_triangular(r, yg, upper=True, left=False).to(y.dtype)
    return q


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Least-squares solution of ``a @ sol = b``, also for a rank-deficient ``a`` (an exactly low-rank ``x``).

    On CPU this is LAPACK's default driver, the rank-revealing gelsy.  CUDA offers only
    gels, which assumes full rank, so off the CPU the solution comes from the
    pseudo-inverse with gelsy's cutoff ``eps * max(m, n)``.
    """
    if a.device.type == "cpu":
        return torch.linalg.lstsq(a, b).solution
    return torch.linalg.pinv(a, rtol=torch.finfo(a.dtype).eps * max(a.shape)) @ b


def _core(x2: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int):
    """Shared range finder: returns (Qrange, Ub, S, Vb) truncated to ``rank`` (compute dtype)."""
    n, h = x2.shape
    k = lowrank_k(rank, oversample, n, h)
    comp = torch.float32
    gram = torch.float64 if x2.dtype == torch.float32 else torch.float32
    xf = x2.to(comp)
    omega = rademacher(h, k, seed, STREAM_SKETCH, device=x2.device)
    y = xf @ omega
    if power_iters >= 0:
        q = _orth(y, gram)
        for _ in range(power_iters):
            z = _orth(xf.T @ q, gram)
            q = _orth(xf @ z, gram)
        b = q.T @ xf
    else:
        ell = 2 * k + 1
        psi = rademacher(ell, n, seed, STREAM_SKETCH2, device=x2.device)
        w = psi @ xf
        q = _orth(y, gram)
        b = _lstsq((psi @ q).to(gram), w.to(gram)).to(comp)
    ub, s, vbt = torch.linalg.svd(b.to(gram), full_matrices=False)
    return q, _first(ub, rank).to(comp), _first(s, rank).to(comp), _first(vbt.T, rank).to(comp)


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1]
    return x.detach().reshape(-1, h)


def lowrank(
    x: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference ``sft::lowrank``: ``x.reshape(-1, H) ~= P @ Q.T``, Q with orthonormal columns."""
    check_float_input(x, "x")
    x2 = _as_2d(x) if x.dim() >= 1 else x.reshape(1, 1)
    n, h = x2.shape
    check_lowrank_args(rank, oversample, power_iters, n, h)
    if n == 0:
        return x.new_zeros(0, rank), x.new_zeros(h, rank)
    _check_finite(x2, "sft::lowrank", "x")
    q, ub, s, vb = _core(x2, rank, oversample, power_iters, seed)
    p = (q.to(torch.float32) @ ub) * s
    return p.to(x.dtype), vb.to(x.dtype)


def randomized_svd(
    w: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference ``sft::randomized_svd``: ``w ~= U diag(S) V^T`` (U: N x r, S: r, V: H x r)."""
    check_float_input(w, "w")
    if w.dim() != 2:
        raise ValueError(f"sft::randomized_svd: w must be 2-D (N x H), got shape {tuple(w.shape)}")
    n, h = w.shape
    check_lowrank_args(rank, oversample, power_iters, n, h)
    if n == 0:
        return w.new_zeros(0, rank), w.new_zeros(rank), w.new_zeros(h, rank)
    _check_finite(w, "sft::randomized_svd", "w")
    q, ub, s, vb = _core(w.detach(), rank, oversample, power_iters, seed)
    u = q.to(torch.float32) @ ub
    return u.to(w.dtype), s.to(w.dtype), vb.to(w.dtype)


def lowrank_quantize(
    x: torch.Tensor,
    rank: int,
    oversample: int,
    power_iters: int,
    bits: int,
    block: int,
    stochastic: bool,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference ``sft::lowrank_quantize``: low-rank factors of ``x``, then ``P^T`` and ``Q^T`` quantized."""
    check_bits_block(bits, block)
    p, q = lowrank(x, rank, oversample, power_iters, seed)
    pc, ps = quantize(_contiguous(p.T), bits, block, stochastic, seed)
    qc, qs = quantize(_contiguous(q.T), bits, block, stochastic, (seed + 1) & 0xFFFFFFFFFFFFFFFF)
    return pc, ps, qc, qs


def lowrank_dequantize(
    p_codes: torch.Tensor,
    p_scales: torch.Tensor,
    q_codes: torch.Tensor,
    q_scales: torch.Tensor,
    rows: int,
    cols: int,
    rank: int,
    bits: int,
    block: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Reference ``sft::lowrank_dequantize``: ``dequant(P^T)^T @ dequant(Q^T)`` as ``rows x cols``."""
    check_bits_block(bits, block)
    check_out_dtype(dtype)
    pt = dequantize(p_codes, p_scales, bits, block, rows, torch.float32)
    qt = dequantize(q_codes, q_scales, bits, block, cols, torch.float32)
    if pt.shape[0] != rank or qt.shape[0] != rank:
        raise ValueError(
            f"sft::lowrank_dequantize: codes must have rank={rank} rows, got p_codes {tuple(p_codes.shape)} "
            f"and q_codes {tuple(q_codes.shape)}"
        )
    return (pt.T @ qt).to(dtype)
