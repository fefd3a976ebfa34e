"""``CloudServer``: the cloud side of split fine-tuning, serving edge sessions over the channel.

One :class:`CloudSession` per (client id, run id): its own cloud part, optimizer,
scheduler, checkpoints and the reply of its latest step.  The channel gives each
connection its own thread; a session's lock serialises its steps, so several edges
train at once while each session stays sequential.  Part construction and keyed
forwards run under the process-wide RNG lock (:func:`sft_kernels.split.seeded`), so
concurrent sessions never perturb each other: each equals its run alone, bit for bit.

Exactly once: a session knows the next step it expects.  A request for the step it
has just applied (the edge lost the reply) gets the cached reply back, never a second
update (a repeated ``STEP`` of the general path is acknowledged again); at ``OPEN`` both
sides agree on the newest step both can resume from (the edge sends its checkpoint
steps), and the session rolls back to it if it must.  The cached reply is part of every
checkpoint, so it survives a crash of the server too; graphs and gradients of a step in
progress are not, so restoring a checkpoint drops them.  Checkpoints are the edge's
choice: a TRAIN or STEP frame with ``ckpt`` asks for one after it.

Failures: anything wrong in a request (structure, codec, shapes, sizes, NaN/Inf) is
refused with an ERROR frame before the model is touched.  Every other failure also
gets an ERROR frame, marked retryable when a retry can help (a checkpoint that could
not be written, a full server); the connection and the server keep serving, and a
failed step leaves no gradients behind.  A step whose checkpoint fails after the
optimizer step stays applied with its reply cached; the retry writes the checkpoint
before the reply is replayed.

Limits (:class:`SessionLimits`): sessions in memory, sessions per client, idle expiry
(checkpoint, then evict), tokens per step and sequence length; see docs/protocol.md,
"Limits and fairness".
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from ..channel import Connection, Limits, LinkLimiter, Listener, TLSConfig
from ..step import CloudWorker
from ..step.cloud import bool_flag, dispatch
from ..step.messages import (BACKWARD, EVAL, FINISH, FORWARD, KIND_NAMES, OPEN, REPLY, STEP, TRAIN, StepRefused,
                             check_finite)
from .checkpoint import CheckpointedPart, CheckpointStore
from .config import SPLIT_FIELDS, RunConfig, fit_hash, fit_names
from .parts import build_parts, make_optimizer, make_scheduler

__all__ = ["CloudServer", "CloudSession", "SessionLimits"]

log = logging.getLogger("sft_kernels.runtime")

#: Most checkpoint steps an edge may list in OPEN (it keeps 3).
_MAX_EDGE_CKPTS = 64
#: Fixed allowance of a session's frames besides tensor data (meta JSON, descriptors, config).
_FRAME_SLACK = 64 << 10
#: Upper bound of encoded bytes per boundary value for any codec (fp32 raw is 4; block scales add < 1).
_BYTES_PER_VALUE = 5


@dataclass(frozen=True)
class SessionLimits:
    """What one server lets its edges use.  Defaults fit a 2-core CPU server with a few MiniLM edges.

    Attributes:
        max_sessions: sessions held in memory at once (about 70 MiB each for MiniLM with AdamW).
        max_sessions_per_client: sessions one client id may hold at once.
        session_timeout: seconds a session with no open connection stays in memory; after that it may
            be checkpointed and evicted, and comes back from its checkpoint when its edge returns.
            Without a checkpoint directory an evicted session is lost, so the timeout must exceed the
            longest pause of an edge (its evaluation, its restart).
        max_tokens: padded tokens (batch x padded length) one TRAIN or EVAL request may carry; the
            cloud's activation memory grows with it (and attention with the length on top).
        max_seq_len: longest padded sequence a session may use (its ``max_length`` is checked at OPEN).
    """

    max_sessions: int = 16
    max_sessions_per_client: int = 4
    session_timeout: float = 900.0
    max_tokens: int = 16384
    max_seq_len: int = 512

    def __post_init__(self) -> None:
        checks = [("max_sessions", self.max_sessions >= 1, ">= 1"),
                  ("max_sessions_per_client", 1 <= self.max_sessions_per_client, ">= 1"),
                  ("session_timeout", 0 < self.session_timeout < float("inf"), "a finite number of seconds > 0"),
                  ("max_tokens", 1 <= self.max_tokens <= 1 << 24, "1 .. 2**24"),
                  ("max_seq_len", 2 <= self.max_seq_len <= 8192, "2 .. 8192")]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"SessionLimits.{name} must be {valid}, got {getattr(self, name)!r}")


class CloudSession(CheckpointedPart):
    """The cloud part of one run and everything needed to step, replay and resume it.

    Building one restores the newest checkpoint of the run if there is one; the step-0
    checkpoint is written by :meth:`accept`, once the handshake checks have passed.
    """

    part = "cloud"

    def __init__(self, client_id: str, cfg: RunConfig, model_dir: Union[str, Path, None] = None,
                 checkpoint_dir: Union[str, Path, None] = None, limits: SessionLimits = SessionLimits()) -> None:
        self.client_id, self.cfg, self.limits = client_id, cfg, limits
        parts = build_parts(cfg, model_dir)
        self.init_hashes = parts.hashes()
        self.model = parts.cloud
        del parts
        self.opt = make_optimizer(self.model, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        fwd, bwd, pooled = cfg.codecs()
        self.worker = CloudWorker(self.model, fwd, bwd, cfg.seed, max_length=cfg.max_length, max_batch=cfg.batch_size,
                                  max_tokens=limits.max_tokens, optimizer=self.opt, scheduler=self.sched, pooled=pooled)
        self.last_reply: Optional[dict[str, Any]] = None
        self.save_pending = False  # the step was applied but its requested checkpoint is not written yet
        self.finished = False  # set by FINISH; a finished session is the first to make room for a new one
        self.lock = threading.Lock()
        self.active = 0  # connections attached (guarded by the server's lock)
        self.last_used = time.monotonic()
        self.handlers = {TRAIN: self.on_train, FORWARD: self.worker.forward, BACKWARD: self.worker.backward,
                         STEP: self.on_step, EVAL: self.worker.evaluate, FINISH: self.on_finish}
        self.store = (CheckpointStore(Path(checkpoint_dir) / client_id / cfg.run_id)
                      if checkpoint_dir is not None else None)
        self._open_store(save_initial=False)

    @property
    def step(self) -> int:
        """Optimizer steps applied (the worker counts them)."""
        return self.worker.step

    @step.setter
    def step(self, value: int) -> None:
        self.worker.step = value

    def accept(self) -> None:
        """The handshake passed: make sure a checkpoint of the starting point exists."""
        if self.store is not None and self.store.latest() is None:
            self.save()

    def adopt_fit(self, tensors: Mapping[str, torch.Tensor], declared: Optional[str]) -> None:
        """Check the calibrated decoders an ``OPEN`` carries (``fit.*``) and load them into a new session.

        Refused (:class:`StepRefused`, nothing loaded): tensors for an ``init="svd"`` run, other names
        than this model's fit, another dtype or shape than this server's own parameters, non-finite
        values, or tensors that do not hash to the declared ``fit`` hash.  A session that already has
        its fit (open before, or restored from a checkpoint) keeps it: the hashes are compared next.
        """
        names = sorted(fit_names(self.model))
        if not names:
            if tensors:
                raise StepRefused(f"OPEN carries tensors {sorted(tensors)[:8]}, but only an init='calibrated' run "
                                  f"sends any (its decoders)")
            return
        want = [f"fit.{n}" for n in names]
        if sorted(tensors) != want:
            raise StepRefused(f"OPEN must carry the calibrated decoders {want}, got {sorted(tensors)[:8]}")
        own = self.model.state_dict()
        got = {n: tensors[f"fit.{n}"] for n in names}
        for n, t in got.items():
            if t.dtype != own[n].dtype or t.shape != own[n].shape:
                raise StepRefused(f"OPEN: decoder 'fit.{n}' is {t.dtype} {tuple(t.shape)}; this server's model needs "
                                  f"{own[n].dtype} {tuple(own[n].shape)}")
            check_finite(t, f"decoder 'fit.{n}'")
        if fit_hash(got) != declared:
            raise StepRefused("OPEN: the decoders sent do not hash to the declared 'fit' hash")
        if "fit" not in self.init_hashes:
            with torch.no_grad():
                self.model.load_state_dict(got, strict=False)
            self.init_hashes["fit"] = declared

    def frame_limit(self) -> int:
        """The largest frame this session can need: a request at the server's token cap, in any codec."""
        values = self.model.width + (self.model.residual_width or 0)
        return _BYTES_PER_VALUE * self.limits.max_tokens * values + 16 * self.limits.max_tokens + _FRAME_SLACK

    # ---------------------------------------------------------------- state
    def _extra_state(self) -> dict[str, Any]:
        return {"reply": self.last_reply}

    def _load_extra(self, state: dict[str, Any]) -> None:
        self.last_reply = state["reply"]
        self.save_pending = False
        self.worker.discard_accumulation()  # graphs and gradients of a later step do not belong to this one
        log.info("session %s/%s: restored step %d", self.client_id, self.cfg.run_id, self.step)

    def _cannot_restore(self, step: int) -> Exception:
        return StepRefused(f"cannot roll back to step {step}: the server runs without --checkpoint-dir")

    def resume_point(self, edge_step: int, edge_ckpts: list[int], fresh: bool = False) -> int:
        """Agree on the next step with an edge at ``edge_step`` holding checkpoints ``edge_ckpts``.

        The newest step both sides can be at: the current one, a replay of the step just applied,
        or the newest checkpoint both have.  This side rolls back to it if it must; the edge rolls
        back when the answer is below its step.  A step applied by ``STEP`` is replayed (its ``STEP``
        acknowledged again) only to an edge in the middle of it (not ``fresh``): a fresh edge would
        run the step's forward again on the stepped parameters, so this side rolls back instead.
        """
        c, last = self.step, self.last_reply
        if c == edge_step or (c == edge_step + 1 and last and last["step"] == edge_step
                              and not (fresh and last.get("kind") == STEP)):
            return edge_step
        common = (set(self.checkpoint_steps()) | {c}) & (set(edge_ckpts) | {edge_step})
        if not common:
            if self.store is None:
                raise self._cannot_restore(edge_step)
            raise StepRefused(f"no step to resume from: the cloud is at step {c} with checkpoints "
                              f"{self.checkpoint_steps()}, the edge at step {edge_step} with checkpoints {edge_ckpts}")
        target = max(common)
        if target != c:
            self.restore(target)
        return target

    def _save_requested(self) -> None:
        try:
            self.save()
        except OSError as exc:
            raise StepRefused(f"step {self.step - 1} was applied, but its checkpoint could not be written: {exc}",
                              retryable=True) from None
        self.save_pending = False

    # ---------------------------------------------------------------- requests (one method per kind)
    def handle(self, kind: int, seq: int, tensors: Mapping[str, torch.Tensor], meta: Any) -> tuple[dict, dict]:
        """Answer one request of this session (its lock held by the caller)."""
        return dispatch(self.handlers, kind, seq, tensors, meta)

    def on_train(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``TRAIN``: apply ``step`` once and return its reply; replay the cached reply for a repeated step."""
        last = self.last_reply
        if last is not None and step == last["step"] == self.step - 1 and last.get("kind", TRAIN) == TRAIN:
            log.info("session %s/%s: step %d repeated, replaying its reply", self.client_id, self.cfg.run_id, step)
            if self.save_pending:
                self._save_requested()
            return self.last_reply["tensors"], self.last_reply["meta"]
        if step != self.step:
            raise StepRefused(f"step {step} out of order: the session expects step {self.step} (reconnect to resync)")
        want_ckpt = bool_flag(meta, "ckpt", False)
        rt, reply_meta = self.worker.train(step, tensors, meta)
        self.last_reply = {"step": step, "tensors": rt, "meta": reply_meta}  # fresh encoder outputs: no copy
        self._after_step(want_ckpt)
        return rt, reply_meta

    def on_step(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``STEP``: the edge's optimizer stepped (general path); step this part's, checkpoint if asked."""
        if step == self.step - 1 and self.save_pending:
            self._save_requested()
        want_ckpt = bool_flag(meta, "ckpt", False)
        applied = step == self.step
        out = self.worker.optimizer_step(step, tensors, meta)
        if applied and self.step == step + 1:  # not a step the edge's GradScaler skipped  # remembered (and checkpointed) so that an edge which lost the reply can resume and re-send it
            self.last_reply = {"step": step, "kind": STEP, "tensors": {}, "meta": out}
            self._after_step(want_ckpt)
        return out

    def _after_step(self, want_ckpt: bool) -> None:
        if want_ckpt or self.step == self.cfg.total_steps:
            self.save_pending = True
            self._save_requested()

    def on_finish(self, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``FINISH``: the edge is done at ``step`` (or, with ``final: false``, wants a checkpoint of it)."""
        if step != self.step:
            raise StepRefused(f"finish at step {step}, but the session is at step {self.step}")
        final = bool_flag(meta, "final", True)
        if self.store is not None and self.store.latest() != self.step:
            self._save_requested()
        self.finished = self.finished or final
        return {}, {"step": self.step}


def _check_open_meta(meta: Any) -> tuple[RunConfig, dict, int, list[int]]:
    if not isinstance(meta, dict) or not {"config", "hashes", "step", "ckpts"} <= set(meta) <= {
            "config", "hashes", "step", "ckpts", "fresh"}:
        raise StepRefused("OPEN needs meta with exactly 'config', 'hashes', 'step' and 'ckpts' (and optionally "
                          "'fresh')")
    cfg = RunConfig.from_dict(meta["config"])
    hashes = meta["hashes"]
    want = {"edge", "cloud"} | ({"fit"} if cfg.init == "calibrated" else set())
    if (not isinstance(hashes, dict) or set(hashes) != want
            or not all(isinstance(v, str) and len(v) == 64 for v in hashes.values())):
        raise StepRefused(f"OPEN 'hashes' must map exactly {sorted(want)} to sha256 hex digests (init={cfg.init!r})")
    step = meta["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= cfg.total_steps:
        raise StepRefused(f"OPEN step must be an int in 0..{cfg.total_steps}, got {step!r}")
    ckpts = meta["ckpts"]
    if (not isinstance(ckpts, list) or len(ckpts) > _MAX_EDGE_CKPTS
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= step for c in ckpts)):
        raise StepRefused(f"OPEN 'ckpts' must be a list of at most {_MAX_EDGE_CKPTS} ints in 0..step")
    return cfg, hashes, step, ckpts


class CloudServer:
    """Serves split fine-tuning sessions to authenticated edges.

    Args:
        tokens: client id -> secret (see :func:`sft_kernels.channel.load_tokens`).
        split: the split settings served (:data:`~.config.SPLIT_FIELDS`); a session asking for others is refused.
            ``None`` accepts whatever the edge proposes.
        host, port: where to listen (127.0.0.1 unless told otherwise; port 0 picks a free one).
        model_dir: local model directory (default: the embedded package).
        checkpoint_dir: where sessions checkpoint (at the steps their edges ask for); None: no checkpoints.
        tls, limits, link: passed to the channel's :class:`~sft_kernels.channel.Listener` (``limits``
            holds the connection pool and timeouts).
        sessions: :class:`SessionLimits` (sessions, per-client quota, idle expiry, tokens per step).
    """

    def __init__(self, tokens: Mapping[str, bytes], split: Optional[Mapping[str, Any]] = None,
                 host: str = "127.0.0.1", port: int = 0, *, model_dir: Union[str, Path, None] = None,
                 checkpoint_dir: Union[str, Path, None] = None, tls: Optional[TLSConfig] = None,
                 limits: Optional[Limits] = None, link: Optional[LinkLimiter] = None,
                 sessions: SessionLimits = SessionLimits()) -> None:
        if split is not None:
            unknown = sorted(set(split) - set(SPLIT_FIELDS))
            if unknown:
                raise ValueError(f"split: unknown keys {unknown}; valid: {list(SPLIT_FIELDS)}")
            RunConfig(**dict(split))  # validates the values
        self.split = dict(split) if split is not None else None
        self.model_dir, self.checkpoint_dir = model_dir, checkpoint_dir
        self.session_limits = sessions
        self.sessions: dict[tuple[str, str], CloudSession] = {}
        self._building: dict[tuple[str, str], int] = {}  # sessions being built (reserved slots)
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
    def _check_limits(self, cfg: RunConfig) -> None:
        lim = self.session_limits
        if cfg.max_length > lim.max_seq_len:
            raise StepRefused(f"session refused: max_length {cfg.max_length} exceeds the server's limit of "
                              f"{lim.max_seq_len} tokens per sequence")
        if cfg.batch_size * cfg.max_length > lim.max_tokens:
            raise StepRefused(f"session refused: batch_size {cfg.batch_size} x max_length {cfg.max_length} = "
                              f"{cfg.batch_size * cfg.max_length} tokens exceeds the server's limit of "
                              f"{lim.max_tokens} tokens per step")

    def _evict(self, key: tuple[str, str], s: CloudSession) -> None:
        """Checkpoint ``s`` at its current step and drop it (server lock held; ``s`` is idle or finished)."""
        with s.lock:
            if s.store is not None and (s.save_pending or s.store.latest() != s.step):
                s.save(idle=not s.save_pending)
        del self.sessions[key]
        log.info("session %s/%s evicted at step %d (%s)", key[0], key[1], s.step,
                 "finished" if s.finished else "idle")

    def _make_room(self, client_id: str) -> None:
        """Expire idle sessions; refuse when the client's quota or the server is full (server lock held).

        Sessions without a connection idle for ``session_timeout`` are checkpointed and evicted; then the
        oldest finished sessions make room (FINISH wrote their final checkpoint, so even one whose connection
        is still open may go): first the client's own when its quota is reached, then anyone's when the
        server is full.  An unfinished session with a connection is never evicted.
        """
        lim = self.session_limits
        now = time.monotonic()
        for key, s in list(self.sessions.items()):
            if s.active == 0 and now - s.last_used >= lim.session_timeout:
                self._evict(key, s)

        def held() -> int:
            return sum(1 for k in self.sessions if k[0] == client_id) + \
                sum(n for k, n in self._building.items() if k[0] == client_id)

        def used() -> int:
            return len(self.sessions) + sum(self._building.values())

        finished = sorted((kv for kv in self.sessions.items() if kv[1].finished), key=lambda kv: kv[1].last_used)
        for key, s in finished:
            if key[0] == client_id and held() >= lim.max_sessions_per_client:
                self._evict(key, s)
        if held() >= lim.max_sessions_per_client:
            raise StepRefused(f"session refused: client {client_id!r} already holds {held()} unfinished sessions, "
                              f"its quota is {lim.max_sessions_per_client} (finish a run, or wait "
                              f"{lim.session_timeout:.0f} s after closing one)")
        for key, s in finished:
            if used() < lim.max_sessions:
                break
            if key in self.sessions:
                self._evict(key, s)
        if used() >= lim.max_sessions:
            waits = [lim.session_timeout - (now - s.last_used) for s in self.sessions.values() if s.active == 0]
            after = min(max(1.0, min(waits)) if waits else 5.0, 3600.0)
            raise StepRefused(f"server full ({lim.max_sessions} sessions in use); retry after {after:.0f} s",
                              retryable=True, retry_after=after)

    def _open(self, conn: Connection, meta: Any, tensors: Mapping[str, torch.Tensor]) -> tuple[CloudSession, dict]:
        client_id = conn.client_id
        cfg, hashes, step, ckpts = _check_open_meta(meta)
        if self.split is not None:
            served = RunConfig(**{**cfg.to_dict(), **self.split})
            diff = cfg.split_mismatch(served)
            if diff:
                raise StepRefused("session refused, split settings differ: " + "; ".join(diff))
        self._check_limits(cfg)
        key = (client_id, cfg.run_id)
        with self._lock:
            s = self.sessions.get(key)
            if s is not None and s.cfg != cfg:
                raise StepRefused(f"run id '{cfg.run_id}' is already open with a different config")
            if s is None:
                self._make_room(client_id)
                self._building[key] = self._building.get(key, 0) + 1
            else:
                s.active += 1  # attached now, so it cannot be evicted while the handshake finishes
        if s is None:
            try:
                # built outside the server lock: other sessions keep stepping meanwhile
                s = CloudSession(client_id, cfg, self.model_dir, self.checkpoint_dir, self.session_limits)
                s.adopt_fit(tensors, hashes.get("fit"))
                self._check_hashes(s, hashes)
                with s.lock:
                    s.accept()
            finally:
                with self._lock:
                    self._building[key] -= 1
                    if not self._building[key]:
                        del self._building[key]
            with self._lock:
                s = self.sessions.setdefault(key, s)  # a concurrent OPEN of the same run may have won
                s.active += 1
        try:
            fresh = bool_flag(meta, "fresh", False)
            with s.lock:
                s.adopt_fit(tensors, hashes.get("fit"))
                self._check_hashes(s, hashes)
                resume = s.resume_point(step, ckpts, fresh)
                if fresh:  # the edge starts this step afresh: drop what an earlier
                    s.worker.discard_accumulation()   # process of it left half-accumulated
                s.last_used = time.monotonic()
        except BaseException:
            self._detach(s)
            raise
        conn.limits = dataclasses.replace(conn.limits, max_frame_bytes=min(conn.limits.max_frame_bytes,
                                                                           s.frame_limit()))
        log.info("session %s/%s open: edge at step %d, resume at %d", client_id, cfg.run_id, step, resume)
        return s, {"step": resume, "cloud_step": s.step}

    @staticmethod
    def _check_hashes(s: CloudSession, hashes: dict) -> None:
        if hashes != s.init_hashes:
            raise StepRefused(f"initial parameters differ: edge has {hashes}, cloud has {s.init_hashes}; the edge's "
                              "model differs from the server's: both sides must load the same model files "
                              "(sft serve --model / sft train --model) with the same seed")

    def _detach(self, s: Optional[CloudSession]) -> None:
        if s is not None:
            with self._lock:
                s.active -= 1
                s.last_used = time.monotonic()

    @staticmethod
    def _step(session: Optional[CloudSession], frame) -> tuple[dict, dict]:
        if session is None:
            raise StepRefused(f"message kind {frame.kind} before OPEN")
        with session.lock:
            try:
                return session.handle(frame.kind, frame.seq, frame.tensors, frame.meta)
            finally:
                session.last_used = time.monotonic()

    def handle(self, conn: Connection) -> None:
        """Serve one authenticated connection until it closes; every failed request gets an ERROR frame."""
        session: Optional[CloudSession] = None
        try:
            while True:
                try:
                    frame = conn.recv()
                except (ConnectionError, EOFError, OSError, TimeoutError) as exc:
                    log.info("connection %s (%s) closed: %s", conn.conn_id, conn.client_id, exc)
                    return
                try:
                    if frame.kind == OPEN:
                        old, session = session, None
                        self._detach(old)
                        session, meta = self._open(conn, frame.meta, frame.tensors)
                        tensors = {}
                    else:
                        tensors, meta = self._step(session, frame)
                except Exception as exc:  # noqa: BLE001 - every failure is answered, none closes the link
                    retryable, after, text = _classify(exc)
                    log.warning("connection %s (%s): %s %d failed%s: %s", conn.conn_id, conn.client_id,
                                KIND_NAMES.get(frame.kind, frame.kind), frame.seq,
                                " (retryable)" if retryable else "", text)
                    conn.send_error(text, seq=frame.seq, retryable=retryable, retry_after=after)
                    continue
                conn.send(REPLY, tensors, meta, seq=frame.seq)
        finally:
            self._detach(session)


def _classify(exc: BaseException) -> tuple[bool, Optional[float], str]:
    """``(retryable, retry_after, message)`` of a failed request."""
    if isinstance(exc, StepRefused):
        return exc.retryable, exc.retry_after, str(exc)
    if isinstance(exc, (ValueError, KeyError, TypeError, IndexError)):
        return False, None, f"request refused: {type(exc).__name__}: {exc}"
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
        return False, None, f"server error: {type(exc).__name__}: {exc}"
    if isinstance(exc, (OSError, MemoryError)):
        return True, None, f"server error (a retry may help): {type(exc).__name__}: {exc}"
    return False, None, f"server failed on this request: {type(exc).__name__}: {exc}"
