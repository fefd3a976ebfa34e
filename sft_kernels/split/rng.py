"""Dropout randomness keyed by (seed, step, part).

Each part of a split model draws its dropout masks from a generator seeded from
``(seed, step, part)`` instead of the global stream.  Two consequences:

* the edge and the cloud draw the same masks whether they run in one process
  (:class:`~sft_kernels.split.SimulatedSplit`) or in two over a link, so a TCP run
  is the same computation as a simulated one;
* a run resumed from a checkpoint at step ``s`` draws the masks an uninterrupted
  run draws at step ``s``, without having to restore a generator's history.

The global RNG state is saved and restored around the block, so code outside it
sees no change.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["part_seed", "part_rng", "PARTS"]

#: The parts a split model has.
PARTS = ("edge", "cloud")


def part_seed(seed: int, step: int, part: str) -> int:
    """The 63-bit generator seed of ``part`` at training ``step`` of a run seeded ``seed``."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    digest = hashlib.blake2b(f"sft-dropout:{int(seed)}:{int(step)}:{part}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@contextlib.contextmanager
def part_rng(seed: int, step: int, part: str, devices: Optional[Sequence[torch.device]] = None) -> Iterator[None]:
    """Run the block with torch's generators seeded from ``(seed, step, part)``; restore them afterwards.

    ``devices``: accelerator devices whose generators to fork too (default: none, i.e. CPU only).
    """
    s = part_seed(seed, step, part)
    cuda = [torch.device(d).index or 0 for d in (devices or []) if torch.device(d).type == "cuda"]
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(s)
        yield
