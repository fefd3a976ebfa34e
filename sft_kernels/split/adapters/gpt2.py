"""Adapter for GPT-2 (pre-LN decoder; ``Conv1D`` stores weights as (in, out)).

Bottleneck form: edge ``z = Σ_r V_rᵀ LN2(x)`` with ``x`` the residual stream after layer
K's attention; cloud layer output ``W2 · act(U_r z + b1) + b2 [+ x]``.  The factorised
matrix is ``c_fc.weight.T`` (d_ff × d).  Calibrated (stream form): edge ``z = A (x − μ)``;
cloud ``x̂ = D z + c``, output ``x̂ + MLP(LN2(x̂))``.

Knows transformers' GPT-2 modules; no codecs, channels or training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import LayerKwargs
from .decoder import DecoderAdapter

__all__ = ["GPT2Adapter"]


class GPT2Adapter(DecoderAdapter):
    """``GPT2Model`` and ``GPT2ForSequenceClassification``."""

    name = "gpt2"
    base_classes = ("GPT2Model",)

    def layers(self, base: nn.Module) -> nn.ModuleList:
        if base.config.add_cross_attention:
            raise ValueError("GPT-2 with add_cross_attention=True is not supported")
        return base.h

    def edge_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"wte": base.wte, "wpe": base.wpe, "drop": base.drop}

    def cloud_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"ln_f": base.ln_f}

    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        h = mods["wte"](input_ids)
        return mods["drop"](h + mods["wpe"](self.positions(h)))

    def layer_kwargs(self, mods: nn.ModuleDict, config: Any, hidden: torch.Tensor,
                     attention_mask: torch.Tensor) -> LayerKwargs:
        pos = self.positions(hidden)
        return {"attention_mask": self.causal_mask(config, hidden, attention_mask, pos), "position_ids": pos}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        return layer(hidden, **kwargs)

    def finish(self, mods: nn.ModuleDict, hidden: torch.Tensor) -> Any:
        return self.head_output(mods, mods["ln_f"](hidden))

    def head_output(self, mods: nn.ModuleDict, rows: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=rows)

    def split_layer(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        return ({"ln_1": layer.ln_1, "attn": layer.attn, "ln_2": layer.ln_2},
                {"act": layer.mlp.act, "c_proj": layer.mlp.c_proj, "dropout": layer.mlp.dropout})

    def factorised_weight(self, layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return layer.mlp.c_fc.weight.t(), layer.mlp.c_fc.bias

    def bottleneck_kwargs(self, edge_part: nn.ModuleDict, named: dict[str, Any]) -> LayerKwargs:
        return {"attention_mask": named.get("attention_mask"), "position_ids": named.get("position_ids")}

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.ln_2

    def attention_output(self, edge_part: nn.ModuleDict, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        attn, _ = edge_part["attn"](edge_part["ln_1"](hidden), **kwargs)
        return attn + hidden

    def ffn_input(self, edge_part: nn.ModuleDict, hidden: torch.Tensor,
                  kwargs: LayerKwargs) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.attention_output(edge_part, hidden, kwargs)
        return edge_part["ln_2"](x), x

    def ffn_output(self, cloud_part: nn.ModuleDict, pre: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
        y = cloud_part["dropout"](cloud_part["c_proj"](cloud_part["act"](pre)))
        return y if residual is None else y + residual
