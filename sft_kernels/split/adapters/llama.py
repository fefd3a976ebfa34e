"""Adapter for Llama-style decoders: Llama, Qwen2, Mistral (RMSNorm, rotary, gated MLP).

The cloud rebuilds what the base model's forward makes before its layers: the causal
mask (sliding-window where the config asks for it: per-layer ``layer_types`` in Qwen2,
``sliding_window`` in Mistral) and the rotary ``position_embeddings`` from the model's
own ``rotary_emb`` module.

Bottleneck form: factorise the stacked ``[W_gate; W_up]`` (2·d_ff × d); edge
``z = Σ_r V_rᵀ RMSNorm(x)``; cloud ``W_down(act(U_gate z) ⊙ (U_up z)) [+ x]``.  Calibrated
(stream form): edge ``z = A (x − μ)``; cloud ``x̂ = D z + c``, output ``x̂ + MLP(RMSNorm(x̂))``.

Knows transformers' Llama-family modules; no codecs, channels or training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import LayerKwargs
from .decoder import DecoderAdapter

__all__ = ["LlamaAdapter"]

_FULL, _SLIDING = "full_attention", "sliding_attention"


def _layer_type(config: Any, layer_idx: int) -> str:
    """The attention type of layer ``layer_idx``, as the base model's forward picks its mask."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return types[layer_idx]
    return _SLIDING if getattr(config, "sliding_window", None) is not None else _FULL


class LlamaAdapter(DecoderAdapter):
    """``LlamaModel``, ``Qwen2Model``, ``MistralModel`` and their ``*ForSequenceClassification``."""

    name = "llama"
    base_classes = ("LlamaModel", "Qwen2Model", "MistralModel")

    def layers(self, base: nn.Module) -> nn.ModuleList:
        return base.layers[: base.config.num_hidden_layers]

    def edge_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"embed_tokens": base.embed_tokens, "rotary_emb": base.rotary_emb}

    def cloud_modules(self, base: nn.Module) -> dict[str, nn.Module]:
        return {"norm": base.norm, "rotary_emb": base.rotary_emb}

    def embed(self, mods: nn.ModuleDict, input_ids: torch.Tensor, **inputs: Optional[torch.Tensor]) -> torch.Tensor:
        return mods["embed_tokens"](input_ids)

    def layer_kwargs(self, mods: nn.ModuleDict, config: Any, hidden: torch.Tensor,
                     attention_mask: torch.Tensor) -> LayerKwargs:
        pos = self.positions(hidden)
        types = {_layer_type(config, i) for i in range(config.num_hidden_layers)}
        masks = {t: self.causal_mask(config, hidden, attention_mask, pos, sliding=t == _SLIDING) for t in types}
        return {"masks": masks, "position_ids": pos, "position_embeddings": mods["rotary_emb"](hidden, pos),
                "config": config}

    @staticmethod
    def _call_kwargs(layer_idx: int, kwargs: LayerKwargs) -> dict[str, Any]:
        return {"attention_mask": kwargs["masks"][_layer_type(kwargs["config"], layer_idx)],
                "position_ids": kwargs["position_ids"], "position_embeddings": kwargs["position_embeddings"]}

    def run_layer(self, layer: nn.Module, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        return layer(hidden, **self._call_kwargs(layer.self_attn.layer_idx, kwargs))

    def finish(self, mods: nn.ModuleDict, hidden: torch.Tensor) -> Any:
        return self.head_output(mods, mods["norm"](hidden))

    def head_output(self, mods: nn.ModuleDict, rows: torch.Tensor) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPast

        return BaseModelOutputWithPast(last_hidden_state=rows)

    def split_layer(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        return ({"input_layernorm": layer.input_layernorm, "self_attn": layer.self_attn,
                 "post_attention_layernorm": layer.post_attention_layernorm},
                {"act": layer.mlp.act_fn, "down_proj": layer.mlp.down_proj})

    def factorised_weight(self, layer: nn.Module) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
        bias = None if gate.bias is None else torch.cat([gate.bias, up.bias])
        return torch.cat([gate.weight, up.weight]), bias

    def bottleneck_kwargs(self, edge_part: nn.ModuleDict, named: dict[str, Any]) -> LayerKwargs:
        attn = edge_part["self_attn"]
        return {"masks": {_layer_type(attn.config, attn.layer_idx): named.get("attention_mask")},
                "position_ids": named.get("position_ids"), "position_embeddings": named["position_embeddings"],
                "config": attn.config}

    def ffn_norm(self, layer: nn.Module) -> nn.Module:
        return layer.post_attention_layernorm

    def attention_output(self, edge_part: nn.ModuleDict, hidden: torch.Tensor, kwargs: LayerKwargs) -> torch.Tensor:
        attn = edge_part["self_attn"]
        out, _ = attn(hidden_states=edge_part["input_layernorm"](hidden), **self._call_kwargs(attn.layer_idx, kwargs))
        return out + hidden

    def ffn_input(self, edge_part: nn.ModuleDict, hidden: torch.Tensor,
                  kwargs: LayerKwargs) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.attention_output(edge_part, hidden, kwargs)
        return edge_part["post_attention_layernorm"](x), x

    def ffn_output(self, cloud_part: nn.ModuleDict, pre: torch.Tensor,
                   residual: Optional[torch.Tensor]) -> torch.Tensor:
        gate, up = pre.chunk(2, dim=-1)
        y = cloud_part["down_proj"](cloud_part["act"](gate) * up)
        return y if residual is None else y + residual
