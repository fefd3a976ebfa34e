"""The runtime's messages on top of the channel: kinds, and codec packets as named tensors.

A training step's request carries the encoded boundary tensor (``h.*`` tensors),
the encoded residual when links are kept (``r.*``), the auxiliary tensors of
:class:`~sft_kernels.split.BoundaryOutput` and the labels; the packet metadata
(codec spec, shape, dtype, mode) goes in the frame's JSON ``meta``.  Everything read
from the peer is validated here before a model sees it.

=========  ======  ================================  =======================================
kind       value   edge -> cloud                     cloud -> edge
=========  ======  ================================  =======================================
OPEN       16      run config, hashes, edge step     cloud step (the agreed resume point)
TRAIN      17      step ``seq``: packets, aux, y     gradient packets, loss
EVAL       18      packets, aux                      logits
FINISH     19      final step                        cloud checkpoint written
REPLY      20      --                                reply to any of the above
=========  ======  ================================  =======================================
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..codecs import Codec, Packet
from ..split import BoundaryOutput

__all__ = ["OPEN", "TRAIN", "EVAL", "FINISH", "REPLY", "packet_to_wire", "packet_from_wire", "boundary_to_wire",
           "boundary_from_wire", "StepRefused", "check_finite"]

OPEN, TRAIN, EVAL, FINISH, REPLY = 16, 17, 18, 19, 20

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MODES = ("raw", "cast", "quant", "lowrank", "dense")
_AUX = ("lengths", "seq_len", "pool_index")


class StepRefused(ValueError):
    """A peer's message was refused (bad structure, wrong codec, non-finite values); no state was touched."""


def packet_to_wire(packet: Packet, prefix: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, meta)`` of a packet; tensor names get ``prefix + "."``."""
    meta = {"spec": packet.spec, "shape": list(packet.shape), "dtype": str(packet.dtype).removeprefix("torch."),
            "mode": packet.mode, "transposed": bool(packet.transposed)}
    return {f"{prefix}.{k}": v for k, v in packet.tensors.items()}, meta


def packet_from_wire(tensors: Mapping[str, torch.Tensor], meta: Any, prefix: str, codec: Codec,
                     max_numel: int) -> Packet:
    """Validate and rebuild a packet sent for ``codec``; :class:`StepRefused` names what is wrong."""
    if not isinstance(meta, dict) or set(meta) != {"spec", "shape", "dtype", "mode", "transposed"}:
        raise StepRefused(f"packet '{prefix}': metadata must have keys spec, shape, dtype, mode, transposed")
    if meta["spec"] != str(codec):
        raise StepRefused(f"packet '{prefix}': encoded with codec '{meta['spec']}', the session uses '{codec}'")
    shape = meta["shape"]
    if (not isinstance(shape, list) or len(shape) > 8
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise StepRefused(f"packet '{prefix}': shape must be a list of at most 8 ints >= 0, got {shape!r}")
    if math.prod(shape) > max_numel:
        raise StepRefused(f"packet '{prefix}': shape {shape} has more than {max_numel} elements")
    if meta["dtype"] not in _DTYPES or meta["mode"] not in _MODES or not isinstance(meta["transposed"], bool):
        raise StepRefused(f"packet '{prefix}': dtype must be one of {sorted(_DTYPES)} and mode one of {_MODES}, "
                          f"got {meta['dtype']!r}, {meta['mode']!r}")
    mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return Packet(meta["spec"], tuple(shape), _DTYPES[meta["dtype"]], meta["mode"], mine, meta["transposed"])


def decode_packet(codec: Codec, packet: Packet, name: str) -> torch.Tensor:
    """``codec.decode`` with its errors (wrong sizes, missing tensors) turned into :class:`StepRefused`."""
    try:
        y = codec.decode(packet)
    except (ValueError, RuntimeError, KeyError, IndexError, TypeError) as exc:
        raise StepRefused(f"{name}: cannot decode the packet: {exc}") from None
    if tuple(y.shape) != tuple(packet.shape):
        raise StepRefused(f"{name}: decoded shape {tuple(y.shape)} is not the declared {packet.shape}")
    check_finite(y, name)
    return y


def check_finite(t: torch.Tensor, name: str) -> None:
    """:class:`StepRefused` if ``t`` has NaN or Inf values (how many, out of how many)."""
    bad = int((~torch.isfinite(t)).sum()) if t.numel() else 0
    if bad:
        raise StepRefused(f"{name} has {bad} non-finite value(s) out of {t.numel()}; step refused, model untouched")


def boundary_to_wire(b: BoundaryOutput, fwd: Codec, seed: int) -> tuple[dict, dict, int]:
    """Encode a boundary for the wire: ``(tensors, meta, payload_bytes)``; the residual uses ``seed + 1``."""
    tensors, meta = {}, {}
    for prefix, t, s in (("h", b.hidden, seed), ("r", b.residual, seed + 1)):
        if t is not None:
            tt, mm = packet_to_wire(fwd.encode(t.detach(), s), prefix)
            tensors.update(tt)
            meta[prefix] = mm
    tensors.update(b.aux_tensors())
    return tensors, meta, sum(t.numel() * t.element_size() for t in tensors.values())


def boundary_from_wire(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], fwd: Codec, *, width: int,
                       residual: bool, max_length: int, max_batch: int) -> BoundaryOutput:
    """Validate and decode a boundary sent by an edge; :class:`StepRefused` says what is wrong."""
    for k in _AUX[:2]:
        if k not in tensors:
            raise StepRefused(f"boundary: missing tensor '{k}'")
    lengths, seq_len = tensors["lengths"], tensors["seq_len"]
    if lengths.dtype != torch.int32 or lengths.dim() != 1 or not 1 <= lengths.numel() <= max_batch:
        raise StepRefused(f"boundary: lengths must be int32 of shape (batch,) with 1 <= batch <= {max_batch}, "
                          f"got {lengths.dtype} {tuple(lengths.shape)}")
    if seq_len.dtype != torch.int32 or seq_len.numel() != 1 or not 1 <= int(seq_len.reshape(())) <= max_length:
        raise StepRefused(f"boundary: seq_len must be one int32 in 1..{max_length}")
    s = int(seq_len.reshape(()))
    if bool(((lengths < 1) | (lengths > s)).any()):
        raise StepRefused(f"boundary: every length must be in 1..seq_len={s}")
    tokens = int(lengths.sum())
    want = {"h"} | ({"r"} if residual else set())
    if set(meta) != want:
        raise StepRefused(f"boundary: packets {sorted(meta)} sent, the session expects {sorted(want)}")
    out = {}
    for prefix in sorted(want):
        p = packet_from_wire(tensors, meta[prefix], prefix, fwd, max_numel=tokens * 8192)
        if prefix == "h" and tuple(p.shape) != (tokens, width):
            raise StepRefused(f"boundary: hidden shape {p.shape} must be (total tokens {tokens}, width {width})")
        out[prefix] = decode_packet(fwd, p, "received activation" if prefix == "h" else "received residual")
    if "r" in out and out["r"].shape[0] != tokens:
        raise StepRefused(f"boundary: residual has {out['r'].shape[0]} rows, expected {tokens}")
    pool = tensors.get("pool_index")
    return BoundaryOutput(out["h"], lengths, s, out.get("r"), pool)
