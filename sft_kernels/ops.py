"""Python wrappers over ``torch.ops.sft.*``, their fake kernels and autograd registrations.

The wrappers validate arguments (``ValueError`` naming the argument and the
valid range) and call the compiled op.  Fake kernels let every op run under
``torch.compile`` / FakeTensor; they return contiguous outputs, exactly the
shapes and strides of the real kernels.

The ops are compression primitives, not differentiable functions: calling them
on a tensor that requires grad and back-propagating raises a clear error.  Use
:func:`sft_kernels.boundary` for a straight-through gradient.

This module knows nothing of codecs, models or the network.
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
    num_blocks,
    packed_cols,
)

__all__ = [
    "quantize",
    "dequantize",
    "lowrank",
    "randomized_svd",
    "lowrank_quantize",
    "lowrank_dequantize",
]

_sft = torch.ops.sft


def _rows_cols(x: torch.Tensor) -> tuple[int, int]:
    if x.dim() == 0:
        return 1, 1
    return math.prod(x.shape[:-1]), x.shape[-1]


# ----------------------------------------------------------------------------- public wrappers


def quantize(
    x: torch.Tensor, bits: int = 8, block: int = 64, stochastic: bool = False, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise symmetric absmax quantization along the last dim (see ``reference`` for the format).

    Returns ``(codes, scales)``: ``codes`` uint8 ``(..., ceil(cols*bits/8))`` and
    ``scales`` fp32 ``(..., ceil(cols/block))``.  ``stochastic=True`` rounds with
    Philox draws keyed by ``seed``.
    """
    check_float_input(x, "x")
    check_bits_block(bits, block)
    return _sft.quantize(x, bits, block, stochastic, seed)


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, cols: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize`: returns ``(..., cols)`` in ``dtype``."""
    check_bits_block(bits, block)
    check_out_dtype(dtype)
    check_packed_shapes(codes, scales, bits, block, cols)
    return _sft.dequantize(codes, scales, bits, block, cols, dtype)


def lowrank(
    x: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomized low-rank factors: ``x.reshape(-1, H) ~= P @ Q.T`` (P: N x rank, Q: H x rank orthonormal).

    ``power_iters=-1`` selects the single-pass sketch, which reads ``x`` once.
    """
    check_float_input(x, "x")
    n, h = _rows_cols(x)
    check_lowrank_args(rank, oversample, power_iters, n, h)
    return _sft.lowrank(x, rank, oversample, power_iters, seed)


def randomized_svd(
    w: torch.Tensor, rank: int, oversample: int = 8, power_iters: int = 2, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized truncated SVD of a 2-D matrix: ``w ~= U @ diag(S) @ V.T``."""
    check_float_input(w, "w")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D (N x H), got shape {tuple(w.shape)}")
    check_lowrank_args(rank, oversample, power_iters, w.shape[0], w.shape[1])
    return _sft.randomized_svd(w, rank, oversample, power_iters, seed)


def lowrank_quantize(
    x: torch.Tensor,
    rank: int,
    oversample: int = 8,
    power_iters: int = 1,
    bits: int = 8,
    block: int = 64,
    stochastic: bool = False,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-rank factors of ``x`` with ``P.T`` and ``Q.T`` quantized: ``(p_codes, p_scales, q_codes, q_scales)``."""
    check_float_input(x, "x")
    check_bits_block(bits, block)
    n, h = _rows_cols(x)
    check_lowrank_args(rank, oversample, power_iters, n, h)
    return _sft.lowrank_quantize(x, rank, oversample, power_iters, bits, block, stochastic, seed)


def lowrank_dequantize(
    p_codes: torch.Tensor,
    p_scales: torch.Tensor,
    q_codes: torch.Tensor,
    q_scales: torch.Tensor,
    rows: int,
    cols: int,
    rank: int,
    bits: int = 8,
    block: int = 64,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reconstruct the ``rows x cols`` matrix from :func:`lowrank_quantize`'s output."""
    check_bits_block(bits, block)
    check_out_dtype(dtype)
    if rows < 0 or cols < 0:
        raise ValueError(f"rows and cols must be >= 0, got rows={rows}, cols={cols}")
    if rank <= 0:
        raise ValueError(f"rank must be >= 1, got {rank}")
    check_packed_shapes(p_codes, p_scales, bits, block, rows)
    check_packed_shapes(q_codes, q_scales, bits, block, cols)
    if p_codes.dim() != 2 or q_codes.dim() != 2 or p_codes.shape[0] != rank or q_codes.shape[0] != rank:
        raise ValueError(
            f"p_codes and q_codes must be 2-D with rank={rank} rows, got {tuple(p_codes.shape)} and "
            f"{tuple(q_codes.shape)}"
        )
    return _sft.lowrank_dequantize(p_codes, p_scales, q_codes, q_scales, rows, cols, rank, bits, block, dtype)


# ----------------------------------------------------------------------------- fake kernels


@torch.library.register_fake("sft::quantize")
def _quantize_fake(x, bits, block, stochastic, seed):
    torch._check(bits in (2, 4, 8), lambda: f"bits must be one of (2, 4, 8), got {bits}")
    torch._check(block > 0, lambda: f"block must be >= 1, got {block}")
    lead = x.shape[:-1] if x.dim() else ()
    cols = x.shape[-1] if x.dim() else 1
    codes = x.new_empty((*lead, packed_cols(cols, bits)), dtype=torch.uint8)
    scales = x.new_empty((*lead, num_blocks(cols, block)), dtype=torch.float32)
    return codes, scales


@torch.library.register_fake("sft::dequantize")
def _dequantize_fake(codes, scales, bits, block, cols, dtype):
    torch._check(bits in (2, 4, 8), lambda: f"bits must be one of (2, 4, 8), got {bits}")
    torch._check(block > 0, lambda: f"block must be >= 1, got {block}")
    return codes.new_empty((*codes.shape[:-1], cols), dtype=dtype)


def _fake_rows(x):
    return (math.prod(x.shape[:-1]) if x.dim() else 1), (x.shape[-1] if x.dim() else 1)


@torch.library.register_fake("sft::lowrank")
def _lowrank_fake(x, rank, oversample, power_iters, seed):
    n, h = _fake_rows(x)
    return x.new_empty((n, rank)), x.new_empty((h, rank))


@torch.library.register_fake("sft::randomized_svd")
def _randomized_svd_fake(w, rank, oversample, power_iters, seed):
    n, h = w.shape
    return w.new_empty((n, rank)), w.new_empty((rank,)), w.new_empty((h, rank))


@torch.library.register_fake("sft::lowrank_quantize")
def _lowrank_quantize_fake(x, rank, oversample, power_iters, bits, block, stochastic, seed):
    n, h = _fake_rows(x)
    u8, f32 = torch.uint8, torch.float32
    return (
        x.new_empty((rank, packed_cols(n, bits)), dtype=u8),
        x.new_empty((rank, num_blocks(n, block)), dtype=f32),
        x.new_empty((rank, packed_cols(h, bits)), dtype=u8),
        x.new_empty((rank, num_blocks(h, block)), dtype=f32),
    )


@torch.library.register_fake("sft::lowrank_dequantize")
def _lowrank_dequantize_fake(p_codes, p_scales, q_codes, q_scales, rows, cols, rank, bits, block, dtype):
    return p_codes.new_empty((rows, cols), dtype=dtype)


# ----------------------------------------------------------------------------- autograd


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"sft::{name} is a compression primitive and has no derivative; wrap the tensor with "
            "sft_kernels.boundary(x, fwd=..., bwd=...) for a straight-through gradient"
        )

    return backward


for _name in ("quantize", "dequantize", "lowrank", "randomized_svd", "lowrank_quantize", "lowrank_dequantize"):
    torch.library.register_autograd(f"sft::{_name}", _not_differentiable(_name))
