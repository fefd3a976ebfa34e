"""The split training step, written once and run over any link.

* :class:`EdgeClient` (:mod:`.edge`) -- the edge half: edge forward, encode, decode, edge backward;
* :class:`CloudWorker` (:mod:`.cloud`) -- the cloud half: one method per message kind;
* :mod:`.link` -- what moves messages between them (:class:`InProcessLink` here; TCP in the runtime)
  and the one byte counter (:class:`Traffic`);
* :mod:`.messages` -- the messages, and packets as named tensors;
* :class:`SimulatedSplit` -- the step over the in-process link, as a drop-in ``nn.Module``.

Sits between ``split/`` (models) and ``runtime/`` (sockets, sessions, checkpoints): imports
``split`` and ``codecs``, never ``channel``, ``data`` or ``runtime``.
"""
from .cloud import CloudWorker
from .edge import EdgeClient, StepBytes
from .link import InProcessLink, Link, Reply, Traffic
from .simulated import SimulatedSplit

__all__ = ["CloudWorker", "EdgeClient", "StepBytes", "InProcessLink", "Link", "Reply", "Traffic", "SimulatedSplit"]
