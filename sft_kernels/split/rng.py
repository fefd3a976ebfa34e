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

Why a lock: ``F.dropout`` and SDPA take no generator, so the keyed stream has to be the
process-global one (CPU, and CUDA for the devices named).  Two threads seeding it at once (two
cloud sessions, or a session being built while another steps) would reseed each other's
stream mid-forward.  :func:`seeded` therefore holds one process-wide re-entrant lock for the
whole block: keyed forwards and seeded construction of different sessions serialise, and each
sees exactly the stream it would see alone.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Iterator, Optional, Sequence

import torch

__all__ = ["part_seed", "part_rng", "seeded", "codec_seed", "PARTS"]

#: Held while any block runs on a seeded global stream (re-entrant: seeded construction nests).
_GLOBAL_RNG_LOCK = threading.RLock()

#: The parts a split model has ("top": the edge's head in the U-split).
PARTS = ("edge", "cloud", "top")


def codec_seed(seed: int, step: int) -> int:
    """Codec seed of the boundary tensor at ``step`` (the residual, when sent, uses this + 1)."""
    return seed + 2 * step


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
    with seeded(part_seed(seed, step, part), devices):
        yield


@contextlib.contextmanager
def seeded(seed: int, devices: Optional[Sequence[torch.device]] = None) -> Iterator[None]:
    """Run the block on torch's global generators seeded with ``seed``, under the process-wide RNG lock.

    The generators' previous states come back afterwards, so the caller's stream is untouched;
    ``devices``: CUDA devices whose generators to fork and seed too (CPU's always is).
    """
    cuda = [torch.device(d).index or 0 for d in (devices or []) if torch.device(d).type == "cuda"]
    with _GLOBAL_RNG_LOCK, torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield
