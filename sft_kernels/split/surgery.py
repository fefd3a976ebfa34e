"""``split_model``: cut a transformers model into an edge part and a cloud part (and, U-shaped, a top).

* ``mode="layer"``: the edge holds the embeddings and layers ``[0, at)``; it sends the
  hidden states of the real tokens.
* ``mode="bottleneck"``: the edge also holds layer ``at``'s attention and the edge factor
  ``Σ_r V_rᵀ`` of that layer's factorised FFN up-projection; it sends ``z`` (``rank``
  values per token).  The cloud holds ``U_r`` (+ the bias), the rest of that FFN and the
  layers after it.  With ``eliminate_links=True`` the residual around that FFN is dropped;
  with ``False`` the residual stream crosses too (``BoundaryOutput.residual``).

* ``init`` (bottleneck only) chooses the code:

  - ``"svd"`` (the default; the paper's): ``z = Σ_r V_rᵀ a`` from a randomized SVD of W1
    alone, the residual dropped (links eliminated).
  - ``"calibrated"``: the code is fitted to activations of the user's own unlabelled text
    (``calibration=``, see :mod:`.calibrate`), ``z = A (x − μ)`` sent by an edge Linear with
    bias, and the cloud rebuilds from ``z`` what the eliminated link would carry.  Post-LN
    (BERT family, DistilBERT): ``x`` is the FFN input ``a`` (also the residual); the cloud
    computes ``B z + b`` in place of ``W1 a + b1`` and adds ``D z + c`` where the paper drops
    ``+ a``.  Pre-LN (GPT-2, Llama-style): the dropped residual is the stream ``x`` before
    the FFN's norm, so ``x`` itself is coded: the split sits before the norm, and the cloud
    rebuilds ``x̂ = D z + c`` and runs the norm, the full FFN (W1 stays dense, on the cloud)
    and the residual on ``x̂``.  At full rank (r = d) the calibrated split is the unsplit
    model.  ``A``/bias, ``B``/``b`` and ``D``/``c`` are ordinary trainable parameters of the
    parts (``edge.factor``, ``cloud.factor`` -- None in the pre-LN form -- and
    ``cloud.decoder``); weight decay applies to them as the optimizer's parameter groups say
    (e.g. transformers' Trainer exempts the biases ``−Aμ``, ``b`` and ``c``, not the weights).
    The fit's report is ``edge.calibration`` / ``cloud.calibration`` (a
    :class:`~.calibrate.CalibrationReport`), also logged at INFO.  Refused: with
    ``mode="layer"``, and with ``eliminate_links=False`` (the residual would then cross
    exactly, so the decoder has nothing to rebuild and, pre-LN, the code would be redundant
    with the stream: use ``init="svd"``).  ``calibration`` with ``init="svd"`` is refused too
    (ignoring data the caller passed would hide a mistake).

* ``u_split=True`` (either mode, task models only): the U-shaped split, three parts
  ``(edge, cloud, top)``.  The edge is the same; the cloud runs the middle and the
  family's final per-token modules (GPT-2's ``ln_f``, Llama's norm) and returns only the
  row each sequence's head pools from, ``(batch, d)``; the :class:`TopModel`, run on the
  edge, holds the rest of the task head and the loss, so labels never leave the edge.
  Which row: decoders send ``BoundaryOutput.pool_index`` (the head's own rule evaluated on
  the edge's ``input_ids``); encoders pool position 0 ([CLS] / <s>), a rule the cloud
  applies itself, so nothing more is sent for them (``pool_index`` stays None).

The parts share parameters with ``model`` (like an in-place surgery: training the parts
trains those weights); ``model`` itself is left runnable, but a second split of it is
refused until :func:`merge` (a ``copy.deepcopy`` of it may be split).

Padding: batches must be right-padded (the tokenizers' default for encoders); only real
tokens cross and the cloud restores the padded layout, whose padding rows are zeros from
the boundary on (their outputs are not the unsplit model's; real tokens' are).

This module knows transformers models, adapters and ``ops.randomized_svd``; it must not
know channels, data loading or the runtime.
"""
from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Optional, Union, overload

import torch
from torch import nn

from .. import ops
from .adapters import Adapter, BottleneckLayer, adapter_for, base_model_of, replace_module
from .boundary_output import BoundaryOutput
from .calibrate import (CalibrationOptions, CalibrationReport, calibration_batches, check_activations, fit_code,
                        heldout_errors, sample_tokens)

__all__ = ["split_model", "merge", "EdgeModel", "CloudModel", "TopModel", "MODES", "INITS", "DEFAULT_POWER_ITERS",
           "Calibration", "UNFITTED"]

MODES = ("layer", "bottleneck")
#: How the bottleneck's code is initialised (see the module docstring).
INITS = ("svd", "calibrated")
#: What ``calibration=`` takes: tokenized batches (dicts the model takes) or strings (with ``tokenizer=``).
Calibration = Union[Iterable[Mapping[str, torch.Tensor]], Iterable[str]]
_log = logging.getLogger(__name__)


class _Unfitted:
    """The type of :data:`UNFITTED`."""

    def __repr__(self) -> str:
        return "sft_kernels.split.UNFITTED"


#: ``calibration=UNFITTED`` with ``init="calibrated"``: build the calibrated split's structure with a
#: zero code, for a side that receives its fit rather than fitting it (the cloud server, which gets the
#: decoders in the session handshake; an edge resuming from a checkpoint that holds its fit).
UNFITTED = _Unfitted()
#: Power iterations of the randomized SVD that initialises the bottleneck factors.
DEFAULT_POWER_ITERS = 16
_OVERSAMPLE = 16
#: Models whose parts are live (by identity: a deepcopy of a split model is a fresh, splittable model).
_SPLIT_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _BaseOutputStub(nn.Module):
    """Stands in for the base model inside a part's task head: returns the output that part computed."""

    def __init__(self, part: str = "cloud") -> None:
        super().__init__()
        self.part = part
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise RuntimeError(f"the split {self.part}'s task head was called outside "
                               f"{self.part.capitalize()}Model.forward")
        return self.output


def _head_of(model: nn.Module, prefix: str, part: str) -> tuple[nn.Module, _BaseOutputStub]:
    """``(task head, stub)``: a shallow copy of ``model`` sharing its head modules, its base model a stub."""
    stub = _BaseOutputStub(part)
    head = copy.copy(model)
    head._modules = dict(model._modules)
    head._modules[prefix] = stub
    return head, stub


def _run_head(head: nn.Module, stub: _BaseOutputStub, base_output: Any, labels: Optional[torch.Tensor],
              extra: dict[str, Any]) -> Any:
    """The transformers head's forward (pooling, classifier, loss) on ``base_output`` in place of its base model."""
    stub.output = base_output
    try:
        return head(labels=labels, **extra)
    finally:
        stub.output = None


def _lengths_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence lengths of a right-padded 0/1 mask; ``ValueError`` for any other layout."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be (batch, seq), got shape {tuple(attention_mask.shape)}")
    lengths = attention_mask.long().sum(1)
    want = torch.arange(attention_mask.shape[1], device=attention_mask.device)[None, :] < lengths[:, None]
    if not torch.equal(attention_mask.bool(), want):
        raise ValueError("attention_mask must be right-padded (1s then 0s in every row): left padding and holes "
                         "are not supported; tokenize with padding_side='right'")
    return lengths


def _mask_of(lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    return (torch.arange(seq_len, device=lengths.device)[None, :] < lengths.long()[:, None]).long()


def _pad(flat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Scatter ``(tokens, w)`` rows back into a zero ``(batch, seq, w)`` tensor at ``mask``."""
    out = flat.new_zeros(*mask.shape, flat.shape[-1])
    out[mask.bool()] = flat
    return out


class EdgeModel(nn.Module):
    """The edge part: ``edge(input_ids, attention_mask, ...) -> BoundaryOutput``."""

    def __init__(self, adapter: Adapter, config: Any, mods: dict[str, nn.Module], layers: list[nn.Module],
                 bottleneck: Optional[tuple[dict[str, nn.Module], nn.Linear]], eliminate_links: bool,
                 send_pool_index: bool, stream: bool = False) -> None:
        super().__init__()
        self.adapter, self.config, self.eliminate_links, self.stream = adapter, config, eliminate_links, stream
        self.send_pool_index = send_pool_index and adapter.sends_pool_index
        self.mods = nn.ModuleDict(mods)
        self.layers = nn.ModuleList(layers)
        self.attn = nn.ModuleDict(bottleneck[0]) if bottleneck else None
        self.factor = bottleneck[1] if bottleneck else None
        #: The calibrated fit's report (``init="calibrated"``), else None.
        self.calibration: Optional[CalibrationReport] = None
        #: State-dict keys of the calibrated code (``init="calibrated"``: the factor), else empty.
        self.fit_names: tuple[str, ...] = ()

    def _split_inputs(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                      inputs: dict[str, Optional[torch.Tensor]]
                      ) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
        """``(code input, residual, mask, lengths)`` on the padded batch: what the edge factor reads and the
        residual stream around the FFN (bottleneck; None for the stream form), or the hidden states (layer)."""
        bad = [k for k in inputs if k not in self.adapter.extra_inputs]
        if bad:
            raise TypeError(f"edge got unexpected inputs {bad}; accepted: input_ids, attention_mask, "
                            f"{', '.join(self.adapter.extra_inputs)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        lengths = _lengths_of(attention_mask)
        given = {k: v for k, v in inputs.items() if v is not None}
        hidden = self.adapter.embed(self.mods, input_ids, **given)
        kw = self.adapter.layer_kwargs(self.mods, self.config, hidden, attention_mask)
        for layer in self.layers:
            hidden = self.adapter.run_layer(layer, hidden, kw)
        if self.factor is None:
            return hidden, None, attention_mask, lengths
        if self.stream:
            return self.adapter.attention_output(self.attn, hidden, kw), None, attention_mask, lengths
        x, res = self.adapter.ffn_input(self.attn, hidden, kw)
        return x, res, attention_mask, lengths

    def code_input(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                   **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """``(real tokens, d)``: what the edge factor is applied to (the calibration's activations)."""
        x, _, mask, _ = self._split_inputs(input_ids, attention_mask, inputs)
        return x[mask.bool()]

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **inputs: Optional[torch.Tensor]) -> BoundaryOutput:
        """Run the edge on a right-padded batch; ``inputs``: the family's extra inputs (e.g. token_type_ids)."""
        x, res, attention_mask, lengths = self._split_inputs(input_ids, attention_mask, inputs)
        keep = attention_mask.bool()
        send = x[keep] if self.factor is None else self.factor(x[keep])
        residual = res[keep] if self.factor is not None and not self.eliminate_links else None
        pool = self.adapter.pool_index(self.config, input_ids, lengths) if self.send_pool_index else None
        if pool is not None and bool((pool.long() >= lengths).any()):
            raise ValueError(f"the task head would pool from a padding position: decoder heads pool at the last "
                             f"token that is not config.pad_token_id={self.config.pad_token_id}; right-pad with "
                             f"pad_token_id (and set config.pad_token_id for padded batches)")
        return BoundaryOutput(send, lengths.to(torch.int32), int(attention_mask.shape[1]), residual, pool)


class CloudModel(nn.Module):
    """The cloud part: ``cloud(boundary, labels=None)`` returns the model's usual output.

    In a U-split (``u_split=True``, no head) ``cloud(boundary)`` returns the ``(batch, d)``
    rows the task head pools from, for the :class:`TopModel`; labels stay on the edge.
    """

    def __init__(self, adapter: Adapter, config: Any, mods: dict[str, nn.Module], layers: list[nn.Module],
                 bottleneck: Optional[tuple[dict[str, nn.Module], Optional[nn.Linear]]], eliminate_links: bool,
                 head: Optional[nn.Module], stub: Optional[_BaseOutputStub], u_split: bool = False,
                 decoder: Optional[nn.Linear] = None, stream: bool = False) -> None:
        super().__init__()
        self.adapter, self.config, self.eliminate_links, self.u_split = adapter, config, eliminate_links, u_split
        self.stream = stream
        self.mods = nn.ModuleDict(mods)
        self.layers = nn.ModuleList(layers)
        self.ffn = nn.ModuleDict(bottleneck[0]) if bottleneck else None
        self.factor = bottleneck[1] if bottleneck else None
        #: ``D z + c``: the calibrated bottleneck's rebuild of the residual (post-LN) or stream (pre-LN).
        self.decoder = decoder
        self.head = head
        self._stub = stub
        #: The calibrated fit's report (``init="calibrated"``), else None.
        self.calibration: Optional[CalibrationReport] = None
        #: State-dict keys of the calibrated decoders (``init="calibrated"``: the decoder and, post-LN, the
        #: factor), else empty: what the edge sends the cloud once per run.
        self.fit_names: tuple[str, ...] = ()

    @property
    def width(self) -> int:
        """Values per token of ``BoundaryOutput.hidden``."""
        first = self.factor if self.factor is not None else self.decoder
        return first.in_features if first is not None else self.config.hidden_size

    @property
    def residual_width(self) -> Optional[int]:
        """Values per token of ``BoundaryOutput.residual`` when the split keeps the link, else None."""
        return self.config.hidden_size if self.ffn is not None and not self.eliminate_links else None

    @property
    def takes_pool_index(self) -> bool:
        """Whether this part pools from ``BoundaryOutput.pool_index`` (decoders: their heads, a U-split's rows)."""
        return bool(self.adapter.sends_pool_index and (self.head is not None or self.u_split))

    def _check(self, b: BoundaryOutput) -> None:
        if not isinstance(b, BoundaryOutput):
            raise TypeError(f"cloud expects a BoundaryOutput, got {type(b).__name__}")
        dtype = next(self.parameters()).dtype
        if b.lengths.dim() != 1 or b.lengths.dtype.is_floating_point:
            raise ValueError(f"boundary lengths: expected a 1-D integer tensor, arrived {b.lengths.dtype} "
                             f"shape {tuple(b.lengths.shape)}")
        n = int(b.lengths.sum())
        checks = [("hidden", b.hidden, self.width)]
        if self.residual_width is not None:
            if b.residual is None:
                raise ValueError("boundary residual: expected the residual stream (eliminate_links=False), "
                                 "arrived None")
            checks.append(("residual", b.residual, self.config.hidden_size))
        elif b.residual is not None:
            raise ValueError("boundary residual: expected none (links eliminated or layer split), arrived a tensor")
        for name, t, w in checks:
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, w) or t.dtype != dtype:
                t = t if isinstance(t, torch.Tensor) else torch.empty(0)
                raise ValueError(f"boundary {name}: expected shape ({n}, {w}) {dtype} (sum(lengths)={n} tokens "
                                 f"x {w}), arrived {tuple(t.shape)} {t.dtype}")
        if self.takes_pool_index and (
                b.pool_index is None or tuple(b.pool_index.shape) != tuple(b.lengths.shape)):
            got = None if b.pool_index is None else tuple(b.pool_index.shape)
            raise ValueError(f"boundary pool_index: expected shape {tuple(b.lengths.shape)} (one per sequence), "
                             f"arrived {got}")
        if b.lengths.numel() and (int(b.lengths.max()) > b.seq_len or int(b.lengths.min()) < 0):
            raise ValueError(f"boundary lengths: expected in [0, seq_len={b.seq_len}], arrived "
                             f"{b.lengths.tolist()}")
        if self.u_split and not self.takes_pool_index and b.pool_index is not None:
            raise ValueError("boundary pool_index: expected none (an encoder pools position 0, [CLS], a rule the "
                             "cloud applies itself), arrived a tensor")
        if (self.head is not None or self.u_split) and b.pool_index is not None and bool(
                ((b.pool_index < 0) | (b.pool_index.long() >= b.lengths.long())).any()):
            raise ValueError(f"boundary pool_index: expected positions of real tokens (0 <= pool_index < lengths="
                             f"{b.lengths.tolist()}), arrived {b.pool_index.tolist()}")

    def forward(self, boundary: BoundaryOutput, labels: Optional[torch.Tensor] = None) -> Any:
        """Finish the forward from ``boundary``; the loss is computed when ``labels`` is given.

        A U-split's cloud returns the ``(batch, d)`` pooled rows instead and takes no labels.
        """
        self._check(boundary)
        if labels is not None and self.u_split:
            raise ValueError("labels given to the cloud of a u_split=True split: labels stay on the edge; pass them "
                             "to top(cloud(boundary), labels)")
        if labels is not None and self.head is None:
            raise ValueError("labels given, but the split model is a base model without a task head")
        mask = _mask_of(boundary.lengths, boundary.seq_len)
        flat = boundary.hidden
        if self.stream:
            flat = self.adapter.stream_output(self.ffn, self.decoder(flat))
        elif self.factor is not None:
            residual = boundary.residual
            if self.eliminate_links and self.decoder is not None:
                residual = self.decoder(flat)
            flat = self.adapter.ffn_output(self.ffn, self.factor(flat), residual)
        hidden = _pad(flat, mask)
        kw = self.adapter.layer_kwargs(self.mods, self.config, hidden, mask)
        for layer in self.layers:
            hidden = self.adapter.run_layer(layer, hidden, kw)
        out = self.adapter.finish(self.mods, hidden)
        if self.u_split:
            return self.adapter.pool_rows(out.last_hidden_state, boundary.pool_index)
        if self.head is None:
            return out
        extra = self.adapter.head_inputs(self.config, boundary.pool_index, boundary.seq_len)
        return _run_head(self.head, self._stub, out, labels, extra)


class TopModel(nn.Module):
    """The top of a U-split, run on the edge after the cloud: ``top(pooled, labels=None)`` -> the model's output.

    ``pooled`` is what the U-split's cloud returns: ``(batch, d)``, the row of each sequence
    that the task head pools from.  The top holds the rest of the task head and computes the
    loss, so labels never leave the edge.  The head is the model's own transformers module
    (its forward, with the base model replaced by a stand-in), so pooling, dropout and the loss
    (``problem_type`` regression / single-label / multi-label) are transformers' logic:

    * BERT / RoBERTa: BERT's pooler (dense + tanh on [CLS]) sits here, on the top -- the
      natural place, since it acts on the pooled row only; then dropout and the classifier
      (RoBERTa's classification head takes the row directly).
    * DistilBERT: pre_classifier, ReLU, dropout, classifier.
    * GPT-2 / Llama-style: the score layer on the pooled row (its ``ln_f`` / final norm ran
      per token on the cloud, before the row was picked).
    """

    def __init__(self, adapter: Adapter, config: Any, mods: dict[str, nn.Module], head: nn.Module,
                 stub: _BaseOutputStub) -> None:
        super().__init__()
        self.adapter, self.config = adapter, config
        self.mods = nn.ModuleDict(mods)
        self.head = head
        self._stub = stub

    @property
    def width(self) -> int:
        """Values per sequence of ``pooled`` (the model's hidden size)."""
        return self.config.hidden_size

    def _check(self, pooled: Any) -> None:
        dtype = next(self.parameters()).dtype
        want = f"the cloud's pooled rows, a (batch, {self.width}) {dtype} tensor (one row per sequence)"
        if isinstance(pooled, BoundaryOutput):
            raise TypeError(f"top expects {want}, got the edge's BoundaryOutput: run cloud(boundary) first")
        if not isinstance(pooled, torch.Tensor):
            raise TypeError(f"top expects {want}, got {type(pooled).__name__}")
        if pooled.dim() != 2 or pooled.shape[1] != self.width or pooled.dtype != dtype:
            raise ValueError(f"top expects {want}, got shape {tuple(pooled.shape)} {pooled.dtype}")

    def forward(self, pooled: torch.Tensor, labels: Optional[torch.Tensor] = None) -> Any:
        """The task head's output (e.g. ``SequenceClassifierOutput``) from ``pooled``; with the loss if ``labels``."""
        self._check(pooled)
        rows = pooled[:, None, :]  # one-token sequences: each head pools its position 0
        first = torch.zeros(rows.shape[0], dtype=torch.int32, device=rows.device)
        extra = self.adapter.head_inputs(self.config, first, 1)
        return _run_head(self.head, self._stub, self.adapter.head_output(self.mods, rows), labels, extra)


def _factors(weight: torch.Tensor, bias: Optional[torch.Tensor], rank: int, seed: int,
             power_iters: int) -> tuple[nn.Linear, nn.Linear]:
    """``(edge Linear d->rank with Σ_r V_rᵀ, cloud Linear rank->rows with U_r and the bias)``."""
    rows, d = weight.shape
    w = weight.detach().float()
    u, s, v = ops.randomized_svd(w, rank, _OVERSAMPLE, power_iters, seed)
    # skip_init: the factors overwrite every weight, so draw nothing from the global RNG
    edge = nn.utils.skip_init(nn.Linear, d, rank, bias=False, device=weight.device, dtype=weight.dtype)
    cloud = nn.utils.skip_init(nn.Linear, rank, rows, bias=bias is not None, device=weight.device,
                               dtype=weight.dtype)
    with torch.no_grad():
        edge.weight.copy_(s[:, None] * v.t())
        cloud.weight.copy_(u)
        if bias is not None:
            cloud.bias.copy_(bias.detach())
    return edge, cloud


def _linear(d_in: int, d_out: int, like: torch.Tensor) -> nn.Linear:
    """A Linear with a bias, zero-filled (the calibration overwrites it; draws nothing from the global RNG)."""
    lin = nn.utils.skip_init(nn.Linear, d_in, d_out, bias=True, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    return lin


def _check_init(init: str, mode: str, eliminate_links: bool, calibration: Any, tokenizer: Any,
                options: Optional[CalibrationOptions]) -> Optional[CalibrationOptions]:
    """The calibration options to use (None for ``init="svd"``); ``ValueError`` naming the bad argument."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if init == "svd":
        for name, value in (("calibration", calibration), ("tokenizer", tokenizer),
                            ("calibration_options", options)):
            if value is not None:
                raise ValueError(f"{name} applies to init='calibrated' only (init='svd' fits nothing to data); "
                                 f"pass init='calibrated' or drop {name}")
        return None
    if mode != "bottleneck":
        raise ValueError(f"init='calibrated' applies to mode='bottleneck' only, got mode={mode!r}: a layer split "
                         f"sends the hidden states whole and has no code to calibrate")
    if not eliminate_links:
        raise ValueError("init='calibrated' needs eliminate_links=True: it rebuilds on the cloud the residual the "
                         "eliminated link would carry; with eliminate_links=False the residual crosses exactly, so "
                         "there is nothing to rebuild -- use init='svd'")
    if calibration is UNFITTED:
        if tokenizer is not None:
            raise ValueError("tokenizer applies to string calibration; calibration=UNFITTED fits nothing")
        return options if options is not None else CalibrationOptions()
    if calibration is None:
        raise ValueError("init='calibrated' needs calibration=: an iterable of tokenized batches, or a list of "
                         "strings with tokenizer=")
    if isinstance(calibration, (str, bytes, Mapping)) or not isinstance(calibration, Iterable):
        raise ValueError(f"calibration must be an iterable of tokenized batches (dicts) or of strings, got "
                         f"{type(calibration).__name__}")
    if options is None:
        return CalibrationOptions()
    if not isinstance(options, CalibrationOptions):
        raise ValueError(f"calibration_options must be a CalibrationOptions, got {type(options).__name__}")
    return options


def _calibrate(edge: EdgeModel, cloud: CloudModel, layer: nn.Module, calibration: Calibration, tokenizer: Any,
               options: CalibrationOptions, rank: int, seed: int,
               svd: Optional[tuple[nn.Linear, nn.Linear]]) -> CalibrationReport:
    """Run the edge on ``calibration``, fit the code and fill the parts' factors; returns the fit's report."""
    from tqdm import tqdm

    adapter = edge.adapter
    modes = {m: m.training for m in (*edge.modules(), *layer.modules())}
    edge.eval(), layer.eval()
    try:
        batches = calibration_batches(calibration, tokenizer, ("input_ids", "attention_mask", *adapter.extra_inputs),
                                      options)
        with torch.no_grad():
            bar = tqdm(batches, desc="calibration", unit="batch", disable=not options.progress, leave=False)
            chunks = [edge.code_input(**batch) for batch in bar]
            x = torch.cat(chunks) if chunks else torch.zeros(0)
            if x.shape[0] < 2:
                raise ValueError(f"calibration is empty: it gave {x.shape[0]} real tokens; pass at least a few "
                                 f"hundred tokens of the edge's unlabelled text")
            check_activations(x)
            fit_rows, held = sample_tokens(x.shape[0], options.max_tokens, options.heldout, seed)
            ffn_in = adapter.ffn_norm(layer)(x) if adapter.pre_norm else x
        weight, bias = adapter.factorised_weight(layer)
        ffn_mods = adapter.split_layer(layer)[1]
        code = fit_code(x[fit_rows], ffn_in[fit_rows], weight, bias, rank, options.fit, pre_norm=adapter.pre_norm,
                        null_dims=0 if adapter.pre_norm else 1,
                        svd_factors=None if svd is None else (svd[0].weight, svd[1].weight),
                        layer_out=lambda pre, res: adapter.ffn_output(ffn_mods, pre, res), seed=seed)
        errors = heldout_errors(code, x[held], ffn_in[held], weight, bias, pre_norm=adapter.pre_norm)
    finally:
        for m, training in modes.items():
            m.train(training)
    with torch.no_grad():
        edge.factor.weight.copy_(code.A)
        edge.factor.bias.copy_(-(code.A @ code.mu))
        if cloud.factor is not None:
            cloud.factor.weight.copy_(code.B)
            cloud.factor.bias.copy_(code.b)
        cloud.decoder.weight.copy_(code.D)
        cloud.decoder.bias.copy_(code.c)
    return CalibrationReport(options.fit, rank, "stream" if edge.stream else "ffn_input", len(fit_rows), len(held),
                             errors)


@overload
def split_model(model: nn.Module, at: int, mode: str = ..., rank: Optional[int] = ..., eliminate_links: bool = ...,
                seed: int = ..., power_iters: int = ..., *, u_split: Literal[False] = ..., init: str = ...,
                calibration: Optional[Calibration] = ..., tokenizer: Any = ...,
                calibration_options: Optional[CalibrationOptions] = ...) -> tuple[EdgeModel, CloudModel]: ...


@overload
def split_model(model: nn.Module, at: int, mode: str = ..., rank: Optional[int] = ..., eliminate_links: bool = ...,
                seed: int = ..., power_iters: int = ..., *, u_split: Literal[True], init: str = ...,
                calibration: Optional[Calibration] = ..., tokenizer: Any = ...,
                calibration_options: Optional[CalibrationOptions] = ...) -> tuple[EdgeModel, CloudModel, TopModel]: ...


@overload
def split_model(model: nn.Module, at: int, mode: str = ..., rank: Optional[int] = ..., eliminate_links: bool = ...,
                seed: int = ..., power_iters: int = ..., *, u_split: bool, init: str = ...,
                calibration: Optional[Calibration] = ..., tokenizer: Any = ...,
                calibration_options: Optional[CalibrationOptions] = ...
                ) -> Union[tuple[EdgeModel, CloudModel], tuple[EdgeModel, CloudModel, TopModel]]: ...


def split_model(model: nn.Module, at: int, mode: str = "layer", rank: Optional[int] = None,
                eliminate_links: bool = True, seed: int = 0, power_iters: int = DEFAULT_POWER_ITERS, *,
                u_split: bool = False, init: str = "svd", calibration: Optional[Calibration] = None,
                tokenizer: Any = None, calibration_options: Optional[CalibrationOptions] = None,
                ) -> Union[tuple[EdgeModel, CloudModel], tuple[EdgeModel, CloudModel, TopModel]]:
    """Split ``model`` (a base model or a ``*ForSequenceClassification``) at layer ``at``.

    Args:
        model: a transformers model of a supported family (see ``adapters.ADAPTERS``).
        at: K; ``1 <= at < num_layers``.
        mode: ``"layer"`` or ``"bottleneck"``.
        rank: bottleneck rank, ``1 <= rank <= min(d, rows of the factorised matrix)``; bottleneck only.
        eliminate_links: drop the residual around the bottleneck FFN (else it crosses too).
        seed: seeds the randomized SVD and the calibration's token sample, so a split is deterministic.
        power_iters: power iterations of that SVD.
        u_split: the U-shaped split (task models only): three parts, the head and the loss on the edge.
        init: ``"svd"`` (the paper's code) or ``"calibrated"`` (fitted to ``calibration``; bottleneck
            with ``eliminate_links=True`` only); see the module docstring.
        calibration: ``init="calibrated"`` only: an iterable of tokenized batches (dicts of what the
            edge takes; other keys, e.g. labels, are ignored) or of strings (with ``tokenizer``).  The
            edge runs on all of it in eval mode without gradients (a tqdm bar); at most
            ``calibration_options.max_tokens`` real tokens, a sample fixed by ``seed``, are kept.
            :data:`UNFITTED` builds the structure with a zero code, to be loaded (``fit_names``).
        tokenizer: tokenizes string calibration (right padding, truncation).
        calibration_options: a :class:`~.calibrate.CalibrationOptions` (fit method, sample size...).

    Returns ``(edge, cloud)``: ``cloud(edge(**batch), labels)`` is the model's forward.  With
    ``u_split=True``, ``(edge, cloud, top)``: ``top(cloud(edge(**batch)), labels)`` is the model's
    forward; the cloud returns the ``(batch, d)`` rows the head pools from (see :class:`TopModel`).
    """
    if not isinstance(u_split, bool):
        raise ValueError(f"u_split must be a bool (True: edge, cloud and top; False: edge and cloud), got {u_split!r}")
    if isinstance(model, (EdgeModel, CloudModel, TopModel)) or model in _SPLIT_MODELS:
        raise ValueError("model is already split: split_model shares its weights with the parts; merge(edge, cloud) "
                         "first, or split a copy.deepcopy of the original")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    options = _check_init(init, mode, eliminate_links, calibration, tokenizer, calibration_options)
    base, prefix = base_model_of(model)
    adapter = adapter_for(base)
    if u_split and not prefix:
        raise ValueError(f"u_split=True needs a model with a task head (e.g. a *ForSequenceClassification): the top "
                         f"runs the head and the loss, and a {type(model).__name__} has none; split it with "
                         f"u_split=False")
    layers = list(adapter.layers(base))
    n = len(layers)
    if any(isinstance(layer, BottleneckLayer) for layer in layers):
        raise ValueError("model is a merged bottleneck model (its layer K is a BottleneckLayer): it cannot be split "
                         "again; evaluate or fine-tune it whole, or split the original model")
    if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < n:
        raise ValueError(f"at must be an int in [1, {n - 1}] (1 <= at < num_layers={n}), got {at!r}")
    bottleneck_edge = bottleneck_cloud = decoder = None
    stream = False
    if mode == "bottleneck":
        weight, bias = adapter.factorised_weight(layers[at])
        limit = min(weight.shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(f"rank must be an int in [1, {limit}] (min(d, rows) of the {tuple(weight.shape)} "
                             f"factorised weight), got {rank!r}")
        stream = options is not None and adapter.pre_norm
        e_mods, c_mods = adapter.split_layer_stream(layers[at]) if stream else adapter.split_layer(layers[at])
        if options is None:
            e_fac, c_fac = _factors(weight, bias, rank, seed, power_iters)
        else:  # filled by _calibrate below
            e_fac = _linear(weight.shape[1], rank, weight)
            c_fac = None if stream else _linear(rank, weight.shape[0], weight)
            decoder = _linear(rank, weight.shape[1], weight)
        bottleneck_edge, bottleneck_cloud = (e_mods, e_fac), (c_mods, c_fac)
        cloud_layers = layers[at + 1:]
    else:
        if rank is not None:
            raise ValueError(f"rank applies to mode='bottleneck' only, got rank={rank!r} with mode='layer'")
        cloud_layers = layers[at:]
    edge = EdgeModel(adapter, base.config, adapter.edge_modules(base), layers[:at], bottleneck_edge, eliminate_links,
                     send_pool_index=bool(prefix), stream=stream)
    top = None
    if u_split:
        top_mods = adapter.top_modules(base)
        cloud_mods = {k: m for k, m in adapter.cloud_modules(base).items() if k not in top_mods}
        cloud = CloudModel(adapter, base.config, cloud_mods, cloud_layers, bottleneck_cloud, eliminate_links,
                           None, None, u_split=True, decoder=decoder, stream=stream)
        top = TopModel(adapter, base.config, top_mods, *_head_of(model, prefix, "top"))
    else:
        head, stub = _head_of(model, prefix, "cloud") if prefix else (None, None)
        cloud = CloudModel(adapter, base.config, adapter.cloud_modules(base), cloud_layers, bottleneck_cloud,
                           eliminate_links, head, stub, decoder=decoder, stream=stream)
    if options is not None:
        edge.fit_names = ("factor.weight", "factor.bias")
        cloud.fit_names = ("decoder.weight", "decoder.bias") + (() if stream else ("factor.weight", "factor.bias"))
    if options is not None and calibration is not UNFITTED:
        svd = _factors(weight, bias, rank, seed, power_iters) if options.fit == "svd" else None
        report = _calibrate(edge, cloud, layers[at], calibration, tokenizer, options, rank, seed, svd)
        edge.calibration = cloud.calibration = report
        _log.info("%s", report)
    _SPLIT_MODELS.add(model)
    origin = _Origin(model, at, mode, eliminate_links, u_split)
    edge._origin = cloud._origin = origin  # plain attribute: not a submodule, adds no parameters
    if top is None:
        return edge, cloud
    top._origin = origin
    return edge, cloud, top


class _Origin:
    """Where the parts of one split came from (held outside the module tree so its parameters are not counted twice)."""

    def __init__(self, model: nn.Module, at: int, mode: str, eliminate_links: bool, u_split: bool) -> None:
        self.model, self.at, self.mode, self.eliminate_links, self.u_split = model, at, mode, eliminate_links, u_split


def merge(edge: EdgeModel, cloud: CloudModel, top: Optional[TopModel] = None) -> nn.Module:
    """One module with the parts' (trained) weights; the parts must come from one ``split_model`` call.

    ``top``: the third part of a ``u_split=True`` split (required then, refused otherwise); the
    merge is the same as for the two-part split of the same model, and its forward gives the
    U-split's outputs (``top(cloud(edge(**batch)), labels)``).

    * Layer split: the parts share their weights with the model they were split from, so the
      merge is that model -- its original transformers class (``save_pretrained`` works), and
      it may be split again.
    * Bottleneck split (``eliminate_links`` True or False): that model with layer K replaced
      by a :class:`~.adapters.BottleneckLayer` holding layer K's modules and the two trained
      factors (and no residual around the FFN when the links were eliminated; a calibrated
      split's decoder and, pre-LN, its stream form: see the class).  Its forward is
      the usual transformers forward and gives the split pair's outputs; save and load it with
      :func:`~.export.save_split_model` / :func:`~.export.load_split_model`.

    The returned module shares its parameters with the parts.
    """
    origin = getattr(edge, "_origin", None)
    if not isinstance(edge, EdgeModel) or not isinstance(cloud, CloudModel) or origin is None \
            or origin is not getattr(cloud, "_origin", None):
        raise ValueError("merge needs the (edge, cloud) pair returned by one split_model call")
    if origin.u_split and (not isinstance(top, TopModel) or getattr(top, "_origin", None) is not origin):
        raise ValueError("merge needs all three parts of a u_split=True split: merge(edge, cloud, top) with the top "
                         "returned by the same split_model call")
    if not origin.u_split and top is not None:
        raise ValueError("merge got a top, but these parts come from a split_model call with u_split=False, which "
                         "has no top: merge(edge, cloud)")
    if origin.mode == "bottleneck":
        base, _ = base_model_of(origin.model)
        layer = edge.adapter.layers(base)[origin.at]
        if not isinstance(layer, BottleneckLayer):  # a second merge of the same pair returns the same model
            new = edge.adapter.install_bottleneck(layer, edge.factor, cloud.factor, not origin.eliminate_links,
                                                  decoder=cloud.decoder, stream=cloud.stream)
            replace_module(base, layer, new)
    _SPLIT_MODELS.discard(origin.model)
    return origin.model
