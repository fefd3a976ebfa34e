"""``CloudServer``: the cloud side of split fine-tuning, serving edge sessions over the channel.

One :class:`CloudSession` per (client id, run id): its own cloud part, optimizer,
scheduler, checkpoints and the reply of its latest step.  The channel gives each
connection its own thread; a session's lock serialises its steps, so several edges
train at once while each session stays sequential.

Exactly once: a session knows the next step it expects.  A request for the step it
has just applied (the edge lost the reply) gets the cached reply back, never a second
update; a request for an older step means the edge restarted from a checkpoint, and
the session rolls back to the same checkpoint first (at ``OPEN``).  The cached reply
is part of every checkpoint, so it survives a crash of the server too.

Anything wrong in a request (structure, codec, shapes, NaN/Inf) is refused with an
error frame before the model is touched; the session and the server keep serving.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..channel import Connection, Limits, LinkLimiter, Listener, TLSConfig
from ..codecs import BWD_SEED_OFFSET, from_spec
from ..split import BoundaryOutput, codec_seed, part_rng
from .checkpoint import CheckpointedPart, CheckpointStore
from .config import SPLIT_FIELDS, RunConfig, state_hash
from .messages import (EVAL, FINISH, OPEN, REPLY, TRAIN, StepRefused, boundary_from_wire, check_finite,
                       packet_to_wire)
from .parts import build_parts, make_optimizer, make_scheduler

__all__ = ["CloudServer", "CloudSession"]

log = logging.getLogger("sft_kernels.runtime")

#: Largest eval batch a session accepts (training batches are bounded by the run's batch size).
_MAX_EVAL_BATCH = 4096


class CloudSession(CheckpointedPart):
    """The cloud part of one run and everything needed to step, replay and resume it."""

    def __init__(self, client_id: str, cfg: RunConfig, model_dir: Union[str, Path, None] = None,
                 checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 50) -> None:
        self.client_id, self.cfg = client_id, cfg
        _, edge, cloud = build_parts(cfg, model_dir)
        self.init_hashes = {"edge": state_hash(edge), "cloud": state_hash(cloud)}
        del edge
        self.model = cloud
        self.opt = make_optimizer(cloud, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.fwd, self.bwd = from_spec(cfg.fwd_codec), from_spec(cfg.bwd_codec)
        self.step = 0
        self.last_reply: Optional[dict[str, Any]] = None
        self.finished = False  # set by FINISH; a finished session is the first to make room for a new one
        self.lock = threading.Lock()
        self.every = checkpoint_every
        self.store = (CheckpointStore(Path(checkpoint_dir) / client_id / cfg.run_id)
                      if checkpoint_dir is not None else None)
        self._open_store()

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {"reply": self.last_reply}

    def _load_extra(self, state: dict[str, Any]) -> None:
        self.last_reply = state["reply"]
        log.info("session %s/%s: restored step %d", self.client_id, self.cfg.run_id, self.step)

    def _cannot_restore(self, step: int) -> Exception:
        return StepRefused(f"cannot roll back to step {step}: the server runs without --checkpoint-dir")

    def resume_point(self, edge_step: int) -> int:
        """Agree on the next step with an edge that is at ``edge_step``; roll this side back if it must."""
        c = self.step
        if c == edge_step or (c == edge_step + 1 and self.last_reply and self.last_reply["step"] == edge_step):
            return edge_step
        if c > edge_step:
            self.restore(edge_step)
            return edge_step
        return c  # the edge is ahead (this side restarted from a checkpoint): the edge rolls back

    # ---------------------------------------------------------------- steps
    def _boundary(self, tensors: Mapping[str, torch.Tensor], meta: Any, max_batch: int) -> BoundaryOutput:
        if not isinstance(meta, dict) or not isinstance(meta.get("boundary"), dict):
            raise StepRefused("request meta must hold a 'boundary' object")
        return boundary_from_wire(tensors, meta["boundary"], self.fwd, width=self.model.width,
                                  residual=self.cfg.mode == "bottleneck" and not self.cfg.eliminate_links,
                                  max_length=self.cfg.max_length, max_batch=max_batch)

    def _labels(self, tensors: Mapping[str, torch.Tensor], batch: int) -> torch.Tensor:
        y = tensors.get("labels")
        regression = self.cfg.num_labels == 1
        want = torch.float32 if regression else torch.int64
        if y is None or y.dtype != want or tuple(y.shape) != (batch,):
            raise StepRefused(f"labels must be {want} of shape ({batch},), got "
                              f"{None if y is None else (y.dtype, tuple(y.shape))}")
        if regression:
            check_finite(y, "labels")
        elif bool(((y < 0) | (y >= self.cfg.num_labels)).any()):
            raise StepRefused(f"labels must be in 0..{self.cfg.num_labels - 1}")
        return y

    def train(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Any) -> tuple[dict, dict]:
        """Apply training ``step`` once and return its reply; replay the cached reply for a repeated step."""
        if self.last_reply is not None and step == self.last_reply["step"] and step == self.step - 1:
            log.info("session %s/%s: step %d repeated, replaying its reply", self.client_id, self.cfg.run_id, step)
            return self.last_reply["tensors"], self.last_reply["meta"]
        if step != self.step:
            raise StepRefused(f"step {step} out of order: the session expects step {self.step} (reconnect to resync)")
        b = self._boundary(tensors, meta, self.cfg.batch_size)
        labels = self._labels(tensors, b.batch_size)
        h = b.hidden.detach().requires_grad_(True)
        r = b.residual.detach().requires_grad_(True) if b.residual is not None else None
        with part_rng(self.cfg.seed, step, "cloud"):
            out = self.model(BoundaryOutput(h, b.lengths, b.seq_len, r, b.pool_index), labels=labels)
        loss = out.loss
        try:
            check_finite(loss.detach(), f"step {step}: the loss")
            loss.backward()
            check_finite(h.grad, f"step {step}: the boundary gradient")
            for name, p in self.model.named_parameters():
                if p.grad is not None:
                    check_finite(p.grad, f"step {step}: gradient of {name}")
        except StepRefused:
            self.opt.zero_grad(set_to_none=True)
            raise
        seed = codec_seed(self.cfg.seed, step) + BWD_SEED_OFFSET
        rt, rm = packet_to_wire(self.bwd.encode(h.grad, seed), "g.h")
        reply_meta: dict[str, Any] = {"loss": float(loss.detach()), "step": step, "h": rm}
        if r is not None:
            t2, m2 = packet_to_wire(self.bwd.encode(r.grad, seed + 1), "g.r")
            rt.update(t2)
            reply_meta["r"] = m2
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.step = step + 1
        self.last_reply = {"step": step, "tensors": rt, "meta": reply_meta}  # fresh encoder outputs: no copy
        if self.step % self.every == 0 or self.step == self.cfg.total_steps:
            self.save()
        return rt, reply_meta

    @torch.no_grad()
    def evaluate(self, tensors: Mapping[str, torch.Tensor], meta: Any) -> tuple[dict, dict]:
        """Forward only: the logits of an eval batch."""
        b = self._boundary(tensors, meta, _MAX_EVAL_BATCH)
        was = self.model.training
        self.model.eval()
        try:
            out = self.model(b)
        finally:
            self.model.train(was)
        return {"logits": out.logits.float().contiguous()}, {}

    def finish(self, step: int) -> tuple[dict, dict]:
        """The edge is done at ``step``: make sure a checkpoint of it exists."""
        if step != self.step:
            raise StepRefused(f"finish at step {step}, but the session is at step {self.step}")
        if self.store is not None and self.store.latest() != self.step:
            self.save()
        self.finished = True
        return {}, {"step": self.step}


class CloudServer:
    """Serves split fine-tuning sessions to authenticated edges.

    Args:
        tokens: client id -> secret (see :func:`sft_kernels.channel.load_tokens`).
        split: the split settings served (:data:`~.config.SPLIT_FIELDS`); a session asking for others is refused.
            ``None`` accepts whatever the edge proposes.
        host, port: where to listen (127.0.0.1 unless told otherwise; port 0 picks a free one).
        model_dir: local model directory (default: the embedded package).
        checkpoint_dir, checkpoint_every: where and how often sessions checkpoint (every N steps).
        tls, limits, link: passed to the channel's :class:`~sft_kernels.channel.Listener`.
        max_sessions: sessions held in memory at once; when full, the oldest finished one (``FINISH``
            received) makes room, and an unfinished one never does.
    """

    def __init__(self, tokens: Mapping[str, bytes], split: Optional[Mapping[str, Any]] = None,
                 host: str = "127.0.0.1", port: int = 0, *, model_dir: Union[str, Path, None] = None,
                 checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 50,
                 tls: Optional[TLSConfig] = None, limits: Optional[Limits] = None, link: Optional[LinkLimiter] = None,
                 max_sessions: int = 16) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        if split is not None:
            unknown = sorted(set(split) - set(SPLIT_FIELDS))
            if unknown:
                raise ValueError(f"split: unknown keys {unknown}; valid: {list(SPLIT_FIELDS)}")
            RunConfig(**dict(split))  # validates the values
        self.split = dict(split) if split is not None else None
        self.model_dir, self.checkpoint_dir, self.every = model_dir, checkpoint_dir, checkpoint_every
        self.max_sessions = max_sessions
        self.sessions: dict[tuple[str, str], CloudSession] = {}
        self._lock = threading.Lock()
        self.listener = Listener(tokens, host, port, tls=tls, limits=limits or Limits(), link=link)

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        return self.listener.address

    def start(self) -> "CloudServer":
        """Serve in a background thread."""
        self.listener.start(self.handle)
        return self

    def serve_forever(self) -> None:
        """Serve in this thread until :meth:`shutdown`."""
        self.listener.serve_forever(self.handle)

    def shutdown(self) -> None:
        """Stop accepting and close the listener."""
        self.listener.shutdown()

    # ---------------------------------------------------------------- sessions
    def _open(self, client_id: str, meta: Any) -> tuple[CloudSession, dict]:
        if not isinstance(meta, dict) or not {"config", "hashes", "step"} <= set(meta):
            raise StepRefused("OPEN needs meta with 'config', 'hashes' and 'step'")
        cfg = RunConfig.from_dict(meta["config"])
        if self.split is not None:
            served = RunConfig(**{**cfg.to_dict(), **self.split})
            diff = cfg.split_mismatch(served)
            if diff:
                raise StepRefused("session refused, split settings differ: " + "; ".join(diff))
        step = meta["step"]
        if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= cfg.total_steps:
            raise StepRefused(f"OPEN step must be an int in 0..{cfg.total_steps}, got {step!r}")
        key = (client_id, cfg.run_id)
        with self._lock:
            s = self.sessions.get(key)
            if s is not None and s.cfg != cfg:
                raise StepRefused(f"run id '{cfg.run_id}' is already open with a different config")
            if s is None:
                if len(self.sessions) >= self.max_sessions:
                    done = [k for k, v in self.sessions.items() if v.finished]
                    if not done:
                        raise StepRefused(f"server is full ({self.max_sessions} unfinished sessions)")
                    del self.sessions[done[0]]  # the oldest finished session (its checkpoints stay on disk)
                s = CloudSession(client_id, cfg, self.model_dir, self.checkpoint_dir, self.every)
                self.sessions[key] = s
        if meta["hashes"] != s.init_hashes:
            raise StepRefused(f"initial parameters differ: edge has {meta['hashes']}, cloud has {s.init_hashes}; "
                              "both sides must load the same model files with the same seed")
        with s.lock:
            resume = s.resume_point(step)
        log.info("session %s/%s open: edge at step %d, resume at %d", client_id, cfg.run_id, step, resume)
        return s, {"step": resume, "cloud_step": s.step}

    def handle(self, conn: Connection) -> None:
        """Serve one authenticated connection until it closes."""
        session: Optional[CloudSession] = None
        while True:
            try:
                frame = conn.recv()
            except (ConnectionError, EOFError, OSError, TimeoutError) as exc:
                log.info("connection %s (%s) closed: %s", conn.conn_id, conn.client_id, exc)
                return
            try:
                if frame.kind == OPEN:
                    session, meta = self._open(conn.client_id, frame.meta)
                    tensors: dict = {}
                elif session is None:
                    raise StepRefused(f"message kind {frame.kind} before OPEN")
                elif frame.kind == TRAIN:
                    with session.lock:
                        tensors, meta = session.train(frame.seq, frame.tensors, frame.meta)
                elif frame.kind == EVAL:
                    with session.lock:
                        tensors, meta = session.evaluate(frame.tensors, frame.meta)
                elif frame.kind == FINISH:
                    with session.lock:
                        tensors, meta = session.finish(frame.seq)
                else:
                    raise StepRefused(f"unknown message kind {frame.kind}")
            except (StepRefused, ValueError, KeyError) as exc:
                log.warning("connection %s (%s): refused: %s", conn.conn_id, conn.client_id, exc)
                conn.send_error(str(exc), seq=frame.seq)
                continue
            conn.send(REPLY, tensors, meta, seq=frame.seq)
