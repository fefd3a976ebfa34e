"""Adapter for the BERT family of post-LN encoders: BERT, RoBERTa and MiniLM (a ``BertModel``).

DistilBERT reuses its masks in :mod:`.distilbert`.

Bottleneck form (post-LN): edge ``z = Σ_r V_rᵀ h`` with ``h`` the attention output of
layer K; cloud ``LayerNorm(W2 · act(U_r z + b1) + b2 [+ h])``.  Calibrated: edge
``z = A (h − μ)``; cloud ``LayerNorm(W2 · act(B z + b) + b2 + D z + c)`` (the residual rebuilt
from the code instead of dropped).

Knows transformers' BERT/RoBERTa modules only; no codecs, channels or training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import Adapter, LayerKwargs

__all__ = ["BertAdapter"]


class BertAdapter(Adapter):
    """``BertModel`` / ``RobertaModel`` (and their ``*ForSequenceClassification``), encoder configs only."""

    name = "bert"
    base_classes = ("BertModel", "RobertaModel")
    extra_inputs = ("token_type_ids", "position_ids")

    def layers(self, base: nn.Module) -> nn.ModuleList:
        if base.config.is_decoder:
            raise ValueError(f"{type(base).__name__} with is_decoder=True is not supported; only encoder configs split")
        return base.encoder.layer

    def edge_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"embeddings": base.embeddings}

    def cloud_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"pooler": base.pooler} if base.pooler is not None else {}

    def top_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return self.cloud_modules(base)  # the pooler (dense + tanh on [CLS]) is BERT's only final module

    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        return mods["embeddings"](input_ids=input_ids, **inputs)

    def layer_kwargs(self, mods: nn.ModuleDict, config: Any, hidden: torch.Tensor,
                     attention_mask: torch.Tensor) -> LayerKwargs:
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(config=config, inputs_embeds=hidden, attention_mask=attention_mask)
        return {"attention_mask": mask}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        return layer(hidden, **kwargs)

    def finish(self, mods: nn.ModuleDict, hidden: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        pooled = mods["pooler"](hidden) if "pooler" in mods else None
        return BaseModelOutputWithPoolingAndCrossAttentions(last_hidden_state=hidden, pooler_output=pooled)

    def head_output(self, mods: nn.ModuleDict, rows: torch.Tensor) -> Any:
        return self.finish(mods, rows)  # the pooler, when present, runs on [CLS] = rows[:, 0]

    def split_layer(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        return ({"attention": layer.attention},
                {"act": layer.intermediate.intermediate_act_fn, "output": layer.output})

    def factorised_weight(self, layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return layer.intermediate.dense.weight, layer.intermediate.dense.bias

    def ffn_input(self, edge_part: nn.ModuleDict, hidden: torch.Tensor,
                  kwargs: LayerKwargs) -> tuple[torch.Tensor, torch.Tensor]:
        h = edge_part["attention"](hidden, kwargs["attention_mask"])[0]
        return h, h

    def ffn_output(self, cloud_part: nn.ModuleDict, pre: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
        out = cloud_part["output"]
        y = out.dropout(out.dense(cloud_part["act"](pre)))
        return out.LayerNorm(y if residual is None else y + residual)
