"""The codec demo: encode and decode real MiniLM boundary activations with each codec.

It embeds GLUE SST-2 dev sentences with the first ``layer`` layers of the
embedded all-MiniLM-L6-v2 (the tensor a layer split at K=``layer`` sends), then
reports, per codec, the payload bytes per token, the reduction against fp32 and
the relative Frobenius error of the decoded tensor.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import torch

from ..codecs import from_spec
from ..data import read_sentences
from ..split import boundary_activations, load_minilm

DEFAULT_CODECS: tuple[str, ...] = (
    "none",
    "fp16",
    "bf16",
    "int8",
    "int4",
    "int2",
    "int8,sr",
    "lowrank:r=8",
    "lowrank:r=32",
    "lowrank:r=8+int8",
    "lowrank:r=32+int8",
    "lowrank:r=32+int4",
    "lowrank:r=16,iters=-1+int8",
)


@dataclass
class CodecReport:
    """One codec's result on one activation tensor."""

    spec: str
    nbytes: int
    reduction: float
    rel_error: float
    ms: float


def codec_report(x: torch.Tensor, specs: Iterable[str] = DEFAULT_CODECS, seed: int = 0) -> list[CodecReport]:
    """Encode and decode ``x`` with every codec; sizes against ``x`` as fp32."""
    base = x.numel() * 4
    norm = torch.linalg.norm(x.float())
    out = []
    for spec in specs:
        codec = from_spec(spec)
        t0 = time.perf_counter()
        packet = codec.encode(x, seed=seed)
        y = codec.decode(packet)
        ms = (time.perf_counter() - t0) * 1e3
        err = float(torch.linalg.norm((y.float() - x.float())) / norm) if norm > 0 else 0.0
        out.append(CodecReport(str(codec), packet.nbytes, base / max(packet.nbytes, 1), err, ms))
    return out


def run_demo(
    n_sentences: int = 256,
    layer: int = 3,
    specs: Optional[Sequence[str]] = None,
    data_dir: Optional[str] = None,
    model_dir: Optional[str] = None,
) -> list[CodecReport]:
    """Run the demo end to end and print the table; returns the rows."""
    texts = read_sentences("SST-2", "dev", limit=n_sentences, data_dir=data_dir)
    model = load_minilm(model_dir)
    x = boundary_activations(texts, layer=layer, model=model)
    print(f"MiniLM boundary activations after layer {layer}: {tuple(x.shape)} fp32 "
          f"({len(texts)} SST-2 dev sentences, {x.numel() * 4 / 1e6:.2f} MB)")
    rows = codec_report(x, specs or DEFAULT_CODECS)
    ntok = x.shape[0]
    print(f"{'codec':30s} {'bytes':>10s} {'B/token':>9s} {'reduction':>10s} {'rel. error':>11s} {'ms':>8s}")
    for r in rows:
        print(f"{r.spec:30s} {r.nbytes:10d} {r.nbytes / ntok:9.1f} {r.reduction:9.1f}x {r.rel_error:11.4f} {r.ms:8.1f}")
    return rows
