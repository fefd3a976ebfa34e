"""Helpers shared by the benchmark scripts: interleaved timing, test matrices and the PyTorch baselines.

The baselines are what a user would write without sft_kernels: a per-row absmax
int8 quantize in PyTorch, and ``torch.svd_lowrank`` followed by that quantize
of both factors.
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Sequence

import torch

#: Singular-value profiles of the synthetic test matrices.
SPECTRA = {
    "1/(1+i)": lambda i: 1.0 / (1.0 + i),
    "exp(-i/10)": lambda i: torch.exp(-i / 10.0),
    "1/sqrt(1+i)": lambda i: (1.0 + i) ** -0.5,
}


def interleaved_times(fns: Sequence[Callable[[], object]], repeat: int, warmup: int = 2,
                      max_seconds: float = 30.0) -> list[list[float]]:
    """All times (ms) of each function, called in turn (so machine load hits all alike), up to ``repeat`` rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    t_end = time.perf_counter() + max_seconds
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and len(times[0]) >= 3:
            break
    return times


def interleaved_ms(fns: Sequence[Callable[[], object]], repeat: int, **kw) -> list[float]:
    """Median ms of each function under :func:`interleaved_times`."""
    return [statistics.median(ts) for ts in interleaved_times(fns, repeat, **kw)]


def decaying(n: int, h: int, spectrum: str = "1/(1+i)", seed: int = 0) -> torch.Tensor:
    """An ``n x h`` fp32 matrix with random singular vectors and the singular values of ``spectrum``."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, h)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(h, k, generator=g))
    s = SPECTRA[spectrum](torch.arange(k, dtype=torch.float32))
    return ((u * s) @ v.T).contiguous()


def composite_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax int8 quantize, as a user would write it in PyTorch."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / 127
    return torch.round(xf / scale).to(torch.int8), scale


def composite_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def baseline_lowrank_encode(x: torch.Tensor, rank: int, niter: int = 2):
    """``torch.svd_lowrank(x.float(), q=rank, niter)`` then the composite int8 quantize of ``(U S)^T`` and ``V^T``."""
    u, s, v = torch.svd_lowrank(x.float(), q=rank, niter=niter)
    return composite_quantize((u * s).T), composite_quantize(v.T)


def baseline_lowrank_decode(enc) -> torch.Tensor:
    (pq, ps), (qq, qs) = enc
    return composite_dequantize(pq, ps).T @ composite_dequantize(qq, qs)


def rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    """Relative Frobenius error ``||y - x|| / ||x||`` in fp32."""
    x = x.float()
    return float(torch.linalg.norm(y.float() - x) / torch.linalg.norm(x))


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def machine() -> str:
    """CPU model, torch threads and versions, for the tables."""
    cpu = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}"


def fmt_row(row: dict, cols: Sequence[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    return "| " + " | ".join(cell(row[c]) for c in cols) + " |"


def fmt_table(rows: Sequence[dict], cols: Sequence[str]) -> str:
    head = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return "\n".join(head + [fmt_row(r, cols) for r in rows])


def cuda_interleaved_ms(fns: Sequence[Callable[[], object]], repeat: int, warmup: int = 2) -> list[float]:
    """Median GPU time (ms, CUDA events) of each function, called in turn for ``repeat`` rounds."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    events = [[(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
              for _ in fns]
    for r in range(repeat):
        for fn, evs in zip(fns, events):
            evs[r][0].record()
            fn()
            evs[r][1].record()
    torch.cuda.synchronize()
    return [statistics.median(a.elapsed_time(b) for a, b in evs) for evs in events]
