"""Runners: a fine-tuning run driven one batch at a time, split or not, in process or over TCP.

A training loop that owns its data order (the GLUE harness, ``bench/glue.py``) talks to a
:class:`Runner`: ``train_step(batch) -> loss`` (one optimizer step), ``predict(batch) -> logits``,
``bytes_up`` / ``bytes_down`` (payload bytes of the training steps so far, never of evaluation),
``tokenizer`` and ``close()``.  :func:`make_runner` builds one with the package's recipe:

* ``split=None`` -- the unsplit reference (:class:`ReferenceRunner`): the plain classifier
  (the model every split run starts from) with the split runs' optimizer and schedule,
  :func:`~.parts.make_optimizer` (AdamW, ``foreach=False``) and :func:`~.parts.make_scheduler`
  (linear warmup, then linear decay).  No link: its byte counters stay 0.
* a split (:data:`~.config.SPLIT_FIELDS` values) -- :class:`SplitRunner`: an
  :class:`~.edge.EdgeTrainer` with the cloud part in this process (an ``InProcessLink``) or, with
  ``over_tcp``, in a ``sft serve`` process on loopback (:func:`local_cloud`, one per process).
  Both run the same fused ``TRAIN`` step (the U-split: ``FORWARD`` / ``BACKWARD`` / ``STEP``) with
  dropout and codec randomness keyed by (seed, step, part), so they compute the same run, loss
  for loss; the bytes are the trainer's :class:`~.edge.TrainSummary` payload counters.

The batches are the caller's, as given: data order and the regression targets' scale
(:mod:`sft_kernels.data.recipe`) belong to the loop.  Must not know GLUE tasks, CSVs or reports.
"""
from __future__ import annotations

import atexit
import time
from typing import Any, Iterable, Mapping, Optional, Protocol

import torch

from ..split import model_inputs
from ..split.calibrate import DEFAULT_FIT
from .config import SPLIT_FIELDS, RunConfig
from .edge import EdgeTrainer
from .jobs import LocalCloud
from .parts import _classifier, _embedded, make_optimizer, make_scheduler

__all__ = ["Runner", "ReferenceRunner", "SplitRunner", "make_runner", "local_cloud", "embedded_tokenizer"]

Batch = Mapping[str, torch.Tensor]


class Runner(Protocol):
    """What a training loop needs from a way of running the (split) model."""

    tokenizer: Any

    def train_step(self, batch: Batch) -> float:
        """One optimizer step on ``batch`` (model inputs and ``labels``); returns the loss."""

    def predict(self, batch: Batch) -> torch.Tensor:
        """Logits of ``batch`` in eval mode, no gradients, no update."""

    @property
    def bytes_up(self) -> int:
        """Edge -> cloud payload bytes of the training steps so far."""

    @property
    def bytes_down(self) -> int:
        """Cloud -> edge payload bytes of the training steps so far."""

    def close(self) -> None:
        """Release resources."""

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs (between optimizer steps): parts, optimizers, schedules, counters."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s ``state`` (of a runner built with the same arguments)."""


def _opt_state(opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
    return {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}


def _load_opt_state(opt: torch.optim.Optimizer, sched: Any, state: Mapping[str, Any]) -> None:
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])


class ReferenceRunner:
    """The unsplit reference: the plain classifier of ``cfg``, trained with the split runs' optimizer and schedule.

    Dropout draws from the global RNG, which is seeded with ``cfg.seed`` here, so the run is a
    function of the config.  There is no link: :attr:`bytes_up` and :attr:`bytes_down` are 0.
    """

    bytes_up = bytes_down = handshake_bytes = 0

    def __init__(self, cfg: RunConfig) -> None:
        torch.manual_seed(cfg.seed)
        self.tokenizer, self.model = _classifier(None, cfg.num_labels, cfg.seed)
        self._inputs = model_inputs(self.model)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg)

    def train_step(self, batch: Batch) -> float:
        self.model.train()
        out = self.model(**{k: batch[k] for k in self._inputs if k in batch}, labels=batch["labels"])
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        self.opt.step()
        self.sched.step()
        return float(out.loss.detach())

    @torch.no_grad()
    def predict(self, batch: Batch) -> torch.Tensor:
        self.model.eval()
        return self.model(**{k: batch[k] for k in self._inputs if k in batch}).logits

    def close(self) -> None:
        self.model = self.opt = self.sched = None

    def state_dict(self) -> dict[str, Any]:
        # dropout draws from the global generator here, so a resumed run needs its state too
        return {"model": self.model.state_dict(), **_opt_state(self.opt, self.sched), "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        _load_opt_state(self.opt, self.sched, state)
        torch.set_rng_state(state["rng"])


class SplitRunner:
    """A split run: an :class:`~.edge.EdgeTrainer` fed the batch it is given, its cloud part in process or at ``cloud``.

    ``cloud``: a started :class:`~.jobs.LocalCloud` (or anything with ``host``, ``port``,
    ``client_id`` and ``token``) to train against over TCP; None runs the cloud part in this process.
    Evaluation batch ``i`` after training uses the codec seed of step ``total_steps + i``, as
    :meth:`~.edge.EdgeTrainer.predict` defines, on either link.
    """

    def __init__(self, cfg: RunConfig, cloud: Optional[Any] = None, calibration: Optional[Iterable[Any]] = None
                 ) -> None:
        self._batch: Optional[Batch] = None
        remote = {} if cloud is None else dict(host=cloud.host, port=cloud.port, client_id=cloud.client_id,
                                               token=cloud.token)
        self.trainer = EdgeTrainer(cfg, self._current_batch, progress=False, calibration=calibration, **remote)
        self.tokenizer = self.trainer.tokenizer
        self._evals = 0

    def _current_batch(self, step: int) -> Batch:
        if self._batch is None:
            raise RuntimeError("SplitRunner: no batch given (call train_step(batch))")
        return self._batch

    def train_step(self, batch: Batch) -> float:
        self._batch = batch
        try:
            return self.trainer.train_step()
        finally:
            self._batch = None

    def predict(self, batch: Batch) -> torch.Tensor:
        logits = self.trainer.predict([batch], start=self._evals)
        self._evals += 1
        return logits

    @property
    def bytes_up(self) -> int:
        return self.trainer.summary.payload_up

    @property
    def bytes_down(self) -> int:
        return self.trainer.summary.payload_down

    @property
    def handshake_bytes(self) -> int:
        """Payload bytes of the session handshake (a calibrated run's decoders; see ``EdgeTrainer``)."""
        return self.trainer.handshake_bytes

    def state_dict(self) -> dict[str, Any]:
        """The edge's checkpoint state and, in process, the cloud worker's part, optimizer and step (over TCP the
        cloud keeps its own checkpoints: refused)."""
        worker = self._worker()
        return {"edge": self.trainer.state(), "evals": self._evals, "cloud": {
            "model": worker.model.state_dict(), **_opt_state(worker.opt, worker.sched), "step": worker.step}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        worker = self._worker()
        t = self.trainer
        with t._checkpointed():
            t.model.load_state_dict(state["edge"]["model"])
        _load_opt_state(t.opt, t.sched, state["edge"])
        t.step = int(state["edge"]["step"])
        t._load_extra(state["edge"])
        self._evals = int(state["evals"])
        worker.model.load_state_dict(state["cloud"]["model"])
        _load_opt_state(worker.opt, worker.sched, state["cloud"])
        worker.step = int(state["cloud"]["step"])

    def _worker(self) -> Any:
        worker = getattr(self.trainer.link, "worker", None)
        if worker is None:
            raise RuntimeError("SplitRunner.state_dict: over TCP the cloud checkpoints itself; resume with the "
                               "trainer's checkpoint_dir instead")
        return worker

    def close(self) -> None:
        try:
            if self.trainer.step == self.trainer.cfg.total_steps:
                self.trainer.finish()  # over TCP: lets the server drop this session when it needs room
        finally:
            self.trainer.close()


_CLOUD: Optional[LocalCloud] = None


def local_cloud() -> LocalCloud:
    """The ``sft serve`` process (any split, up to 4 sessions) that over-TCP runners train against.

    Started on first use, once per process, and stopped at exit.
    """
    global _CLOUD
    if _CLOUD is None:
        _CLOUD = LocalCloud(extra=["--any-split", "--quiet", "--max-sessions", "4"]).start()
        atexit.register(_CLOUD.__exit__, None, None, None)
    return _CLOUD


def embedded_tokenizer():
    """The embedded model's tokenizer; reads the model files once per process (every runner builds from that copy)."""
    return _embedded()[0]


def make_runner(split: Optional[Mapping[str, Any]], num_labels: int, seed: int, *, lr: float, weight_decay: float,
                total_steps: int, warmup_steps: int, batch_size: int, max_length: int, over_tcp: bool = False,
                at: int = 3, task: str = "glue", run_id: Optional[str] = None,
                calibration: Optional[Iterable[Any]] = None, calibration_size: int = 512,
                calibration_fit: str = DEFAULT_FIT) -> Runner:
    """The runner of one fine-tuning run of the embedded MiniLM with a fresh ``num_labels`` head.

    Args:
        split: None for the unsplit reference, else :data:`~.config.SPLIT_FIELDS` values
            (``mode``, ``rank``, ``eliminate_links``, ``u_split``, ``fwd_codec``, ``bwd_codec``, ``at``);
            ``rank`` defaults to None (right for ``mode="layer"``).
        num_labels, seed, lr, weight_decay, total_steps, warmup_steps, batch_size, max_length: the
            :class:`~.config.RunConfig` fields of the run (checked there).
        over_tcp: run a split's cloud part in :func:`local_cloud`'s server process instead of in
            this one (the reference always runs in process).
        at: split after this many encoder layers (unless ``split`` names ``at``).
        task, run_id: for the record; ``run_id`` (default: unique per call) names the cloud session.
        calibration, calibration_size: a calibrated split's (``init="calibrated"``) unlabelled batches to fit
            its code on, and their example count for the record (the runner has no data order of its own).
        calibration_fit: how a calibrated split fits its code (``RunConfig.calibration_fit``).
    """
    fields = dict(split or {})
    unknown = sorted(set(fields) - set(SPLIT_FIELDS))
    if unknown:
        raise ValueError(f"split: unknown keys {unknown} (valid: {list(SPLIT_FIELDS)})")
    if split is not None:
        fields.setdefault("rank", None)
    fields.setdefault("at", at)
    cfg = RunConfig(task=task, num_labels=num_labels, seed=seed, lr=lr, weight_decay=weight_decay,
                    warmup_steps=warmup_steps, total_steps=total_steps, batch_size=batch_size,
                    max_length=max_length, run_id=run_id or f"{task}-s{seed}-{time.time_ns()}",
                    calibration_size=calibration_size, calibration_fit=calibration_fit, **fields)
    if split is None:
        return ReferenceRunner(cfg)
    return SplitRunner(cfg, local_cloud() if over_tcp else None, calibration)
