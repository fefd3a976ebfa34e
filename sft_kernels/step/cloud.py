"""``CloudWorker``: the cloud half of the split training step, one method per message kind.

It decodes and validates a request (:mod:`.messages`), runs the cloud part, and encodes the
reply.  The same worker serves every link: :class:`~.link.InProcessLink` calls it directly
(``SimulatedSplit``), the TCP server calls it from a session (``sft serve``).

Two ways through a training step:

* **fused** (``TRAIN``, one round trip): forward, the model's own loss, backward, and -- when the
  worker owns an optimizer -- the optimizer step; the reply carries the boundary gradient and the
  loss.  Right when the loss is the model's, unscaled, one micro-batch per step (``sft train``).
* **general** (``FORWARD`` then ``BACKWARD``, two round trips; ``STEP`` once per optimizer step):
  the forward keeps its graph and returns the outputs (loss and logits, raw fp32; in the U-split
  the pooled rows, through the codec); the backward takes whatever gradient the edge's autograd
  computed for them -- a loss divided for accumulation, a GradScaler's scale, a custom loss of the
  logits -- and returns the boundary gradient.  Gradients accumulate until ``STEP``.

Dropout in the cloud part draws from ``(seed, seq, "cloud")`` and codec randomness from the
step's codec seed, so a request replayed or recomputed is the same computation.

Exactly once: a repeated ``FORWARD`` of a micro-batch whose graph is kept replays its outputs; a
repeated ``BACKWARD`` of the last micro-batch replays its gradient; a repeated ``STEP`` is
acknowledged without stepping again.

Knows the split's cloud part, codecs and messages; no sockets, sessions or checkpoints.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from ..codecs import BWD_SEED_OFFSET, Codec
from ..split import BoundaryOutput, codec_seed, part_rng
from .messages import (BACKWARD, EVAL, FORWARD, POOLED_SEED_OFFSET, STEP, TRAIN, StepRefused, boundary_from_wire,
                       check_finite, decode_packet, label_dtype, packet_from_wire, packet_to_wire)

__all__ = ["CloudWorker", "dispatch", "bool_flag", "step_hyperparameters", "OPTIMIZER_HYPERPARAMETERS", "MAX_PENDING"]

#: Forwards whose graph the cloud keeps at once, waiting for their backward (bounds its memory); a
#: forward beyond it drops the oldest graph (whose backward is then refused).
MAX_PENDING = 16
#: The edge optimizer's hyper-parameters a ``STEP`` may carry (the cloud trains with AdamW).
OPTIMIZER_HYPERPARAMETERS = ("lr", "weight_decay", "betas", "eps")
_LIMIT = 1 << 40


def step_hyperparameters(group: Mapping[str, Any]) -> dict[str, Any]:
    """What ``STEP`` carries of an edge optimizer's parameter group (:data:`OPTIMIZER_HYPERPARAMETERS`), as JSON."""
    return {"lr": float(group["lr"]), "weight_decay": float(group["weight_decay"]),
            "betas": [float(b) for b in group["betas"]], "eps": float(group["eps"])}


Handler = Callable[[int, Mapping[str, torch.Tensor], Any], tuple[dict, dict]]


def dispatch(handlers: Mapping[int, Handler], kind: int, seq: int, tensors: Mapping[str, torch.Tensor],
             meta: Any) -> tuple[dict, dict]:
    """Call the handler of ``kind``; :class:`StepRefused` for an unknown kind or a meta that is not an object."""
    handler = handlers.get(kind)
    if handler is None:
        raise StepRefused(f"unknown message kind {kind}")
    if not isinstance(meta, dict):
        raise StepRefused("request meta must be a JSON object")
    return handler(seq, tensors, meta)


def bool_flag(meta: Mapping[str, Any], name: str, default: bool) -> bool:
    """``meta[name]`` (``default`` when absent); :class:`StepRefused` unless it is a bool."""
    v = meta.get(name, default)
    if not isinstance(v, bool):
        raise StepRefused(f"request meta '{name}' must be a bool, got {v!r}")
    return v


def _output_tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensor fields of a transformers output (or a plain tensor: the U-split's pooled rows)."""
    if isinstance(out, torch.Tensor):
        return {"pooled": out}
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


class CloudWorker:
    """Runs the cloud part for requests of one run.

    Args:
        model: the cloud part (``split_model``'s ``CloudModel``).
        fwd, bwd: the run's codecs (activations up and, in the U-split, the pooled rows down; gradients).
        seed: the run's seed (dropout and codec keys).
        max_length, max_batch, max_tokens: bounds on a request (padded length, sequences, padded tokens).
        optimizer, scheduler: the cloud part's own (the fused ``TRAIN`` steps them; ``STEP`` needs the
            optimizer).  None: whoever holds the parameters steps them (``SimulatedSplit``).
    """

    def __init__(self, model: nn.Module, fwd: Codec, bwd: Codec, seed: int, *, max_length: int = _LIMIT, max_batch: int = _LIMIT, max_tokens: int = _LIMIT,
                 optimizer: Optional[torch.optim.Optimizer] = None,
                 scheduler: Optional[torch.optim.lr_scheduler.LRScheduler] = None,
                 pooled: Optional[tuple[Codec, Codec]] = None) -> None:
        self.model, self.fwd, self.bwd, self.seed = model, fwd, bwd, seed
        self.pooled_fwd, self.pooled_bwd = pooled or (fwd, bwd)
        self.u_split = bool(getattr(model, "u_split", False))
        self.max_length, self.max_batch, self.max_tokens = max_length, max_batch, max_tokens
        self.opt, self.sched = optimizer, scheduler
        self.step = 0  # optimizer steps applied
        self.pending: dict[int, tuple[torch.Tensor, Optional[torch.Tensor], dict[str, torch.Tensor], dict]] = {}
        self.last_backward: Optional[tuple[int, dict, dict]] = None
        self.accumulated = 0  # micro-batches backpropagated since the last STEP
        self._handlers: dict[int, Handler] = {
            TRAIN: self.train, FORWARD: self.forward, BACKWARD: self.backward, STEP: self.optimizer_step,
            EVAL: self.evaluate}

    def handle(self, kind: int, seq: int, tensors: Mapping[str, torch.Tensor], meta: Any) -> tuple[dict, dict]:
        """Answer one request: ``(tensors, meta)`` of the reply; :class:`StepRefused` when refused."""
        return dispatch(self._handlers, kind, seq, tensors, meta)

    # ---------------------------------------------------------------- decoding
    @property
    def num_labels(self) -> Optional[int]:
        """Outputs of the cloud's task head (1 = regression); None in the U-split (no labels come here)."""
        return None if self.u_split or self.model.head is None else int(self.model.config.num_labels)

    def _boundary(self, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], max_batch: int,
                  extra: tuple[str, ...] = ()) -> BoundaryOutput:
        if not isinstance(meta.get("b"), dict):
            raise StepRefused("request meta must hold a 'b' (boundary packets) object")
        return boundary_from_wire(tensors, meta["b"], self.fwd, width=self.model.width,
                                  residual_width=self.model.residual_width, max_length=self.max_length,
                                  max_batch=max_batch, max_tokens=self.max_tokens,
                                  pool_index=self.model.takes_pool_index, extra=extra)

    def _labels(self, tensors: Mapping[str, torch.Tensor], batch: int, required: bool) -> Optional[torch.Tensor]:
        y = tensors.get("labels")
        if y is None and not required:
            return None
        if self.num_labels is None:
            raise StepRefused("labels sent, but in this session the edge holds the head and the loss (U-split): "
                              "no label may cross the link")
        regression = self.num_labels == 1
        want = label_dtype(self.num_labels)
        if y is None or y.dtype != want or tuple(y.shape) != (batch,):
            raise StepRefused(f"labels must be {want} of shape ({batch},), got "
                              f"{None if y is None else (y.dtype, tuple(y.shape))}")
        if regression:
            check_finite(y, "labels")
        elif bool(((y < 0) | (y >= self.num_labels)).any()):
            raise StepRefused(f"labels must be in 0..{self.num_labels - 1} (the head's {self.num_labels} classes), "
                              f"got values {sorted(set(y.tolist()))[:8]}")
        return y if regression else y.long()

    def _run(self, seq: int, b: BoundaryOutput, labels: Optional[torch.Tensor], grad: bool
             ) -> tuple[torch.Tensor, Optional[torch.Tensor], Any]:
        """The cloud part's forward on leaf copies of the boundary tensors (they collect its gradient)."""
        h = b.hidden.detach().requires_grad_(grad)
        r = b.residual.detach().requires_grad_(grad) if b.residual is not None else None
        with part_rng(self.seed, seq, "cloud"), torch.set_grad_enabled(grad):
            crossed = BoundaryOutput(h, b.lengths, b.seq_len, r, b.pool_index)
            out = self.model(crossed) if self.u_split else self.model(crossed, labels=labels)
        return h, r, out

    def _reply_outputs(self, seq: int, out: Any) -> tuple[dict, dict]:
        """Outputs down: the U-split's pooled rows through the codec, else loss and logits raw fp32."""
        if self.u_split:
            pooled = out.detach()
            check_finite(pooled, f"micro-batch {seq}: the pooled rows")
            seed = codec_seed(self.seed, seq) + POOLED_SEED_OFFSET
            t, m = packet_to_wire(self.pooled_fwd.encode(pooled, seed), "o.pooled")
            return t, {"o": {"pooled": m}}
        tensors, names = {}, []
        for name, v in _output_tensors(out).items():
            v = v.detach()
            check_finite(v, f"micro-batch {seq}: the cloud's {name}")
            tensors["o." + name] = v.reshape(1) if v.dim() == 0 else v
            names.append([name, v.dim()])
        return tensors, {"o": names}

    def _encode_grads(self, seq: int, h: torch.Tensor, r: Optional[torch.Tensor]) -> tuple[dict, dict]:
        """The boundary gradients, checked and encoded with the backward codec."""
        if h.grad is None:
            h.grad = torch.zeros_like(h)  # the outputs did not depend on the boundary
        check_finite(h.grad, f"step {seq}: the boundary gradient")
        for name, p in self.model.named_parameters():
            if p.grad is not None:
                check_finite(p.grad, f"step {seq}: gradient of {name}")
        seed = codec_seed(self.seed, seq) + BWD_SEED_OFFSET
        rt, rm = packet_to_wire(self.bwd.encode(h.grad, seed), "g.h")
        meta: dict[str, Any] = {"h": rm}
        if r is not None:
            t2, m2 = packet_to_wire(self.bwd.encode(r.grad if r.grad is not None else torch.zeros_like(r),
                                                    seed + 1), "g.r")
            rt.update(t2)
            meta["r"] = m2
        return rt, meta

    def discard_accumulation(self) -> None:
        """Forget kept graphs and gradients accumulated since the last step (their edge is gone)."""
        self.pending.clear()
        self.last_backward = None
        self.accumulated = 0
        self._zero_grad()

    def _zero_grad(self) -> None:
        for p in self.model.parameters():
            p.grad = None

    # ---------------------------------------------------------------- handlers
    def train(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``TRAIN``: the fused step -- forward, the model's loss, backward, and the optimizer step if owned."""
        if self.u_split:
            raise StepRefused("TRAIN (the fused step) needs the loss on the cloud; a U-split session trains with "
                              "FORWARD, BACKWARD and STEP")
        b = self._boundary(tensors, meta, self.max_batch, extra=("labels",))
        labels = self._labels(tensors, b.batch_size, required=True)
        try:
            h, r, out = self._run(seq, b, labels, grad=True)
            loss = out.loss
            check_finite(loss.detach(), f"step {seq}: the loss")
            loss.backward()
            rt, rm = self._encode_grads(seq, h, r)
            rm["loss"] = float(loss.detach())
            if self.opt is not None:
                self.opt.step()
                if self.sched is not None:
                    self.sched.step()
                self.step += 1
        finally:
            if self.opt is not None:
                self._zero_grad()  # a failed step leaves no accumulated gradients behind
        return rt, rm

    def forward(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``FORWARD``: the cloud part's forward in train mode; keeps the graph for ``BACKWARD`` if ``keep``."""
        keep = bool_flag(meta, "keep", True)
        if seq in self.pending:
            return self.pending[seq][3]["tensors"], self.pending[seq][3]["meta"]  # the edge lost the reply
        while keep and len(self.pending) >= MAX_PENDING:
            del self.pending[min(self.pending)]  # a forward nobody backpropagated (or the oldest of many)
        b = self._boundary(tensors, meta, self.max_batch, extra=("labels",))
        labels = self._labels(tensors, b.batch_size, required=False)
        h, r, out = self._run(seq, b, labels, grad=keep)
        outs = _output_tensors(out)
        rt, rm = self._reply_outputs(seq, out)
        if keep:
            self.pending[seq] = (h, r, outs, {"tensors": rt, "meta": rm})
        return rt, rm

    def _output_grads(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                      outs: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        names = meta.get("g")
        if not isinstance(names, list) or not names or not all(isinstance(n, str) and n in outs for n in names):
            raise StepRefused(f"micro-batch {seq}: BACKWARD meta 'g' must list outputs of the forward "
                              f"({sorted(outs)}), got {str(names)[:200]}")
        ys, gs = [], []
        for name in names:
            y = outs[name]
            if self.u_split:
                p = packet_from_wire(tensors, meta.get("d"), "d." + name, self.pooled_bwd, y.numel())
                g = decode_packet(self.pooled_bwd, p, f"micro-batch {seq}: gradient of {name}")
            else:
                g = tensors.get("d." + name)
                if g is None or g.dtype != torch.float32 or g.numel() != y.numel():
                    raise StepRefused(f"micro-batch {seq}: gradient of {name} must be float32 with {y.numel()} "
                                      f"values, got {None if g is None else (g.dtype, tuple(g.shape))}")
                check_finite(g, f"micro-batch {seq}: gradient of {name}")
            if g.numel() != y.numel():
                raise StepRefused(f"micro-batch {seq}: gradient of {name} has {g.numel()} values, its output "
                                  f"{y.numel()}")
            ys.append(y)
            gs.append(g.reshape(y.shape).to(y.dtype))
        return ys, gs

    def backward(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``BACKWARD``: backpropagate the outputs' gradients; gradients accumulate until ``STEP``."""
        if self.last_backward is not None and self.last_backward[0] == seq and seq not in self.pending:
            return self.last_backward[1], self.last_backward[2]
        if seq not in self.pending:
            raise StepRefused(f"micro-batch {seq}: no forward waits for this backward (it ran already, ran "
                              f"without a graph, or the cloud restarted since)")
        h, r, outs, _ = self.pending[seq]
        ys, gs = self._output_grads(seq, tensors, meta, outs)
        del self.pending[seq]
        try:
            torch.autograd.backward(ys, gs)
            rt, rm = self._encode_grads(seq, h, r)
        except BaseException:
            self._zero_grad()  # never step on a half-accumulated gradient
            raise
        self.last_backward = (seq, rt, rm)
        self.accumulated += 1
        return rt, rm

    def optimizer_step(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
                       ) -> tuple[dict, dict]:
        """``STEP``: the edge's optimizer stepped; step the cloud part's with the edge's hyper-parameters."""
        if self.opt is None:
            raise StepRefused("STEP: this cloud part has no optimizer of its own")
        if seq == self.step - 1:
            return {}, {"step": self.step}  # a repeat: already applied
        if seq != self.step:
            raise StepRefused(f"STEP {seq} out of order: the cloud has applied {self.step} optimizer steps")
        hp = meta.get("hp")
        if not isinstance(hp, dict) or not set(hp) <= set(OPTIMIZER_HYPERPARAMETERS):
            raise StepRefused(f"STEP meta 'hp' must be an object with keys among {list(OPTIMIZER_HYPERPARAMETERS)}")
        for k, v in hp.items():
            ok = (isinstance(v, list) and len(v) == 2 and all(isinstance(x, (int, float)) and 0 <= x < 1 for x in v)
                  ) if k == "betas" else (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < 10)
            if not ok:
                raise StepRefused(f"STEP hyper-parameter {k} out of range: {v!r}")
        if bool_flag(meta, "skip", False):  # the edge's GradScaler skipped this step (inf/NaN): so does the cloud
            self.discard_accumulation()
            return {}, {"step": self.step}
        n, clip, unscale = meta.get("n"), meta.get("clip"), meta.get("unscale")
        if n is not None and n != self.accumulated:
            raise StepRefused(f"STEP {seq}: the edge backpropagated {n} micro-batch(es) since its last step, the cloud "
                              f"holds the gradients of {self.accumulated} (it restarted in the middle of this step?); "
                              f"not stepping on a partial gradient: resume from the last checkpoint")
        for name, v in (("clip", clip), ("unscale", unscale)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")):
                raise StepRefused(f"STEP meta '{name}' must be a positive finite number, got {v!r}")
        for group in self.opt.param_groups:
            group.update({k: tuple(v) if k == "betas" else float(v) for k, v in hp.items()})
        try:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if unscale is not None:  # the edge's GradScaler scaled the loss: unscale as it unscales the edge's
                inv = torch.tensor(unscale, dtype=torch.float32)
                for g in grads:
                    g.mul_(inv.to(g.device))
            if clip is not None:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.grad is not None], clip)
            self.opt.step()
        finally:
            self._zero_grad()
            self.accumulated = 0
        self.pending.clear()
        self.step += 1
        return {}, {"step": self.step}

    @torch.no_grad()
    def evaluate(self, seq: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> tuple[dict, dict]:
        """``EVAL``: forward only, the cloud part in eval mode; loss too when labels are sent."""
        b = self._boundary(tensors, meta, self.max_tokens, extra=("labels",))
        labels = self._labels(tensors, b.batch_size, required=False)
        was = self.model.training
        self.model.eval()
        try:
            _, _, out = self._run(seq, b, labels, grad=False)
        finally:
            self.model.train(was)
        return self._reply_outputs(seq, out)
