"""Adapter for DistilBERT: a post-LN BERT-family encoder whose FFN is ``lin1``/``lin2``.

Bottleneck form as for BERT: edge ``z = Σ_r V_rᵀ h`` with ``h = sa_layer_norm(attn + x)``;
cloud ``output_layer_norm(lin2(act(U_r z + b1)) [+ h])``; calibrated as for BERT (``z = A (h − μ)``,
the residual rebuilt as ``D z + c``).  Masks are built as in
:class:`~.bert.BertAdapter`.

Knows transformers' DistilBERT modules; no codecs, channels or training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import LayerKwargs
from .bert import BertAdapter

__all__ = ["DistilBertAdapter"]


class DistilBertAdapter(BertAdapter):
    """``DistilBertModel`` and ``DistilBertForSequenceClassification``."""

    name = "distilbert"
    base_classes = ("DistilBertModel",)
    extra_inputs = ("position_ids",)

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return base.transformer.layer

    def cloud_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {}

    def top_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {}  # no pooler: the head's pre_classifier and classifier take [CLS] directly

    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        return mods["embeddings"](input_ids, None, inputs.get("position_ids"))

    def finish(self, mods: nn.ModuleDict, hidden: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutput

        return BaseModelOutput(last_hidden_state=hidden)

    def split_layer(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        ffn = layer.ffn
        return ({"attention": layer.attention, "sa_layer_norm": layer.sa_layer_norm},
                {"act": ffn.activation, "lin2": ffn.lin2, "dropout": ffn.dropout,
                 "output_layer_norm": layer.output_layer_norm})

    def factorised_weight(self, layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return layer.ffn.lin1.weight, layer.ffn.lin1.bias

    def ffn_input(self, edge_part: nn.ModuleDict, hidden: torch.Tensor,
                  kwargs: LayerKwargs) -> tuple[torch.Tensor, torch.Tensor]:
        attn, _ = edge_part["attention"](hidden, attention_mask=kwargs["attention_mask"])
        h = edge_part["sa_layer_norm"](attn + hidden)
        return h, h

    def ffn_output(self, cloud_part: nn.ModuleDict, pre: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = cloud_part["dropout"](cloud_part["lin2"](cloud_part["act"](pre)))
        return cloud_part["output_layer_norm"](y if residual is None else y + residual)
