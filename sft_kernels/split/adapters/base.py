"""The interface one model family implements to be split: :class:`Adapter`.

An adapter wraps the transformers modules of one family (it never re-implements
them): it says where the embeddings, the layer stack and the final modules live,
how to rebuild what the base model's ``forward`` builds before the layers (the
attention mask, rotary position embeddings) from a right-padded 0/1 mask, and,
for the bottleneck split, how layer K's FFN is cut around its up-projection.  Pre-LN
families (``pre_norm = True``) also say how layer K is cut *before* the FFN's norm, for the
calibrated bottleneck, which codes the residual stream itself (see :mod:`..calibrate`).

To add a family: subclass :class:`Adapter` in a new file of this package and add
an instance to ``ADAPTERS`` in ``adapters/__init__.py``.

This module knows transformers modules, not codecs, channels or training loops.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

import torch
from torch import nn

__all__ = ["Adapter", "BottleneckLayer", "LayerKwargs"]

#: Keyword arguments every layer of a stack is called with (masks, rotary embeddings...).
LayerKwargs = dict[str, Any]


class BottleneckLayer(nn.Module):
    """Layer K of a merged bottleneck model: the split's edge and cloud halves of the layer, run in one place.

    It replaces the transformers layer in the model's layer stack and is called as that layer
    was (same arguments, returns the hidden states), computing exactly what the split pair
    computes, so a merged model gives the split pair's outputs.  Two forms:

    * the FFN form (``init="svd"``, and ``"calibrated"`` for post-LN families):
      ``x, residual = ffn_input(hidden)``, ``z = edge_factor(x)``, output
      ``ffn_output(cloud_factor(z), r)`` with ``r`` the residual (``keep_link=True``), the
      decoder's rebuild ``decoder(z)`` (calibrated) or None (the link dropped).  The dense
      up-projection is gone.
    * the stream form (``stream=True``: ``"calibrated"`` for pre-LN families):
      ``z = edge_factor(attention_output(hidden))``, output ``stream_output(decoder(z))``
      (the norm, the full FFN and the residual on the rebuilt stream); ``cloud_factor`` is None.
    """

    def __init__(self, adapter: "Adapter", layer: nn.Module, edge_factor: nn.Linear,
                 cloud_factor: Optional[nn.Linear], keep_link: bool, decoder: Optional[nn.Linear] = None,
                 stream: bool = False) -> None:
        super().__init__()
        if stream and (decoder is None or cloud_factor is not None or keep_link):
            raise ValueError("the stream form needs a decoder, no cloud factor and no link")
        if not stream and cloud_factor is None:
            raise ValueError("the FFN form needs a cloud factor")
        self.adapter, self.keep_link, self.stream = adapter, keep_link, stream
        self._signature = inspect.signature(layer.forward)
        edge, cloud = adapter.split_layer_stream(layer) if stream else adapter.split_layer(layer)
        self.edge, self.cloud = nn.ModuleDict(edge), nn.ModuleDict(cloud)
        self.edge_factor, self.cloud_factor, self.decoder = edge_factor, cloud_factor, decoder

    @property
    def rank(self) -> int:
        """Values per token between the two halves."""
        return self.edge_factor.out_features

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Called as the replaced transformers layer; returns its ``(batch, seq, d)`` output."""
        named = self._signature.bind_partial(hidden_states, *args, **kwargs).arguments
        for name, param in self._signature.parameters.items():  # flatten the layer's **kwargs
            if param.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(name, {}))
        kw = self.adapter.bottleneck_kwargs(self.edge, named)
        if self.stream:
            x = self.adapter.attention_output(self.edge, hidden_states, kw)
            return self.adapter.stream_output(self.cloud, self.decoder(self.edge_factor(x)))
        x, residual = self.adapter.ffn_input(self.edge, hidden_states, kw)
        z = self.edge_factor(x)
        if not self.keep_link:
            residual = self.decoder(z) if self.decoder is not None else None
        return self.adapter.ffn_output(self.cloud, self.cloud_factor(z), residual)


class Adapter:
    """One model family.  Subclasses set ``name`` and ``base_classes`` and implement the methods.

    ``mods`` below is an ``nn.ModuleDict`` holding what :meth:`edge_modules` (on the edge)
    or :meth:`cloud_modules` (on the cloud) returned.
    """

    #: Family name used in error messages, e.g. ``"bert"``.
    name: str = ""
    #: Class names of the base models (``BertModel``, ...) this adapter handles.
    base_classes: tuple[str, ...] = ()
    #: ``forward`` keyword arguments of the base model that the edge accepts besides input_ids/attention_mask.
    extra_inputs: tuple[str, ...] = ()
    #: True when the edge sends ``BoundaryOutput.pool_index`` (decoders' classification heads need it).
    sends_pool_index: bool = False
    #: True for pre-LN families: the FFN reads a norm of the residual stream, and the calibrated
    #: bottleneck codes the stream itself (:meth:`split_layer_stream`, :meth:`attention_output`,
    #: :meth:`stream_output`); False for post-LN families, whose FFN input is the residual.
    pre_norm: bool = False

    # ---------------------------------------------------------------- structure
    def layers(self, base: nn.Module) -> nn.ModuleList:
        """The stack of transformer layers of ``base``."""
        raise NotImplementedError

    def edge_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        """Modules the edge needs besides the layers (the embeddings)."""
        raise NotImplementedError

    def cloud_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        """Modules the cloud needs besides the layers and the task head (pooler, final norm, rotary)."""
        raise NotImplementedError

    def top_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        """Those of :meth:`cloud_modules` that act on the pooled row only, so a U-split runs them on its top.

        None by default; BERT's pooler (dense + tanh on [CLS]) is one.  The cloud of a U-split
        keeps the rest (the final modules that act per token, e.g. GPT-2's ``ln_f``).
        """
        return {}

    # ---------------------------------------------------------------- forward pieces
    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        """``(batch, seq, d)`` embeddings of ``input_ids`` (``inputs``: the ``extra_inputs`` given)."""
        raise NotImplementedError

    def layer_kwargs(self, mods: nn.ModuleDict, config: Any, hidden: torch.Tensor,
                     attention_mask: torch.Tensor) -> LayerKwargs:
        """What the base model's forward builds for its layers, from a 0/1 ``(batch, seq)`` mask."""
        raise NotImplementedError

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        """One layer: ``(batch, seq, d) -> (batch, seq, d)``."""
        raise NotImplementedError

    def finish(self, mods: nn.ModuleDict, hidden: torch.Tensor) -> Any:
        """The base model's output (a transformers ``ModelOutput``) from the last layer's hidden states."""
        raise NotImplementedError

    def pool_index(self, config: Any, input_ids: torch.Tensor, lengths: torch.Tensor) -> Optional[torch.Tensor]:
        """``(batch,)`` positions a decoder's classification head pools from; None when the head needs none."""
        return None

    def head_inputs(self, config: Any, pool_index: Optional[torch.Tensor], seq_len: int) -> dict[str, Any]:
        """Keyword arguments for the task head's forward (beside ``labels``) that reproduce its pooling."""
        return {}

    def pool_rows(self, hidden: torch.Tensor, pool_index: Optional[torch.Tensor]) -> torch.Tensor:
        """``(batch, d)``: the row of each sequence of ``hidden`` (``(batch, seq, d)``) that the task head pools.

        Encoders pool position 0 ([CLS] / <s>): a fixed rule, so ``pool_index`` is not needed
        (and not sent); decoders override this with their per-sequence positions.
        """
        return hidden[:, 0].contiguous()

    def head_output(self, mods: nn.ModuleDict, rows: torch.Tensor) -> Any:
        """The base model's output as the task head reads it, on a U-split's top.

        ``rows``: ``(batch, 1, d)``, the pooled rows as one-token sequences (the cloud already
        ran the per-token final modules); ``mods`` holds :meth:`top_modules`.
        """
        raise NotImplementedError

    # ---------------------------------------------------------------- bottleneck
    def split_layer(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """Cut layer K: ``(edge modules, cloud modules)``; the factorised up-projection goes to neither."""
        raise NotImplementedError

    def factorised_weight(self, layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The ``(rows, d)`` up-projection weight that the bottleneck factorises, and its bias (or None)."""
        raise NotImplementedError

    def install_bottleneck(self, layer: nn.Module, edge_factor: nn.Linear, cloud_factor: Optional[nn.Linear],
                           keep_link: bool, decoder: Optional[nn.Linear] = None,
                           stream: bool = False) -> BottleneckLayer:
        """Layer K rebuilt around the factors (sharing ``layer``'s modules), to put in the stack in its place.

        ``decoder``: the calibrated bottleneck's rebuild of the residual (FFN form) or of the
        stream (``stream=True``); see :class:`BottleneckLayer`.
        """
        return BottleneckLayer(self, layer, edge_factor, cloud_factor, keep_link, decoder, stream)

    def bottleneck_kwargs(self, edge_part: nn.ModuleDict, named: dict[str, Any]) -> LayerKwargs:
        """:meth:`ffn_input`'s ``kwargs`` from the arguments the base model called layer K with (by name)."""
        return {"attention_mask": named.get("attention_mask")}

    def ffn_input(self, edge_part: nn.ModuleDict, hidden: torch.Tensor,
                  kwargs: LayerKwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer K up to its up-projection: ``(ffn input, residual stream)``, both ``(batch, seq, d)``."""
        raise NotImplementedError

    def ffn_output(self, cloud_part: nn.ModuleDict, pre: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
        """Layer K's output from ``pre = U_r z (+ b1)`` (tokens, rows); ``residual`` None drops the link."""
        raise NotImplementedError

    # ---------------------------------------------------------------- calibrated bottleneck, pre-LN families
    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        """Layer K's norm in front of its FFN (pre-LN families only)."""
        raise NotImplementedError(f"{self.name} is a post-LN family: its FFN input is the residual itself")

    def split_layer_stream(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """Cut layer K before the FFN's norm: ``(edge: the attention block, cloud: {"norm", "mlp"})``."""
        raise NotImplementedError(f"{self.name} is a post-LN family: it has no stream form")

    def attention_output(self, edge_part: nn.ModuleDict, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        """Layer K's residual stream after its attention block, ``(batch, seq, d)`` (pre-LN families only)."""
        raise NotImplementedError(f"{self.name} is a post-LN family: it has no stream form")

    def stream_output(self, cloud_part: nn.ModuleDict, stream: torch.Tensor) -> torch.Tensor:
        """Layer K's output from its (rebuilt) stream: ``stream + mlp(norm(stream))``; ``cloud_part`` from
        :meth:`split_layer_stream`."""
        return stream + cloud_part["mlp"](cloud_part["norm"](stream))
