"""``EdgeTrainer``: the edge side of split fine-tuning over the channel.

It holds the edge part, its optimizer and scheduler, and the data.  Each step:
forward on the edge (dropout keyed by ``(seed, step, "edge")``), encode the boundary,
send it with the labels, receive the encoded gradient, decode, check it is finite,
backward, step.

Faults: a dropped connection is retried with exponential backoff, a bounded number of
times; each retry authenticates again and re-opens the session, which tells the edge
where the cloud stands (the newest step both sides can resume from: the edge sends its
checkpoint steps).  The edge then re-sends the step (the cloud replays its cached
reply if it had applied it) or, when the cloud restarted from an older checkpoint,
rolls back to that checkpoint itself and recomputes from there.  Because dropout and
codec randomness are keyed by step and the data order by (seed, epoch), recomputed
steps are the same computation.  The edge chooses the checkpoint steps (``checkpoint_every``)
and asks the cloud to checkpoint the same ones, so an edge restart never depends on the
two sides' intervals.

What is retried and what is not:

* the server *answered* with a retryable ERROR (server full, a checkpoint it could not
  write): wait (the server's ``retry_after`` if given) and re-send, at most ``retries``
  times in a row, then :class:`CloudError` with the server's reason;
* the server answered with a permanent ERROR (bad request, wrong hash, ...): :class:`CloudError` at once;
* the link broke (server down or restarting): reconnect with backoff, ``retries`` attempts per
  break and at most ``retries`` breaks while one request is outstanding, then :class:`LinkLost`;
* the very first connection fails, or TLS, authentication or the peer's protocol is wrong: fail
  at once (:class:`~sft_kernels.channel.LinkRefused`, :class:`~sft_kernels.channel.AuthError`)
  naming the likely cause.

Byte counts: ``TrainSummary`` holds payload bytes (encoded tensors) and wire bytes (every byte of
the TRAIN frames on the socket) of the training steps; :meth:`EdgeTrainer.wire_bytes` counts every
byte of every connection, handshakes and reconnects included.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch

from ..channel import (Connection, Limits, LinkLimiter, LinkRefused, ProtocolError, RemoteError, TLSConfig,
                       connect)
from ..codecs import from_spec
from ..split import codec_seed, part_rng
from .checkpoint import CheckpointedPart, CheckpointStore
from .config import RunConfig, state_hash
from .messages import (EVAL, FINISH, KIND_NAMES, OPEN, TRAIN, StepRefused, boundary_to_wire, decode_packet,
                       packet_from_wire)
from .parts import build_parts, make_optimizer, make_scheduler

__all__ = ["EdgeTrainer", "TrainSummary", "CloudError", "LinkLost"]

log = logging.getLogger("sft_kernels.runtime")

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_LINK_ERRORS = (OSError, ConnectionError, EOFError, ProtocolError, TimeoutError)


class CloudError(RuntimeError):
    """The cloud refused a request, or kept failing it (its error message is included)."""


class _Busy(Exception):
    """The cloud answered OPEN with a retryable refusal (e.g. server full)."""

    def __init__(self, message: str, retry_after: Optional[float]) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LinkLost(ConnectionError):
    """The link stayed down through every retry."""


class _Rewind(Exception):
    def __init__(self, step: int) -> None:
        self.step = step


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
    """

    def __init__(self, cfg: RunConfig, batch_at: Callable[[int], Mapping[str, torch.Tensor]], *, host: str,
                 port: int, client_id: str, token: Union[bytes, str],
                 checkpoint_dir: Union[str, Path, None] = None, checkpoint_every: int = 50, retries: int = 8,
                 backoff_s: float = 0.25, tls: Optional[TLSConfig] = None, limits: Optional[Limits] = None,
                 link: Optional[LinkLimiter] = None, timeout: float = 120.0, model_dir: Union[str, Path, None] = None,
                 progress: bool = True) -> None:
        if checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 0 < backoff_s <= 60:
            raise ValueError(f"backoff_s must be in (0, 60], got {backoff_s}")
        self.cfg, self.batch_at = cfg, batch_at
        self.tokenizer, self.model, cloud = build_parts(cfg, model_dir)
        self.init_hashes = {"edge": state_hash(self.model), "cloud": state_hash(cloud)}
        del cloud
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.fwd, self.bwd = from_spec(cfg.fwd_codec), from_spec(cfg.bwd_codec)
        self._addr = (host, port)
        self._cred = (client_id, token)
        self._conn_kw = dict(tls=tls, limits=limits or Limits(), link=link, timeout=timeout)
        self.retries, self.backoff_s, self.progress = retries, backoff_s, progress
        self.every = checkpoint_every
        self.step = 0
        self.summary = TrainSummary()
        self.store = CheckpointStore(checkpoint_dir) if checkpoint_dir is not None else None
        self.conn: Optional[Connection] = None
        self._connected_once = False
        self._wire_closed = [0, 0]  # wire bytes (sent, received) of connections already closed
        self._open_store()

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        s = self.summary
        return {"cursor": {"step": self.step},  # batches are keyed by step: the data cursor is the step
                "summary": {"losses": list(s.losses), "step_bytes": [list(t) for t in s.step_bytes],
                            "payload_up": s.payload_up, "payload_down": s.payload_down, "examples": s.examples,
                            "wire_up": s.wire_up, "wire_down": s.wire_down}}

    def _load_extra(self, state: dict[str, Any]) -> None:
        sm = state["summary"]
        self.summary.losses = list(sm["losses"])
        self.summary.step_bytes = [tuple(t) for t in sm["step_bytes"]]
        self.summary.payload_up, self.summary.payload_down = sm["payload_up"], sm["payload_down"]
        self.summary.examples = sm["examples"]
        self.summary.wire_up, self.summary.wire_down = sm["wire_up"], sm["wire_down"]

    def _cannot_restore(self, step: int) -> Exception:
        return CloudError(f"the cloud resumes at step {step}, but this edge runs without a checkpoint directory "
                          f"and is at step {self.step}; cannot roll back")

    # ---------------------------------------------------------------- link
    def wire_bytes(self) -> tuple[int, int]:
        """Every byte this edge put on / took off the socket, (sent, received): all connections, handshakes included."""
        up, down = self._wire_closed
        if self.conn is not None:
            cu, cd = self.conn.stats.total_wire()
            up, down = up + cu, down + cd
        return up, down

    def _connect(self) -> Connection:
        host, port = self._addr
        try:
            conn = connect(host, port, *self._cred, **self._conn_kw)
        except ConnectionRefusedError as exc:
            if self._connected_once:
                raise  # the server is restarting: a link fault, retried with backoff
            raise LinkRefused(f"cannot connect to {host}:{port}: nothing listens there (wrong host or port, or "
                              f"the server is not running): {exc}") from None
        # anything else (a close during the handshake: a busy server evicting, a restart; ServerBusy) is a
        # link fault, retried with backoff by the caller
        self._connected_once = True
        return conn

    def open(self) -> None:
        """Connect, authenticate and open the session; roll back if the cloud resumes earlier."""
        self.close()
        conn = self._connect()
        try:
            reply = conn.request(OPEN, {}, {"config": self.cfg.to_dict(), "hashes": self.init_hashes,
                                            "step": self.step, "ckpts": self.checkpoint_steps()})
        except RemoteError as exc:
            self._close_conn(conn)
            if exc.retryable:
                raise _Busy(f"the cloud cannot open the session now: {exc}", exc.retry_after) from None
            raise CloudError(f"the cloud refused the session: {exc}") from None
        except BaseException:
            self._close_conn(conn)
            raise
        self.conn = conn
        resume = reply.meta.get("step")
        if not isinstance(resume, int) or not 0 <= resume <= self.step:
            self.close()
            raise CloudError(f"the cloud proposed resume step {resume!r}; the edge is at step {self.step}")
        if resume < self.step:
            log.warning("cloud resumes at step %d, edge was at %d: rolling back", resume, self.step)
            self.restore(resume)
            self.summary.replays_or_rollbacks += 1
            raise _Rewind(resume)

    def _close_conn(self, conn: Connection) -> None:
        up, down = conn.stats.total_wire()
        self._wire_closed[0] += up
        self._wire_closed[1] += down
        conn.close()

    def close(self) -> None:
        """Close the connection (the session stays on the server)."""
        if self.conn is not None:
            self._close_conn(self.conn)
            self.conn = None

    def _sleep(self, delay: float) -> float:
        time.sleep(delay)
        return min(delay * 2, 10.0)

    def _reopen(self) -> None:
        delay = self.backoff_s
        last: Optional[BaseException] = None
        for attempt in range(1, self.retries + 1):
            delay = self._sleep(delay)
            try:
                self.open()
                self.summary.reconnects += 1
                return
            except _Rewind:
                self.summary.reconnects += 1
                raise
            except _LINK_ERRORS as exc:
                last = exc
                log.warning("reconnect %d/%d failed: %s", attempt, self.retries, exc)
        raise LinkLost(f"link to {self._addr[0]}:{self._addr[1]} lost; {self.retries} reconnect(s) failed; "
                       f"last error: {type(last).__name__}: {last}")

    def _request(self, kind: int, tensors: dict, meta: dict, seq: int):
        """Send one request until it is answered; retries bounded as the module docstring says.

        Returns ``(reply, sent)``: the reply frame and the wire bytes of the request that got it.
        """
        what = f"{KIND_NAMES[kind]} {seq}"
        answered, breaks = 0, 0
        delay = self.backoff_s
        while True:
            try:
                if self.conn is None:
                    self.open()
                before = self.conn.stats.wire_bytes_sent
                reply = self.conn.request(kind, tensors, meta, seq=seq)
                return reply, self.conn.stats.wire_bytes_sent - before
            except (RemoteError, _Busy) as exc:
                retry = exc.retryable if isinstance(exc, RemoteError) else True
                if not retry:
                    raise CloudError(f"the cloud refused {what}: {exc}") from None
                answered += 1
                if answered > self.retries:
                    raise CloudError(f"the cloud failed {what} {answered} times in a row; giving up. "
                                     f"Its last answer: {exc}") from None
                wait = exc.retry_after if exc.retry_after is not None else delay
                log.warning("the cloud answered %s with a retryable failure (%d/%d), retrying in %.1f s: %s",
                            what, answered, self.retries, min(wait, 30.0), exc)
                delay = self._sleep(min(wait, 30.0))
            except _LINK_ERRORS as exc:
                breaks += 1
                if breaks > self.retries:
                    raise LinkLost(f"the link to {self._addr[0]}:{self._addr[1]} broke {breaks} times while "
                                   f"{what} was outstanding; giving up. Last error: {type(exc).__name__}: {exc}") \
                        from None
                log.warning("link error at %s: %s; reconnecting", what, exc)
                self.close()
                self._reopen()

    # ---------------------------------------------------------------- steps
    def _inputs(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: batch[k] for k in _INPUTS if k in batch}

    def train_step(self) -> float:
        """Run the current step once across the link; returns its loss."""
        step = self.step
        batch = self.batch_at(step)
        with part_rng(self.cfg.seed, step, "edge"):
            b = self.model(**self._inputs(batch))
        tensors, bmeta, nbytes = boundary_to_wire(b, self.fwd, codec_seed(self.cfg.seed, step))
        labels = batch["labels"]
        labels = labels.float() if self.cfg.num_labels == 1 else labels.long()
        tensors["labels"] = labels
        up = nbytes + labels.numel() * labels.element_size()
        meta = {"b": bmeta}
        if self.store is not None and self._checkpoint_due(step + 1):
            meta["ckpt"] = True  # the cloud checkpoints the same steps as this edge
        reply, wire_up = self._request(TRAIN, tensors, meta, seq=step)
        wire_down = reply.wire_bytes
        if reply.seq != step:
            raise CloudError(f"reply for step {reply.seq}, expected {step}")
        grads, outs = [], []
        for prefix, t in (("h", b.hidden), ("r", b.residual)):
            if t is None:
                continue
            p = packet_from_wire(reply.tensors, reply.meta.get(prefix), "g." + prefix, self.bwd, t.numel())
            g = decode_packet(self.bwd, p, f"step {step}: received gradient '{prefix}'")
            if g.shape != t.shape:
                raise StepRefused(f"step {step}: gradient '{prefix}' has shape {tuple(g.shape)}, "
                                  f"expected {tuple(t.shape)}")
            grads.append(g.to(t.dtype))
            outs.append(t)
        torch.autograd.backward(outs, grads)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        loss = float(reply.meta["loss"])
        s = self.summary
        s.losses.append(loss)
        down = sum(v.numel() * v.element_size() for v in reply.tensors.values())
        s.payload_up += up
        s.payload_down += down
        s.wire_up += wire_up
        s.wire_down += wire_down
        s.examples += int(labels.shape[0])
        s.step_bytes.append((up, down, int(labels.shape[0]), wire_up, wire_down))
        self.step = step + 1
        if self._checkpoint_due(self.step):
            self.save()
        return loss

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
                except _Rewind:
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
        was = self.model.training
        self.model.eval()
        out = []
        try:
            for i, batch in enumerate(batches):
                b = self.model(**self._inputs(batch))
                tensors, meta, _ = boundary_to_wire(b, self.fwd, codec_seed(self.cfg.seed, self.step + start + i))
                while True:
                    try:
                        reply, _ = self._request(EVAL, tensors, {"b": meta}, seq=i)
                        break
                    except _Rewind:
                        raise CloudError("the cloud rolled back during evaluation; re-run training first") from None
                out.append(reply.tensors["logits"])
        finally:
            self.model.train(was)
        return torch.cat(out) if out else torch.zeros(0)

    def finish(self) -> None:
        """Tell the cloud the run is over (it checkpoints its final step)."""
        self._request(FINISH, {}, {}, seq=self.step)
