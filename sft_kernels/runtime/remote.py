"""``RemoteSplit``: your own training script over a real link.

``SimulatedSplit`` with the cloud part on a ``sft serve`` server: the same call signature and
output type, the same step (:mod:`sft_kernels.step`), over a :class:`~.link.TcpLink`::

    model = RemoteSplit(model, connect="cloud.example.org:7000", client_id="edge-1",
                        token_file="edge-1.token", tls_ca="ca.pem", at=3, mode="bottleneck", rank=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)     # the edge's parameters only
    for batch in loader:
        loss = model(**batch).loss
        opt.zero_grad(); loss.backward(); opt.step()            # the cloud part steps with it

What behaves as ``SimulatedSplit`` does, and what it costs:

* **AMP's GradScaler.**  Its scale reaches the cloud's backward like any loss scaling; pass
  ``grad_scaler=`` and the cloud unscales by the same factor before stepping and skips the steps the
  scaler skips.
* **Any loss.**  In train mode the outputs (loss and logits; in the U-split the edge's top computes
  them) are autograd tensors: their backward sends ``BACKWARD`` with whatever gradient autograd
  computed -- a loss divided for gradient accumulation (yours or ``Trainer``'s), a GradScaler's
  scale, a custom loss of the logits -- and the cloud backpropagates exactly that.  Two round trips
  per micro-batch (``FORWARD``, ``BACKWARD``) plus one small ``STEP`` per optimizer step.  (``sft
  train``, which owns its loop and uses the model's own loss, takes the fused one-round-trip
  ``TRAIN`` instead.)
* **Gradient accumulation.**  The cloud accumulates until the edge's optimizer steps: a global
  ``torch.optim`` step hook sends ``STEP`` (keyed by the optimizer step, idempotent) when an
  optimizer over this module's parameters steps.  The cloud checks that it accumulated as many
  micro-batches as the edge did (a server restart in the middle of an accumulation is refused,
  not silently half-applied).
* **The cloud's optimizer follows the edge's.**  The cloud part trains with AdamW; each ``STEP``
  carries the edge optimizer's current ``lr``, ``weight_decay``, ``betas`` and ``eps`` (its first
  parameter group holding this module's parameters), so schedules and weight decay apply to both.
  Other optimizer classes are refused.
* **Gradient clipping** across both halves would need another round trip; ``max_grad_norm`` makes
  the cloud clip its own gradients to that norm at each step (each half clips its own share; clip
  the edge's yourself, or let ``Trainer`` do it with the same value).
* **Eval mode** sends ``EVAL`` (forward only; the loss too when labels are given).  A train-mode
  forward under ``torch.no_grad()`` keeps no graph on the cloud.
* **Exactly once.**  Requests are keyed (micro-batch, optimizer step); a reply lost to a broken
  link is replayed by the cloud on reconnect, never applied twice.
* **Checkpoints** happen at optimizer-step boundaries: :meth:`RemoteSplit.save_checkpoint` /
  :meth:`RemoteSplit.load_checkpoint` in your own loop, :class:`RemoteSplitCallback` with
  ``Trainer`` (the cloud checkpoints when ``Trainer`` saves; ``Trainer`` saves this module's state,
  which holds the step counters, and resuming re-opens the session at that step).
* :meth:`RemoteSplit.close` finishes the session (the server frees finished sessions first).
* **A calibrated bottleneck** (``init="calibrated"``, ``calibration=`` your unlabelled batches or
  strings): the code is fitted here, before the first step, and the cloud's fitted decoders cross in
  the session handshake, at every (re)open (:attr:`RemoteSplit.handshake_bytes`; MiniLM at rank 4:
  38,400 B).  :meth:`RemoteSplit.save_checkpoint` keeps the fit, so a restarted process resumes
  without refitting: build it with ``calibration=UNFITTED`` and call :meth:`RemoteSplit.load_checkpoint`
  before the first forward.  (``Trainer``'s own checkpoints hold this module's ``state_dict`` only:
  to resume with ``Trainer``, pass the same calibration again, which fits the same code.)

The server must serve the same model: it builds its parts from its own copy of the checkpoint with
the run's seed (``sft serve --model DIR``), and the handshake compares both parts' parameters by
hash.  Build your model with :func:`sft_kernels.split.load_classifier` (same checkpoint, same seed).
"""
from __future__ import annotations

import logging
import weakref
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from ..channel import TLSConfig
from ..codecs import from_spec
from ..split import UNFITTED, CalibrationOptions, split_model
from ..split.surgery import Calibration
from ..step import EdgeClient
from ..step.cloud import step_hyperparameters
from ..step.edge import pooled_codecs
from ..step.link import CountsTraffic
from ..step.messages import FINISH, STEP
from .config import RunConfig, fit_hash, fit_state, state_hash
from .link import CloudError, TcpLink
from .parts import edge_hash

__all__ = ["RemoteSplit", "RemoteSplitCallback"]

log = logging.getLogger("sft_kernels.runtime")

#: Live RemoteSplits, for the optimizer step hooks (weak: a dropped module unregisters itself).
_LIVE: "weakref.WeakSet[RemoteSplit]" = weakref.WeakSet()
_HOOKS: list = []


def _param_ids(opt: torch.optim.Optimizer) -> set[int]:
    return {id(p) for g in opt.param_groups for p in g["params"]}


def _before_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    ids = _param_ids(opt)
    for rs in list(_LIVE):
        rs._check_optimizer(opt, ids)


def _after_step(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    ids = _param_ids(opt)
    for rs in list(_LIVE):
        if ids & rs._own_ids:
            rs._optimizer_stepped(opt, ids)


def _install_hooks() -> None:
    if not _HOOKS:
        _HOOKS.append(register_optimizer_step_pre_hook(_before_step))
        _HOOKS.append(register_optimizer_step_post_hook(_after_step))


def _host_port(connect: str) -> tuple[str, int]:
    host, _, port = str(connect).rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"connect must be 'HOST:PORT' with a port in 1..65535, got {connect!r}")
    return host.strip("[]"), int(port)


def _read_token(token: Union[str, bytes, None], token_file: Union[str, Path, None]) -> Union[str, bytes]:
    if (token is None) == (token_file is None):
        raise ValueError("give exactly one of token and token_file (this edge's secret from the server's tokens file)")
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"token_file {str(path)!r} does not exist")
        token = path.read_text(encoding="utf-8").strip()
    if not token:
        raise ValueError("the token is empty")
    return token


class RemoteSplit(CountsTraffic, nn.Module):
    """``model`` split at ``at``: the edge part here, the cloud part on the ``sft serve`` server at ``connect``.

    Args:
        model: a ``*ForSequenceClassification`` of a supported family, as the server builds it (same
            checkpoint, same ``seed``: see :func:`sft_kernels.split.load_classifier`).
        connect: the server's ``HOST:PORT``.
        client_id, token / token_file: this edge's credentials (a line of the server's tokens file).
        tls_ca, tls_cert, tls_key, server_hostname: TLS (``tls_ca`` verifies the server and turns TLS
            on; cert and key for mutual TLS).
        at, mode, rank, eliminate_links, u_split, init, fwd_codec, bwd_codec, pooled_codec, pooled_grad_codec,
            seed: the split, as
            :class:`~sft_kernels.SimulatedSplit`'s (they must match what the server serves).
        calibration, tokenizer, calibration_options: ``init="calibrated"``: what the code is fitted on, as
            :func:`~sft_kernels.split.split_model` takes them (unlabelled batches, or strings with
            ``tokenizer``); the cloud's fitted decoders are sent at every session open.
            ``calibration=UNFITTED`` fits nothing and connects only at :meth:`load_checkpoint`, which
            restores the fit a :meth:`save_checkpoint` kept (a restarted process never refits).
        run_id: names the session on the server (with ``client_id``); a second RemoteSplit with the
            same names resumes it.
        max_length, max_batch_size: the largest batch this edge will send (the server checks them).
        max_grad_norm: the cloud clips its own gradients to this norm at each step (None: no clipping).
        grad_scaler: the ``torch.amp.GradScaler`` of your loop, if any: the cloud unscales its gradients by
            the same factor before stepping, and drops them when the scaler skips a step (its ``update`` is
            wrapped to tell the cloud).
        retries, timeout: the link's retry bound and socket timeout (see :class:`~.link.TcpLink`).

    What ``Trainer.save_model()`` (and each ``Trainer`` checkpoint) writes: ``model.safetensors`` with
    this module's ``state_dict`` -- the edge part (``edge.*``), in the U-split the top (``top.*``), and
    the step counters ``optimizer_steps`` / ``micro_batches`` -- and no ``config.json``.  That is what
    ``trainer.train(resume_from_checkpoint=...)`` reads back; it is not a model to load: the cloud half
    is on the server (in its ``--checkpoint-dir``), and neither :func:`sft_kernels.load_split_model`
    nor ``from_pretrained`` reads this file.  A whole trained model is exported from a
    :class:`~sft_kernels.SimulatedSplit` (its ``save_pretrained``), not yet from a remote run.
    """

    #: Read by transformers' ``Trainer``: the loss is the model's (mean over the batch), no loss kwargs.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, connect: str, client_id: str = "edge", token: Union[str, bytes, None] = None,
                 token_file: Union[str, Path, None] = None, *, at: int, mode: str = "layer",
                 rank: Optional[int] = None, eliminate_links: bool = True, u_split: bool = False,
                 fwd_codec: str = "int8", bwd_codec: str = "int8,sr", pooled_codec: Optional[str] = None,
                 pooled_grad_codec: Optional[str] = None, seed: int = 0, init: str = "svd",
                 calibration: Optional[Calibration] = None, tokenizer: Any = None,
                 calibration_options: Optional[CalibrationOptions] = None, run_id: str = "remote",
                 max_length: int = 128, max_batch_size: int = 32, max_grad_norm: Optional[float] = None,
                 tls_ca: Union[str, Path, None] = None, tls_cert: Union[str, Path, None] = None,
                 tls_key: Union[str, Path, None] = None, server_hostname: Optional[str] = None,
                 grad_scaler: Optional[torch.amp.GradScaler] = None, retries: int = 8, timeout: float = 120.0) -> None:
        super().__init__()
        host, port = _host_port(connect)
        secret = _read_token(token, token_file)
        if max_grad_norm is not None and not 0 < max_grad_norm < float("inf"):
            raise ValueError(f"max_grad_norm must be a positive finite number or None, got {max_grad_norm!r}")
        name = Path(str(getattr(model.config, "_name_or_path", "") or "model")).name or "model"
        self.cfg = RunConfig(model=name[:200], task="remote", num_labels=int(model.config.num_labels), at=at,
                             mode=mode, rank=rank, eliminate_links=eliminate_links, u_split=u_split, init=init,
                             fwd_codec=str(fwd_codec), bwd_codec=str(bwd_codec), pooled_codec=pooled_codec,
                             pooled_grad_codec=pooled_grad_codec, seed=seed, total_steps=10**8,
                             batch_size=max_batch_size, max_length=max_length, run_id=run_id)
        parts = split_model(model, at=at, mode=mode, rank=rank, eliminate_links=eliminate_links, seed=seed,
                            u_split=u_split, init=init, calibration=calibration, tokenizer=tokenizer,
                            calibration_options=calibration_options)
        self.edge = parts[0]
        self.top = parts[2] if u_split else None
        cloud = parts[1]
        self._hashes = {"edge": edge_hash(self.edge, self.top), "cloud": state_hash(cloud)}
        #: The cloud's calibrated decoders as fitted here (``init="calibrated"``), sent at every open; None for
        #: ``init="svd"``, and until :meth:`load_checkpoint` restores them when built with ``calibration=UNFITTED``.
        self.fit: Optional[dict[str, torch.Tensor]] = None
        if init == "calibrated" and calibration is not UNFITTED:
            self._set_fit(fit_state(cloud))
        # weak: ids of freed tensors are reused, and only a live optimizer can hold these
        self._cloud_refs = {id(p): weakref.ref(p) for p in cloud.parameters()}
        del cloud, parts
        self._own_ids = {id(p) for p in self.parameters()}
        self.max_grad_norm = max_grad_norm
        self.register_buffer("optimizer_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("micro_batches", torch.zeros((), dtype=torch.long))
        self._backwards = 0  # micro-batches backpropagated since the last optimizer step
        self._forwards = 0  # micro-batches sent since the last optimizer step (0: nothing outstanding)
        self._opened_at: Optional[int] = None
        tls = None
        if tls_ca or tls_cert or tls_key:
            tls = TLSConfig(cert=tls_cert, key=tls_key, ca=tls_ca, server_hostname=server_hostname or host)
        self.link = TcpLink(host, port, client_id, secret, open_meta=self._open_meta, on_resume=self._cannot_rewind,
                            open_tensors=self._open_tensors, retries=retries, tls=tls, timeout=timeout)
        fwd, bwd = from_spec(fwd_codec), from_spec(bwd_codec)
        self.client = EdgeClient(self.edge, self.link, fwd, bwd, seed, top=self.top,
                                 pooled=pooled_codecs(fwd, bwd, pooled_codec, pooled_grad_codec))
        self.client.on_backward = self._count_backward
        self.grad_scaler = grad_scaler
        if grad_scaler is not None:
            update = grad_scaler.update

            def update_and_tell_cloud(*args: Any, **kwargs: Any) -> None:
                if self._backwards:  # backpropagated micro-batches no optimizer step consumed: a skipped step
                    self._skip_step()
                update(*args, **kwargs)

            grad_scaler.update = update_and_tell_cloud
        if not self._awaiting_fit():
            self.link.open()  # connect now: a wrong address, token, model or split surfaces here
        _install_hooks()
        _LIVE.add(self)

    # ---------------------------------------------------------------- session
    def _set_fit(self, fit: dict[str, torch.Tensor]) -> None:
        self.fit = fit
        self._hashes["fit"] = fit_hash(fit)

    def _awaiting_fit(self) -> bool:
        """Built with ``calibration=UNFITTED`` and no fit loaded yet: nothing to open a session with."""
        return self.cfg.init == "calibrated" and self.fit is None

    def _open_tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.fit is None else {f"fit.{k}": v for k, v in self.fit.items()}

    @property
    def handshake_bytes(self) -> int:
        """Payload bytes of the session handshakes so far: a calibrated run's decoders, once per (re)open."""
        return self.link.traffic.handshake_up

    def _open_meta(self) -> dict[str, Any]:
        step = int(self.optimizer_steps)
        self._opened_at = step
        return {"config": self.cfg.to_dict(), "hashes": self._hashes, "step": step, "ckpts": [],
                "fresh": self._forwards == 0}

    def _cannot_rewind(self, resume: int) -> None:
        self.link.close()
        raise CloudError(f"the cloud can resume this run only from optimizer step {resume}, but this edge is at step "
                         f"{int(self.optimizer_steps)}: load your checkpoint of step {resume} "
                         f"(RemoteSplit.load_checkpoint, or Trainer's resume_from_checkpoint)")

    def _count_backward(self) -> None:
        self._backwards += 1

    @property
    def traffic(self):
        """Payload bytes each way so far (:class:`~sft_kernels.step.Traffic`)."""
        return self.link.traffic

    # ---------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **inputs: Optional[torch.Tensor]) -> Any:
        """The wrapped model's forward, the cloud part on the server; returns the wrapped model's output type."""
        if self._awaiting_fit():
            raise ValueError("RemoteSplit was built with calibration=UNFITTED: call load_checkpoint(path) first "
                             "(it restores the fit saved with the checkpoint), or build it with calibration=")
        if self._opened_at != int(self.optimizer_steps):  # the step counter was loaded (a resumed Trainer)
            self.link.open()
        index = int(self.micro_batches)
        self.micro_batches += 1
        self._forwards += 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        return self.client.forward(index, {k: v for k, v in batch.items() if v is not None}, labels,
                                   self.cfg.num_labels)

    # ---------------------------------------------------------------- optimizer
    def _check_optimizer(self, opt: torch.optim.Optimizer, ids: set[int]) -> None:
        foreign = [p for g in opt.param_groups for p in g["params"]
                   if (ref := self._cloud_refs.get(id(p))) is not None and ref() is p]
        if foreign:
            raise ValueError(f"RemoteSplit: this optimizer holds {len(foreign)} parameter(s) of the cloud part, which "
                             f"trains on the server; build it over remote_split.parameters() (the edge's only)")
        if ids & self._own_ids and type(opt) is not torch.optim.AdamW:
            raise ValueError(f"RemoteSplit: the cloud part trains with AdamW and follows the edge optimizer's "
                             f"hyper-parameters; the edge's optimizer is {type(opt).__name__}: use torch.optim.AdamW")

    def _optimizer_stepped(self, opt: torch.optim.Optimizer, ids: set[int]) -> None:
        group = next(g for g in opt.param_groups if any(id(p) in self._own_ids for p in g["params"]))
        meta: dict[str, Any] = {"hp": step_hyperparameters(group), "n": self._backwards}
        if self.max_grad_norm is not None:
            meta["clip"] = float(self.max_grad_norm)
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            meta["unscale"] = 1.0 / float(self.grad_scaler.get_scale())
        self.link.request(STEP, {}, meta, int(self.optimizer_steps))
        self.optimizer_steps += 1
        self._opened_at = int(self.optimizer_steps)  # the session stepped with this side: nothing to re-open
        self._backwards = self._forwards = 0

    def _skip_step(self) -> None:
        """The GradScaler skipped the edge's step: the cloud drops its accumulated gradients too."""
        self.link.request(STEP, {}, {"skip": True, "hp": {}}, int(self.optimizer_steps))
        self._backwards = self._forwards = 0

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_cloud(self) -> int:
        """Ask the server to checkpoint the cloud part at the current optimizer step; returns that step.

        The server needs ``--checkpoint-dir``.  Call it at an optimizer-step boundary (after
        ``opt.step()``, before the next forward).
        """
        step = int(self.optimizer_steps)
        self.link.request(FINISH, {}, {"final": False}, step)
        return step

    def save_checkpoint(self, path: Union[str, Path], optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Any = None) -> Path:
        """Checkpoint both halves at the current optimizer step: the cloud on the server, this side to ``path``.

        ``path`` holds this module's state (edge, top, step counters), a calibrated run's fit (the cloud's
        decoders as fitted here: a resumed process sends them again without refitting) and, if given, the
        optimizer's and the scheduler's; written atomically.  Resume with :meth:`load_checkpoint`.
        """
        self.checkpoint_cloud()
        path = Path(path)
        state: dict[str, Any] = {"model": self.state_dict(), "step": int(self.optimizer_steps)}
        if self.fit is not None:
            state["fit"] = self.fit
        if optimizer is not None:
            state["optimizer"] = optimizer.state_dict()
        if scheduler is not None:
            state["scheduler"] = scheduler.state_dict()
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def load_checkpoint(self, path: Union[str, Path], optimizer: Optional[torch.optim.Optimizer] = None,
                        scheduler: Any = None) -> int:
        """Resume from :meth:`save_checkpoint`'s file: this side from ``path``, the cloud from its checkpoint of
        the same step (the session re-opens there).  Returns the optimizer step resumed at.

        A calibrated run's file holds the fit (the cloud's decoders as first fitted): it replaces this
        module's, and the session re-opens with it.
        """
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if self.cfg.init == "calibrated":
            fit = state.get("fit")
            if not isinstance(fit, dict) or not fit:
                raise ValueError(f"{path} holds no calibrated fit: it was saved by a RemoteSplit with init='svd' "
                                 f"(or by an older version); this one has init='calibrated'")
            self._set_fit(fit)
        elif "fit" in state:
            raise ValueError(f"{path} holds a calibrated fit: it was saved by a RemoteSplit with "
                             f"init='calibrated'; this one has init='svd'")
        self.load_state_dict(state["model"])
        if optimizer is not None and "optimizer" in state:
            optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        self._backwards = self._forwards = 0
        self.link.open()
        return int(self.optimizer_steps)

    def close(self) -> None:
        """Finish the session (the server checkpoints it if it can and frees it first) and close the link."""
        _LIVE.discard(self)
        try:
            if self.link.conn is not None:
                self.link.request(FINISH, {}, {}, int(self.optimizer_steps))
        finally:
            self.link.close()


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class RemoteSplitCallback(_trainer_callback_base()):
    """A ``transformers.TrainerCallback``: the cloud checkpoints at the step where ``Trainer`` saves.

    ``Trainer`` saves the edge's state itself (this module's ``state_dict`` holds the step counters);
    ``trainer.train(resume_from_checkpoint=...)`` restores it and the next forward re-opens the session
    at that step, where the cloud restores its own checkpoint.
    """

    def __init__(self, model: RemoteSplit) -> None:
        self.model = model

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.model.checkpoint_cloud()
