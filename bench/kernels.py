"""Kernel benchmarks: sft ops against ``x.clone()`` bandwidth and the PyTorch composite a user would write.

Run ``python bench/kernels.py`` (part of ``make bench``); ``--quick`` for a smoke run.
Every ratio in a row comes from the same run: our op, ``x.clone()``,
``y.copy_(x)`` and the baseline are timed interleaved on the same tensor and
the medians are reported.

Columns
-------
* ``*_ms``: median wall time.
* ``bw/clone``: effective bandwidth ((bytes read + bytes written) / time) as a
  fraction of ``x.clone()``'s (which reads and writes all of x).  A fresh
  allocation above glibc's mmap threshold (32 MiB) is page-faulted in on every
  call, so ``clone`` of a large fp32 tensor is slow; ``bw/copy`` is the same
  fraction against ``y.copy_(x)`` into a preallocated ``y`` (the machine's
  copy speed).  For the low-rank ops, bytes = one read of x + the packed output.
* ``err``: relative Frobenius error of the decoded tensor.
* ``x base``: baseline time / our time (higher is better).

Baselines (see ``common.py``): quantize -> per-row absmax int8 in PyTorch;
lowrank_quantize -> ``torch.svd_lowrank(x.float(), q=rank, niter=2)`` + that
quantize of ``U*S`` and ``V``.

``--device cuda`` times quantize / dequantize on the GPU with CUDA events
(fp32 and bf16 at 1, 16 and 256 MB, rows of 4096): ``bw/clone`` as above, and
``x ref``, the time of the PyTorch composite of the same format
(``sft_kernels.reference``) over ours. Which CUDA kernels serve the ops (fused
or the reference) follows ``SFT_CUDA_FUSED``, and is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

import sft_kernels  # noqa: F401
from sft_kernels import ops
from sft_kernels import reference as R
from sft_kernels.codecs import DEFAULT_BLOCK, LowRankCodec

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    baseline_lowrank_decode,
    baseline_lowrank_encode,
    composite_dequantize,
    composite_quantize,
    cuda_interleaved_ms,
    decaying,
    fmt_row,
    fmt_table,
    interleaved_ms,
    machine,
    nbytes,
    rel_err,
)

QUANT_COLS = ["op", "dtype", "shape", "MB", "clone_ms", "copy_ms", "quant_ms", "bw/clone", "bw/copy",
              "x base", "dequant_ms", "dq bw/clone", "dq x base", "err"]
CUDA_COLS = ["op", "dtype", "shape", "MB", "clone_ms", "quant_ms", "bw/clone", "ref_ms", "x ref", "dequant_ms",
             "dq bw/clone", "dq x ref"]
LOWRANK_COLS = ["op", "dtype", "shape", "clone_ms", "ours_ms", "bw/clone", "err", "base_ms", "base_err", "x base",
                "decode_ms"]


def bench_quantize(x: torch.Tensor, bits: int, sr: bool, repeat: int) -> dict:
    """One quantize + dequantize row for tensor ``x`` (default block of the bit width)."""
    block = DEFAULT_BLOCK[bits]
    cols = x.shape[-1]
    y = torch.empty_like(x)
    codes, scales = ops.quantize(x, bits, block, sr, 0)
    cq, cs = composite_quantize(x)
    clone_ms, copy_ms, q_ms, cq_ms, d_ms, cd_ms = interleaved_ms([
        x.clone,
        lambda: y.copy_(x),
        lambda: ops.quantize(x, bits, block, sr, 0),
        lambda: composite_quantize(x),
        lambda: ops.dequantize(codes, scales, bits, block, cols, x.dtype),
        lambda: composite_dequantize(cq, cs, x.dtype),
    ], repeat)
    io = x.nbytes + nbytes(codes, scales)
    return {
        **_quantize_row_head(x, bits, sr),
        "clone_ms": clone_ms,
        "copy_ms": copy_ms,
        "quant_ms": q_ms,
        "bw/clone": (io / q_ms) / (2 * x.nbytes / clone_ms),
        "bw/copy": (io / q_ms) / (2 * x.nbytes / copy_ms),
        "x base": cq_ms / q_ms,
        "dequant_ms": d_ms,
        "dq bw/clone": (io / d_ms) / (2 * x.nbytes / clone_ms),
        "dq x base": cd_ms / d_ms,
        "err": rel_err(ops.dequantize(codes, scales, bits, block, cols, x.dtype), x),
    }


def _quantize_row_head(x: torch.Tensor, bits: int, sr: bool) -> dict:
    """The columns that name a quantize row: op, dtype, shape, size."""
    return {"op": f"quantize int{bits}{',sr' if sr else ''}", "dtype": str(x.dtype).replace("torch.", ""),
            "shape": "x".join(map(str, x.shape)), "MB": round(x.nbytes / 2**20, 1)}


def bench_quantize_cuda(x: torch.Tensor, bits: int, sr: bool, repeat: int) -> dict:
    """One CUDA quantize + dequantize row: our op, x.clone() and the reference composite, interleaved."""
    block = DEFAULT_BLOCK[bits]
    cols = x.shape[-1]
    codes, scales = ops.quantize(x, bits, block, sr, 0)
    clone_ms, q_ms, ref_ms, d_ms, dref_ms = cuda_interleaved_ms([
        x.clone,
        lambda: ops.quantize(x, bits, block, sr, 0),
        lambda: R.quantize(x, bits, block, sr, 0),
        lambda: ops.dequantize(codes, scales, bits, block, cols, x.dtype),
        lambda: R.dequantize(codes, scales, bits, block, cols, x.dtype),
    ], repeat)
    io = x.nbytes + nbytes(codes, scales)
    clone_bw = 2 * x.nbytes / clone_ms
    return {
        **_quantize_row_head(x, bits, sr),
        "clone_ms": clone_ms,
        "quant_ms": q_ms,
        "bw/clone": (io / q_ms) / clone_bw,
        "ref_ms": ref_ms,
        "x ref": ref_ms / q_ms,
        "dequant_ms": d_ms,
        "dq bw/clone": (io / d_ms) / clone_bw,
        "dq x ref": dref_ms / d_ms,
    }


def run_cuda(repeat: int, quick: bool, json_path: Path) -> int:
    """The CUDA table: fp32 and bf16 at 1, 16 and 256 MB (1 and 16 with --quick)."""
    if not torch.cuda.is_available():
        print("bench/kernels.py --device cuda: no CUDA device visible to torch", file=sys.stderr)
        return 2
    dev = torch.cuda.get_device_name()
    fused = os.environ.get("SFT_CUDA_FUSED") == "1"
    print(f"# device: {dev}; torch {torch.__version__}; kernels: {'fused (SFT_CUDA_FUSED=1)' if fused else 'reference'}",
          flush=True)
    print("| " + " | ".join(CUDA_COLS) + " |")
    rows = []
    cols = 4096
    for mb in ([1, 16] if quick else [1, 16, 256]):
        for dtype in (torch.float32, torch.bfloat16):
            n = mb * 2**20 // (cols * torch.finfo(dtype).bits // 8)
            x = torch.randn(n, cols, device="cuda").to(dtype)
            for bits, sr in [(8, False), (4, False), (8, True)]:
                row = bench_quantize_cuda(x, bits, sr, repeat)
                rows.append(row)
                print(fmt_row(row, CUDA_COLS), flush=True)
            del x
            torch.cuda.empty_cache()
    print()
    print(fmt_table(rows, CUDA_COLS))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"device": dev, "fused": fused, "torch": torch.__version__, "quantize": rows},
                                    indent=1))
    print(f"\nrows written to {json_path}")
    return 0


def bench_lowrank(x: torch.Tensor, rank: int, oversample: int, iters: int, repeat: int, label: str = "") -> dict:
    """One lowrank_quantize (int8) row against the svd_lowrank + composite baseline."""
    n, h = x.shape
    args = (rank, oversample, iters, 8, 64, False, 0)
    out = ops.lowrank_quantize(x, *args)
    torch.manual_seed(0)
    base = baseline_lowrank_encode(x, rank)
    clone_ms, ours_ms, dec_ms, base_ms = interleaved_ms([
        x.clone,
        lambda: ops.lowrank_quantize(x, *args),
        lambda: ops.lowrank_dequantize(*out, n, h, rank, 8, 64, x.dtype),
        lambda: baseline_lowrank_encode(x, rank),
    ], repeat)
    return {
        "op": f"lowrank_quantize r={rank} os={oversample} it={iters} int8{label}",
        "dtype": str(x.dtype).replace("torch.", ""),
        "shape": f"{n}x{h}",
        "clone_ms": clone_ms,
        "ours_ms": ours_ms,
        "bw/clone": ((x.nbytes + nbytes(*out)) / ours_ms) / (2 * x.nbytes / clone_ms),
        "err": rel_err(ops.lowrank_dequantize(*out, n, h, rank, 8, 64, torch.float32), x),
        "base_ms": base_ms,
        "base_err": rel_err(baseline_lowrank_decode(base), x),
        "x base": base_ms / ours_ms,
        "decode_ms": dec_ms,
    }


def minilm_tokens(n_sentences: int) -> torch.Tensor:
    """Real boundary activations: MiniLM hidden states after layer 3 for SST-2 dev sentences."""
    from sft_kernels.data import read_sentences
    from sft_kernels.split import boundary_activations

    return boundary_activations(read_sentences("SST-2", "dev", limit=n_sentences), layer=3)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and few repeats (smoke run)")
    p.add_argument("--repeat", type=int, default=15, help="interleaved timing rounds; medians are reported")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--only", choices=["quantize", "lowrank"], default=None, help="run one group")
    p.add_argument("--json", type=Path, default=None,
                   help="where to write all rows (default bench/results/kernels.json, kernels_cuda.json for cuda)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: the quantize table on the GPU (ignores --only and --threads)")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.device == "cuda":
        return run_cuda(3 if args.quick else args.repeat, args.quick,
                        args.json or Path("bench/results/kernels_cuda.json"))
    args.json = args.json or Path("bench/results/kernels.json")
    if args.threads:
        torch.set_num_threads(args.threads)
    codec = LowRankCodec()
    ns = [1024] if args.quick else [4096, 16384]
    hs = [384, 768] if args.quick else [384, 768, 4096]
    ranks = [8] if args.quick else [4, 8, 32]
    repeat = 3 if args.quick else args.repeat
    print(f"# machine: {machine()}", flush=True)
    quant_rows, lr_rows = [], []

    def emit(rows, row, cols):
        rows.append(row)
        print(fmt_row(row, cols), flush=True)

    if args.only in (None, "quantize"):
        print("| " + " | ".join(QUANT_COLS) + " |")
        for n in ns:
            for h in hs:
                for dtype in (torch.float32, torch.bfloat16):
                    x = torch.randn(n, h).to(dtype)
                    for bits, sr in [(8, False), (4, False), (2, False), (8, True)]:
                        emit(quant_rows, bench_quantize(x, bits, sr, repeat), QUANT_COLS)

    if args.only in (None, "lowrank"):
        print("| " + " | ".join(LOWRANK_COLS) + " |")
        for n in ns:
            for h in hs:
                x = decaying(n, h)
                for r in ranks:
                    emit(lr_rows, bench_lowrank(x, r, codec.oversample, codec.iters, repeat), LOWRANK_COLS)
        x = minilm_tokens(32 if args.quick else 256)
        for r in ranks:
            emit(lr_rows, bench_lowrank(x, r, codec.oversample, codec.iters, repeat, " (MiniLM)"), LOWRANK_COLS)
        # the target case in bf16, and the single-pass sketch against two passes
        x = decaying(1024 if args.quick else 4096, 768)
        emit(lr_rows, bench_lowrank(x.bfloat16(), 8, codec.oversample, codec.iters, repeat), LOWRANK_COLS)
        for iters in (-1, 0, 2):
            emit(lr_rows, bench_lowrank(x, 8, codec.oversample, iters, repeat), LOWRANK_COLS)

    print()
    if quant_rows:
        print(fmt_table(quant_rows, QUANT_COLS) + "\n")
    if lr_rows:
        print(fmt_table(lr_rows, LOWRANK_COLS))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine(), "quantize": quant_rows, "lowrank": lr_rows}, indent=1))
    print(f"\nrows written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
