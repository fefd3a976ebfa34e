"""Registry of split adapters, one per model family (see :mod:`.base` for the interface).

Knows the adapter classes only; no codecs, channels or training.
"""
from __future__ import annotations

from torch import nn

from .base import Adapter, BottleneckLayer
from .bert import BertAdapter
from .distilbert import DistilBertAdapter
from .gpt2 import GPT2Adapter
from .llama import LlamaAdapter

__all__ = ["Adapter", "ADAPTERS", "BottleneckLayer", "adapter_for", "base_model_of", "replace_module"]

#: One instance per supported family; a new family is one new file plus one entry here.
ADAPTERS: list[Adapter] = [BertAdapter(), DistilBertAdapter(), GPT2Adapter(), LlamaAdapter()]


def base_model_of(model: nn.Module) -> tuple[nn.Module, str]:
    """``(base model, attribute name)`` of a task model; ``(model, "")`` for a base model."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    if isinstance(inner, nn.Module) and inner is not model:
        return inner, prefix
    return model, ""


def replace_module(root: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` where ``old`` sits in ``root``'s module tree (found by identity); ``ValueError`` if absent."""
    for name, mod in root.named_modules():
        if mod is old and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(root.get_submodule(parent_name) if parent_name else root, attr, new)
            return
    raise ValueError(f"{type(old).__name__} is not a submodule of {type(root).__name__}")


def adapter_for(base: nn.Module) -> Adapter:
    """The adapter whose ``base_classes`` lists ``type(base).__name__``; ``TypeError`` listing the supported ones."""
    cls = type(base).__name__
    for adapter in ADAPTERS:
        if cls in adapter.base_classes:
            return adapter
    supported = sorted(c for a in ADAPTERS for c in a.base_classes)
    raise TypeError(
        f"cannot split a {cls}: supported base models are {supported} (and their task models). "
        "To add a family, implement sft_kernels.split.adapters.base.Adapter in a new file of "
        "sft_kernels/split/adapters/ and register it in ADAPTERS there."
    )
