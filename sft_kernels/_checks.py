"""Argument checks shared by the reference, the op wrappers and the codecs.

They raise ``ValueError`` naming the bad argument and the valid range, at the
boundary where the value enters.  The compiled kernels repeat the same checks
with ``TORCH_CHECK_VALUE`` (also ``ValueError``) so that direct
``torch.ops.sft`` calls are safe too; non-finite input is a ``RuntimeError``.  This module imports nothing but torch.
"""
from __future__ import annotations

import torch

VALID_BITS = (2, 4, 8)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_bits_block(bits: int, block: int) -> None:
    """Raise ``ValueError`` unless ``bits`` is 2, 4 or 8 and ``block`` >= 1."""
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits}")
    if block <= 0:
        raise ValueError(f"block must be >= 1, got {block}")


def check_float_input(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``x`` is a fp32, fp16 or bf16 tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {x.dtype}")


def check_out_dtype(dtype: torch.dtype) -> None:
    """Raise ``ValueError`` unless ``dtype`` is an output dtype the decoders support."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")


def lowrank_k(rank: int, oversample: int, n: int, h: int) -> int:
    """Sketch width ``k = min(rank + oversample, N, H)``."""
    return min(rank + oversample, n, h)


def check_lowrank_args(rank: int, oversample: int, power_iters: int, n: int, h: int) -> None:
    """Validate low-rank arguments for an ``N x H`` input."""
    if rank <= 0:
        raise ValueError(f"rank must be >= 1, got {rank}")
    if n > 0 and rank > min(n, h):
        raise ValueError(f"rank must be <= min(N, H) = min({n}, {h}) = {min(n, h)}, got {rank}")
    if n == 0 and rank > h:
        raise ValueError(f"rank must be <= H = {h}, got {rank}")
    if oversample < 0:
        raise ValueError(f"oversample must be >= 0, got {oversample}")
    if power_iters < -1:
        raise ValueError(f"power_iters must be >= -1 (-1 selects the single-pass sketch), got {power_iters}")


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per row of packed codes: ``ceil(cols * bits / 8)``."""
    return -(-cols * bits // 8)


def num_blocks(cols: int, block: int) -> int:
    """Scales per row: ``ceil(cols / block)``."""
    return -(-cols // block)


def check_packed_shapes(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, cols: int) -> None:
    """Validate that ``codes``/``scales`` are the packed form of rows of ``cols`` elements."""
    if codes.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8, got {codes.dtype}")
    if scales.dtype != torch.float32:
        raise ValueError(f"scales must be float32, got {scales.dtype}")
    if cols < 0:
        raise ValueError(f"cols must be >= 0, got {cols}")
    if codes.dim() < 1 or scales.dim() < 1:
        raise ValueError("codes and scales must have at least 1 dimension")
    want_c, want_s = packed_cols(cols, bits), num_blocks(cols, block)
    if codes.shape[-1] != want_c:
        raise ValueError(
            f"codes last dim must be ceil(cols*bits/8) = {want_c} for cols={cols}, bits={bits}; got {codes.shape[-1]}"
        )
    if scales.shape[-1] != want_s:
        raise ValueError(
            f"scales last dim must be ceil(cols/block) = {want_s} for cols={cols}, block={block}; got {scales.shape[-1]}"
        )
    if codes.shape[:-1] != scales.shape[:-1]:
        raise ValueError(
            f"codes and scales leading shapes must match, got {tuple(codes.shape)} and {tuple(scales.shape)}"
        )
