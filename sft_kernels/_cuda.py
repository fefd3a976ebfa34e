"""The CUDA kernels of the ``sft::`` compression ops, and the switch that picks them.

Every compression op (all but the CPU channel primitive ``crc32c``) has a CUDA
kernel.  Where no fused kernel has been verified on a GPU, that kernel is the
op's pure-PyTorch reference (:mod:`sft_kernels.reference`) registered with
``torch.library.register_kernel``.  It is correct but slow:

* ``quantize`` / ``dequantize`` are bit-identical to the CPU kernels;
* the low-rank ops run through cuBLAS / cuSOLVER and agree within rounding.

The reference path is never silent: its first call in a process warns once
with :class:`SlowPathWarning`.

The fused C++ CUDA kernels of ``quantize`` / ``dequantize`` are registered only
when the environment asks for them at import: ``SFT_CUDA_FUSED=1`` calls the
extension's C entry point ``int sft_register_cuda_fused(void)`` (0 when it
registered both).  A Python registration would silently override a C++ one,
so the reference is then registered for the four low-rank ops only.  Without
the switch, without the entry point (an extension built without CUDA) or when
it fails, the reference serves all six ops; a switch that was asked for but
could not be honoured warns and says why.  :func:`cuda_backend` reports which
path each op uses.

This module knows the ops, the reference and the compiled extension; nothing
of codecs, models or the network.
"""
from __future__ import annotations

import ctypes
import os
import warnings
from typing import Any, Callable

import torch

from . import _C, reference

__all__ = ["SlowPathWarning", "cuda_backend", "FUSED_ENV", "CUDA_OPS", "REFERENCE_KERNELS"]

#: Environment variable that asks for the fused C++ CUDA quantize / dequantize kernels.
FUSED_ENV = "SFT_CUDA_FUSED"
_FUSED_ENTRY = "sft_register_cuda_fused"
_FUSABLE_OPS = ("quantize", "dequantize")
#: The ops that have a CUDA kernel (``crc32c`` is a CPU-only channel primitive).
CUDA_OPS = _FUSABLE_OPS + ("lowrank", "randomized_svd", "lowrank_quantize", "lowrank_dequantize")


class SlowPathWarning(UserWarning):
    """The slow pure-PyTorch reference computes ``sft::`` ops on CUDA (no verified fused kernel is active)."""


_backend: dict[str, str] = {}
_warned = False


def cuda_backend() -> dict[str, str]:
    """Which CUDA kernel serves each compression op: ``{op name: "reference" | "fused"}``."""
    return dict(_backend)


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "sft_kernels: the slow pure-PyTorch reference path computes sft:: ops on CUDA "
            f"(sft_kernels.cuda_backend() = {cuda_backend()}); it is correct but far from memory bandwidth",
            SlowPathWarning,
            stacklevel=3,
        )


def _fresh(out: Any, inputs: tuple[torch.Tensor, ...]) -> Any:
    """``out`` (a tensor or a tuple of them) made contiguous, sharing no storage with ``inputs`` or each other.

    Storage identity is compared as ``torch.library``'s own aliasing check does; data
    pointers would not do (every empty or fake tensor has data pointer 0).
    """
    outs = out if isinstance(out, tuple) else (out,)
    seen = {t.untyped_storage()._cdata for t in inputs}
    fresh = []
    for t in outs:
        if not t.is_contiguous() or t.untyped_storage()._cdata in seen:
            # clone, not .contiguous(): the latter takes a device guard, absent for fake CUDA tensors on CPU builds
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage()._cdata)
        fresh.append(t)
    return tuple(fresh) if isinstance(out, tuple) else fresh[0]


def _run(fn: Callable[..., Any], inputs: tuple[torch.Tensor, ...], *args: Any) -> Any:
    """Run reference ``fn(*args)`` as an op kernel: warn once, no autocast, fresh contiguous outputs."""
    _warn_once()
    # an enclosing autocast would turn the reference's fp32 GEMMs into half-precision ones
    with torch.autocast("cuda", enabled=False):
        return _fresh(fn(*args), inputs)


# One function per op with exactly the op's schema arguments (csrc/ops.cpp).


def _quantize(x: torch.Tensor, bits: int, block: int, stochastic: bool, seed: int):
    return _run(reference.quantize, (x,), x, bits, block, stochastic, seed)


def _dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, block: int, cols: int, dtype: torch.dtype):
    return _run(reference.dequantize, (codes, scales), codes, scales, bits, block, cols, dtype)


def _lowrank(x: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int):
    return _run(reference.lowrank, (x,), x, rank, oversample, power_iters, seed)


def _randomized_svd(w: torch.Tensor, rank: int, oversample: int, power_iters: int, seed: int):
    return _run(reference.randomized_svd, (w,), w, rank, oversample, power_iters, seed)


def _lowrank_quantize(x: torch.Tensor, rank: int, oversample: int, power_iters: int, bits: int, block: int,
                      stochastic: bool, seed: int):
    return _run(reference.lowrank_quantize, (x,), x, rank, oversample, power_iters, bits, block, stochastic, seed)


def _lowrank_dequantize(p_codes: torch.Tensor, p_scales: torch.Tensor, q_codes: torch.Tensor,
                        q_scales: torch.Tensor, rows: int, cols: int, rank: int, bits: int, block: int,
                        dtype: torch.dtype):
    inputs = (p_codes, p_scales, q_codes, q_scales)
    return _run(reference.lowrank_dequantize, inputs, *inputs, rows, cols, rank, bits, block, dtype)


#: The reference CUDA kernel of each op in :data:`CUDA_OPS`.
REFERENCE_KERNELS: dict[str, Callable[..., Any]] = {
    "quantize": _quantize,
    "dequantize": _dequantize,
    "lowrank": _lowrank,
    "randomized_svd": _randomized_svd,
    "lowrank_quantize": _lowrank_quantize,
    "lowrank_dequantize": _lowrank_dequantize,
}


def _register_fused() -> str:
    """Ask the extension to register its fused CUDA quantize / dequantize; returns why not ("" on success)."""
    try:
        lib = ctypes.CDLL(_C.__file__)
    except OSError as exc:
        return f"cannot load {_C.__file__} with ctypes ({exc})"
    entry = getattr(lib, _FUSED_ENTRY, None)
    if entry is None:
        return f"the extension has no {_FUSED_ENTRY}() (it was built without CUDA)"
    entry.argtypes = []
    entry.restype = ctypes.c_int
    rc = entry()
    return "" if rc == 0 else f"{_FUSED_ENTRY}() returned {rc}"


def _register() -> None:
    """Register the CUDA kernels once per process, as :data:`FUSED_ENV` asks."""
    fused = False
    if os.environ.get(FUSED_ENV) == "1":
        why = _register_fused()
        fused = not why
        if not fused:
            warnings.warn(
                f"sft_kernels: {FUSED_ENV}=1, but the fused CUDA quantize/dequantize kernels are unavailable: "
                f"{why}; the slow pure-PyTorch reference path serves them on CUDA",
                SlowPathWarning,
                stacklevel=2,
            )
    for name in CUDA_OPS:
        if fused and name in _FUSABLE_OPS:
            _backend[name] = "fused"
        else:
            torch.library.register_kernel(f"sft::{name}", "cuda", REFERENCE_KERNELS[name])
            _backend[name] = "reference"


_register()
