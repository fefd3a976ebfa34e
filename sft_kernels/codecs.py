"""Codecs for the tensors that cross the edge-cloud split, and the ``boundary`` autograd op.

A codec turns a tensor into a :class:`Packet` (named tensors plus a little
metadata) and back.  Codecs are built from spec strings::

    none | fp16 | bf16 | int8 | int4 | int2          [,block=B][,sr]  (block/sr: int codecs only)
    lowrank:r=R[,oversample=P][,iters=I]            [+int8|+int4 [,block=B][,sr] | +fp16]

``str(codec)`` is the canonical spec (parameters equal to their defaults are
left out) and ``from_spec(str(codec)) == codec``.  ``packet.nbytes`` is the
payload: the sum of the packet's tensor bytes; the channel counts its own
framing separately.

Design notes:

* Quantizing codecs pick their blocking so that fp32 scales cost at most 1/16
  of the codes (block 64 for int8, 128 for int4, 256 for int2).  A tensor
  whose last dim is shorter than the block (a rank-4 bottleneck ``z``, say) is
  quantized along the other axis, so the scales stay amortised.
* When low rank cannot help (``rank >= min(N, H)`` or ``rank*(N+H) >= N*H``,
  e.g. a one-token eval batch) the codec sends the tensor through its
  quantization stage alone and records ``mode="dense"`` in the packet.
* The spec parser uses only plain string operations so that ``boundary`` with
  spec strings traces under ``torch.compile(fullgraph=True)``.

This module knows tensors and ops, not models or sockets.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

from . import ops
from ._checks import FLOAT_DTYPES, VALID_BITS

__all__ = [
    "Packet",
    "Codec",
    "NoneCodec",
    "CastCodec",
    "QuantCodec",
    "LowRankCodec",
    "from_spec",
    "boundary",
    "DEFAULT_BLOCK",
]

#: Default quantization block per bit width: scales (4 B) are <= 1/16 of the codes.
DEFAULT_BLOCK = {8: 64, 4: 128, 2: 256}
_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_INT_NAMES = {"int8": 8, "int4": 4, "int2": 2}
_LOWRANK_DEFAULT_OVERSAMPLE = 8
_LOWRANK_DEFAULT_ITERS = 1
_SEED_LIMIT = 2**62
#: Offset between the forward and backward seeds of ``boundary``.
BWD_SEED_OFFSET = 2**40

_VALID_FORMS = (
    "valid forms: 'none' | 'fp16' | 'bf16' | 'int8|int4|int2[,block=B][,sr]' | "
    "'lowrank:r=R[,oversample=P][,iters=I][+int8|+int4[,block=B][,sr]|+fp16]'"
)


@dataclass
class Packet:
    """What a codec sends: named tensors plus the metadata needed to decode them.

    ``mode`` is ``"raw"``, ``"cast"``, ``"quant"``, ``"lowrank"`` or ``"dense"``
    (low rank skipped because it could not help).  ``transposed`` is set when a
    quantizer blocked along the leading axis.
    """

    spec: str
    shape: tuple
    dtype: torch.dtype
    mode: str
    tensors: dict = field(default_factory=dict)
    transposed: bool = False

    @property
    def nbytes(self) -> int:
        """Payload bytes: the sum of the tensors' bytes."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def _check_seed(seed: int) -> None:
    if not isinstance(seed, (int, torch.SymInt)) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -_SEED_LIMIT <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be in [-2**62, 2**62), got {seed}")


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}")


def _check_finite_scales(*scales: torch.Tensor) -> None:
    """Accelerator kernels can't raise without a sync; they emit non-finite scales instead."""
    if torch.compiler.is_compiling():
        return
    for s in scales:
        if s.device.type != "cpu" and s.numel() and not bool(torch.isfinite(s).all()):
            bad = int((~torch.isfinite(s)).sum())
            raise RuntimeError(f"codec: input has non-finite values ({bad} non-finite block scale(s))")


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 0:
        return x.reshape(1, 1)
    return x.reshape(-1, x.shape[-1])


class Codec:
    """Base class: ``encode(x, seed) -> Packet`` and ``decode(packet) -> Tensor``."""

    def encode(self, x: torch.Tensor, seed: int = 0) -> Packet:
        """Compress ``x``; ``seed`` keys stochastic rounding and sketches (pass a fresh one per step)."""
        raise NotImplementedError

    def decode(self, packet: Packet) -> torch.Tensor:
        """Rebuild a tensor of the encoded shape and dtype from ``packet``."""
        raise NotImplementedError

    def spec(self) -> str:
        """The canonical spec string."""
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec()

    def _check_packet(self, packet: Packet) -> None:
        if packet.spec != self.spec():
            raise ValueError(f"packet was encoded with codec '{packet.spec}', cannot decode it with '{self.spec()}'")

    def _packet(self, x: torch.Tensor, mode: str, tensors: dict, transposed: bool = False) -> Packet:
        return Packet(self.spec(), tuple(x.shape), x.dtype, mode, tensors, transposed)


@dataclass(frozen=True)
class NoneCodec(Codec):
    """Sends the tensor unchanged (the uncompressed layer-split baseline)."""

    def spec(self) -> str:
        return "none"

    def encode(self, x: torch.Tensor, seed: int = 0) -> Packet:
        _check_input(x)
        return self._packet(x, "raw", {"x": x.contiguous()})

    def decode(self, packet: Packet) -> torch.Tensor:
        self._check_packet(packet)
        return packet.tensors["x"].reshape(packet.shape).to(packet.dtype)


@dataclass(frozen=True)
class CastCodec(Codec):
    """Sends the tensor cast to fp16 or bf16."""

    name: str = "fp16"

    def __post_init__(self) -> None:
        if self.name not in _CAST_DTYPES:
            raise ValueError(f"cast codec name must be one of {sorted(_CAST_DTYPES)}, got '{self.name}'")

    def spec(self) -> str:
        return self.name

    def encode(self, x: torch.Tensor, seed: int = 0) -> Packet:
        _check_input(x)
        return self._packet(x, "cast", {"x": x.to(_CAST_DTYPES[self.name]).contiguous()})

    def decode(self, packet: Packet) -> torch.Tensor:
        self._check_packet(packet)
        return packet.tensors["x"].reshape(packet.shape).to(packet.dtype)


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Blockwise absmax integer quantization (``sft::quantize``) with optional stochastic rounding."""

    bits: int = 8
    block: Optional[int] = None
    sr: bool = False

    def __post_init__(self) -> None:
        if self.bits not in VALID_BITS:
            raise ValueError(f"bits must be one of {VALID_BITS}, got {self.bits}")
        if self.block is None:
            object.__setattr__(self, "block", DEFAULT_BLOCK[self.bits])
        if self.block <= 0:
            raise ValueError(f"block must be >= 1, got {self.block}")

    @property
    def block_size(self) -> int:
        """The block in use: the explicit one, else the 1/16-overhead default of ``DEFAULT_BLOCK``."""
        return self.block

    def spec(self) -> str:
        s = f"int{self.bits}"
        if self.block != DEFAULT_BLOCK[self.bits]:
            s += f",block={self.block}"
        if self.sr:
            s += ",sr"
        return s

    def encode(self, x: torch.Tensor, seed: int = 0) -> Packet:
        _check_input(x)
        _check_seed(seed)
        x2 = _as_2d(x)
        rows, cols = x2.shape
        transposed = cols < self.block_size and rows > cols
        src = x2.t() if transposed else x2
        codes, scales = ops.quantize(src, self.bits, self.block_size, self.sr, seed)
        _check_finite_scales(scales)
        return self._packet(x, "quant", {"codes": codes, "scales": scales}, transposed)

    def decode(self, packet: Packet) -> torch.Tensor:
        self._check_packet(packet)
        shape = packet.shape
        cols = shape[-1] if len(shape) else 1
        rows = math.prod(shape[:-1]) if len(shape) else 1
        n = rows if packet.transposed else cols
        y = ops.dequantize(packet.tensors["codes"], packet.tensors["scales"], self.bits, self.block_size, n, packet.dtype)
        if packet.transposed:
            y = y.t()
        return y.reshape(shape)


_Stage = Union[NoneCodec, CastCodec, QuantCodec]


@dataclass(frozen=True)
class LowRankCodec(Codec):
    """Randomized low-rank factors ``P Q^T`` of the ``N x H`` view, optionally quantized or cast.

    With an int stage the fused ``sft::lowrank_quantize`` op is used; ``P`` is
    blocked along the token axis.  Falls back to the stage alone (``mode="dense"``)
    when the factors would not be smaller than the tensor.
    """

    rank: int = 8
    oversample: int = _LOWRANK_DEFAULT_OVERSAMPLE
    iters: int = _LOWRANK_DEFAULT_ITERS
    stage: _Stage = NoneCodec()

    def __post_init__(self) -> None:
        if self.rank <= 0:
            raise ValueError(f"lowrank rank r must be >= 1, got {self.rank}")
        if self.oversample < 0:
            raise ValueError(f"lowrank oversample must be >= 0, got {self.oversample}")
        if self.iters < -1:
            raise ValueError(f"lowrank iters must be >= -1 (-1: single-pass sketch), got {self.iters}")
        st = self.stage
        if isinstance(st, QuantCodec) and st.bits == 2 or isinstance(st, CastCodec) and st.name != "fp16":
            raise ValueError(f"lowrank stage must be +int8, +int4 or +fp16, got +{st.spec()}")

    def spec(self) -> str:
        s = f"lowrank:r={self.rank}"
        if self.oversample != _LOWRANK_DEFAULT_OVERSAMPLE:
            s += f",oversample={self.oversample}"
        if self.iters != _LOWRANK_DEFAULT_ITERS:
            s += f",iters={self.iters}"
        if not isinstance(self.stage, NoneCodec):
            s += "+" + self.stage.spec()
        return s

    def helps(self, n: int, h: int) -> bool:
        """True when the rank-``r`` factors are smaller than the ``n x h`` tensor."""
        r = self.rank
        return r < min(n, h) and r * (n + h) < n * h

    def encode(self, x: torch.Tensor, seed: int = 0) -> Packet:
        _check_input(x)
        _check_seed(seed)
        x2 = _as_2d(x)
        n, h = x2.shape
        if not self.helps(n, h):
            inner = self.stage.encode(x, seed)
            return self._packet(x, "dense", inner.tensors, inner.transposed)
        st = self.stage
        if isinstance(st, QuantCodec):
            pc, ps, qc, qs = ops.lowrank_quantize(
                x2, self.rank, self.oversample, self.iters, st.bits, st.block_size, st.sr, seed
            )
            _check_finite_scales(ps, qs)
            tensors = {"p_codes": pc, "p_scales": ps, "q_codes": qc, "q_scales": qs}
        else:
            p, q = ops.lowrank(x2, self.rank, self.oversample, self.iters, seed)
            if isinstance(st, CastCodec):
                p, q = p.to(_CAST_DTYPES[st.name]), q.to(_CAST_DTYPES[st.name])
            tensors = {"p": p, "q": q}
        return self._packet(x, "lowrank", tensors)

    def decode(self, packet: Packet) -> torch.Tensor:
        self._check_packet(packet)
        if packet.mode == "dense":
            inner = Packet(self.stage.spec(), packet.shape, packet.dtype, _stage_mode(self.stage), packet.tensors,
                           packet.transposed)
            return self.stage.decode(inner)
        shape = packet.shape
        cols = shape[-1] if len(shape) else 1
        rows = math.prod(shape[:-1]) if len(shape) else 1
        t = packet.tensors
        st = self.stage
        if isinstance(st, QuantCodec):
            y = ops.lowrank_dequantize(
                t["p_codes"], t["p_scales"], t["q_codes"], t["q_scales"], rows, cols, self.rank, st.bits,
                st.block_size, packet.dtype,
            )
        else:
            y = (t["p"].float() @ t["q"].float().t()).to(packet.dtype)
        return y.reshape(shape)


def _stage_mode(stage: Codec) -> str:
    return {NoneCodec: "raw", CastCodec: "cast", QuantCodec: "quant"}[type(stage)]


# ----------------------------------------------------------------------------- spec parsing


def _bad(spec: str, part: str, why: str) -> ValueError:
    return ValueError(f"bad codec spec '{spec}': {why} (in '{part}'); {_VALID_FORMS}")


def _parse_int(spec: str, part: str, key: str, value: str, lo: int) -> int:
    body = value[1:] if value.startswith("-") else value
    if not body.isdigit():
        raise _bad(spec, part, f"{key} must be an integer, got '{value}'")
    v = int(value)
    if v < lo:
        raise _bad(spec, part, f"{key} must be >= {lo}, got {v}")
    return v


def _parse_stage(spec: str, part: str) -> _Stage:
    """Parse ``none | fp16 | bf16 | intB[,block=B][,sr]``."""
    name, *opts = [p.strip() for p in part.split(",")]
    if name == "none" or name in _CAST_DTYPES:
        if opts:
            raise _bad(spec, part, f"'{name}' takes no options")
        return NoneCodec() if name == "none" else CastCodec(name)
    if name not in _INT_NAMES:
        raise _bad(spec, part, f"unknown codec '{name}'")
    block, sr = None, False
    for opt in opts:
        key, eq, value = opt.partition("=")
        if opt == "sr" and not sr:
            sr = True
        elif key == "block" and eq and block is None:
            block = _parse_int(spec, part, "block", value, 1)
        else:
            raise _bad(spec, part, f"unknown or repeated option '{opt}' (valid: block=B, sr)")
    return QuantCodec(_INT_NAMES[name], block, sr)


def _parse_lowrank(spec: str, part: str, stage: _Stage) -> LowRankCodec:
    body = part[len("lowrank:"):]
    vals: dict = {}
    names = {"r": ("rank", 1), "oversample": ("oversample", 0), "iters": ("iters", -1)}
    for opt in [p.strip() for p in body.split(",")] if body else []:
        key, eq, value = opt.partition("=")
        if not eq or key not in names or names[key][0] in vals:
            raise _bad(spec, part, f"unknown or repeated option '{opt}' (valid: r=R, oversample=P, iters=I)")
        attr, lo = names[key]
        vals[attr] = _parse_int(spec, part, key, value, lo)
    if "rank" not in vals:
        raise _bad(spec, part, "lowrank needs r=R")
    try:
        return LowRankCodec(vals["rank"], vals.get("oversample", _LOWRANK_DEFAULT_OVERSAMPLE),
                            vals.get("iters", _LOWRANK_DEFAULT_ITERS), stage)
    except ValueError as exc:  # the stage check lives in LowRankCodec; report it with the spec grammar
        raise _bad(spec, part, str(exc)) from None


def from_spec(spec: Union[str, Codec]) -> Codec:
    """Build a codec from a spec string (a :class:`Codec` is returned unchanged).

    Raises ``ValueError`` naming the bad part and listing the valid forms.
    """
    if isinstance(spec, Codec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"codec spec must be a str or Codec, got {type(spec).__name__}")
    s = spec.strip()
    if not s:
        raise _bad(spec, spec, "empty spec")
    if s.startswith("lowrank"):
        head, plus, tail = s.partition("+")
        if not head.startswith("lowrank:"):
            raise _bad(spec, head, "lowrank needs ':r=R'")
        if plus and not tail:
            raise _bad(spec, s, "nothing after '+'")
        stage = _parse_stage(spec, tail) if plus else NoneCodec()
        if plus and isinstance(stage, NoneCodec):
            raise _bad(spec, tail, "lowrank stage must be +int8, +int4 or +fp16")
        return _parse_lowrank(spec, head, stage)
    if "+" in s:
        raise _bad(spec, s, "only lowrank codecs take a '+stage'")
    return _parse_stage(spec, s)


# ----------------------------------------------------------------------------- boundary


def _may_alias(codec: Codec, x: torch.Tensor) -> bool:
    if isinstance(codec, NoneCodec):
        return True
    return isinstance(codec, CastCodec) and _CAST_DTYPES[codec.name] == x.dtype


class _Boundary(torch.autograd.Function):
    """Forward ``decode(encode(x))`` with the fwd codec; backward the same with the bwd codec (straight-through)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: Codec, bwd: Codec, seed: int, on_packet=None) -> torch.Tensor:
        ctx.bwd = bwd
        ctx.seed = seed
        ctx.on_packet = on_packet
        packet = fwd.encode(x, seed)
        if on_packet is not None:
            on_packet("fwd", packet)
        y = fwd.decode(packet)
        # raw and same-dtype casts decode to a view of x; an autograd output must not alias its input
        return y.clone() if _may_alias(fwd, x) else y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        bwd = ctx.bwd
        packet = bwd.encode(grad, ctx.seed + BWD_SEED_OFFSET)
        if ctx.on_packet is not None:
            ctx.on_packet("bwd", packet)
        return bwd.decode(packet), None, None, None, None


def boundary(
    x: torch.Tensor,
    fwd: Union[str, Codec] = "none",
    bwd: Union[str, Codec] = "none",
    seed: int = 0,
    on_packet: Optional[Callable[[str, Packet], None]] = None,
) -> torch.Tensor:
    """Simulate the split: what the cloud sees of ``x`` going forward, and the edge of its gradient coming back.

    The forward returns ``fwd.decode(fwd.encode(x, seed))``; the backward passes the
    incoming gradient through ``bwd`` (seeded with ``seed + 2**40``) straight to ``x``.
    Pass a fresh ``seed`` per step; changing it does not recompile under ``torch.compile``.
    ``on_packet(direction, packet)``, if given, sees each packet as it is sent (``"fwd"``, then
    ``"bwd"`` during backward), e.g. to count the bytes on the wire.
    """
    _check_input(x)
    _check_seed(seed)
    return _Boundary.apply(x, from_spec(fwd), from_spec(bwd), seed, on_packet)
