"""Atomic, step-numbered checkpoints in a directory.

``save`` writes ``step-00000042.pt.tmp``, flushes and fsyncs it, then renames it to
``step-00000042.pt`` (``os.replace`` is atomic on POSIX), so a crash leaves either the
old set of checkpoints or the new one, never a torn file.  Loading uses
``torch.load(weights_only=True)``: checkpoints hold tensors, numbers, strings and
containers only.

Which steps are checkpointed is the edge's choice (its ``checkpoint_every``): it asks the cloud
to checkpoint the same steps, so both sides always hold the same *regular* checkpoints.  The
cloud may also write an *idle* checkpoint (``step-NNNNNNNN.idle.pt``) when it evicts a silent
session; only the newest idle one is kept, and none older than the newest regular one, so idle
checkpoints never push a regular one the edge may resume from out of the newest ``keep``.

No RNG state is saved: dropout and codec randomness are keyed by (seed, step), and restoring a
global generator would disturb every other session of the process.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional, Union

import torch

from .config import fit_hash, fit_state, state_hash

__all__ = ["CheckpointStore", "CheckpointedPart"]

_NAME = re.compile(r"^step-(\d{8,})(\.idle)?\.pt$")


class CheckpointStore:
    """Checkpoints of one part of one run: ``directory/step-NNNNNNNN.pt``, the newest ``keep`` kept."""

    def __init__(self, directory: Union[str, Path], keep: int = 3) -> None:
        if keep < 2:
            raise ValueError(f"keep must be >= 2 (resume may need the one before the newest), got {keep}")
        self.directory = Path(directory)
        self.keep = keep
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, step: int, idle: bool = False) -> Path:
        """File of the (regular or idle) checkpoint at ``step``."""
        return self.directory / f"step-{step:08d}{'.idle' if idle else ''}.pt"

    def _scan(self) -> tuple[list[int], list[int]]:
        regular, idle = [], []
        for p in self.directory.iterdir():
            m = _NAME.match(p.name)
            if m:
                (idle if m.group(2) else regular).append(int(m.group(1)))
        return sorted(regular), sorted(idle)

    def steps(self) -> list[int]:
        """Steps with a complete checkpoint (regular or idle), ascending."""
        regular, idle = self._scan()
        return sorted(set(regular) | set(idle))

    def regular_steps(self) -> list[int]:
        """Steps with a regular (edge-requested) checkpoint, ascending."""
        return self._scan()[0]

    def latest(self) -> Optional[int]:
        """The newest checkpointed step, or None."""
        s = self.steps()
        return s[-1] if s else None

    def save(self, step: int, state: dict[str, Any], idle: bool = False) -> Path:
        """Write ``state`` as the checkpoint of ``step`` atomically; prune old ones.

        On failure (disk full, no permission) the partial temporary file is removed and the
        error propagates; the previous checkpoints are untouched.
        """
        final = self.path(step, idle)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._prune()
        return final

    def _prune(self) -> None:
        regular, idle = self._scan()
        for old in regular[:-self.keep]:
            self.path(old).unlink(missing_ok=True)
        newest = regular[-1] if regular else -1
        for old in idle[:-1] + [i for i in idle[-1:] if i <= newest]:
            self.path(old, idle=True).unlink(missing_ok=True)

    def load(self, step: int) -> dict[str, Any]:
        """The checkpoint of ``step``; FileNotFoundError naming the directory and the steps it has."""
        p = self.path(step)
        if not p.is_file():
            p = self.path(step, idle=True)
        if not p.is_file():
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory} (have {self.steps()})")
        return torch.load(p, map_location="cpu", weights_only=True)


class CheckpointedPart:
    """Mixin for one side of a run (edge or cloud): checkpointing of its part, optimizer and scheduler.

    The class sets ``model``, ``opt``, ``sched``, ``cfg`` (a ``RunConfig``), ``step``, ``store``
    (a :class:`CheckpointStore` or None) and ``init_hashes`` (the state hashes of both initial parts,
    and of a calibrated run's decoders, which the session handshake compares), and may add to a checkpoint through :meth:`_extra_state` /
    :meth:`_load_extra`.  Every checkpoint carries the ``init_hashes`` of the run it descends from,
    and restoring one adopts them: the handshake then checks what will actually train.
    """

    #: Which part this side holds ("edge" or "cloud"): the key of its own hash in ``init_hashes``.
    part = "edge"

    def _extra_state(self) -> dict[str, Any]:
        return {}

    def _load_extra(self, state: dict[str, Any]) -> None:
        pass

    def _cannot_restore(self, step: int) -> Exception:
        return RuntimeError(f"cannot roll back to step {step}: no checkpoint directory")

    def _open_store(self, save_initial: bool = True) -> None:
        """Resume from the newest checkpoint, or (``save_initial``) write the step-0 one."""
        if self.store is not None:
            latest = self.store.latest()
            if latest is None:
                if save_initial:
                    self.save()
            else:
                self.restore(latest)

    def checkpoint_steps(self) -> list[int]:
        """Steps this side can roll back to."""
        return self.store.steps() if self.store is not None else []

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "config": self.cfg.to_dict(),
                "init_hashes": dict(self.init_hashes), **self._extra_state()}

    def save(self, idle: bool = False) -> None:
        """Checkpoint at the current step (no-op without a checkpoint directory); see :class:`CheckpointStore`."""
        if self.store is not None:
            self.store.save(self.step, self.state(), idle=idle)

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
        hashes = st.get("init_hashes")
        if not isinstance(hashes, dict) or not {"edge", "cloud"} <= set(hashes) <= {"edge", "cloud", "fit"}:
            raise ValueError(f"checkpoint {self.store.path(step)} does not record the initial parameter hashes "
                             "(written by an older version?)")
        if int(st["step"]) == 0 and (state_hash(self.model) != hashes[self.part] or (
                self.part == "cloud" and "fit" in hashes and fit_hash(fit_state(self.model)) != hashes["fit"])):
            raise ValueError(f"checkpoint {self.store.path(step)} claims to hold the initial {self.part} part, "
                             "but its parameters do not hash to the recorded initial hash")
        self.init_hashes = dict(hashes)
        self.step = int(st["step"])
        self._load_extra(st)
