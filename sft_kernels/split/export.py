"""Save and load merged bottleneck models: ``save_split_model`` / ``load_split_model``.

A merged bottleneck model (see :func:`~.surgery.merge`) is a transformers model whose layer
K is a :class:`~.adapters.BottleneckLayer`, which ``save_pretrained`` does not know.  A
saved model is a directory of four files:

* ``config.json``: the transformers config (as ``config.save_pretrained`` writes it), with its
  ``model_type`` replaced by ``"sft_kernels_split"`` (:data:`MODEL_TYPE`), ``architectures`` naming
  the loader below, and an ``auto_map`` pointing transformers' auto classes at ``sft_kernels_split.py``;
* ``sft_split.json``: where the bottleneck is (``at``, ``rank``, ``eliminate_links``, ``family``,
  ``model_class``, ``factor_bias``) and, since format 2, how it is built (``init``: ``"svd"`` or
  ``"calibrated"``; ``code``: ``"ffn_input"`` or ``"stream"`` (the pre-LN calibrated form);
  ``edge_bias``: the edge factor has a bias; ``decoder``: the cloud rebuilds the residual or
  stream with a decoder Linear); since format 3, ``base_model_type``: the family's own
  ``model_type`` (``"bert"``, ...), which config.json no longer carries;
* ``model.safetensors``: the full state dict (``safetensors``, no pickle);
* ``sft_kernels_split.py``: two classes for transformers' ``trust_remote_code`` path; they call
  :func:`load_split_model`.

Loading with transformers.  Plain ``AutoModelForSequenceClassification.from_pretrained(path)``
(or ``AutoConfig`` / ``AutoModel``) refuses the directory: ``model_type`` is registered nowhere in
transformers, so nothing can rebuild the model as its own class with a re-initialised layer K
(which is what happened before format 3, silently apart from a list of missing weights).  The
refusal is transformers' own "contains custom code which must be executed to correctly load the
model ... pass the argument ``trust_remote_code=True``".  With ``trust_remote_code=True`` it runs
``sft_kernels_split.py``, which imports ``sft_kernels`` (it must be installed) and returns
:func:`load_split_model`'s model: the same weights and logits.  ``load_split_model(path)`` needs
no flag.  A class's own ``from_pretrained`` (``BertForSequenceClassification.from_pretrained``)
bypasses the auto classes and is not supported: it warns that the model type differs and builds
layer K afresh.

Format 1 and 2 files (written before the calibrated bottleneck, and before format 3's config)
still load with :func:`load_split_model`: format 1 is ``init="svd"``, ``code="ffn_input"``, no
edge bias, no decoder; both keep the family's ``model_type`` in config.json.  Saving always
writes the current format.

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

__all__ = ["save_split_model", "load_split_model", "SPLIT_FILE", "WEIGHTS_FILE", "MODEL_TYPE"]

#: The bottleneck description written beside config.json.
SPLIT_FILE = "sft_split.json"
#: The weights file.
WEIGHTS_FILE = "model.safetensors"
#: config.json's ``model_type`` since format 3: unknown to transformers, so its auto classes refuse the directory.
MODEL_TYPE = "sft_kernels_split"
#: The module (a file in the saved directory) that transformers' ``trust_remote_code`` path imports.
_CODE_MODULE = "sft_kernels_split"
_FORMAT = 3
_KEYS = {"format": int, "family": str, "model_class": str, "at": int, "rank": int, "eliminate_links": bool,
         "factor_bias": bool}
#: Keys added by format 2, with the values that format 1 files mean.
_KEYS_2 = {"init": (str, "svd"), "code": (str, "ffn_input"), "edge_bias": (bool, False), "decoder": (bool, False)}
#: What format 3 adds: the family's own ``model_type`` (config.json carries :data:`MODEL_TYPE` instead).
_BASE_TYPE = "base_model_type"
#: ``from_pretrained`` keywords the auto classes pass along on their own (hub plumbing); ignored here.
_HUB_KWARGS = frozenset({"config", "trust_remote_code", "adapter_kwargs", "revision", "code_revision", "cache_dir",
                         "force_download", "proxies", "token", "local_files_only", "subfolder", "_commit_hash",
                         "_from_auto", "_from_pipeline", "use_safetensors", "dtype", "torch_dtype"})

#: ``sft_kernels_split.py``, written beside the model: transformers imports it under ``trust_remote_code=True``.
#: Its classes only hand the directory to :func:`_from_pretrained`, so what loading means stays in this module.
_CODE = f'''"""Written by sft_kernels.save_split_model beside a model split with a low-rank bottleneck.

Layer K of this model is a bottleneck layer that transformers' own classes do not have (see
sft_split.json), so transformers loads this directory only through this file, and only with
trust_remote_code=True; it needs the sft_kernels package.  Without transformers:

    import sft_kernels
    model = sft_kernels.load_split_model(path)
"""
from transformers import PretrainedConfig, PreTrainedModel

import sft_kernels.split.export


class SftKernelsSplitConfig(PretrainedConfig):
    """config.json as read by AutoConfig: the family's config, under model_type {MODEL_TYPE!r}."""

    model_type = {MODEL_TYPE!r}


class SftKernelsSplitModel(PreTrainedModel):
    """What the auto classes call: from_pretrained returns sft_kernels.load_split_model(path)."""

    config_class = SftKernelsSplitConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        return sft_kernels.split.export._from_pretrained(pretrained_model_name_or_path, model_args, kwargs)
'''
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
        path: the output directory; its config.json, sft_split.json, model.safetensors and
            sft_kernels_split.py are overwritten (the module docstring says what each holds, and how
            transformers' auto classes treat the directory: they refuse it, or with
            ``trust_remote_code=True`` load it through :func:`load_split_model`).
    """
    from safetensors.torch import save_file

    adapter, _, at, layer = _bottleneck_of(model)
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    base_type = config["model_type"]
    # the auto class a transformers user loads this model with: a classifier, or a base model
    auto = ("AutoModelForSequenceClassification" if type(model).__name__.endswith("ForSequenceClassification")
            else "AutoModel")
    config.update(model_type=MODEL_TYPE, architectures=["SftKernelsSplitModel"],
                  auto_map={"AutoConfig": f"{_CODE_MODULE}.SftKernelsSplitConfig",
                            auto: f"{_CODE_MODULE}.SftKernelsSplitModel"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / f"{_CODE_MODULE}.py").write_text(_CODE)
    meta = {"format": _FORMAT, "family": adapter.name, "model_class": type(model).__name__, "at": at,
            "rank": layer.rank, "eliminate_links": not layer.keep_link,
            "factor_bias": layer.cloud_factor is not None and layer.cloud_factor.bias is not None,
            "init": "calibrated" if layer.decoder is not None else "svd",
            "code": "stream" if layer.stream else "ffn_input",
            "edge_bias": layer.edge_factor.bias is not None, "decoder": layer.decoder is not None,
            _BASE_TYPE: base_type}
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
    if meta["format"] not in range(1, _FORMAT + 1):
        raise ValueError(f"{file}: format {meta['format']} is not supported (this version reads 1 to {_FORMAT})")
    for key, (typ, old) in _KEYS_2.items():
        if meta["format"] == 1:
            meta[key] = old
        elif not isinstance(meta.get(key), typ):
            raise ValueError(f"{file}: {key} must be a {typ.__name__} (format {meta['format']}), got "
                             f"{meta.get(key)!r}")
    if meta["format"] >= 3 and not isinstance(meta.get(_BASE_TYPE), str):
        raise ValueError(f"{file}: {_BASE_TYPE} must be a str (format {meta['format']}), got {meta.get(_BASE_TYPE)!r}")
    if meta["code"] not in _CODES:
        raise ValueError(f"{file}: code must be one of {_CODES}, got {meta['code']!r}")
    if meta["init"] not in _INITS:
        raise ValueError(f"{file}: init must be one of {_INITS}, got {meta['init']!r}")
    if meta["code"] == "stream" and (not meta["decoder"] or not meta["eliminate_links"]):
        raise ValueError(f"{file}: code 'stream' needs decoder=true and eliminate_links=true")
    return meta


def _read_config(src: Path, meta: dict[str, Any]) -> Any:
    """The family's transformers config of a saved model (format 3: config.json under :data:`MODEL_TYPE`)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if meta["format"] < 3:  # config.json is the family's own
        return transformers.AutoConfig.from_pretrained(str(src), local_files_only=True)
    try:
        config = json.loads((src / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{src / 'config.json'} is not valid JSON: {exc}") from exc
    if config.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{src / 'config.json'}: model_type must be {MODEL_TYPE!r} (format {meta['format']}), got "
                         f"{config.get('model_type')!r}")
    base_type = meta[_BASE_TYPE]
    if base_type not in CONFIG_MAPPING:
        raise ValueError(f"{src / SPLIT_FILE}: {_BASE_TYPE} {base_type!r} is not a model type this transformers "
                         f"version knows")
    for key in ("model_type", "auto_map"):
        config.pop(key, None)
    config["architectures"] = [meta["model_class"]]
    return CONFIG_MAPPING[base_type].from_dict(config)


def _from_pretrained(path: Union[str, Path], model_args: tuple, kwargs: dict[str, Any]) -> nn.Module:
    """transformers' ``trust_remote_code`` path into :func:`load_split_model` (``sft_kernels_split.py`` calls it).

    ``dtype`` / ``torch_dtype`` (other than ``"auto"``) cast the loaded model; the hub keywords the auto
    classes pass on their own are ignored; any other keyword (``device_map``, ``quantization_config``,
    ...) is refused with a ``TypeError`` rather than silently not applied.
    """
    unsupported = sorted(k for k, v in kwargs.items() if k not in _HUB_KWARGS and v is not None)
    if model_args or unsupported:
        raise TypeError(f"a model saved by sft_kernels.save_split_model loads as it was saved; from_pretrained "
                        f"does not take {unsupported or 'positional model arguments'} for it: load it, then change it")
    model = load_split_model(path)
    dtype = kwargs.get("dtype") or kwargs.get("torch_dtype")
    if dtype is not None and dtype != "auto":
        model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return model


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
    config = _read_config(src, meta)
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
