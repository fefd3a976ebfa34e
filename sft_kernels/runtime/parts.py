"""Building the parts of a run from its :class:`RunConfig`, and their optimizers.

Both sides call :func:`build_parts` with the same config and the same model files and get
bit-identical initial parts (the head and the bottleneck factors are seeded), which the session
handshake checks by hash.  Construction runs under :func:`~sft_kernels.split.seeded`, so it is a
pure function of the config even while other sessions train in other threads.  Each side then
keeps only its own parts: the edge the bottom (and, in the U-split, the top), the cloud the middle.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import nn

from ..split import UNFITTED, CalibrationOptions, load_minilm, minilm_classifier, seeded, split_model
from ..split.pretrained import EMBEDDED_MODEL, load_classifier
from .config import RunConfig, fit_hash, fit_state, state_hash

__all__ = ["Parts", "build_parts", "edge_hash", "make_optimizer", "make_scheduler", "linear_warmup", "EMBEDDED_MODEL"]


@dataclass
class Parts:
    """The initial parts of a run: ``tokenizer``, ``edge``, ``cloud``, (U-split) ``top`` and (calibrated) ``fit``.

    ``fit``: the cloud's calibrated decoders as the edge fitted them (:func:`~.config.fit_state`), what
    crosses once per run in the session handshake; None for ``init="svd"`` or parts built unfitted.
    """

    tokenizer: Any
    edge: nn.Module
    cloud: nn.Module
    top: Optional[nn.Module] = None
    fit: Optional[dict[str, torch.Tensor]] = None

    def hashes(self) -> dict[str, str]:
        """``{"edge": ..., "cloud": ...}`` (+ ``"fit"`` when fitted): what the handshake compares.

        The parts' hashes leave the calibrated fit out (:func:`~.config.state_hash`); the edge's covers its top.
        """
        out = {"edge": edge_hash(self.edge, self.top), "cloud": state_hash(self.cloud)}
        if self.fit is not None:
            out["fit"] = fit_hash(self.fit)
        return out


def edge_hash(edge: nn.Module, top: Optional[nn.Module] = None) -> str:
    """State hash of the edge's parts: the bottom, and the top in the U-split."""
    return state_hash(edge if top is None else nn.ModuleDict({"edge": edge, "top": top}))


@functools.lru_cache(maxsize=1)
def _embedded():
    """The embedded MiniLM's files, read once per process (every build still makes fresh modules)."""
    return load_minilm(None)


def _classifier(model: Union[str, Path, None], num_labels: int, seed: int):
    if model is None or (isinstance(model, str) and model == EMBEDDED_MODEL):
        return minilm_classifier(num_labels, minilm=_embedded(), seed=seed)
    return load_classifier(model, num_labels, seed=seed)


def build_parts(cfg: RunConfig, model: Union[str, Path, None] = None,
                calibration: Union[Iterable[Any], Callable[[Any], Iterable[Any]], None] = None,
                progress: bool = False) -> Parts:
    """The initial :class:`Parts` of ``cfg``, in train mode.

    ``model``: a local checkpoint directory of a supported family, or None / ``"all-MiniLM-L6-v2"``
    for the embedded model (see :func:`sft_kernels.split.load_classifier`).
    ``calibration`` (``init="calibrated"`` only): the edge's unlabelled batches (or strings) to fit the
    code on, or a callable that returns them given the model's tokenizer (for batches that need it, such
    as the run's own first training batches); None builds the parts unfitted (a zero code: the cloud,
    which receives the fit, or an edge that restores it from a checkpoint).  ``progress``: the
    calibration's progress bar.
    """
    kw: dict[str, Any] = {}
    if cfg.init == "calibrated":
        kw = dict(init="calibrated", calibration=UNFITTED if calibration is None else calibration,
                  calibration_options=CalibrationOptions(fit=cfg.calibration_fit, max_length=cfg.max_length,
                                                         progress=progress))
    elif calibration is not None:
        raise ValueError("calibration applies to init='calibrated' only")
    with seeded(cfg.seed):  # a pure function of the config: no other thread's draws, no global state left changed
        tok, net = _classifier(model, cfg.num_labels, cfg.seed)
        if calibration is not None:
            kw["tokenizer"] = tok
            if callable(calibration):
                kw["calibration"] = calibration(tok)
        parts = split_model(net, at=cfg.at, mode=cfg.mode, rank=cfg.rank, eliminate_links=cfg.eliminate_links,
                            seed=cfg.seed, u_split=cfg.u_split, **kw)
    fit = fit_state(parts[1]) if calibration is not None else None
    edge, cloud, *top = (p.train() for p in parts)
    return Parts(tok, edge, cloud, top[0] if top else None, fit=fit)


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
