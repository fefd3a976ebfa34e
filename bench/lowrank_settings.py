"""Sweep ``lowrank_quantize`` settings against the ``torch.svd_lowrank`` + int8 baseline.

For every (oversample, power_iters) pair this measures, on ``N x H`` fp32
matrices with decaying spectra, the relative Frobenius error of the decoded
reconstruction (mean over seeds) and the wall time of the encode, next to the
baseline: ``torch.svd_lowrank(x, q=rank, niter=2)`` followed by a per-row int8
absmax quantize of ``U*S`` and ``V`` written in PyTorch. A setting "meets" the
target when it is at least ``--target`` times faster than the baseline and no
less accurate on every spectrum.

Run ``python bench/lowrank_settings.py`` (``--threads``, ``--n``, ``--h`` to vary).
Times are the median of interleaved runs (all settings and the baseline take
turns, so a change in machine load hits them alike); ``min`` is also printed.
"""
from __future__ import annotations

import argparse
import statistics

import sys
from pathlib import Path

import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft.*)
from sft_kernels import ops

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    SPECTRA,
    baseline_lowrank_decode,
    baseline_lowrank_encode,
    decaying,
    interleaved_times,
    rel_err,
)

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--h", type=int, default=768)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--seeds", type=int, default=3, help="matrices per spectrum")
    p.add_argument("--repeat", type=int, default=20, help="interleaved timing rounds")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--target", type=float, default=5.0, help="required speedup over the baseline")
    p.add_argument("--oversample", type=int, nargs="+", default=[0, 4, 8, 12, 16])
    p.add_argument("--power-iters", type=int, nargs="+", default=[-1, 0, 1, 2])
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n, h, rank = args.n, args.h, args.rank
    settings = [(o, it) for it in args.power_iters for o in args.oversample]

    # accuracy
    err = {s: {} for s in ["baseline"] + settings}
    for spec in SPECTRA:
        xs = [decaying(n, h, spec, seed) for seed in range(args.seeds)]
        base = []
        for seed, x in enumerate(xs):
            torch.manual_seed(seed)
            base.append(rel_err(baseline_lowrank_decode(baseline_lowrank_encode(x, rank)), x))
        err["baseline"][spec] = statistics.mean(base)
        for o, it in settings:
            e = []
            for seed, x in enumerate(xs):
                enc = ops.lowrank_quantize(x, rank, o, it, 8, 64, False, seed)
                e.append(rel_err(ops.lowrank_dequantize(*enc, n, h, rank, 8, 64), x))
            err[(o, it)][spec] = statistics.mean(e)

    # time (interleaved)
    x = decaying(n, h, "1/(1+i)", 0)
    fns = {"baseline": lambda: baseline_lowrank_encode(x, rank)}
    for o, it in settings:
        fns[(o, it)] = (lambda o, it: lambda: ops.lowrank_quantize(x, rank, o, it, 8, 64, False, 0))(o, it)
    times = dict(zip(fns, interleaved_times(list(fns.values()), args.repeat, warmup=1, max_seconds=float("inf"))))
    med = {key: statistics.median(v) for key, v in times.items()}

    print(f"# lowrank_quantize rank={rank} int8 block=64 on {n}x{h} fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"# error: mean relative Frobenius error over {args.seeds} matrices per spectrum")
    specs = list(SPECTRA)
    print("| setting | median ms | min ms | speedup | " + " | ".join(f"err {s}" for s in specs) + " | meets |")
    print("|---|---|---|---|" + "---|" * len(specs) + "---|")
    for key in ["baseline"] + settings:
        name = "svd_lowrank(q=r, niter=2) + int8" if key == "baseline" else f"oversample={key[0]} power_iters={key[1]}"
        speed = med["baseline"] / med[key]
        ok = key != "baseline" and speed >= args.target and all(
            err[key][s] <= err["baseline"][s] for s in specs[:2])
        ok_all = ok and err[key][specs[2]] <= err["baseline"][specs[2]]
        errs = " | ".join(f"{err[key][s]:.4f}" for s in specs)
        mark = "" if key == "baseline" else ("yes (all 3)" if ok_all else "yes" if ok else "no")
        print(f"| {name} | {med[key]:.2f} | {min(times[key]):.2f} | {speed:.1f}x | {errs} | {mark} |")
    print("# meets: >= target speedup and error <= baseline on 1/(1+i) and exp(-i/10) "
          "('all 3': also on 1/sqrt(1+i))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
