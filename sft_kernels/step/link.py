"""Links: what moves the split step's requests and replies, and the one byte counter they share.

A *link* has one method, ``request(kind, tensors, meta, seq) -> Reply``: it delivers a request
of :mod:`.messages` to the cloud half of the step and returns the cloud's answer (or raises the
cloud's refusal).  Everything else of a step -- encoding, decoding, seeds, dropout keys,
exactly-once bookkeeping -- belongs to :mod:`.edge` and :mod:`.cloud`, so a new transport is one
new link and nothing else.

* :class:`InProcessLink` calls a :class:`~.cloud.CloudWorker` in this process (``SimulatedSplit``);
* the TCP link lives in :mod:`sft_kernels.runtime.link` (``RemoteSplit``, ``sft train``).

Every link counts the payload bytes (tensor data) of what it carries in a :class:`Traffic`.

Knows messages and tensors; no sockets, models or training loops.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Protocol

import torch

from .messages import payload_nbytes

__all__ = ["Link", "Reply", "Traffic", "InProcessLink", "CountsTraffic"]


class Reply(NamedTuple):
    """The cloud's answer to one request."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


@dataclass
class Traffic:
    """Payload bytes (tensor data) a link carried each way, and how many requests.

    ``handshake_up``: payload bytes of the session handshakes (``OPEN``: a calibrated run's decoders,
    sent at every open, reconnects included), not part of ``up``.
    """

    up: int = 0
    down: int = 0
    requests: int = 0
    handshake_up: int = 0

    def count(self, request: Mapping[str, torch.Tensor], reply: Mapping[str, torch.Tensor]) -> tuple[int, int]:
        """Add one exchange; returns its ``(up, down)`` payload bytes."""
        up, down = payload_nbytes(request), payload_nbytes(reply)
        self.up += up
        self.down += down
        self.requests += 1
        return up, down


class Link(Protocol):
    """Moves one request to the cloud half of the split step and returns its reply."""

    traffic: Traffic

    def request(self, kind: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], seq: int) -> Reply:
        """Deliver a request; raises the cloud's refusal (:class:`~.messages.StepRefused` or a link error)."""


class InProcessLink:
    """A link to a :class:`~.cloud.CloudWorker` in the same process: no copies, no sockets, same counting."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.traffic = Traffic()

    def request(self, kind: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any], seq: int) -> Reply:
        out, out_meta = self.worker.handle(kind, seq, tensors, meta)
        self.traffic.count(tensors, out)
        return Reply(out, out_meta)


class CountsTraffic:
    """Mixin for a module that holds a ``link``: its byte counters, read from the link's :class:`Traffic`."""

    link: Link

    @property
    def bytes_sent(self) -> int:
        """Payload bytes edge -> cloud so far (every request)."""
        return self.link.traffic.up

    @property
    def bytes_received(self) -> int:
        """Payload bytes cloud -> edge so far (every reply)."""
        return self.link.traffic.down
