"""``EdgeClient``: the edge half of the split training step, over any link.

Edge forward (dropout keyed by ``(seed, index, "edge")``) -> encode the boundary -> the link ->
the cloud (:class:`~.cloud.CloudWorker`) -> decode what comes back -> edge backward.  Two paths
(see :mod:`.cloud`):

* :meth:`EdgeClient.fused_step` -- ``TRAIN``, one round trip: the cloud computes the model's own
  loss and backpropagates it at once; the edge applies the returned boundary gradient.  For loops
  that own the whole step (``sft train``, the GLUE harness).
* :meth:`EdgeClient.forward` -- ``FORWARD`` now, ``BACKWARD`` when autograd reaches the returned
  outputs: the outputs (loss and logits; in the U-split the pooled rows, then the edge's top) are
  ordinary autograd tensors, so any loss a user builds from them, scaled however, reaches the
  cloud's backward.  Two round trips per micro-batch.  ``model.eval()`` sends ``EVAL`` (forward
  only); a train-mode forward under ``torch.no_grad()`` keeps no graph on the cloud.

Knows the split's parts, codecs, messages and a link; no sockets or sessions.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Union

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling, SequenceClassifierOutput

from ..codecs import BWD_SEED_OFFSET, Codec, from_spec
from ..split import BoundaryOutput, codec_seed, part_rng
from .link import Link, Reply
from .messages import (BACKWARD, EVAL, FORWARD, POOLED_SEED_OFFSET, TRAIN, StepRefused, boundary_to_wire, label_dtype,
                       decode_packet, packet_from_wire, packet_to_wire, payload_nbytes)

__all__ = ["EdgeClient", "StepBytes", "pooled_codecs"]


def pooled_codecs(fwd: Codec, bwd: Codec, pooled: Union[str, Codec, None] = None,
                  pooled_grad: Union[str, Codec, None] = None) -> tuple[Codec, Codec]:
    """The U-split's codecs of the pooled rows (down) and their gradient (up): each defaults to the run's
    activation (``fwd``) and gradient (``bwd``) codec."""
    return (fwd if pooled is None else from_spec(pooled)), (bwd if pooled_grad is None else from_spec(pooled_grad))


@dataclass
class StepBytes:
    """Payload bytes of one micro-batch (its backward's fill in when it runs)."""

    sent: int = 0
    received: int = 0
    aux: int = 0
    labels: int = 0


def _grad_specs(hidden: torch.Tensor, residual: Optional[torch.Tensor]) -> list:
    """``(shape, dtype, device)`` of each boundary tensor (None for no residual): what its gradient must be."""
    return [(t.shape, t.dtype, t.device) if t is not None else None for t in (hidden, residual)]


class _Remote(torch.autograd.Function):
    """The cloud's part of the graph: forward sends ``FORWARD``, backward sends ``BACKWARD``."""

    @staticmethod
    def forward(ctx, client: "EdgeClient", index: int, tensors: dict, meta: dict, box: list,
                hidden: torch.Tensor, residual: Optional[torch.Tensor]):
        ctx.set_materialize_grads(False)
        reply = client._exchange(FORWARD, tensors, meta, index)
        names, outs = client._outputs(index, reply)
        ctx.client, ctx.index, ctx.names = client, index, names
        ctx.step = client.last_step
        ctx.shapes = _grad_specs(hidden, residual)
        box.append(names)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads: Optional[torch.Tensor]):
        given = [(n, g) for n, g in zip(ctx.names, grads) if g is not None]
        none = (None,) * 5
        if not given:
            return none + (None, None)
        gh, gr = ctx.client._backward(ctx.index, given, ctx.shapes, ctx.step)
        return none + (gh, gr)


class EdgeClient:
    """The edge part's side of every split step of one run.

    Args:
        edge: the edge part (``split_model``'s ``EdgeModel``).
        link: where the cloud half is (:mod:`.link`).
        fwd, bwd: the run's codecs.
        seed: the run's seed (dropout and codec keys).
        top: the U-split's top (head and loss on the edge), or None.
        pooled: the U-split's codecs of the pooled rows (down) and of their gradient (up); default
            ``(fwd, bwd)``.
        head: whether the cloud holds a task head (outside the U-split): picks the output type.
    """

    def __init__(self, edge: nn.Module, link: Link, fwd: Codec, bwd: Codec, seed: int, *,
                 top: Optional[nn.Module] = None, head: bool = True,
                 pooled: Optional[tuple[Codec, Codec]] = None) -> None:
        self.edge, self.link, self.fwd, self.bwd, self.seed, self.top = edge, link, fwd, bwd, seed, top
        self.pooled_fwd, self.pooled_bwd = pooled or (fwd, bwd)
        self.head = head
        self.last_step = StepBytes()
        self.aux_bytes = 0  # auxiliary bytes of every boundary sent
        self.on_backward: Optional[Callable[[], None]] = None  # called after each micro-batch's BACKWARD

    # ---------------------------------------------------------------- pieces
    def _devices(self, t: torch.Tensor) -> list[torch.device]:
        return [t.device] if t.device.type != "cpu" else []

    def encode(self, index: int, inputs: Mapping[str, torch.Tensor]) -> tuple[BoundaryOutput, dict, dict]:
        """Run the edge part on ``inputs`` and encode its boundary: ``(boundary, tensors, meta)``."""
        ids = inputs["input_ids"]
        with part_rng(self.seed, index, "edge", self._devices(ids)):
            b = self.edge(**inputs)
        tensors, bmeta, _ = boundary_to_wire(b, self.fwd, codec_seed(self.seed, index))
        return b, tensors, {"b": bmeta}

    def wire_labels(self, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
        """Labels as they cross (:func:`~.messages.label_dtype`: float32 for regression, else int8 up to 128
        classes); an id the dtype cannot hold is refused here, not wrapped."""
        dtype = label_dtype(num_labels)
        if not dtype.is_floating_point and labels.numel() and not (
                0 <= int(labels.min()) and int(labels.max()) < num_labels):
            raise ValueError(f"labels must be class ids in 0..{num_labels - 1}, got values "
                             f"{sorted(set(labels.tolist()))[:8]}")
        return labels.to(dtype)

    def _exchange(self, kind: int, tensors: dict, meta: dict, seq: int) -> Reply:
        reply = self.link.request(kind, tensors, meta, seq)
        up, down = payload_nbytes(tensors), payload_nbytes(reply.tensors)
        if kind in (FORWARD, EVAL, TRAIN):
            labels = tensors.get("labels")
            self.last_step = StepBytes(up, down, 0, 0 if labels is None else labels.numel() * labels.element_size())
        return reply

    def _decode_grads(self, index: int, reply: Reply, shapes: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        out = []
        for prefix, spec in zip(("h", "r"), shapes):
            if spec is None:
                out.append(None)
                continue
            shape, dtype = spec[:2]
            p = packet_from_wire(reply.tensors, reply.meta.get(prefix), "g." + prefix, self.bwd, shape.numel())
            g = decode_packet(self.bwd, p, f"step {index}: received gradient '{prefix}'")
            if g.shape != shape:
                raise StepRefused(f"step {index}: gradient '{prefix}' has shape {tuple(g.shape)}, expected "
                                  f"{tuple(shape)}")
            out.append(g.to(dtype))
        return out[0], out[1]

    def _outputs(self, index: int, reply: Reply) -> tuple[list[str], list[torch.Tensor]]:
        """The cloud's outputs from a FORWARD/EVAL reply, in order: ``(names, tensors)``."""
        o = reply.meta.get("o")
        if self.top is not None:
            if not isinstance(o, dict) or set(o) != {"pooled"}:
                raise StepRefused(f"micro-batch {index}: the reply holds no pooled rows")
            p = packet_from_wire(reply.tensors, o["pooled"], "o.pooled", self.pooled_fwd, 1 << 34)
            return ["pooled"], [decode_packet(self.pooled_fwd, p, f"micro-batch {index}: pooled rows")]
        if not isinstance(o, list) or not all(isinstance(x, list) and len(x) == 2 for x in o):
            raise StepRefused(f"micro-batch {index}: the reply lists no outputs")
        names, outs = [], []
        for name, ndim in o:
            t = reply.tensors.get("o." + str(name))
            if t is None:
                raise StepRefused(f"micro-batch {index}: output {name!r} missing from the reply")
            names.append(name)
            outs.append(t.reshape(()) if ndim == 0 else t)
        return names, outs

    def _backward(self, index: int, given: list, shapes: list, step: StepBytes
                  ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        if not all(bool(torch.isfinite(g).all()) for _, g in given):
            # an overflowed loss scale (AMP's GradScaler): nothing non-finite crosses the link; the edge's
            # gradients become NaN so its scaler skips the step (and tells the cloud to drop this one)
            if self.on_backward is not None:
                self.on_backward()
            return tuple(None if spec is None else torch.full(spec[0], float("nan"), dtype=spec[1], device=spec[2])
                         for spec in shapes)
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"g": [n for n, _ in given]}
        for name, g in given:
            if self.top is not None:
                seed = codec_seed(self.seed, index) + POOLED_SEED_OFFSET + BWD_SEED_OFFSET
                t, m = packet_to_wire(self.pooled_bwd.encode(g.detach().contiguous(), seed), "d." + name)
                tensors.update(t)
                meta["d"] = m
            else:
                tensors["d." + name] = g.detach().float().reshape(-1).contiguous()
        reply = self.link.request(BACKWARD, tensors, meta, index)
        if self.on_backward is not None:
            self.on_backward()
        step.sent += payload_nbytes(tensors)
        step.received += payload_nbytes(reply.tensors)
        return self._decode_grads(index, reply, shapes)

    def _result(self, names: list[str], outs: list[torch.Tensor], labels: Optional[torch.Tensor], index: int) -> Any:
        if self.top is not None:
            with part_rng(self.seed, index, "top", self._devices(outs[0])):
                return self.top(outs[0], labels=labels)
        d = dict(zip(names, outs))
        if self.head or "logits" in d:
            return SequenceClassifierOutput(**d)
        return (BaseModelOutputWithPooling if "pooler_output" in d else BaseModelOutput)(**d)

    # ---------------------------------------------------------------- the two paths
    def forward(self, index: int, inputs: Mapping[str, torch.Tensor], labels: Optional[torch.Tensor] = None,
                num_labels: Optional[int] = None) -> Any:
        """The split model's forward as micro-batch ``index``: the wrapped model's output type.

        In train mode with gradients the outputs are autograd tensors whose backward runs the
        cloud's (``BACKWARD``); in eval mode the cloud only runs forward (``EVAL``).
        """
        b, tensors, meta = self.encode(index, inputs)
        if labels is not None and self.top is None:
            tensors["labels"] = self.wire_labels(labels, num_labels if num_labels is not None else 2)
        training = self.edge.training
        keep = training and torch.is_grad_enabled() and b.hidden.requires_grad
        if not keep:
            if training:
                meta["keep"] = False
            reply = self._exchange(FORWARD if training else EVAL, tensors, meta, index)
            names, outs = self._outputs(index, reply)
        else:
            box: list = []
            outs = list(_Remote.apply(self, index, tensors, meta, box, b.hidden, b.residual))
            names = box[0]
        self.last_step.aux = b.aux_nbytes
        self.aux_bytes += b.aux_nbytes
        return self._result(names, outs, labels, index)

    def fused_step(self, index: int, inputs: Mapping[str, torch.Tensor], labels: torch.Tensor, num_labels: int,
                   extra_meta: Optional[dict] = None) -> tuple[float, Reply, int]:
        """One ``TRAIN`` round trip and the edge's backward: ``(loss, reply, request payload bytes)``.

        The caller steps the edge's optimizer.  ``extra_meta`` travels with the request (``ckpt``).
        """
        b, tensors, meta = self.encode(index, inputs)
        tensors["labels"] = self.wire_labels(labels, num_labels)
        meta.update(extra_meta or {})
        reply = self._exchange(TRAIN, tensors, meta, index)
        if reply.meta.get("loss") is None:
            raise StepRefused(f"step {index}: the reply carries no loss")
        gh, gr = self._decode_grads(index, reply, _grad_specs(b.hidden, b.residual))
        outs, grads = [b.hidden], [gh]
        if gr is not None:
            outs.append(b.residual)
            grads.append(gr)
        torch.autograd.backward(outs, grads)
        self.last_step.aux = b.aux_nbytes
        self.aux_bytes += b.aux_nbytes
        return float(reply.meta["loss"]), reply, payload_nbytes(tensors)
