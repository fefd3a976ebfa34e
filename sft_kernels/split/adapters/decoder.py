"""What the decoder-only families (GPT-2, Llama-style) share: causal masks and last-token pooling.

Padding assumption: right padding (1s then 0s in ``attention_mask``), as for the
encoders.  transformers' ``*ForSequenceClassification`` heads of decoders pool the
logits at the rightmost token that is not ``pad_token_id``; the edge evaluates that
rule on its ``input_ids`` and sends the positions (``BoundaryOutput.pool_index``),
and the cloud hands the head stand-in ``input_ids`` that make the head's own rule
pick the same positions, so the head and its loss run unchanged.  In a U-split the
cloud picks those rows itself (:meth:`DecoderAdapter.pool_rows`, after the final norm)
and the top's head sees one-token sequences.

Both families are pre-LN: the calibrated bottleneck cuts layer K before the FFN's norm
(:meth:`DecoderAdapter.split_layer_stream`): the edge keeps the attention block, the cloud
the norm and the whole MLP, which run on the stream the cloud rebuilds from the code.

Knows transformers' mask utilities; no codecs, channels or training.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import Adapter

__all__ = ["DecoderAdapter"]


def _pad_id(config: Any) -> Optional[int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return text.pad_token_id


class DecoderAdapter(Adapter):
    """Base for decoder-only families: pooling positions and causal masks."""

    sends_pool_index = True
    pre_norm = True

    def split_layer_stream(self, layer: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        norm = self.ffn_norm(layer)
        edge = {k: m for k, m in self.split_layer(layer)[0].items() if m is not norm}
        return edge, {"norm": norm, "mlp": layer.mlp}

    def pool_index(self, config: Any, input_ids: torch.Tensor, lengths: torch.Tensor) -> Optional[torch.Tensor]:
        pad = _pad_id(config)
        t = input_ids.shape[-1]
        if pad is None:  # the head pools the last position (and refuses batches > 1 itself)
            pos = torch.full((input_ids.shape[0],), t - 1, dtype=torch.int64, device=input_ids.device)
        else:
            idx = torch.arange(t, device=input_ids.device)
            pos = (idx * (input_ids != pad).long()).argmax(-1)
        return pos.to(torch.int32)

    def head_inputs(self, config: Any, pool_index: Optional[torch.Tensor], seq_len: int) -> dict[str, Any]:
        pad = _pad_id(config)
        fill = 0 if pad is None else pad
        ids = torch.full((pool_index.shape[0], seq_len), fill, dtype=torch.long, device=pool_index.device)
        ids[torch.arange(ids.shape[0], device=ids.device), pool_index.long()] = fill + 1
        return {"input_ids": ids}

    def pool_rows(self, hidden: torch.Tensor, pool_index: Optional[torch.Tensor]) -> torch.Tensor:
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), pool_index.long()]

    @staticmethod
    def causal_mask(config: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    sliding: bool = False) -> Any:
        """The mask the base model's forward builds (``create_causal_mask`` or its sliding-window variant)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        fn = create_sliding_window_causal_mask if sliding else create_causal_mask
        return fn(config=config, inputs_embeds=hidden, attention_mask=attention_mask, past_key_values=None,
                  position_ids=position_ids)

    @staticmethod
    def positions(hidden: torch.Tensor) -> torch.Tensor:
        """``(1, seq)`` position ids, as the base model's forward makes them without a cache."""
        return torch.arange(hidden.shape[1], device=hidden.device)[None, :]
