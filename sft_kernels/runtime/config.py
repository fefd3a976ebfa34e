"""``RunConfig``: what the edge and the cloud must agree on before the first step.

The edge proposes it when it opens a session; the cloud checks the split settings
against the ones it serves and builds its part from it.  It travels as JSON (never
pickle), and every field is type- and range-checked when read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

import torch

from ..codecs import Codec, from_spec
from ..step.edge import pooled_codecs
from ..split.calibrate import DEFAULT_FIT, FIT_METHODS

__all__ = ["RunConfig", "SPLIT_FIELDS", "INITS", "state_hash", "fit_state", "fit_hash", "fit_names"]

#: Fields a server pins with its own flags; a session asking for other values is refused.
SPLIT_FIELDS = ("at", "mode", "rank", "eliminate_links", "u_split", "init", "fwd_codec", "bwd_codec", "pooled_codec",
                "pooled_grad_codec")
#: How the bottleneck's code starts (``split_model``'s ``init``).
INITS = ("svd", "calibrated")

_RUN_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_MODES = ("layer", "bottleneck")


@dataclass(frozen=True)
class RunConfig:
    """One split fine-tuning run.

    Attributes:
        model: what the edge loaded, for the record (``"all-MiniLM-L6-v2"``, the embedded model, or a
            checkpoint's directory name).  Each side builds from its own files; the handshake compares
            the resulting parameters by hash, not this name.
        task: data task name (``"synthetic"`` or a GLUE task), for the record.
        num_labels: classifier outputs (1 = regression).
        at: split after this many encoder layers.
        mode / rank / eliminate_links / u_split / init: as in :func:`sft_kernels.split_model` (``u_split``:
            the head and the loss stay on the edge; no label crosses; ``init="calibrated"``: the edge fits
            the code on ``calibration_size`` of its training examples, unlabelled, and sends the cloud's
            decoders in the session handshake).
        calibration_size: ``init="calibrated"``: training examples the edge fits the code on (the first
            ones of the run's data order; their labels are not used).
        calibration_fit: ``init="calibrated"``: how the edge fits the code, one of
            :data:`sft_kernels.split.calibrate.FIT_METHODS` (the edge's choice: the cloud checks the decoders it
            receives by hash, not how they were fitted).
        fwd_codec / bwd_codec: codec specs of the activations (edge -> cloud) and gradients (back).
        pooled_codec / pooled_grad_codec: the U-split's codecs of the pooled rows (cloud -> edge) and of
            their gradient (back up); None: ``fwd_codec`` / ``bwd_codec``.
        seed: keys the head init, the bottleneck factors, data order, dropout and codecs.
        lr / weight_decay / warmup_steps / total_steps: AdamW and a linear warmup-then-decay schedule.
        batch_size / max_length: batching on the edge.
        run_id: names the run; with the client id it names the cloud session and its checkpoints.
    """

    model: str = "all-MiniLM-L6-v2"
    task: str = "synthetic"
    num_labels: int = 2
    at: int = 3
    mode: str = "bottleneck"
    rank: Optional[int] = 4
    eliminate_links: bool = True
    u_split: bool = False
    init: str = "svd"
    calibration_size: int = 512
    calibration_fit: str = DEFAULT_FIT
    fwd_codec: str = "int8"
    bwd_codec: str = "int8,sr"
    pooled_codec: Optional[str] = None
    pooled_grad_codec: Optional[str] = None
    seed: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    total_steps: int = 100
    batch_size: int = 32
    max_length: int = 128
    run_id: str = "run"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            want = {"int": int, "float": (int, float), "str": str, "bool": bool,
                    "Optional[int]": (int, type(None)), "Optional[str]": (str, type(None))}[str(f.type)]
            if not isinstance(v, want) or (isinstance(v, bool) and str(f.type) != "bool"):
                raise ValueError(f"RunConfig.{f.name} must be {f.type}, got {v!r}")
        checks = [
            ("num_labels", 1 <= self.num_labels <= 1000, "1..1000"),
            ("at", 1 <= self.at <= 1000, ">= 1"),
            ("mode", self.mode in _MODES, f"one of {_MODES}"),
            ("rank", (self.rank is None) == (self.mode == "layer") and (self.rank is None or self.rank >= 1),
             ">= 1 for mode 'bottleneck', None for mode 'layer'"),
            ("init", self.init in INITS and (self.init == "svd" or (self.mode == "bottleneck" and self.eliminate_links)),
             f"one of {INITS} ('calibrated' needs mode 'bottleneck' with eliminate_links=True)"),
            ("calibration_size", 1 <= self.calibration_size <= 10**6, "1 .. 1e6"),
            ("calibration_fit", self.calibration_fit in FIT_METHODS, f"one of {FIT_METHODS}"),
            ("seed", 0 <= self.seed < 2**31, "0 .. 2**31-1"),
            ("lr", 0 < self.lr < 1, "(0, 1)"),
            ("weight_decay", 0 <= self.weight_decay < 1, "[0, 1)"),
            ("total_steps", 1 <= self.total_steps <= 10**8, "1 .. 1e8"),
            ("warmup_steps", 0 <= self.warmup_steps <= self.total_steps, "0 .. total_steps"),
            ("batch_size", 1 <= self.batch_size <= 4096, "1 .. 4096"),
            ("max_length", 2 <= self.max_length <= 8192, "2 .. 8192"),
            ("run_id", bool(_RUN_ID.match(self.run_id)), "1-64 characters of [A-Za-z0-9_.-]"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"RunConfig.{name} must be {valid}, got {getattr(self, name)!r}")
        for name in ("fwd_codec", "bwd_codec", "pooled_codec", "pooled_grad_codec"):
            if getattr(self, name) is not None:
                from_spec(getattr(self, name))  # raises ValueError naming the bad part
        if not self.u_split and (self.pooled_codec is not None or self.pooled_grad_codec is not None):
            raise ValueError("RunConfig.pooled_codec / pooled_grad_codec apply to the U-split only (u_split=True)")

    def to_dict(self) -> dict:
        """Plain JSON-able dict (codec specs canonical)."""
        d = dataclasses.asdict(self)
        for name in ("fwd_codec", "bwd_codec", "pooled_codec", "pooled_grad_codec"):
            if d[name] is not None:
                d[name] = str(from_spec(d[name]))
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RunConfig":
        """Inverse of :meth:`to_dict`; refuses unknown or missing keys with a ValueError naming them."""
        if not isinstance(d, Mapping):
            raise ValueError(f"run config must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ValueError(f"run config: unknown keys {unknown}, missing keys {missing}")
        return cls(**d)

    def split_mismatch(self, other: "RunConfig") -> list[str]:
        """The :data:`SPLIT_FIELDS` on which ``self`` (the edge's) and ``other`` (the server's) differ, as text."""
        a, b = self.to_dict(), other.to_dict()
        return [f"{k}: edge asks {a[k]!r}, server serves {b[k]!r}" for k in SPLIT_FIELDS if a[k] != b[k]]

    def codecs(self) -> tuple[Codec, Codec, tuple[Codec, Codec]]:
        """``(fwd, bwd, (pooled, pooled_grad))``: the run's codec objects (the U-split's pooled pair defaults to
        ``(fwd, bwd)``)."""
        fwd, bwd = from_spec(self.fwd_codec), from_spec(self.bwd_codec)
        return fwd, bwd, pooled_codecs(fwd, bwd, self.pooled_codec, self.pooled_grad_codec)

    def digest(self) -> str:
        """SHA-256 of the canonical JSON form."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def fit_names(module: torch.nn.Module) -> set[str]:
    """State-dict keys of the calibrated fit inside ``module`` (its parts' ``fit_names``, with their prefixes)."""
    return {f"{prefix}.{n}" if prefix else n for prefix, m in module.named_modules()
            for n in getattr(m, "fit_names", ())}


def _tensors_hash(items: Iterable[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, t in sorted(items, key=lambda kv: kv[0]):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def state_hash(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state dict (names, dtypes, shapes and bytes, in name order).

    The calibrated fit (:func:`fit_names`) is left out: it is fitted on the edge's own data after
    both sides built their parts, so what the handshake compares by this hash is the part before
    calibration; the cloud's decoders are checked on their own (:func:`fit_hash`).
    """
    skip = fit_names(module)
    return _tensors_hash((k, v) for k, v in module.state_dict().items() if k not in skip)


def fit_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the calibrated fit's tensors in ``module`` by state-dict key (empty for ``init="svd"``)."""
    names, state = fit_names(module), module.state_dict()
    return {k: state[k].detach().clone() for k in sorted(names)}


def fit_hash(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 of a fit (:func:`fit_state`): names, dtypes, shapes and bytes."""
    return _tensors_hash(tensors.items())
