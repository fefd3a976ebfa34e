"""Atomic, step-numbered checkpoints in a directory.

``save`` writes ``step-00000042.pt.tmp``, flushes and fsyncs it, then renames it to
``step-00000042.pt`` (``os.replace`` is atomic on POSIX), so a crash leaves either the
old set of checkpoints or the new one, never a torn file.  Loading uses
``torch.load(weights_only=True)``: checkpoints hold tensors, numbers, strings and
containers only.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

__all__ = ["CheckpointStore", "CheckpointedPart"]

_NAME = re.compile(r"^step-(\d{8,})\.pt$")


class CheckpointStore:
    """Checkpoints of one part of one run: ``directory/step-NNNNNNNN.pt``, the newest ``keep`` kept."""

    def __init__(self, directory: Union[str, Path], keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (resume may need the one before the newest), got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, step: int) -> Path:
        """File of the checkpoint at ``step``."""
        return self.directory / f"step-{step:08d}.pt"

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint, ascending."""
        out = []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def latest(self) -> Optional[int]:
        """The newest checkpointed step, or None."""
        s = self.steps()
        return s[-1] if s else None

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically; prune old ones."""
        final = self.path(step)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        for old in self.steps()[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        return final

    def load(self, step: int) -> dict[str, Any]:
        """The checkpoint of ``step``; FileNotFoundError naming the directory and the steps it has."""
        p = self.path(step)
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.steps()})")
        return torch.load(p, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """torch's CPU generator state (dropout itself is keyed per step; this is for anything else)."""
    return {"torch_cpu": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    torch.set_rng_state(state["torch_cpu"])


class CheckpointedPart:
    """Mixin for one side of a run (edge or cloud): checkpointing of its part, optimizer and scheduler.

    The class sets ``model``, ``opt``, ``sched``, ``cfg`` (a ``RunConfig``), ``step`` and ``store``
    (a :class:`CheckpointStore` or None), and may add to a checkpoint through :meth:`_extra_state` /
    :meth:`_load_extra`.
    """

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass

    def _cannot_restore(self, step: int) -> Exception:
        return RuntimeError(f"cannot roll back to step {step}: no checkpoint directory")

    def _open_store(self) -> None:
        """Resume from the newest checkpoint, or write the step-0 one."""
        if self.store is not None:
            latest = self.store.latest()
            if latest is None:
                self.save()
            else:
                self.restore(latest)

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "rng": rng_state(), "step": self.step,
                "config": self.cfg.to_dict(), **self._extra_state()}

    def save(self) -> None:
        """Checkpoint at the current step (no-op without a checkpoint directory)."""
        if self.store is not None:
            self.store.save(self.step, self.state())

    def restore(self, step: int) -> None:
        """Load the checkpoint of ``step``."""
        if self.store is None:
            raise self._cannot_restore(step)
        st = self.store.load(step)
        if st["config"] != self.cfg.to_dict():
            raise ValueError(f"checkpoint {self.store.path(step)} belongs to a different run config")
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        self.step = int(st["step"])
        self._load_extra(st)
