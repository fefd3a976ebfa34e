"""What the edge part of a split model sends to the cloud part: :class:`BoundaryOutput`.

Only the real (non-padding) tokens cross: ``hidden`` is ``(total_real_tokens, width)``,
in row-major order of the padded batch (sequence 0's tokens, then sequence 1's, ...).
The padded layout is rebuilt on the cloud from the per-sequence ``lengths`` and the
padded length ``seq_len``.  ``to_tensors``/``from_tensors`` give the flat
``dict[str, Tensor]`` form a channel frames.

This module knows tensors, not models, codecs or sockets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["BoundaryOutput"]

_REQUIRED = ("hidden", "lengths", "seq_len")
_OPTIONAL = ("residual", "pool_index")


@dataclass
class BoundaryOutput:
    """The edge's output: the boundary tensor plus compact auxiliary data.

    Attributes:
        hidden: ``(total_real_tokens, width)`` floating tensor to send (hidden states in a
            layer split, the bottleneck code ``z`` in a bottleneck split).
        lengths: ``(batch,)`` int32, real tokens per sequence (right padding).
        seq_len: padded sequence length of the batch the edge saw.
        residual: ``(total_real_tokens, d)`` residual stream of the bottleneck layer; only
            in a bottleneck split with ``eliminate_links=False`` (the ablation).
        pool_index: ``(batch,)`` int32, the position a decoder's sequence-classification head
            pools from (its rule, evaluated on the edge's ``input_ids``), sent whenever the model
            has a head: the cloud's head uses it, and in a U-split the cloud picks those rows to
            send back down to the top.  None for encoders, in every split: their heads pool
            position 0 ([CLS]), a rule the cloud applies itself, so sending it would cost bytes
            for nothing.
    """

    hidden: torch.Tensor
    lengths: torch.Tensor
    seq_len: int
    residual: Optional[torch.Tensor] = None
    pool_index: Optional[torch.Tensor] = None

    @property
    def batch_size(self) -> int:
        """Number of sequences."""
        return int(self.lengths.shape[0])

    def aux_tensors(self) -> dict[str, torch.Tensor]:
        """The auxiliary tensors (everything but ``hidden`` and ``residual``) as they cross: int16 while the
        padded length fits (``<= 32767``, every run the runtime accepts), else int32."""
        dtype = torch.int16 if self.seq_len <= torch.iinfo(torch.int16).max else torch.int32
        d = {"lengths": self.lengths.to(dtype), "seq_len": torch.tensor([self.seq_len], dtype=dtype)}
        if self.pool_index is not None:
            d["pool_index"] = self.pool_index.to(dtype)
        return d

    @property
    def aux_nbytes(self) -> int:
        """Bytes of the auxiliary data as :meth:`to_tensors` sends it."""
        return sum(t.numel() * t.element_size() for t in self.aux_tensors().values())

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Flat ``{name: tensor}`` form for a channel; inverse of :meth:`from_tensors`."""
        d = {"hidden": self.hidden, **self.aux_tensors()}
        if self.residual is not None:
            d["residual"] = self.residual
        return d

    @classmethod
    def from_tensors(cls, d: dict[str, torch.Tensor]) -> "BoundaryOutput":
        """Rebuild from :meth:`to_tensors`' dict; raises ``KeyError`` naming missing or unknown keys."""
        missing = [k for k in _REQUIRED if k not in d]
        unknown = [k for k in d if k not in _REQUIRED + _OPTIONAL]
        if missing or unknown:
            raise KeyError(f"BoundaryOutput.from_tensors: missing keys {missing}, unknown keys {unknown}; "
                           f"expected {list(_REQUIRED)} and optionally {list(_OPTIONAL)}")
        seq_len = d["seq_len"]
        if seq_len.numel() != 1:
            raise ValueError(f"seq_len must hold one value, got shape {tuple(seq_len.shape)}")
        pool = d.get("pool_index")
        return cls(d["hidden"], d["lengths"].to(torch.int32), int(seq_len.reshape(())), d.get("residual"),
                   None if pool is None else pool.to(torch.int32))
