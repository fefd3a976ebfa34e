"""Kernel benchmarks: sft ops against ``x.clone()`` bandwidth and the PyTorch composite a user would write.

Run ``python bench/kernels.py`` (``make bench``); ``--quick`` for a smoke run.
Every ratio in a row is measured in the same run, on the same tensor.

Columns
-------
* ``ms``: median wall time over ``--repeat`` runs (after warm-up).
* ``bw/clone``: effective bandwidth (bytes read + bytes written) / time, as a
  fraction of ``x.clone()``'s (which reads and writes all of x) on the same x.
  For the low-rank ops the bytes are one read of x plus the packed output.
* ``err``: relative Frobenius error of the decoded tensor.
* ``vs base``: baseline time / our time (higher is better).

Baselines: quantize -> per-row absmax int8 quantize in PyTorch (the quantize
half, and the dequantize half for dequantize); lowrank_quantize ->
``torch.svd_lowrank(x.float(), q=rank, niter=2)`` plus the per-row int8
composite on ``U*S`` and ``V``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

import sft_kernels  # noqa: F401
from sft_kernels import ops


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 2, max_seconds: float = 20.0) -> float:
    """Median wall time in ms of ``fn()`` over up to ``repeat`` runs (stops early after ``max_seconds``)."""
    for _ in range(warmup):
        fn()
    times = []
    t_end = time.perf_counter() + max_seconds
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > t_end and len(times) >= 3:
            break
    return statistics.median(times)


def composite_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-row int8 absmax quantize a user would write in PyTorch."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(xf / scale).to(torch.int8), scale


def composite_dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def rel_err(y: torch.Tensor, x: torch.Tensor) -> float:
    x = x.float()
    return float(torch.linalg.norm(y.float() - x) / torch.linalg.norm(x))


def nbytes(*ts: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def bench_quantize(x: torch.Tensor, bits: int, block: int, sr: bool, repeat: int, clone_ms: float) -> dict:
    """One quantize + dequantize row for tensor ``x``."""
    codes, scales = ops.quantize(x, bits, block, sr, 0)
    t_q = median_ms(lambda: ops.quantize(x, bits, block, sr, 0), repeat)
    y = ops.dequantize(codes, scales, bits, block, x.shape[-1], x.dtype)
    t_d = median_ms(lambda: ops.dequantize(codes, scales, bits, block, x.shape[-1], x.dtype), repeat)
    t_cq = median_ms(lambda: composite_quantize(x), repeat)
    cq, cs = composite_quantize(x)
    t_cd = median_ms(lambda: composite_dequantize(cq, cs, x.dtype), repeat)
    clone_bw = 2 * x.nbytes / clone_ms
    io = x.nbytes + nbytes(codes, scales)
    return {
        "op": f"quantize int{bits}{',sr' if sr else ''}",
        "dtype": str(x.dtype).replace("torch.", ""),
        "shape": "x".join(map(str, x.shape)),
        "MB": round(x.nbytes / 2**20, 1),
        "clone_ms": clone_ms,
        "quant_ms": t_q,
        "quant_bw_frac": io / t_q / clone_bw,
        "dequant_ms": t_d,
        "dequant_bw_frac": io / t_d / clone_bw,
        "err": rel_err(y, x),
        "composite_quant_ms": t_cq,
        "composite_dequant_ms": t_cd,
        "quant_vs_composite": t_cq / t_q,
        "dequant_vs_composite": t_cd / t_d,
    }


def baseline_lowrank_int8(x: torch.Tensor, rank: int, niter: int) -> torch.Tensor:
    """torch.svd_lowrank + the composite per-row int8 quantize of both factors, decoded."""
    u, s, v = torch.svd_lowrank(x.float(), q=rank, niter=niter)
    pq, ps = composite_quantize((u * s).T)
    qq, qs = composite_quantize(v.T)
    return composite_dequantize(pq, ps, torch.float32).T @ composite_dequantize(qq, qs, torch.float32)


def bench_lowrank(x: torch.Tensor, rank: int, oversample: int, iters: int, repeat: int, clone_ms: float,
                  base_niter: int = 2, label: str = "") -> dict:
    """One lowrank_quantize (int8) row against the svd_lowrank + composite baseline."""
    n, h = x.shape
    args = (rank, oversample, iters, 8, 64, False, 0)
    out = ops.lowrank_quantize(x, *args)
    y = ops.lowrank_dequantize(*out, n, h, rank, 8, 64, torch.float32)
    t_ours = median_ms(lambda: ops.lowrank_quantize(x, *args), repeat)
    t_dec = median_ms(lambda: ops.lowrank_dequantize(*out, n, h, rank, 8, 64, torch.float32), repeat)
    torch.manual_seed(0)
    yb = baseline_lowrank_int8(x, rank, base_niter)
    t_base = median_ms(lambda: baseline_lowrank_int8(x, rank, base_niter), max(3, repeat // 2))
    t_base_enc = median_ms(
        lambda: [composite_quantize(t) for t in _svd_factors(x, rank, base_niter)], max(3, repeat // 2)
    )
    clone_bw = 2 * x.nbytes / clone_ms
    return {
        "op": f"lowrank_quantize r={rank} os={oversample} it={iters} int8" + label,
        "dtype": str(x.dtype).replace("torch.", ""),
        "shape": f"{n}x{h}",
        "MB": round(x.nbytes / 2**20, 1),
        "clone_ms": clone_ms,
        "ours_ms": t_ours,
        "ours_bw_frac": (x.nbytes + nbytes(*out)) / t_ours / clone_bw,
        "decode_ms": t_dec,
        "err": rel_err(y, x),
        "base_ms": t_base_enc,
        "base_err": rel_err(yb, x),
        "speedup": t_base_enc / t_ours,
        "bytes_out": nbytes(*out),
    }


def _svd_factors(x: torch.Tensor, rank: int, niter: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, v = torch.svd_lowrank(x.float(), q=rank, niter=niter)
    return (u * s).T, v.T


def decaying(n: int, h: int, seed: int = 0) -> torch.Tensor:
    """An ``n x h`` fp32 matrix with singular values 1/(1+i)."""
    g = torch.Generator().manual_seed(seed)
    k = min(n, h)
    u, _ = torch.linalg.qr(torch.randn(n, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(h, k, generator=g))
    s = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32))
    return (u * s) @ v.T


def minilm_tokens(n_sentences: int) -> torch.Tensor:
    from sft_kernels.data import read_sentences
    from sft_kernels.split import boundary_activations

    return boundary_activations(read_sentences("SST-2", "dev", limit=n_sentences), layer=3)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}, python {platform.python_version()}"


def fmt_table(rows: list[dict], cols: list[str]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r[c]) for c in cols) + " |")
    return "\n".join(lines)


QUANT_COLS = ["op", "dtype", "shape", "MB", "clone_ms", "quant_ms", "quant_bw_frac", "quant_vs_composite",
              "dequant_ms", "dequant_bw_frac", "dequant_vs_composite", "err"]
LOWRANK_COLS = ["op", "shape", "clone_ms", "ours_ms", "ours_bw_frac", "err", "base_ms", "base_err", "speedup",
                "decode_ms"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    p.add_argument("--repeat", type=int, default=15, help="timed runs per measurement; the median is reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--oversample", type=int, default=None, help="lowrank oversample (default: the codec default)")
    p.add_argument("--iters", type=int, default=None, help="lowrank power iterations (default: the codec default)")
    p.add_argument("--only", choices=["quantize", "lowrank"], default=None, help="run one group")
    p.add_argument("--json", type=Path, default=Path("bench/results/kernels.json"), help="where to write all rows")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from sft_kernels.codecs import LowRankCodec

    os_ = args.oversample if args.oversample is not None else LowRankCodec().oversample
    it = args.iters if args.iters is not None else LowRankCodec().iters
    ns = [1024] if args.quick else [4096, 16384]
    hs = [384, 768] if args.quick else [384, 768, 4096]
    ranks = [8] if args.quick else [4, 8, 32]
    repeat = 3 if args.quick else args.repeat
    print(f"# machine: {machine()}", flush=True)
    quant_rows, lr_rows = [], []

    if args.only in (None, "quantize"):
        cases = [(n, h) for n in ns for h in hs]
        for n, h in cases:
            for dtype in (torch.float32, torch.bfloat16):
                x = torch.randn(n, h).to(dtype)
                clone_ms = median_ms(lambda: x.clone(), repeat)
                for bits, sr in [(8, False), (4, False), (2, False), (8, True)]:
                    row = bench_quantize(x, bits, 64 if bits == 8 else 128 if bits == 4 else 256, sr, repeat, clone_ms)
                    quant_rows.append(row)
                    print(fmt_table([row], QUANT_COLS).splitlines()[-1], flush=True)

    if args.only in (None, "lowrank"):
        for n in ns:
            for h in hs:
                x = decaying(n, h)
                clone_ms = median_ms(lambda: x.clone(), repeat)
                for r in ranks:
                    row = bench_lowrank(x, r, os_, it, repeat, clone_ms)
                    lr_rows.append(row)
                    print(fmt_table([row], LOWRANK_COLS).splitlines()[-1], flush=True)
        x = minilm_tokens(32 if args.quick else 256)
        clone_ms = median_ms(lambda: x.clone(), repeat)
        for r in ranks:
            row = bench_lowrank(x, r, os_, it, repeat, clone_ms, label=" (MiniLM)")
            lr_rows.append(row)
            print(fmt_table([row], LOWRANK_COLS).splitlines()[-1], flush=True)
        # single-pass sketch against two-pass on the target case
        x = decaying(1024 if args.quick else 4096, 768)
        clone_ms = median_ms(lambda: x.clone(), repeat)
        for iters in (-1, 0, 1, 2):
            row = bench_lowrank(x, 8, os_, iters, repeat, clone_ms)
            lr_rows.append(row)
            print(fmt_table([row], LOWRANK_COLS).splitlines()[-1], flush=True)

    print()
    if quant_rows:
        print(fmt_table(quant_rows, QUANT_COLS))
        print()
    if lr_rows:
        print(fmt_table(lr_rows, LOWRANK_COLS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "quantize": quant_rows, "lowrank": lr_rows}, indent=1))
    print(f"\nrows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
