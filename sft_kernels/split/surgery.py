"""``split_model``: cut a transformers model into an edge part and a cloud part.

* ``mode="layer"``: the edge holds the embeddings and layers ``[0, at)``; it sends the
  hidden states of the real tokens.
* ``mode="bottleneck"``: the edge also holds layer ``at``'s attention and the edge factor
  ``Σ_r V_rᵀ`` of that layer's factorised FFN up-projection; it sends ``z`` (``rank``
  values per token).  The cloud holds ``U_r`` (+ the bias), the rest of that FFN and the
  layers after it.  With ``eliminate_links=True`` the residual around that FFN is dropped;
  with ``False`` the residual stream crosses too (``BoundaryOutput.residual``).

Both parts share parameters with ``model`` (like an in-place surgery: training the parts
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
import weakref
from typing import Any, Optional

import torch
from torch import nn

from .. import ops
from .adapters import Adapter, BottleneckLayer, adapter_for, base_model_of, replace_module
from .boundary_output import BoundaryOutput

__all__ = ["split_model", "merge", "EdgeModel", "CloudModel", "MODES", "DEFAULT_POWER_ITERS"]

MODES = ("layer", "bottleneck")
#: Power iterations of the randomized SVD that initialises the bottleneck factors.
DEFAULT_POWER_ITERS = 16
_OVERSAMPLE = 16
#: Models whose parts are live (by identity: a deepcopy of a split model is a fresh, splittable model).
_SPLIT_MODELS: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class _BaseOutputStub(nn.Module):
    """Stands in for the base model inside the cloud's task head: returns the output the cloud computed."""

    def __init__(self) -> None:
        super().__init__()
        self.output: Any = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.output is None:
            raise RuntimeError("the split cloud's task head was called outside CloudModel.forward")
        return self.output


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
                 send_pool_index: bool) -> None:
        super().__init__()
        self.adapter, self.config, self.eliminate_links = adapter, config, eliminate_links
        self.send_pool_index = send_pool_index and adapter.sends_pool_index
        self.mods = nn.ModuleDict(mods)
        self.layers = nn.ModuleList(layers)
        self.attn = nn.ModuleDict(bottleneck[0]) if bottleneck else None
        self.factor = bottleneck[1] if bottleneck else None

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **inputs: Optional[torch.Tensor]) -> BoundaryOutput:
        """Run the edge on a right-padded batch; ``inputs``: the family's extra inputs (e.g. token_type_ids)."""
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
        keep = attention_mask.bool()
        residual = None
        if self.factor is not None:
            x, res = self.adapter.ffn_input(self.attn, hidden, kw)
            send = self.factor(x[keep])
            if not self.eliminate_links:
                residual = res[keep]
        else:
            send = hidden[keep]
        pool = self.adapter.pool_index(self.config, input_ids, lengths) if self.send_pool_index else None
        if pool is not None and bool((pool.long() >= lengths).any()):
            raise ValueError(f"the task head would pool from a padding position: decoder heads pool at the last "
                             f"token that is not config.pad_token_id={self.config.pad_token_id}; right-pad with "
                             f"pad_token_id (and set config.pad_token_id for padded batches)")
        return BoundaryOutput(send, lengths.to(torch.int32), int(attention_mask.shape[1]), residual, pool)


class CloudModel(nn.Module):
    """The cloud part: ``cloud(boundary, labels=None)`` returns the model's usual output."""

    def __init__(self, adapter: Adapter, config: Any, mods: dict[str, nn.Module], layers: list[nn.Module],
                 bottleneck: Optional[tuple[dict[str, nn.Module], nn.Linear]], eliminate_links: bool,
                 head: Optional[nn.Module], stub: Optional[_BaseOutputStub]) -> None:
        super().__init__()
        self.adapter, self.config, self.eliminate_links = adapter, config, eliminate_links
        self.mods = nn.ModuleDict(mods)
        self.layers = nn.ModuleList(layers)
        self.ffn = nn.ModuleDict(bottleneck[0]) if bottleneck else None
        self.factor = bottleneck[1] if bottleneck else None
        self.head = head
        self._stub = stub

    @property
    def width(self) -> int:
        """Values per token of ``BoundaryOutput.hidden``."""
        return self.factor.in_features if self.factor is not None else self.config.hidden_size

    @property
    def residual_width(self) -> Optional[int]:
        """Values per token of ``BoundaryOutput.residual`` when the split keeps the link, else None."""
        return self.config.hidden_size if self.factor is not None and not self.eliminate_links else None

    @property
    def takes_pool_index(self) -> bool:
        """Whether this part's head pools from ``BoundaryOutput.pool_index`` (decoder classification heads)."""
        return bool(self.adapter.sends_pool_index and self.head is not None)

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
        if self.head is not None and b.pool_index is not None and bool(
                ((b.pool_index < 0) | (b.pool_index.long() >= b.lengths.long())).any()):
            raise ValueError(f"boundary pool_index: expected positions of real tokens (0 <= pool_index < lengths="
                             f"{b.lengths.tolist()}), arrived {b.pool_index.tolist()}")

    def forward(self, boundary: BoundaryOutput, labels: Optional[torch.Tensor] = None) -> Any:
        """Finish the forward from ``boundary``; the loss is computed when ``labels`` is given."""
        self._check(boundary)
        if labels is not None and self.head is None:
            raise ValueError("labels given, but the split model is a base model without a task head")
        mask = _mask_of(boundary.lengths, boundary.seq_len)
        flat = boundary.hidden
        if self.factor is not None:
            flat = self.adapter.ffn_output(self.ffn, self.factor(flat), boundary.residual)
        hidden = _pad(flat, mask)
        kw = self.adapter.layer_kwargs(self.mods, self.config, hidden, mask)
        for layer in self.layers:
            hidden = self.adapter.run_layer(layer, hidden, kw)
        out = self.adapter.finish(self.mods, hidden)
        if self.head is None:
            return out
        self._stub.output = out
        try:
            extra = self.adapter.head_inputs(self.config, boundary.pool_index, boundary.seq_len)
            return self.head(labels=labels, **extra)
        finally:
            self._stub.output = None


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


def split_model(model: nn.Module, at: int, mode: str = "layer", rank: Optional[int] = None,
                eliminate_links: bool = True, seed: int = 0,
                power_iters: int = DEFAULT_POWER_ITERS) -> tuple[EdgeModel, CloudModel]:
    """Split ``model`` (a base model or a ``*ForSequenceClassification``) at layer ``at``.

    Args:
        model: a transformers model of a supported family (see ``adapters.ADAPTERS``).
        at: K; ``1 <= at < num_layers``.
        mode: ``"layer"`` or ``"bottleneck"``.
        rank: bottleneck rank, ``1 <= rank <= min(d, rows of the factorised matrix)``; bottleneck only.
        eliminate_links: drop the residual around the bottleneck FFN (else it crosses too).
        seed: seeds the randomized SVD, so a split is deterministic.
        power_iters: power iterations of that SVD.

    Returns ``(edge, cloud)``: ``cloud(edge(**batch), labels)`` is the model's forward.
    """
    if isinstance(model, (EdgeModel, CloudModel)) or model in _SPLIT_MODELS:
        raise ValueError("model is already split: split_model shares its weights with the parts; merge(edge, cloud) "
                         "first, or split a copy.deepcopy of the original")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    base, prefix = base_model_of(model)
    adapter = adapter_for(base)
    layers = list(adapter.layers(base))
    n = len(layers)
    if any(isinstance(layer, BottleneckLayer) for layer in layers):
        raise ValueError("model is a merged bottleneck model (its layer K is a BottleneckLayer): it cannot be split "
                         "again; evaluate or fine-tune it whole, or split the original model")
    if isinstance(at, bool) or not isinstance(at, int) or not 1 <= at < n:
        raise ValueError(f"at must be an int in [1, {n - 1}] (1 <= at < num_layers={n}), got {at!r}")
    bottleneck_edge = bottleneck_cloud = None
    if mode == "bottleneck":
        weight, bias = adapter.factorised_weight(layers[at])
        limit = min(weight.shape)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
            raise ValueError(f"rank must be an int in [1, {limit}] (min(d, rows) of the {tuple(weight.shape)} "
                             f"factorised weight), got {rank!r}")
        e_mods, c_mods = adapter.split_layer(layers[at])
        e_fac, c_fac = _factors(weight, bias, rank, seed, power_iters)
        bottleneck_edge, bottleneck_cloud = (e_mods, e_fac), (c_mods, c_fac)
        cloud_layers = layers[at + 1:]
    else:
        if rank is not None:
            raise ValueError(f"rank applies to mode='bottleneck' only, got rank={rank!r} with mode='layer'")
        cloud_layers = layers[at:]
    head = stub = None
    if prefix:
        stub = _BaseOutputStub()
        head = copy.copy(model)
        head._modules = dict(model._modules)
        head._modules[prefix] = stub
    edge = EdgeModel(adapter, base.config, adapter.edge_modules(base), layers[:at], bottleneck_edge, eliminate_links,
                     send_pool_index=head is not None)
    cloud = CloudModel(adapter, base.config, adapter.cloud_modules(base), cloud_layers, bottleneck_cloud,
                       eliminate_links, head, stub)
    _SPLIT_MODELS.add(model)
    origin = _Origin(model, at, mode, eliminate_links)
    edge._origin = cloud._origin = origin  # plain attribute: not a submodule, adds no parameters
    return edge, cloud


class _Origin:
    """Where a pair of parts came from (held outside the module tree so its parameters are not counted twice)."""

    def __init__(self, model: nn.Module, at: int, mode: str, eliminate_links: bool) -> None:
        self.model, self.at, self.mode, self.eliminate_links = model, at, mode, eliminate_links


def merge(edge: EdgeModel, cloud: CloudModel) -> nn.Module:
    """One module with the parts' (trained) weights; the parts must come from one ``split_model`` call.

    * Layer split: the parts share their weights with the model they were split from, so the
      merge is that model -- its original transformers class (``save_pretrained`` works), and
      it may be split again.
    * Bottleneck split (``eliminate_links`` True or False): that model with layer K replaced
      by a :class:`~.adapters.BottleneckLayer` holding layer K's modules and the two trained
      factors (and no residual around the FFN when the links were eliminated).  Its forward is
      the usual transformers forward and gives the split pair's outputs; save and load it with
      :func:`~.export.save_split_model` / :func:`~.export.load_split_model`.

    The returned module shares its parameters with the parts.
    """
    origin = getattr(edge, "_origin", None)
    if not isinstance(edge, EdgeModel) or not isinstance(cloud, CloudModel) or origin is None \
            or origin is not getattr(cloud, "_origin", None):
        raise ValueError("merge needs the (edge, cloud) pair returned by one split_model call")
    if origin.mode == "bottleneck":
        base, _ = base_model_of(origin.model)
        layer = edge.adapter.layers(base)[origin.at]
        if not isinstance(layer, BottleneckLayer):  # a second merge of the same pair returns the same model
            new = edge.adapter.install_bottleneck(layer, edge.factor, cloud.factor, not origin.eliminate_links)
            replace_module(base, layer, new)
    _SPLIT_MODELS.discard(origin.model)
    return origin.model
