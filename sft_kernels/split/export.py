"""Save and load merged bottleneck models: ``save_split_model`` / ``load_split_model``.

A merged bottleneck model (see :func:`~.surgery.merge`) is a transformers model whose layer
K is a :class:`~.adapters.BottleneckLayer`, which ``save_pretrained`` does not know.  A
saved model is a directory of three files:

* ``config.json``: the transformers config (``config.save_pretrained``);
* ``sft_split.json``: where the bottleneck is (``at``, ``rank``, ``eliminate_links``, ``family``,
  ``model_class``, ``factor_bias``) and, since format 2, how it is built (``init``: ``"svd"`` or
  ``"calibrated"``; ``code``: ``"ffn_input"`` or ``"stream"`` (the pre-LN calibrated form);
  ``edge_bias``: the edge factor has a bias; ``decoder``: the cloud rebuilds the residual or
  stream with a decoder Linear);
* ``model.safetensors``: the full state dict (``safetensors``, no pickle).

Format 1 files (written before the calibrated bottleneck) still load: they are ``init="svd"``,
``code="ffn_input"``, no edge bias, no decoder.  Saving always writes the current format.

Loading rebuilds the model from the config offline, re-installs the bottleneck and loads the
weights strictly.  A layer-split merge is the original transformers class: use its own
``save_pretrained`` / ``from_pretrained``.

Knows transformers models, adapters and safetensors; no codecs, channels or runtime.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from .adapters import BottleneckLayer, adapter_for, base_model_of, replace_module

__all__ = ["save_split_model", "load_split_model", "SPLIT_FILE", "WEIGHTS_FILE"]

#: The bottleneck description written beside config.json.
SPLIT_FILE = "sft_split.json"
#: The weights file.
WEIGHTS_FILE = "model.safetensors"
_FORMAT = 2
_KEYS = {"format": int, "family": str, "model_class": str, "at": int, "rank": int, "eliminate_links": bool,
         "factor_bias": bool}
#: Keys added by format 2, with the values that format 1 files mean.
_KEYS_2 = {"init": (str, "svd"), "code": (str, "ffn_input"), "edge_bias": (bool, False), "decoder": (bool, False)}
_CODES = ("ffn_input", "stream")
_INITS = ("svd", "calibrated")


def _bottleneck_of(model: nn.Module) -> tuple[Any, nn.Module, int, BottleneckLayer]:
    """``(adapter, base model, at, layer)`` of a merged bottleneck model; ``ValueError`` otherwise."""
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise ValueError(f"model must be a transformers model returned by merge(edge, cloud), got "
                         f"{type(model).__name__}")
    base, _ = base_model_of(model)
    adapter = adapter_for(base)
    found = [(i, layer) for i, layer in enumerate(adapter.layers(base)) if isinstance(layer, BottleneckLayer)]
    if len(found) != 1:
        raise ValueError(f"model has {len(found)} bottleneck layers, expected 1: save_split_model saves a merged "
                         f"bottleneck split; a merged layer split is the original {type(model).__name__}, save it "
                         f"with model.save_pretrained(path)")
    return adapter, base, found[0][0], found[0][1]


def save_split_model(model: nn.Module, path: Union[str, Path]) -> Path:
    """Write a merged bottleneck model to directory ``path`` (created if needed); returns ``path``.

    Args:
        model: ``merge(edge, cloud)`` of a bottleneck split.
        path: the output directory; its config.json, sft_split.json and model.safetensors are overwritten.
    """
    from safetensors.torch import save_file

    adapter, _, at, layer = _bottleneck_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    meta = {"format": _FORMAT, "family": adapter.name, "model_class": type(model).__name__, "at": at,
            "rank": layer.rank, "eliminate_links": not layer.keep_link,
            "factor_bias": layer.cloud_factor is not None and layer.cloud_factor.bias is not None,
            "init": "calibrated" if layer.decoder is not None else "svd",
            "code": "stream" if layer.stream else "ffn_input",
            "edge_bias": layer.edge_factor.bias is not None, "decoder": layer.decoder is not None}
    (out / SPLIT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def _read_meta(file: Path) -> dict[str, Any]:
    try:
        meta = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(meta).__name__}")
    for key, typ in _KEYS.items():
        if key not in meta:
            raise ValueError(f"{file}: missing key {key!r} (expected {sorted(_KEYS)})")
        if not isinstance(meta[key], typ) or (typ is int and isinstance(meta[key], bool)):
            raise ValueError(f"{file}: {key} must be a {typ.__name__}, got {meta[key]!r}")
    if meta["format"] not in (1, _FORMAT):
        raise ValueError(f"{file}: format {meta['format']} is not supported (this version reads 1 and {_FORMAT})")
    for key, (typ, old) in _KEYS_2.items():
        if meta["format"] == 1:
            meta[key] = old
        elif not isinstance(meta.get(key), typ):
            raise ValueError(f"{file}: {key} must be a {typ.__name__} (format {_FORMAT}), got {meta.get(key)!r}")
    if meta["code"] not in _CODES:
        raise ValueError(f"{file}: code must be one of {_CODES}, got {meta['code']!r}")
    if meta["init"] not in _INITS:
        raise ValueError(f"{file}: init must be one of {_INITS}, got {meta['init']!r}")
    if meta["code"] == "stream" and (not meta["decoder"] or not meta["eliminate_links"]):
        raise ValueError(f"{file}: code 'stream' needs decoder=true and eliminate_links=true")
    return meta


def load_split_model(path: Union[str, Path]) -> nn.Module:
    """Load a model written by :func:`save_split_model`, offline, in eval mode.

    Raises ``FileNotFoundError`` naming the missing file, and ``ValueError`` when sft_split.json
    is malformed or does not match the config or the weights (e.g. a different rank).
    """
    import transformers
    from safetensors.torch import load_file

    src = Path(path)
    for name in ("config.json", SPLIT_FILE, WEIGHTS_FILE):
        if not (src / name).is_file():
            raise FileNotFoundError(f"no saved split model at {src}: {src / name} is missing (expected config.json, "
                                    f"{SPLIT_FILE} and {WEIGHTS_FILE}, as save_split_model writes)")
    meta = _read_meta(src / SPLIT_FILE)
    cls = getattr(transformers, meta["model_class"], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(f"{src / SPLIT_FILE}: model_class {meta['model_class']!r} is not a transformers model class")
    config = transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    model = cls(config)
    base, _ = base_model_of(model)
    adapter = adapter_for(base)
    if adapter.name != meta["family"]:
        raise ValueError(f"{src / SPLIT_FILE}: family {meta['family']!r} does not match the config's "
                         f"{type(base).__name__} ({adapter.name!r})")
    layers = adapter.layers(base)
    at, rank = meta["at"], meta["rank"]
    if not 1 <= at < len(layers):
        raise ValueError(f"{src / SPLIT_FILE}: at={at} is not in [1, {len(layers) - 1}]")
    layer = layers[at]
    weight, _ = adapter.factorised_weight(layer)
    rows, d = weight.shape
    if not 1 <= rank <= min(rows, d):
        raise ValueError(f"{src / SPLIT_FILE}: rank={rank} is not in [1, {min(rows, d)}]")
    stream = meta["code"] == "stream"
    if stream and not adapter.pre_norm:
        raise ValueError(f"{src / SPLIT_FILE}: code 'stream' is the pre-LN form, but {adapter.name!r} is post-LN")

    def linear(d_in: int, d_out: int, bias: bool) -> nn.Linear:
        # skip_init: the saved weights overwrite every value, so draw nothing from the global RNG
        return nn.utils.skip_init(nn.Linear, d_in, d_out, bias=bias, dtype=weight.dtype)

    edge_factor = linear(d, rank, meta["edge_bias"])
    cloud_factor = None if stream else linear(rank, rows, meta["factor_bias"])
    decoder = linear(rank, d, True) if meta["decoder"] else None
    replace_module(base, layer, adapter.install_bottleneck(layer, edge_factor, cloud_factor,
                                                           not meta["eliminate_links"], decoder=decoder,
                                                           stream=stream))
    state: dict[str, torch.Tensor] = load_file(str(src / WEIGHTS_FILE))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{src / WEIGHTS_FILE} does not match {src / SPLIT_FILE} ({meta}): {exc}") from exc
    return model.eval()
