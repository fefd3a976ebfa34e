"""``SimulatedSplit``: train a split model in one process, with the boundary traffic passed through codecs.

It wraps ``split_model``'s two parts and :func:`sft_kernels.codecs.boundary` around what
crosses (the boundary tensor and, with ``eliminate_links=False``, the residual), and
counts the bytes a real link would carry:

* sent (edge -> cloud): encoded boundary tensors + auxiliary data (``BoundaryOutput``'s
  lengths, padded length, pooling positions, uncompressed) + the labels;
* received (cloud -> edge): the encoded gradients of the boundary tensors.

Its ``forward`` takes the wrapped model's inputs (``input_ids``, ``attention_mask``, ...,
``labels``) and returns the wrapped model's output type, so it drops into a training loop
written for the unsplit model.  Each forward uses a fresh codec seed (``seed`` + a step
counter), so stochastic rounding differs per step but a run is reproducible.  Dropout in
each part draws from a generator keyed by ``(seed, step, part)`` (:mod:`.rng`), as the TCP
runtime does, so a simulated run and a run over a real link are the same computation.

Knows models, ``split_model`` and codecs; no sockets, data loading or runtime.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..codecs import Codec, Packet, boundary, from_spec
from .boundary_output import BoundaryOutput
from .rng import part_rng
from .surgery import split_model

__all__ = ["SimulatedSplit", "StepBytes", "codec_seed"]


def codec_seed(seed: int, step: int) -> int:
    """Codec seed of the boundary tensor at ``step`` (the residual, when sent, uses this + 1)."""
    return seed + 2 * step


@dataclass
class StepBytes:
    """Bytes of one training step.  ``received`` fills in when backward runs."""

    sent: int = 0
    received: int = 0
    aux: int = 0
    labels: int = 0


class SimulatedSplit(nn.Module):
    """A split model whose edge-cloud traffic goes through ``fwd_codec`` / ``bwd_codec``, with byte counters.

    Attributes:
        edge, cloud: the two parts (``split_model``'s).
        bytes_sent: total bytes edge -> cloud (encoded boundary + aux + labels).
        bytes_received: total bytes cloud -> edge (encoded gradients).
        aux_bytes: total auxiliary bytes (a part of ``bytes_sent``).
        last_step: :class:`StepBytes` of the latest forward (and its backward).

    It works as a transformers ``Trainer``'s model: ``labels`` is in ``forward``'s signature,
    and ``accepts_loss_kwargs = False`` tells ``Trainer`` not to pass loss keywords
    (``num_items_in_batch``), which the wrapped model's loss does not take through the split.
    """

    #: Read by transformers' ``Trainer``: the loss is the cloud's (mean over the batch), no loss kwargs.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, at: int, mode: str = "layer", rank: Optional[int] = None,
                 fwd_codec: Union[str, Codec] = "int8", bwd_codec: Union[str, Codec] = "int8,sr",
                 eliminate_links: bool = True, seed: int = 0) -> None:
        super().__init__()
        self.fwd_codec, self.bwd_codec = from_spec(fwd_codec), from_spec(bwd_codec)
        self.edge, self.cloud = split_model(model, at=at, mode=mode, rank=rank, eliminate_links=eliminate_links,
                                            seed=seed)
        self.seed, self.steps = seed, 0
        self.bytes_sent = self.bytes_received = self.aux_bytes = 0
        self.last_step = StepBytes()

    def _count(self, step: StepBytes):
        def on_packet(direction: str, packet: Packet) -> None:
            if direction == "fwd":
                step.sent += packet.nbytes
                self.bytes_sent += packet.nbytes
            else:
                step.received += packet.nbytes
                self.bytes_received += packet.nbytes
        return on_packet

    def _cross(self, t: Optional[torch.Tensor], seed: int, step: StepBytes) -> Optional[torch.Tensor]:
        if t is None:
            return None
        return boundary(t, self.fwd_codec, self.bwd_codec, seed, on_packet=self._count(step))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **inputs: Optional[torch.Tensor]) -> Any:
        """The wrapped model's forward, across a simulated link; returns the wrapped model's output."""
        index = self.steps
        self.steps += 1
        with part_rng(self.seed, index, "edge", [input_ids.device]):
            b = self.edge(input_ids, attention_mask, **inputs)
        step = StepBytes(aux=b.aux_nbytes)
        if labels is not None:
            step.labels = labels.numel() * labels.element_size()
        step.sent = step.aux + step.labels
        self.bytes_sent += step.sent
        self.aux_bytes += step.aux
        self.last_step = step
        seed = codec_seed(self.seed, index)
        crossed = BoundaryOutput(self._cross(b.hidden, seed, step), b.lengths, b.seq_len,
                                 self._cross(b.residual, seed + 1, step), b.pool_index)
        with part_rng(self.seed, index, "cloud", [input_ids.device]):
            return self.cloud(crossed, labels=labels)
