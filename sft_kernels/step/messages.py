"""The split step's messages: kinds, and codec packets as named tensors.

Every link (in-process or TCP) moves the same requests and replies: a kind, a sequence
number, a ``{name: tensor}`` dict and a small JSON-able ``meta``.  A request carries the
encoded boundary tensor (``h.*`` tensors), the encoded residual when links are kept (``r.*``),
the auxiliary tensors of :class:`~sft_kernels.split.BoundaryOutput` and, outside the U-split,
the labels.  ``meta`` holds only what OPEN did not already pin: per packet a compact list
``[mode, transposed, dtype, *shape]`` (indices into :data:`PACKET_MODES` and
:data:`PACKET_DTYPES`); the codec spec is the session's.  Each request is self-contained given
the session, so a cached reply can be replayed on a new connection.  Everything read from the
peer is validated here before a model sees it, and sizes are checked before anything is decoded.

=========  ======  =====================================  =====================================
kind       value   edge -> cloud                          cloud -> edge
=========  ======  =====================================  =====================================
OPEN       16      run config, hashes, edge step,         cloud step (the agreed resume point)
                   edge checkpoint steps
TRAIN      17      step ``seq``: packets, aux, labels,    gradient packets, loss (the fused step:
                   ``ckpt``: checkpoint after it          forward, backward, optimizer step)
EVAL       18      packets, aux                           logits (U-split: pooled packet)
FINISH     19      final step                             cloud checkpoint written
REPLY      20      --                                     reply to any of the above
FORWARD    21      micro-batch ``seq``: packets, aux,     outputs: loss and logits raw, or
                   labels (not in U mode), ``keep``       (U-split) the pooled rows as a packet
BACKWARD   22      micro-batch ``seq``: the outputs'      gradient packets of the boundary
                   gradients (``d.*``)
STEP       23      optimizer step ``seq``: the edge's     the cloud's step count
                   hyper-parameters, ``ckpt``
=========  ======  =====================================  =====================================

Knows codecs and :class:`~sft_kernels.split.BoundaryOutput`; no sockets, models or training loops.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch

from ..codecs import Codec, Packet
from ..split import BoundaryOutput

__all__ = ["OPEN", "TRAIN", "EVAL", "FINISH", "REPLY", "FORWARD", "BACKWARD", "STEP", "KIND_NAMES", "packet_to_wire", "packet_from_wire", "boundary_to_wire",
           "boundary_from_wire", "decode_packet", "payload_nbytes", "label_dtype", "StepRefused", "check_finite", "PACKET_MODES",
           "PACKET_DTYPES", "POOLED_SEED_OFFSET"]

OPEN, TRAIN, EVAL, FINISH, REPLY, FORWARD, BACKWARD, STEP = 16, 17, 18, 19, 20, 21, 22, 23
#: The request kinds by name, for messages.
KIND_NAMES = {OPEN: "OPEN", TRAIN: "TRAIN", EVAL: "EVAL", FINISH: "FINISH", FORWARD: "FORWARD",
              BACKWARD: "BACKWARD", STEP: "STEP"}

#: Packet modes and boundary dtypes by their index in a packet's wire meta (never renumber).
PACKET_MODES = ("raw", "cast", "quant", "lowrank", "dense")
PACKET_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_AUX = ("lengths", "seq_len", "pool_index")
#: Dtypes the auxiliary integers may cross in (:meth:`BoundaryOutput.aux_tensors` picks the smallest that fits).
_AUX_DTYPES = (torch.int16, torch.int32)
#: Added to a step's codec seed for the U-split's pooled rows (down; their gradient up adds the codecs'
#: ``BWD_SEED_OFFSET`` on top), so no two packets of a run share a seed.
POOLED_SEED_OFFSET = 2**41
_MAX_PACKET_NDIM = 8


class StepRefused(ValueError):
    """A request was refused or failed; the peer's ERROR frame carries the message and whether to retry.

    ``retryable``: a retry of the same request can succeed (a full server, a checkpoint that could
    not be written); ``retry_after``: seconds the peer should wait first, if known.  A refusal for
    bad structure, codec, sizes or non-finite values is not retryable and touched no state.
    """

    def __init__(self, message: str, *, retryable: bool = False, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retryable, self.retry_after = retryable, retry_after


def label_dtype(num_labels: int) -> torch.dtype:
    """The dtype labels cross in: float32 for regression (``num_labels == 1``), else the smallest signed
    integer that holds every class id (int8 up to 128 classes)."""
    if num_labels == 1:
        return torch.float32
    return next(t for t in (torch.int8, torch.int16, torch.int32) if num_labels - 1 <= torch.iinfo(t).max)


def payload_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    """Bytes of a message's tensor data (what every link's byte counter adds up)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def packet_to_wire(packet: Packet, prefix: str) -> tuple[dict[str, torch.Tensor], list[int]]:
    """``(tensors, meta)`` of a packet: tensor names get ``prefix + "."``; meta is ``[mode, transposed, dtype, *shape]``.

    The codec spec is not sent: both sides use the session's.
    """
    if packet.dtype not in PACKET_DTYPES:
        raise ValueError(f"packet '{prefix}': dtype {packet.dtype} cannot cross; valid: {list(PACKET_DTYPES)}")
    meta = [PACKET_MODES.index(packet.mode), int(bool(packet.transposed)), PACKET_DTYPES.index(packet.dtype),
            *(int(d) for d in packet.shape)]
    return {f"{prefix}.{k}": v for k, v in packet.tensors.items()}, meta


def _small_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def packet_from_wire(tensors: Mapping[str, torch.Tensor], meta: Any, prefix: str, codec: Codec,
                     max_numel: int) -> Packet:
    """Validate and rebuild a packet sent for ``codec``; :class:`StepRefused` names what is wrong."""
    if (not isinstance(meta, list) or not 3 <= len(meta) <= 3 + _MAX_PACKET_NDIM
            or not all(_small_int(v) and v >= 0 for v in meta)):
        raise StepRefused(f"packet '{prefix}': metadata must be [mode, transposed, dtype, *shape] with at most "
                          f"{_MAX_PACKET_NDIM} dims, all ints >= 0; got {str(meta)[:200]}")
    mode, transposed, dtype, shape = meta[0], meta[1], meta[2], meta[3:]
    if mode >= len(PACKET_MODES) or transposed > 1 or dtype >= len(PACKET_DTYPES):
        raise StepRefused(f"packet '{prefix}': mode must be in 0..{len(PACKET_MODES) - 1}, transposed 0 or 1, "
                          f"dtype in 0..{len(PACKET_DTYPES) - 1}; got {mode}, {transposed}, {dtype}")
    if math.prod(shape) > max_numel:
        raise StepRefused(f"packet '{prefix}': shape {shape} has more than {max_numel} elements")
    mine = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    return Packet(str(codec), tuple(shape), PACKET_DTYPES[dtype], PACKET_MODES[mode], mine, bool(transposed))


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
    return tensors, meta, payload_nbytes(tensors)


def boundary_from_wire(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], fwd: Codec, *, width: int,
                       residual_width: int | None, max_length: int, max_batch: int, max_tokens: int,
                       pool_index: bool, extra: tuple[str, ...] = ()) -> BoundaryOutput:
    """Validate and decode a boundary sent by an edge; :class:`StepRefused` says what is wrong.

    Sizes are checked before anything is decoded: at most ``max_batch`` sequences, a padded length
    of at most ``max_length``, and at most ``max_tokens`` padded tokens (batch x padded length, the
    quantity the cloud's activation memory grows with).  ``residual_width``: the residual's width
    when the session keeps the link (None: no residual may be sent).  ``pool_index``: whether the
    session's head pools from per-sequence positions (decoders) -- then it must be sent, int32
    ``(batch,)`` inside each sequence, else it must be absent.  ``extra``: other tensor names the
    caller reads itself (the labels); any other tensor is refused.
    """
    for k in _AUX[:2]:
        if k not in tensors:
            raise StepRefused(f"boundary: missing tensor '{k}'")
    lengths, seq_len = tensors["lengths"], tensors["seq_len"]
    if lengths.dtype not in _AUX_DTYPES or lengths.dim() != 1 or not 1 <= lengths.numel() <= max_batch:
        raise StepRefused(f"boundary: lengths must be int16 or int32 of shape (batch,) with 1 <= batch <= "
                          f"{max_batch}, got {lengths.dtype} {tuple(lengths.shape)}")
    if (seq_len.dtype != lengths.dtype or seq_len.numel() != 1
            or not 1 <= int(seq_len.reshape(())) <= max_length):
        raise StepRefused(f"boundary: seq_len must be one value of the lengths' dtype in 1..{max_length}")
    lengths = lengths.to(torch.int32)
    s = int(seq_len.reshape(()))
    batch = lengths.numel()
    if batch * s > max_tokens:
        raise StepRefused(f"boundary: batch {batch} x padded length {s} = {batch * s} tokens exceeds the "
                          f"server's limit of {max_tokens} tokens per step")
    if bool(((lengths < 1) | (lengths > s)).any()):
        raise StepRefused(f"boundary: every length must be in 1..seq_len={s}")
    tokens = int(lengths.sum())
    want = {"h"} | ({"r"} if residual_width is not None else set())
    if not isinstance(meta, Mapping) or set(meta) != want:
        raise StepRefused(f"boundary: packets {sorted(meta) if isinstance(meta, Mapping) else meta!r} sent, "
                          f"the session expects {sorted(want)}")
    pool = tensors.get("pool_index")
    if pool_index != (pool is not None):
        raise StepRefused("boundary: this session's head " + ("needs" if pool_index else "takes no")
                          + " 'pool_index'")
    if pool is not None and (pool.dtype != seq_len.dtype or tuple(pool.shape) != (batch,)
                             or bool(((pool < 0) | (pool >= lengths)).any())):
        raise StepRefused(f"boundary: pool_index must be of the lengths' dtype and shape ({batch},) with "
                          f"0 <= pool_index < lengths, got {pool.dtype} {tuple(pool.shape)}")
    if pool is not None:
        pool = pool.to(torch.int32)
    known = set(_AUX) | set(extra)
    stray = sorted(k for k in tensors if k not in known and k.split(".", 1)[0] not in want)
    if stray:
        raise StepRefused(f"boundary: unexpected tensors {stray[:8]}")
    out = {}
    for prefix in sorted(want):
        w = width if prefix == "h" else residual_width
        p = packet_from_wire(tensors, meta[prefix], prefix, fwd, max_numel=tokens * w)
        if tuple(p.shape) != (tokens, w):
            raise StepRefused(f"boundary: packet '{prefix}' shape {p.shape} must be (total tokens {tokens}, "
                              f"width {w})")
        out[prefix] = decode_packet(fwd, p, "received activation" if prefix == "h" else "received residual")
    return BoundaryOutput(out["h"], lengths, s, out.get("r"), pool)
