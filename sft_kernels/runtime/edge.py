"""``EdgeTrainer``: the edge side of ``sft train`` -- its parts, optimizer, data and checkpoints.

Each step is :class:`~sft_kernels.step.EdgeClient`'s: outside the U-split the fused one-round-trip
``TRAIN`` (forward on the edge, encode, the cloud's forward, loss and backward, the gradient back,
edge backward); in the U-split ``FORWARD`` / ``BACKWARD`` (the head and the loss run on the edge)
and ``STEP``.  The link is a :class:`~.link.TcpLink` (its docstring says what is retried).

Resume: every (re)open tells the edge where the cloud stands (the newest step both sides can
resume from: the edge sends its checkpoint steps).  The edge then re-sends the step (the cloud
replays its cached reply if it had applied it) or, when the cloud restarted from an older
checkpoint, rolls back to that checkpoint itself and recomputes from there.  Because dropout and
codec randomness are keyed by step and the data order by (seed, epoch), recomputed steps are the
same computation.  The edge chooses the checkpoint steps (``checkpoint_every``) and asks the cloud
to checkpoint the same ones.  In the U-split the edge's checkpoints hold its top too, and a step
whose cloud half a restarted server lost runs again from its forward (:meth:`EdgeTrainer._general_step`).

Byte counts: ``TrainSummary`` holds payload bytes (encoded tensors) and wire bytes (every byte of
the step's frames on the socket) of the training steps; :meth:`EdgeTrainer.wire_bytes` counts every
byte of every connection, handshakes and reconnects included.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from ..channel import Limits, LinkLimiter, TLSConfig
from ..step import CloudWorker, EdgeClient, InProcessLink
from ..step.cloud import step_hyperparameters
from ..step.messages import FINISH, STEP, payload_nbytes
from .checkpoint import CheckpointedPart, CheckpointStore
from .config import RunConfig
from .link import CloudError, LinkLost, Rewind, TcpLink
from ..split.pretrained import model_inputs
from .parts import build_parts, make_optimizer, make_scheduler

__all__ = ["EdgeTrainer", "TrainSummary", "CloudError", "LinkLost", "first_batches"]

log = logging.getLogger("sft_kernels.runtime")


def first_batches(cfg: RunConfig, batch_at: Callable[[int], Mapping[str, torch.Tensor]]) -> list:
    """A calibrated run's default calibration: the batches of steps ``0, 1, ...`` covering ``cfg.calibration_size``
    examples (their labels are not used)."""
    return [batch_at(s) for s in range(-(-cfg.calibration_size // cfg.batch_size))]


@dataclass
class TrainSummary:
    """What a training run did, measured."""

    steps: int = 0
    examples: int = 0
    losses: list = field(default_factory=list)
    payload_up: int = 0          # encoded boundary + aux + labels, edge -> cloud (training steps)
    payload_down: int = 0        # encoded gradients, cloud -> edge
    wire_up: int = 0             # every byte of the training steps' TRAIN frames on the socket
    wire_down: int = 0           # every byte of their replies
    step_bytes: list = field(default_factory=list)  # per step: (payload up, payload down, examples, wire up, down)
    reconnects: int = 0
    replays_or_rollbacks: int = 0
    seconds: float = 0.0

    def per_example(self) -> tuple[float, float]:
        """Payload bytes per training example, (up, down)."""
        n = max(1, self.examples)
        return self.payload_up / n, self.payload_down / n

    def wire_per_example(self) -> tuple[float, float]:
        """Wire bytes of the training frames per training example, (up, down)."""
        n = max(1, self.examples)
        return self.wire_up / n, self.wire_down / n


class EdgeTrainer(CheckpointedPart):
    """Trains the edge part of ``cfg`` against a :class:`~.cloud.CloudServer` at ``host:port``.

    Args:
        cfg: the run (both sides build the same initial parts from it).
        batch_at: ``step -> batch`` (``input_ids``, ``attention_mask``, optional ``token_type_ids``,
            ``labels``); must be deterministic in ``step`` so a rolled-back step is the same batch.
        client_id, token: this edge's credentials (a line of the server's tokens file).
        checkpoint_dir, checkpoint_every: where and how often the edge checkpoints (every N steps).
        retries, backoff_s: the retry bound (reconnect attempts per link failure, link failures per
            request, and answered retryable failures in a row) and the first backoff (doubles each try).
        tls, limits, link, timeout: passed to :func:`sft_kernels.channel.connect`.
        model_dir: local model directory (default: the embedded package).
        progress: show a tqdm bar.
        calibration: ``cfg.init="calibrated"`` only: what the edge fits the code on (tokenized batches or
            strings; labels are ignored), or a callable returning them given the model's tokenizer (when
            ``batch_at`` is only built from :attr:`tokenizer` after construction).  Default: the batches of
            the first steps, ``batch_at(0)``, ``batch_at(1)``, ... covering ``cfg.calibration_size`` examples
            (:func:`first_batches`).  Not used when the edge resumes from a checkpoint: the checkpoint
            holds the fit, so a restarted edge never refits.
    """

    def __init__(self, cfg: RunConfig, batch_at: Callable[[int], Mapping[str, torch.Tensor]], *,
                 host: Optional[str] = None, port: Optional[int] = None, client_id: str = "edge",
                 token: Union[bytes, str, None] = None,
                 checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 50, retries: int = 8,
                 backoff_s: float = 0.25, tls: Optional[TLSConfig] = None, limits: Optional[Limits] = None,
                 link: Optional[LinkLimiter] = None, timeout: float = 120.0, model_dir: Union[str, Path, None] = None,
                 progress: bool = True, calibration: Optional[Iterable[Any]] = None) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        self.cfg, self.batch_at = cfg, batch_at
        self.store = CheckpointStore(checkpoint_dir) if checkpoint_dir is not None else None
        resuming = self.store is not None and self.store.latest() is not None
        if cfg.init != "calibrated":
            if calibration is not None:
                raise ValueError("calibration applies to cfg.init='calibrated' only")
        elif resuming:
            calibration = None  # the checkpoint holds the fit (restored below)
        elif calibration is None:
            if batch_at is None:
                raise ValueError("cfg.init='calibrated' fits the code on the first batches, but batch_at is None: "
                                 "pass batch_at, or calibration= (batches, or a callable tokenizer -> batches)")
            calibration = first_batches(cfg, batch_at)
        parts = build_parts(cfg, model_dir, calibration, progress=progress)
        #: The cloud's calibrated decoders as fitted here (``init="calibrated"``): sent in every OPEN.
        self.fit = parts.fit
        self.tokenizer, self.model, self.top = parts.tokenizer, parts.edge, parts.top
        self._input_names = model_inputs(self.model)  # what this family takes (no token_type_ids for GPT-2)
        self.init_hashes = parts.hashes()
        # what this side trains and checkpoints: the bottom and, in the U-split, the top
        self.trained = self.model if self.top is None else torch.nn.ModuleDict({"edge": self.model, "top": self.top})
        self.opt = make_optimizer(self.trained, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        fwd, bwd, pooled = cfg.codecs()
        if host is None:  # the cloud part in this process: the same step over an in-process link
            cloud_opt = make_optimizer(parts.cloud, cfg)
            self.link = InProcessLink(CloudWorker(parts.cloud, fwd, bwd, cfg.seed, optimizer=cloud_opt,
                                                  scheduler=make_scheduler(cloud_opt, cfg), pooled=pooled))
        else:
            if port is None or token is None:
                raise ValueError("a cloud at host needs port and token too (or host=None for an in-process cloud)")
            self.link = TcpLink(host, port, client_id, token, open_meta=self._open_meta, on_resume=self._rewind,
                                open_tensors=self._open_tensors,
                                retries=retries, backoff_s=backoff_s, tls=tls, limits=limits, link=link,
                                timeout=timeout)
        self.client = EdgeClient(self.model, self.link, fwd, bwd, cfg.seed, top=self.top, pooled=pooled)
        self.progress = progress
        self.every = checkpoint_every
        self.step = 0
        self._mid_step = False  # U-split: this step's FORWARD was answered, its STEP not yet acknowledged
        self.summary = TrainSummary()
        self._open_store()
        if host is None and resuming and self.fit is not None:
            parts.cloud.load_state_dict(self.fit, strict=False)  # the in-process cloud starts from the same fit
        del parts

    @property
    def conn(self):
        """The open connection, or None (and always None in process)."""
        return getattr(self.link, "conn", None)

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        s = self.summary
        fit = {} if self.fit is None else {"fit": self.fit}
        return {**fit, "cursor": {"step": self.step},  # batches are keyed by step: the data cursor is the step
                "summary": {"losses": list(s.losses), "step_bytes": [list(t) for t in s.step_bytes],
                            "payload_up": s.payload_up, "payload_down": s.payload_down, "examples": s.examples,
                            "wire_up": s.wire_up, "wire_down": s.wire_down}}

    def _load_extra(self, state: dict[str, Any]) -> None:
        if "fit" in state:
            self.fit = state["fit"]
        sm = state["summary"]
        self.summary.losses = list(sm["losses"])
        self.summary.step_bytes = [tuple(t) for t in sm["step_bytes"]]
        self.summary.payload_up, self.summary.payload_down = sm["payload_up"], sm["payload_down"]
        self.summary.examples = sm["examples"]
        self.summary.wire_up, self.summary.wire_down = sm["wire_up"], sm["wire_down"]

    @contextlib.contextmanager
    def _checkpointed(self):
        """``model`` as :class:`CheckpointedPart` saves, loads and hashes it: everything this side trains.

        In the U-split that is the bottom and the top (the handshake's edge hash covers both).
        """
        edge, self.model = self.model, self.trained
        try:
            yield
        finally:
            self.model = edge

    def state(self) -> dict[str, Any]:
        with self._checkpointed():
            return super().state()

    def restore(self, step: int) -> None:
        with self._checkpointed():
            super().restore(step)

    def _cannot_restore(self, step: int) -> Exception:
        return CloudError(f"the cloud resumes at step {step}, but this edge runs without a checkpoint directory "
                          f"and is at step {self.step}; cannot roll back")

    # ---------------------------------------------------------------- link
    def _open_meta(self) -> dict[str, Any]:
        meta = {"config": self.cfg.to_dict(), "hashes": self.init_hashes, "step": self.step,
                "ckpts": self.checkpoint_steps()}
        if self.top is not None:  # the general path: the cloud may hold half of this step (see _general_step)
            meta["fresh"] = not self._mid_step
        return meta

    def _open_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.fit is None else {f"fit.{k}": v for k, v in self.fit.items()}

    @property
    def handshake_bytes(self) -> int:
        """Payload bytes of the session handshakes (a calibrated run's decoders, once per open).

        In process there is no handshake: the bytes the first open would carry.
        """
        if isinstance(self.link, TcpLink):
            return self.link.traffic.handshake_up
        return payload_nbytes(self._open_tensors())

    def _rewind(self, resume: int) -> None:
        log.warning("cloud resumes at step %d, edge was at %d: rolling back", resume, self.step)
        self.restore(resume)
        self.summary.replays_or_rollbacks += 1
        raise Rewind(resume)

    def open(self) -> None:
        """Connect, authenticate and open the session; roll back if the cloud resumes earlier."""
        if isinstance(self.link, TcpLink):
            self.link.open()

    def close(self) -> None:
        """Close the connection (the session stays on the server)."""
        if isinstance(self.link, TcpLink):
            self.link.close()

    def wire_bytes(self) -> tuple[int, int]:
        """Every byte this edge put on / took off the socket, (sent, received): all connections, handshakes included.

        In process there is no socket: the payload bytes.
        """
        if isinstance(self.link, TcpLink):
            return self.link.wire_bytes()
        return self.link.traffic.up, self.link.traffic.down

    # ---------------------------------------------------------------- steps
    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in self._input_names if k in batch}

    def train_step(self) -> float:
        """Run the current step once across the link; returns its loss."""
        step = self.step
        batch = self.batch_at(step)
        ckpt = self.store is not None and self._checkpoint_due(step + 1)
        self.opt.zero_grad(set_to_none=True)  # a step rolled back half way (Rewind) left gradients behind
        if self.top is None:
            extra = {"ckpt": True} if ckpt else {}  # the cloud checkpoints the same steps as this edge
            loss, reply, up = self.client.fused_step(step, self._inputs(batch), batch["labels"], self.cfg.num_labels,
                                                     extra)
            down = payload_nbytes(reply.tensors)
            wire_up, wire_down = getattr(self.link, "last_wire", (up, down))
        else:
            loss, up, down, wire_up, wire_down = self._general_step(step, batch, ckpt)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        s = self.summary
        s.losses.append(loss)
        n = int(batch["labels"].shape[0])
        s.payload_up += up
        s.payload_down += down
        s.wire_up += wire_up
        s.wire_down += wire_down
        s.examples += n
        s.step_bytes.append((up, down, n, wire_up, wire_down))
        s.reconnects = getattr(self.link, "reconnects", 0)
        self.step = step + 1
        if self._checkpoint_due(self.step):
            self.save()
        return loss

    def _general_step(self, step: int, batch: Mapping[str, torch.Tensor], ckpt: bool
                      ) -> tuple[float, int, int, int, int]:
        """The U-split's step: ``FORWARD``, ``BACKWARD`` (the loss is this side's), ``STEP``.

        Returns ``(loss, payload up, payload down, wire up, wire down)``.  A server that restarted
        in the middle of the step lost the forward's graph or the accumulated gradient and refuses
        the re-sent ``BACKWARD`` or ``STEP``: after a reconnect within the step, such a refusal runs
        the step once more from its forward, the session re-opened ``fresh`` (the cloud drops what is
        left of the step).  Until the step's ``FORWARD`` is answered OPEN is ``fresh`` too (a new edge
        process: the cloud drops what an earlier one left; a forward is safe to recompute); later in the
        step it is not (the cloud replays what it answered).
        """
        for attempt in (0, 1):
            reconnects = getattr(self.link, "reconnects", 0)
            up0, down0 = self.link.traffic.up, self.link.traffic.down
            wire0 = self.wire_bytes()
            try:
                out = self.client.forward(step, self._inputs(batch), batch["labels"], self.cfg.num_labels)
                self._mid_step = True  # from here the cloud holds a part of this step
                out.loss.backward()
                self.link.request(STEP, {}, {"hp": step_hyperparameters(self.opt.param_groups[0]), "n": 1, "ckpt": ckpt}, step)
            except CloudError as exc:
                if attempt or getattr(self.link, "reconnects", 0) == reconnects:
                    raise
                log.warning("step %d: the cloud lost its half of the step across a reconnect (%s); running the step "
                            "again", step, exc)
                self.opt.zero_grad(set_to_none=True)
                self.close()  # the next request re-opens the session, fresh
                continue
            finally:
                self._mid_step = False
            break
        wire1 = self.wire_bytes()
        return (float(out.loss.detach()), self.link.traffic.up - up0, self.link.traffic.down - down0,
                wire1[0] - wire0[0], wire1[1] - wire0[1])

    def _checkpoint_due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.cfg.total_steps

    def train(self, steps: Optional[int] = None) -> TrainSummary:
        """Train until ``steps`` (default ``cfg.total_steps``); resumes from wherever the edge is."""
        end = self.cfg.total_steps if steps is None else min(steps, self.cfg.total_steps)
        t0 = time.perf_counter()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=end, initial=self.step, desc="train", unit="step")
        try:
            while self.step < end:
                try:
                    loss = self.train_step()
                except Rewind:
                    if bar is not None:
                        bar.n = self.step
                        bar.refresh()
                    continue
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}")
        finally:
            if bar is not None:
                bar.close()
        self.summary.steps = self.step
        self.summary.seconds += time.perf_counter() - t0
        return self.summary

    @torch.no_grad()
    def predict(self, batches: Iterable[Mapping[str, torch.Tensor]], start: int = 0) -> torch.Tensor:
        """Logits of every batch (forward only; the cloud does not update).

        Eval batch ``i`` is encoded with the codec seed of step ``self.step + start + i``, as
        ``SimulatedSplit`` (which counts every forward) does for evaluation after training.
        """
        parts = [m for m in (self.model, self.top) if m is not None]
        was = [m.training for m in parts]
        for m in parts:
            m.eval()
        out = []
        try:
            for i, batch in enumerate(batches):
                try:
                    res = self.client.forward(self.step + start + i, self._inputs(batch))
                except Rewind:
                    raise CloudError("the cloud rolled back during evaluation; re-run training first") from None
                out.append(res.logits.float())
        finally:
            for m, w in zip(parts, was):
                m.train(w)
        return torch.cat(out) if out else torch.zeros(0)

    def finish(self) -> None:
        """Tell the cloud the run is over (it checkpoints its final step)."""
        if isinstance(self.link, TcpLink):
            self.link.request(FINISH, {}, {}, seq=self.step)
