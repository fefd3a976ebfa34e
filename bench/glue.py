"""GLUE benchmark: fine-tune MiniLM split at K = 3 of 6 layers, per configuration, and compare with no split.

Every (task, config, seed) cell fine-tunes the pretrained all-MiniLM-L6-v2 encoder with a
fresh head on a fixed train subsample (the same rows, seeds, hyper-parameters and steps
for every config), evaluates on the FULL dev set (through the link, codecs included) and
appends one row to the CSV.  Bytes per training example are the byte counters' deltas
over the training steps only, divided by the training examples processed.

The runners and the training recipe are the package's (:mod:`sft_kernels.runtime.runners`):
``train_step(batch) -> loss``, ``predict(batch) -> logits``, ``bytes_up`` / ``bytes_down``
(training traffic so far) and ``close()``.  Config (a) is the plain classifier with the split
runs' AdamW and schedule; a split config is an ``EdgeTrainer`` with its cloud part in this process,
or in a ``sft serve`` process on loopback under ``--over-tcp`` (the same step: the same losses).
This script only drives the runs (data order, the STS-B target scale of
:mod:`sft_kernels.data.recipe`, evaluation) and reports them.

Usage::

    python bench/glue.py                          # defaults of `make glue`
    python bench/glue.py --tasks RTE --configs a b --seeds 0 --max-train 64
    python bench/glue.py --report-only            # RESULTS.md + results/plots/*.png from the CSV

The CSV is resumable: cells already in it are skipped.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sft_kernels.data import (TASKS, batches, compute_metrics, glue_score, load_task,  # noqa: E402
                              majority_baseline, num_batches, subsample)
from sft_kernels.runtime import runners  # noqa: E402
from sft_kernels.runtime.runners import Runner  # noqa: E402
from sft_kernels.split.calibrate import DEFAULT_FIT  # noqa: E402

#: The split point: after layer K of MiniLM's 6.
SPLIT_AT = 3
DEFAULT_TASKS = ("SST-2", "CoLA", "MRPC", "STS-B", "RTE", "WNLI")
#: Regression targets (STS-B scores 0..5) are divided by this for training: an output scale near the fresh
#: head's lets few steps learn (Pearson/Spearman do not depend on the scale).  Measured on STS-B, config a,
#: 512 rows: score 15.5 with the scaling vs 0.6 without.
from sft_kernels.data.recipe import REGRESSION_TARGET_SCALE, learning_rate  # noqa: E402  (the package's recipe)
#: Default train cap: 512 rows per task (16 steps of 32), WNLI whole (635).
DEFAULT_MAX_TRAIN = "512,WNLI=all"
#: The CSV's required columns, in order; extra columns follow them.
CSV_COLUMNS = ["task", "config", "seed", "metric_name", "metric", "train_examples", "epochs",
               "bytes_up_per_example", "bytes_down_per_example", "seconds"]
EXTRA_COLUMNS = ["metrics", "lr", "batch_size", "max_length", "first_losses", "machine", "steps", "bytes_up_first",
                 "bytes_down_first", "first_examples", "handshake_bytes", "final_losses"]
#: Seeds the permutation that holds out the learning-rate sweep's slice of each training set.
SWEEP_SEED = 4321
METRIC_NAMES = {"accuracy": "accuracy", "matthews_corr": "mcc", "f1": "f1", "pearson": "pearson", "spearman": "spearman"}
FINDINGS_START, FINDINGS_END = "<!-- findings -->", "<!-- /findings -->"


@dataclass(frozen=True)
class Config:
    """One split configuration.  ``split is None`` means no split (the reference)."""

    name: str
    label: str
    split: Optional[dict[str, Any]] = None


def _bn(rank: int, fwd: str = "none", bwd: str = "none", links: bool = True, init: str = "svd",
        fit: Optional[str] = None) -> dict[str, Any]:
    out = dict(mode="bottleneck", rank=rank, fwd_codec=fwd, bwd_codec=bwd, eliminate_links=links, init=init)
    return out if fit is None else {**out, "calibration_fit": fit}


def _layer(fwd: str = "none", bwd: str = "none") -> dict[str, Any]:
    return dict(mode="layer", fwd_codec=fwd, bwd_codec=bwd)


CONFIGS: dict[str, Config] = {c.name: c for c in [
    Config("a", "(a) no split (reference)"),
    Config("b", "(b) layer split, fp32 both ways", _layer()),
    Config("c4", "(c) bottleneck r=4, links eliminated", _bn(4)),
    Config("c8", "(c) bottleneck r=8, links eliminated", _bn(8)),
    Config("c16", "(c) bottleneck r=16, links eliminated", _bn(16)),
    Config("c4_links", "(c) bottleneck r=4, links kept (sends h)", _bn(4, links=False)),
    Config("d4_int8", "(d) bottleneck r=4 + int8 / int8,sr", _bn(4, "int8", "int8,sr")),
    Config("d8_int8", "(d) bottleneck r=8 + int8 / int8,sr", _bn(8, "int8", "int8,sr")),
    Config("d4_int4", "(d) bottleneck r=4 + int4 / int4,sr", _bn(4, "int4", "int4,sr")),
    Config("k4", "(k) calibrated bottleneck r=4 + int8 / int8,sr", _bn(4, "int8", "int8,sr", init="calibrated")),
    Config("k2", "(k) calibrated bottleneck r=2 + int8 / int8,sr", _bn(2, "int8", "int8,sr", init="calibrated")),
    Config("k4_fp32", "(k) calibrated bottleneck r=4, fp32 (no codec)", _bn(4, init="calibrated")),
    Config("k4_svdfit", "(k) calibrated r=4, the paper's code + least-squares residual, + int8 / int8,sr",
           _bn(4, "int8", "int8,sr", init="calibrated", fit="svd")),
    Config("e_lr16_int8", "(e) layer split + lowrank r=16 + int8 both ways",
           _layer("lowrank:r=16+int8", "lowrank:r=16+int8")),
    Config("f_int8", "(f) layer split + int8 / int8,sr", _layer("int8", "int8,sr")),
]}


# --------------------------------------------------------------------------------------------- one run
def max_train_for(task: str, spec: dict[str, Optional[int]]) -> Optional[int]:
    """Cap for ``task`` from ``--max-train``'s parsed form (per-task value, else the default)."""
    return spec.get(task, spec.get("*"))


def parse_max_train(text: str) -> dict[str, Optional[int]]:
    """``"512"`` / ``"SST-2=2000,RTE=1000"`` / ``"512,WNLI=0"`` -> ``{task or "*": n}``; 0 or "all" = no cap."""
    out: dict[str, Optional[int]] = {}
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, _, val = part.rpartition("=")
        key = key.strip() or "*"
        if key != "*" and key not in TASKS:
            raise argparse.ArgumentTypeError(f"--max-train: unknown task {key!r} (valid: {list(TASKS)})")
        try:
            n = None if val.strip().lower() in ("all", "none", "0") else int(val)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--max-train: not an int: {val!r}") from None
        if n is not None and n < 0:
            raise argparse.ArgumentTypeError(f"--max-train must be >= 0, got {n}")
        out[key] = n
    return out


def evaluate(runner: Runner, task: str, tokenizer, dev_ds, args: argparse.Namespace) -> dict[str, float]:
    """The task's metrics of ``runner`` on ``dev_ds`` (length-sorted batches, predictions mapped back)."""
    spec = TASKS[task]
    preds = np.zeros(len(dev_ds), dtype=np.float64 if spec.is_regression else np.int64)
    for b in batches(tokenizer, dev_ds, args.eval_batch_size, max_length=args.max_length, sort_by_length=True):
        logits = runner.predict(b)
        p = logits[:, 0] if spec.is_regression else logits.argmax(-1)
        preds[b["index"].numpy()] = p.float().numpy() if spec.is_regression else p.numpy()
    return compute_metrics(task, preds, np.asarray(dev_ds["label"]))


def metric_name(task: str) -> str:
    """The CSV's metric name: ``accuracy``, ``mcc``, ``f1/accuracy``, ``pearson/spearman``."""
    return "/".join(METRIC_NAMES[m] for m in TASKS[task].metric_names)


def machine() -> str:
    """CPU model and core count (``lscpu``), or the platform string."""
    name = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        m = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if m:
            name = m.group(1).strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{name}, {os.cpu_count()} cores"


def run_one(task: str, config: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune one (task, config, seed) cell and evaluate it on the full dev set; returns the CSV row."""
    _, train_full = load_task(task, "train", data_dir=args.data_dir)
    _, dev_ds = load_task(task, "dev", data_dir=args.data_dir, limit=getattr(args, "max_dev", None))
    return train_and_evaluate(task, config, seed, args, subsample(train_full, max_train_for(task, args.max_train)),
                              dev_ds, lr_for(task, args))


def lr_for(task: str, args: argparse.Namespace) -> float:
    """``--lr``, or the package recipe's learning rate of ``task`` (:func:`sft_kernels.data.recipe.learning_rate`)."""
    return args.lr if args.lr is not None else learning_rate(task)


def train_and_evaluate(task: str, config: str, seed: int, args: argparse.Namespace, train_ds, eval_ds,
                       lr: float) -> dict[str, Any]:
    """Fine-tune ``config`` on ``train_ds`` for ``args.epochs`` and evaluate it on ``eval_ds``; returns the CSV row.

    The row also carries ``losses`` (every training step's loss, not written to the CSV).  Regression
    targets are trained as ``label / REGRESSION_TARGET_SCALE`` (the metrics are scale-free).  A config in
    ``args.bytes_only`` trains ``args.bytes_steps`` steps for its byte counts and is not evaluated
    (metric nan).  ``bytes_*_first``: payload of the first ``args.bytes_steps`` steps, over
    ``first_examples`` examples (the same examples for every config of a seed: ratios against a
    bytes-only config compare like with like).
    """
    cfg = CONFIGS[config]
    spec = TASKS[task]
    steps_per_epoch = num_batches(len(train_ds), args.batch_size)
    total = steps_per_epoch * args.epochs
    bytes_only = config in (getattr(args, "bytes_only", None) or ())
    first_steps = getattr(args, "bytes_steps", 20)
    run_steps = min(total, first_steps) if bytes_only else total
    tok = runners.embedded_tokenizer()  # the model files are read once per process, outside the timed part
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    np.random.seed(seed)
    calibration = None
    if cfg.split is not None and cfg.split.get("init") == "calibrated":  # the first training batches, unlabelled
        calibration = [{k: v for k, v in b.items() if k != "labels"} for b in itertools.islice(
            batches(tok, train_ds, args.batch_size, max_length=args.max_length, shuffle=True, seed=seed, epoch=0),
            -(-args.calibration_size // args.batch_size))]
    split = None if cfg.split is None else dict(cfg.split)
    fit = split.pop("calibration_fit", DEFAULT_FIT) if split else DEFAULT_FIT  # the edge's, not a pinned split field
    runner = runners.make_runner(split, spec.num_labels, seed, lr=lr, weight_decay=args.weight_decay,
                                 total_steps=total, warmup_steps=int(round(args.warmup * total)),
                                 batch_size=args.batch_size, max_length=args.max_length, at=SPLIT_AT,
                                 over_tcp=getattr(args, "over_tcp", False), calibration=calibration,
                                 calibration_size=args.calibration_size,
                                 calibration_fit=fit,
                                 run_id=f"{config}-s{seed}-{time.time_ns()}")
    losses: list[float] = []
    examples = 0
    first = (0, 0, 0)
    start_epoch, spent = 0, 0.0
    # a multi-epoch cell checkpoints after each epoch, so an interrupted study loses at most one epoch
    ckpt = (cell_checkpoint(args, task, config, seed)
            if args.epochs > 1 and not bytes_only and not getattr(args, "over_tcp", False) else None)
    key = [task, config, seed, lr, total, len(train_ds)]
    if ckpt is not None and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        if st["key"] == key:
            runner.load_state_dict(st["runner"])
            losses, examples, first = list(st["losses"]), int(st["examples"]), tuple(st["first"])
            start_epoch, spent = int(st["epoch"]), float(st["seconds"])
            if not args.quiet:
                print(f"{task} {config} seed {seed}: resumed after epoch {start_epoch}", flush=True)
    try:
        from tqdm import tqdm

        bar = tqdm(total=run_steps, initial=len(losses), desc=f"{task} {config} s{seed}", disable=args.quiet,
                   leave=False, unit="step")
        for epoch in range(start_epoch, args.epochs):
            for b in batches(tok, train_ds, args.batch_size, max_length=args.max_length, shuffle=True, seed=seed,
                             epoch=epoch):
                if len(losses) == run_steps:
                    break
                if spec.is_regression:
                    b["labels"] = b["labels"] / REGRESSION_TARGET_SCALE
                losses.append(runner.train_step(b))
                examples += len(b["labels"])
                if len(losses) == min(first_steps, total):
                    first = (runner.bytes_up, runner.bytes_down, examples)
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if ckpt is not None and epoch + 1 < args.epochs:
                _save_atomic(ckpt, {"key": key, "runner": runner.state_dict(), "losses": losses, "examples": examples,
                                    "first": list(first), "epoch": epoch + 1,
                                    "seconds": spent + time.perf_counter() - t0})
        bar.close()
        up, down = runner.bytes_up, runner.bytes_down
        handshake = getattr(runner, "handshake_bytes", 0)
        metrics = {} if bytes_only else evaluate(runner, task, tok, eval_ds, args)
    finally:
        runner.close()
    seconds = spent + time.perf_counter() - t0
    return {
        "task": task, "config": config, "seed": seed, "metric_name": metric_name(task),
        "metric": round(glue_score(task, metrics), 4) if metrics else float("nan"),
        "train_examples": len(train_ds), "epochs": args.epochs,
        "bytes_up_per_example": round(up / max(examples, 1), 2),
        "bytes_down_per_example": round(down / max(examples, 1), 2), "seconds": round(seconds, 2),
        "metrics": ";".join(f"{k}={v:.6f}" for k, v in metrics.items()), "lr": lr,
        "batch_size": args.batch_size, "max_length": args.max_length,
        "first_losses": " ".join(f"{x:.5f}" for x in losses[:10]), "machine": machine(),
        "steps": len(losses), "bytes_up_first": first[0], "bytes_down_first": first[1], "first_examples": first[2],
        "handshake_bytes": handshake, "final_losses": " ".join(f"{x:.5f}" for x in losses[-10:]),
        "losses": losses,
    }


def cell_checkpoint(args: argparse.Namespace, task: str, config: str, seed: int) -> Path:
    """Where a cell's end-of-epoch checkpoint lives until its row is in the CSV (next to the CSV, git-ignored)."""
    return args.out.parent / "cells" / f"{args.out.stem}-{task}-{config}-s{seed}.pt"


def _save_atomic(path: Path, state: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def lr_sweep(args: argparse.Namespace) -> None:
    """Pick each task's learning rate on the unsplit model (config ``a``) without touching the dev set.

    Per task, a fixed permutation (seed :data:`SWEEP_SEED`) of the training set gives a held-out slice of
    ``--sweep-heldout`` rows and, after it, ``--sweep-train`` rows to train on; every ``--lr-sweep`` value
    trains ``--epochs`` epochs (seed ``--seeds[0]``) and is scored on the slice.  Rows go to ``--out``
    (resumable); the best learning rate per task is printed, for :data:`sft_kernels.data.recipe.LEARNING_RATES`.
    """
    done = {(r["task"], r["lr"]) for r in read_rows(args.out)}
    seed = args.seeds[0]
    for task in args.tasks:
        _, full = load_task(task, "train", data_dir=args.data_dir)
        perm = np.random.default_rng(SWEEP_SEED).permutation(len(full))
        held = full.select(perm[:args.sweep_heldout].tolist())
        train = full.select(perm[args.sweep_heldout:args.sweep_heldout + args.sweep_train].tolist())
        for lr in args.lr_sweep:
            if (task, str(lr)) in done:
                continue
            row = train_and_evaluate(task, "a", seed, args, train, held, lr)
            append_row(args.out, row)
            cell_checkpoint(args, task, "a", seed).unlink(missing_ok=True)
            if not args.quiet:
                print(f"{task:6s} lr {lr:g}: held-out {row['metric_name']} {row['metric']:.2f}  "
                      f"{row['seconds']:.0f} s", flush=True)
    best: dict[str, tuple[float, float]] = {}
    for r in read_rows(args.out):
        if r["task"] in args.tasks and (r["task"] not in best or float(r["metric"]) > best[r["task"]][1]):
            best[r["task"]] = (float(r["lr"]), float(r["metric"]))
    print("best learning rate per task (held-out training slice): "
          + ", ".join(f"{t}={lr:g} ({m:.2f})" for t, (lr, m) in best.items()))


# --------------------------------------------------------------------------------------------- CSV
def read_rows(path: Path) -> list[dict[str, str]]:
    """The CSV's rows (empty when the file does not exist)."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: Path, row: dict[str, Any]) -> None:
    """Append ``row`` (header first if the file is new), flushed to disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS + EXTRA_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def _meta_path(csv_path: Path) -> Path:
    return csv_path.with_suffix(".meta.json")


def record_command(csv_path: Path, args: argparse.Namespace) -> None:
    """Remember the command line and hyper-parameters next to the CSV (for RESULTS.md)."""
    p = _meta_path(csv_path)
    meta = json.loads(p.read_text()) if p.is_file() else {}
    cmd = "python bench/glue.py " + " ".join(sys.argv[1:])
    meta.setdefault("commands", [])
    if cmd not in meta["commands"]:
        meta["commands"].append(cmd)
    meta["hyper"] = {"lr": args.lr if args.lr is not None else "per task (package recipe)", "weight_decay": args.weight_decay, "warmup": args.warmup,
                     "batch_size": args.batch_size, "eval_batch_size": args.eval_batch_size,
                     "max_length": args.max_length, "epochs": args.epochs, "split_at": SPLIT_AT,
                     "optimizer": "AdamW, linear schedule with warmup", "threads": torch.get_num_threads(),
                     "bytes_steps": args.bytes_steps, "calibration_size": args.calibration_size,
                     "torch": torch.__version__}
    meta["machine"] = machine()
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(meta, indent=1))


# --------------------------------------------------------------------------------------------- report
def _mean_std(xs: list[float]) -> tuple[float, float]:
    a = np.asarray(xs, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _fmt_bytes(x: float) -> str:
    if x >= 1e6:
        return f"{x / 1e6:.2f} MB"
    if x >= 1e3:
        return f"{x / 1e3:.1f} kB"
    return f"{x:.0f} B"


def summarize(rows: list[dict[str, str]]) -> dict[str, Any]:
    """Per (task, config): scores over seeds, mean bytes up/down, seconds; plus the ordered task/config lists."""
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in rows:
        c = cells.setdefault((r["task"], r["config"]), {"scores": [], "up": [], "down": [], "seeds": set(),
                                                         "train": r["train_examples"], "epochs": r["epochs"]})
        c["scores"].append(float(r["metric"]))
        c["up"].append(float(r["bytes_up_per_example"]))
        c["down"].append(float(r["bytes_down_per_example"]))
        c["seeds"].add(r["seed"])
    tasks = [t for t in list(DEFAULT_TASKS) + sorted(TASKS) if any(k[0] == t for k in cells)]
    tasks = list(dict.fromkeys(tasks))
    configs = [c for c in CONFIGS if any(k[1] == c for k in cells)]
    for c in cells.values():
        c["mean"], c["std"] = _mean_std(c["scores"])
        c["up_mean"], c["down_mean"] = float(np.mean(c["up"])), float(np.mean(c["down"]))
    return {"cells": cells, "tasks": tasks, "configs": configs}


#: Paired comparisons of the report: (config, against, what it isolates).
PAIRS = [("b", "a", "the split itself (keyed dropout streams differ: a seed-noise yardstick)"),
         ("c4", "a", "the paper's method, rank 4, vs no split"),
         ("c4", "c4_links", "eliminating the residual link (same bottleneck)"),
         ("c16", "a", "rank 16 vs no split"),
         ("d4_int8", "c4", "int8 both ways on the rank-4 bottleneck"),
         ("d8_int8", "c8", "int8 both ways on the rank-8 bottleneck"),
         ("d4_int4", "c4", "int4 both ways on the rank-4 bottleneck"),
         ("f_int8", "b", "int8 both ways on the layer split"),
         ("e_lr16_int8", "b", "low-rank r=16 + int8 on the layer split")]


def _paired_section(rows: list[dict[str, str]], tasks: list[str]) -> list[str]:
    """Mean ± std over seeds of per-seed score differences: the same seed shares head init, data order, dropout."""
    score: dict[tuple[str, str, str], float] = {(r["task"], r["config"], r["seed"]): float(r["metric"]) for r in rows}
    L = ["", "## Paired differences (same task, same seed), mean ± std over seeds", "",
         "Each run of a seed shares the head initialisation, the data order and the dropout keys across configs, so "
         "per-seed differences cancel much of the seed noise that the mean ± std columns above carry.", "",
         "| difference | isolates | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for x, y, what in PAIRS:
        cells = []
        for t in tasks:
            d = [score[(t, x, s)] - score[(t, y, s)] for (tt, c, s) in score if tt == t and c == x and (t, y, s) in score]
            if d:
                m, sd = _mean_std(d)
                cells.append(f"{m:+.1f} ± {sd:.1f}")
            else:
                cells.append("")
        if any(cells):
            L.append(f"| {x} − {y} | {what} | " + " | ".join(cells) + " |")
    return L


def _baselines(tasks: Iterable[str], data_dir) -> dict[str, float]:
    out = {}
    for t in tasks:
        try:
            _, tr = load_task(t, "train", data_dir=data_dir)
            _, dv = load_task(t, "dev", data_dir=data_dir)
            out[t] = glue_score(t, majority_baseline(t, tr, dv))
        except (FileNotFoundError, ValueError):
            pass
    return out


def _reduction(cells, task: str, config: str, ref: str = "b", key: str = "up_mean") -> Optional[float]:
    r, c = cells.get((task, ref)), cells.get((task, config))
    if not r or not c or c[key] <= 0:
        return None
    return r[key] / c[key]


def make_plots(summary: dict[str, Any], baselines: dict[str, float], plot_dir: Path) -> list[Path]:
    """One PNG per task: score (mean +- std) vs bytes up per training example, log x; ``a`` and majority as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    cells, paths = summary["cells"], []
    for task in summary["tasks"]:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        pts = [(c, cells[(task, c)]) for c in summary["configs"] if (task, c) in cells and c != "a"]
        for name, cell in pts:
            x = max(cell["up_mean"], 1.0)
            ax.errorbar([x], [cell["mean"]], yerr=[cell["std"]], fmt="o", capsize=3)
            ax.annotate(name, (x, cell["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if (task, "a") in cells:
            a = cells[(task, "a")]
            ax.axhline(a["mean"], color="k", lw=1, label=f"(a) no split: {a['mean']:.1f}")
            if a["std"] > 0:
                ax.axhspan(a["mean"] - a["std"], a["mean"] + a["std"], color="k", alpha=0.08)
        if task in baselines:
            ax.axhline(baselines[task], color="gray", ls="--", lw=1, label=f"majority: {baselines[task]:.1f}")
        if pts:
            ax.set_xscale("log")
        ax.set_xlabel("bytes edge -> cloud per training example (log)")
        ax.set_ylabel(f"GLUE score ({metric_name(task) if task in TASKS else ''}) x 100")
        ax.set_title(f"{task}: MiniLM split at K={SPLIT_AT}, score vs traffic")
        ax.legend(loc="best", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        p = plot_dir / f"{task}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def _keep_findings(path: Path) -> str:
    placeholder = "_Findings: to be written (this text between the markers is kept when RESULTS.md is regenerated)._"
    if path.is_file():
        text = path.read_text()
        i, j = text.find(FINDINGS_START), text.find(FINDINGS_END)
        if 0 <= i < j:
            return text[i + len(FINDINGS_START):j].strip("\n")
    return placeholder


WIRE_JSON = REPO / "bench" / "results" / "wire.json"


def _wire_section(path: Path) -> list[str]:
    """RESULTS.md's "payload vs wire" table from ``bench/wire_bytes.py``'s measurement (none if not run)."""
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    rows = data["rows"]
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    cell = {(r["task"], r["config"]): r for r in rows}
    L = ["", "## Payload vs wire bytes per training example (measured over TCP)", "",
         f"The table above counts payload. On the wire (every byte of the TRAIN frames and their replies on the TCP "
         f"socket: frame headers, JSON metadata, tensor descriptors, CRC) each step costs more. Measured by "
         f"`{data['command']}` on {data['machine']}: the first {rows[0]['steps']} training steps of each task "
         f"(batch {data['batch_size']}, max length {data['max_length']}, seed 0, the study's data order), over "
         "loopback TCP. Cells: payload up / wire up, payload down / wire down, bytes per example; the overhead "
         "columns are wire / payload - 1 over all tasks; the reduction is vs (b) on the wire.", "",
         "| config | " + " | ".join(tasks) + " | wire overhead up | down | wire reduction up vs (b) | down |",
         "|---|" + "---|" * (len(tasks) + 4)]
    for c in configs:
        cols, ru, rd = [], [], []
        for t in tasks:
            r = cell.get((t, c))
            if r is None:
                cols.append("")
                continue
            n = r["examples"]
            cols.append(f"{_fmt_bytes(r['payload_up'] / n)} / {_fmt_bytes(r['wire_up'] / n)}, "
                        f"{_fmt_bytes(r['payload_down'] / n)} / {_fmt_bytes(r['wire_down'] / n)}")
            b = cell.get((t, "b"))
            if b is not None:
                ru.append(b["wire_up"] / r["wire_up"])
                rd.append(b["wire_down"] / r["wire_down"])
        mine = [cell[(t, c)] for t in tasks if (t, c) in cell]
        over_up = sum(r["wire_up"] for r in mine) / sum(r["payload_up"] for r in mine) - 1
        over_down = sum(r["wire_down"] for r in mine) / sum(r["payload_down"] for r in mine) - 1
        red = (f"{np.mean(ru):.1f}x | {np.mean(rd):.1f}x" if ru and c != "b" else "- | -")
        L.append(f"| {CONFIGS[c].label} | " + " | ".join(cols) + f" | {100 * over_up:+.1f}% | {100 * over_down:+.1f}% | "
                 + red + " |")
    return L


#: The real-budget study (``--study full``): its configs, evaluated and bytes-only, and its targets.
FULL_TASKS = ("SST-2", "CoLA", "MRPC", "STS-B", "RTE")
FULL_CONFIGS = ("a", "c4", "k4", "k2", "b")
FULL_CSV = REPO / "results" / "glue_full.csv"
#: (config, mean paired difference vs a at least, reduction each way at least) -- issue targets.
FULL_TARGETS = {"k4": (-0.5, 300.0), "k2": (-1.0, 450.0)}


def _nan(x: str) -> bool:
    return x in ("", "nan", "NaN")


def full_study_section(csv_path: Path, rel) -> list[str]:
    """RESULTS.md's first section: the real-budget study (scores, paired differences vs a, traffic, targets)."""
    rows = read_rows(csv_path)
    if not rows:
        return []
    meta_p = _meta_path(csv_path)
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    tasks = [t for t in FULL_TASKS if any(r["task"] == t for r in rows)]
    scored = [r for r in rows if not _nan(r["metric"])]
    configs = [c for c in FULL_CONFIGS if c != "b" and any(r["config"] == c for r in scored)]
    score = {(r["task"], r["config"], r["seed"]): float(r["metric"]) for r in scored}
    by = {(r["task"], r["config"], r["seed"]): r for r in rows}
    hours = sum(float(r["seconds"]) for r in rows) / 3600
    mach = meta.get("machine") or rows[0].get("machine", "?")
    hyper = meta.get("hyper", {})
    L = ["## Real budget: 3 epochs, full training sets", "",
         f"`{csv_path.name}`: {len(rows)} cells, {hours:.1f} CPU-hours of wall time on {mach} (torch "
         f"{hyper.get('torch', '?')}, {hyper.get('threads', '?')} threads). Each task's learning rate is the "
         "package recipe's (`sft_kernels.data.recipe.LEARNING_RATES`, picked on the unsplit model on a held-out slice "
         "of the training set, `results/lr_sweep.csv`) and the same for every config; batch "
         f"{hyper.get('batch_size', '?')}, max length {hyper.get('max_length', '?')}, AdamW, "
         f"{hyper.get('warmup', 0):.0%} warmup then linear decay; full dev sets. (b) is trained only "
         f"{hyper.get('bytes_steps', '?')} steps, for its bytes.", ""]
    for cmd in meta.get("commands", []):
        L.append(f"- Command: `{cmd}`")
    L += ["", "### Scores (mean ± std over seeds) and paired differences vs (a)", "",
          "Paired: per seed, config − (a) (the same head initialisation, data order and seeds), mean ± std over "
          "seeds; the last column is the mean over the tasks that have every seed of both.", "",
          "| config | " + " | ".join(tasks) + " | mean |", "|---|" + "---|" * (len(tasks) + 1)]
    diffs: dict[str, Optional[float]] = {}
    for c in configs:
        cols, means = [], []
        for t in tasks:
            xs = [v for (tt, cc, _), v in score.items() if tt == t and cc == c]
            if not xs:
                cols.append("")
                continue
            m, sd = _mean_std(xs)
            means.append(m)
            cell = f"{m:.1f} ± {sd:.1f} (n={len(xs)})"
            if c != "a":
                d = [v - score[(t, "a", s)] for (tt, cc, s), v in score.items() if tt == t and cc == c
                     and (t, "a", s) in score]
                if d:
                    dm, dsd = _mean_std(d)
                    cell += f"<br>{dm:+.2f} ± {dsd:.2f}"
            cols.append(cell)
        per_task = []
        for t in tasks:
            d = [v - score[(t, "a", s)] for (tt, cc, s), v in score.items() if tt == t and cc == c
                 and (t, "a", s) in score]
            if d:
                per_task.append(float(np.mean(d)))
        diffs[c] = float(np.mean(per_task)) if c != "a" and len(per_task) == len(tasks) else None
        tail = f"{np.mean(means):.1f}" if len(means) == len(tasks) else ""
        if diffs[c] is not None:
            tail += f"<br>{diffs[c]:+.2f}"
        L.append(f"| {CONFIGS[c].label} | " + " | ".join(cols) + f" | {tail} |")
    # traffic: the same first steps (same examples) of each seed against b's, per task; then the mean over tasks
    L += ["", "### Traffic per training example and reduction vs (b)", "",
          "Bytes per example: payload of the whole run (encoded boundary tensors, lengths, labels up; encoded "
          "gradients down) / examples processed. The reduction compares each cell's first "
          f"{hyper.get('bytes_steps', '?')} steps with (b)'s first steps of the same seed (the same examples), then "
          "averages over seeds and tasks. Once per run a calibrated config also sends its cloud decoders in the "
          "session handshake: the `+hs` reduction spreads those bytes over the run's training examples.", "",
          "| config | " + " | ".join(tasks) + " | reduction up | down | up +hs |", "|---|" + "---|" * (len(tasks) + 3)]
    reds: dict[str, tuple[float, float, float]] = {}
    for c in [c for c in FULL_CONFIGS if c not in ("a",)]:
        cols, ru, rd, rh = [], [], [], []
        for t in tasks:
            cells_tc = [r for (tt, cc, _), r in by.items() if tt == t and cc == c]
            if not cells_tc:
                cols.append("")
                continue
            up = float(np.mean([float(r["bytes_up_per_example"]) for r in cells_tc]))
            down = float(np.mean([float(r["bytes_down_per_example"]) for r in cells_tc]))
            cols.append(f"{up:.1f} / {down:.1f} B")
            tr, tdn, th = [], [], []
            for r in cells_tc:
                b = by.get((t, "b", r["seed"]))
                if b is None or c == "b" or not float(r["bytes_up_first"]):
                    continue
                n = float(r["first_examples"])
                tr.append(float(b["bytes_up_first"]) / float(r["bytes_up_first"]))
                tdn.append(float(b["bytes_down_first"]) / float(r["bytes_down_first"]))
                run_examples = float(r["train_examples"]) * float(r["epochs"])
                th.append(float(b["bytes_up_first"]) / n
                          / (float(r["bytes_up_first"]) / n + float(r.get("handshake_bytes") or 0) / run_examples))
            if tr:
                ru.append(float(np.mean(tr)))
                rd.append(float(np.mean(tdn)))
                rh.append(float(np.mean(th)))
        full = len(ru) == len(tasks)
        if full:
            reds[c] = (float(np.mean(ru)), float(np.mean(rd)), float(np.mean(rh)))
        red = " | ".join(f"{x:.0f}x" for x in reds[c]) if full else "- | - | -"
        label = CONFIGS[c].label + (f", first {hyper.get('bytes_steps', '?')} steps only" if c == "b" else "")
        L.append(f"| {label} | " + " | ".join(cols) + f" | {red} |")
    L += ["", "Plots (score vs bytes up per example, per task): "
          + ", ".join(f"[{t}]({rel(csv_path.parent / 'plots_full' / (t + '.png'))})" for t in tasks)]
    L += ["", "### Targets", ""]
    for c, (dmin, rmin) in FULL_TARGETS.items():
        d, r = diffs.get(c), reds.get(c)
        if d is None or r is None:
            L.append(f"- `{c}`: pending (cells missing).")
            continue
        ok = d >= dmin and min(r[0], r[1]) >= rmin
        L.append(f"- `{c}`: mean paired difference vs (a) {d:+.2f} (target >= {dmin}), reduction {r[0]:.0f}x up / "
                 f"{r[1]:.0f}x down (target >= {rmin:.0f}x each way; {r[2]:.0f}x up with the handshake): "
                 f"**{'met' if ok else 'not met'}**.")
    if diffs.get("c4") is not None and "c4" in reds:
        L.append(f"- `c4` (the paper's split, fp32): mean paired difference {diffs['c4']:+.2f}, "
                 f"{reds['c4'][0]:.0f}x up / {reds['c4'][1]:.0f}x down.")
    return L + [""]


SHORT10_CSV = REPO / "results" / "glue_short10.csv"


def gap_section(csv_path: Path) -> list[str]:
    """The 10-seed short-budget comparison: how much of c4's gap to a the calibrated k4 closes, per task.

    Gap closed = mean over seeds of (k4 − c4) / mean over seeds of (a − c4); the target is >= 3/4.
    """
    rows = [r for r in read_rows(csv_path) if not _nan(r["metric"])]
    if not rows:
        return []
    meta_p = _meta_path(csv_path)
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    score = {(r["task"], r["config"], r["seed"]): float(r["metric"]) for r in rows}
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    L = ["## Short budget, 10 seeds: does the calibrated split close the paper's gap?", "",
         f"`{csv_path.name}`: 16 steps of batch 32 on 512 training examples, lr {rows[0]['lr']}, full dev sets, "
         f"seeds {min(int(r['seed']) for r in rows)}..{max(int(r['seed']) for r in rows)}; "
         f"{sum(float(r['seconds']) for r in rows) / 60:.0f} min on {meta.get('machine', rows[0]['machine'])}.", ""]
    for cmd in meta.get("commands", []):
        L.append(f"- Command: `{cmd}`")
    L += ["", "| task | (a) | c4 | k4 | c4 − a (paired) | k4 − a (paired) | gap closed by k4 |", "|---|---|---|---|---|---|---|"]
    for t in tasks:
        cols, paired = [], {}
        for c in ("a", "c4", "k4"):
            xs = [v for (tt, cc, _), v in score.items() if tt == t and cc == c]
            m, sd = _mean_std(xs) if xs else (float("nan"), 0.0)
            cols.append(f"{m:.1f} ± {sd:.1f} (n={len(xs)})" if xs else "")
            if c != "a":
                d = [v - score[(t, "a", sd_)] for (tt, cc, sd_), v in score.items() if tt == t and cc == c
                     and (t, "a", sd_) in score]
                paired[c] = _mean_std(d) if d else None
        gap = ""
        if paired.get("c4") and paired.get("k4") and paired["c4"][0] < 0:
            gap = f"{(paired['k4'][0] - paired['c4'][0]) / -paired['c4'][0]:.0%}"
        fmt = lambda p: f"{p[0]:+.1f} ± {p[1]:.1f}" if p else ""  # noqa: E731
        L.append(f"| {t} | " + " | ".join(cols) + f" | {fmt(paired.get('c4'))} | {fmt(paired.get('k4'))} | {gap} |")
    return L + [""]


INIT_FIDELITY_JSON = REPO / "bench" / "results" / "init_fidelity_tasks.json"


def init_fidelity_section(path: Path) -> list[str]:
    """RESULTS.md's init-fidelity table (``bench/init_fidelity.py --tasks ...``), none if it was not run."""
    if not path.is_file():
        return []
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_init_fidelity", REPO / "bench" / "init_fidelity.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return ["## Init fidelity: the split before any training", "",
            "How far the split model's output is from the unsplit model's before fine-tuning starts: relative error "
            "of the pooled output and of a fresh head's logits on each task's dev set, for the paper's code (`svd`) "
            "and the calibrated one (`pca` fit on 512 unlabelled training sentences of the task). The target at "
            "rank 4 (calibrated pooled error under half of svd's) is the last column below 0.5.", "",
            mod.tasks_table(json.loads(path.read_text())), ""]


def render_report(csv_path: Path, md_path: Path, plot_dir: Path, data_dir=None,
                  full_csv: Optional[Path] = None) -> str:
    """Write RESULTS.md and the plots from the CSV (and first, the real-budget study of ``full_csv``)."""
    rows = read_rows(csv_path)
    meta_p = _meta_path(csv_path)
    meta = json.loads(meta_p.read_text()) if meta_p.is_file() else {}
    s = summarize(rows)
    cells, tasks, configs = s["cells"], s["tasks"], s["configs"]
    baselines = _baselines(tasks, data_dir)
    plots = make_plots(s, baselines, plot_dir)
    rel = lambda p: os.path.relpath(p, md_path.parent)  # noqa: E731
    L: list[str] = ["# GLUE results: MiniLM fine-tuned across a split at K = 3 of 6 layers", ""]
    if full_csv is not None and full_csv.is_file():
        L += full_study_section(full_csv, rel)
    if full_csv is not None:
        L += gap_section(SHORT10_CSV)
        L += init_fidelity_section(INIT_FIDELITY_JSON)
        L += ["## Short budget", ""]
    L.append(f"Generated by `python bench/glue.py --report-only --out {rel(csv_path)}` from `{rel(csv_path)}` "
             f"({len(rows)} runs). Score = GLUE metric x 100 (MRPC: mean of F1 and accuracy; STS-B: mean of "
             "Pearson and Spearman; CoLA: Matthews corr.); mean ± std over seeds; dev sets are always complete.")
    L.append("")
    hyper = meta.get("hyper", {})
    mach = meta.get("machine") or (rows[0].get("machine") if rows else machine())
    total_s = sum(float(r["seconds"]) for r in rows)
    L += ["## Setup", ""]
    L.append(f"- Machine: {mach}; torch {hyper.get('torch', torch.__version__)}, {hyper.get('threads', '?')} threads.")
    if hyper:
        L.append(f"- Hyper-parameters (same for every config): {hyper.get('optimizer')}, lr {hyper.get('lr')}, "
                 f"weight decay {hyper.get('weight_decay')}, warmup {hyper.get('warmup'):.0%} of the steps, "
                 f"batch {hyper.get('batch_size')} (eval {hyper.get('eval_batch_size')}), max length "
                 f"{hyper.get('max_length')} (dynamic padding), {hyper.get('epochs')} epoch(s); split after layer "
                 f"{hyper.get('split_at')}.")
    L.append(f"- Total wall time of the runs: {total_s / 60:.1f} min ({total_s:.0f} s summed over runs).")
    for cmd in meta.get("commands", []):
        L.append(f"- Command: `{cmd}`")
    L += ["", "| task | train examples | epochs | seeds | dev metric | majority baseline |", "|---|---|---|---|---|---|"]
    for t in tasks:
        any_cell = next(cells[(t, c)] for c in configs if (t, c) in cells)
        seeds = sorted(set().union(*(cells[(t, c)]["seeds"] for c in configs if (t, c) in cells)), key=int)
        base = f"{baselines[t]:.1f}" if t in baselines else "?"
        if t == "STS-B":
            base += " (constant: correlation undefined, 0)"
        L.append(f"| {t} | {any_cell['train']} | {any_cell['epochs']} | {' '.join(seeds)} | "
                 f"{metric_name(t) if t in TASKS else '?'} | {base} |")
    # --- scores
    avg: dict[str, Optional[float]] = {}
    for c in configs:
        vals = [cells[(t, c)]["mean"] for t in tasks if (t, c) in cells]
        avg[c] = float(np.mean(vals)) if len(vals) == len(tasks) else None
    a_avg = avg.get("a")
    L += ["", "## Scores (mean ± std over seeds)", "",
          "| config | " + " | ".join(tasks) + " | average | Δ avg vs (a) |",
          "|---|" + "---|" * (len(tasks) + 2)]
    for c in configs:
        cols = []
        for t in tasks:
            cell = cells.get((t, c))
            cols.append(f"{cell['mean']:.1f} ± {cell['std']:.1f}" if cell else "")
        d = f"{avg[c] - a_avg:+.1f}" if avg[c] is not None and a_avg is not None and c != "a" else "-"
        tail = f" | {avg[c]:.1f} | {d} |" if avg[c] is not None else " | | |"
        L.append(f"| {CONFIGS[c].label} | " + " | ".join(cols) + tail)
    base_vals = [baselines[t] for t in tasks if t in baselines]
    if base_vals:
        tail = f" | {np.mean(base_vals):.1f} | |" if len(base_vals) == len(tasks) else " | | |"
        L.append("| majority class | " + " | ".join(f"{baselines[t]:.1f}" if t in baselines else "" for t in tasks)
                 + tail)
    # --- Δ vs a per task
    if "a" in configs:
        L += ["", "## Δ score vs (a) no split, per task", "",
              "| config | " + " | ".join(tasks) + " | average |", "|---|" + "---|" * (len(tasks) + 1)]
        for c in configs:
            if c == "a":
                continue
            ds = [cells[(t, c)]["mean"] - cells[(t, "a")]["mean"] if (t, c) in cells and (t, "a") in cells else None
                  for t in tasks]
            okd = [d for d in ds if d is not None]
            tail = f" | {np.mean(okd):+.1f} |" if len(okd) == len(tasks) else " | |"
            L.append(f"| {CONFIGS[c].label} | " + " | ".join(f"{d:+.1f}" if d is not None else "" for d in ds) + tail)
    # --- paired differences (same task and seed)
    L += _paired_section(rows, tasks)
    # --- bytes
    L += ["", "## Traffic per training example (edge -> cloud up / cloud -> edge down) and reduction vs (b)", "",
          "Bytes are the split's counters over the training steps / training examples: encoded boundary tensors, "
          "auxiliary data and labels up; encoded gradients down. (a) has no link.", "",
          "| config | " + " | ".join(tasks) + " | up reduction vs (b), mean over tasks | down reduction vs (b) |",
          "|---|" + "---|" * (len(tasks) + 2)]
    red_up: dict[str, Optional[float]] = {}
    for c in configs:
        cols = []
        for t in tasks:
            cell = cells.get((t, c))
            if not cell:
                cols.append("")
            elif c == "a":
                cols.append("-")
            else:
                cols.append(f"{_fmt_bytes(cell['up_mean'])} / {_fmt_bytes(cell['down_mean'])}")
        ru = [x for x in (_reduction(cells, t, c) for t in tasks) if x is not None]
        rd = [x for x in (_reduction(cells, t, c, key="down_mean") for t in tasks) if x is not None]
        red_up[c] = float(np.mean(ru)) if ru and c != "a" else None
        L.append(f"| {CONFIGS[c].label} | " + " | ".join(cols) + " | "
                 + (f"{np.mean(ru):.1f}x" if ru and c != "a" else "-") + " | "
                 + (f"{np.mean(rd):.1f}x" if rd and c != "a" else "-") + " |")
    # --- best: the least edge -> cloud traffic among configs within 1 point of (a) on the average
    L.append("")
    if a_avg is not None:
        ok = [c for c in configs if c != "a" and avg.get(c) is not None and avg[c] >= a_avg - 1.0]
        up_avg = {c: float(np.mean([cells[(t, c)]["up_mean"] for t in tasks])) for c in ok}
        if ok:
            best = min(ok, key=lambda c: up_avg[c])
            red = f"{red_up[best]:.1f}x less edge -> cloud traffic than (b)" if red_up.get(best) else \
                f"{_fmt_bytes(up_avg[best])} edge -> cloud per example (no (b) runs to compare)"
            L.append(f"**Best setting within 1 point of (a) on the average:** {CONFIGS[best].label}: average "
                     f"{avg[best]:.1f} vs {a_avg:.1f} ({avg[best] - a_avg:+.1f}), {red}.")
        else:
            L.append("**Best setting within 1 point of (a) on the average:** none of the split configs is within "
                     "1 point of (a).")
    L += _wire_section(WIRE_JSON)
    L += ["", "## Plots", ""]
    L += [f"- [{p.stem}]({rel(p)})" for p in plots]
    L += ["", "## Findings", "", FINDINGS_START, _keep_findings(md_path), FINDINGS_END, ""]
    text = "\n".join(L)
    md_path.write_text(text)
    return text


# --------------------------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--study", choices=["short", "full", "short10"], default="short",
                   help="full: the real-budget study (SST-2 CoLA MRPC STS-B RTE with their full training sets, SST-2 "
                        "subsampled to 8000; configs a c4 k4 k2 and b for bytes; 3 epochs; seeds 0 1 2; the "
                        "recipe's learning rates) into results/glue_full.csv, each cell checkpointed after every "
                        "epoch; short: the 16-step study of results/glue.csv; short10: that budget for a, c4 and "
                        "k4 on SST-2 and STS-B with seeds 0..9 (results/glue_short10.csv)")
    p.add_argument("--data-dir", default=None, help="GLUE directory (default $SFT_GLUE_DIR or ../shared/data/glue)")
    p.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), choices=list(TASKS))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--max-train", type=parse_max_train, default=parse_max_train(DEFAULT_MAX_TRAIN),
                   help="train cap: an int, or per task 'SST-2=2000,RTE=1000' (mixable: '512,WNLI=all')")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of every cell (default: each task's from the package recipe, "
                        "sft_kernels.data.recipe.LEARNING_RATES, picked by --lr-sweep)")
    p.add_argument("--calibration-size", type=int, default=512,
                   help="calibrated configs (k*): training examples (the first of the run's order, unlabelled) "
                        "the edge fits its code on")
    p.add_argument("--bytes-only", nargs="*", default=[], choices=list(CONFIGS), metavar="CONFIG",
                   help="configs trained only --bytes-steps steps, for their byte counts, and not evaluated "
                        "(the traffic denominator b)")
    p.add_argument("--bytes-steps", type=int, default=20,
                   help="steps of a --bytes-only config; every cell also records the bytes of its first this many")
    p.add_argument("--lr-sweep", type=float, nargs="+", default=None, metavar="LR",
                   help="instead of the study: train config a at each LR on a slice of each task's training set "
                        "and score it on a held-out slice of the training set (never the dev set); writes "
                        "results/lr_sweep.csv unless --out is given")
    p.add_argument("--sweep-train", type=int, default=1000, help="--lr-sweep: training rows per task")
    p.add_argument("--sweep-heldout", type=int, default=500, help="--lr-sweep: held-out training rows per task")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--over-tcp", action="store_true",
                   help="run split configs' cloud parts in a `sft serve` process on loopback (real TCP) instead of "
                        "in this process; (a) still runs in process. Writes results/glue_tcp.csv "
                        "unless --out is given")
    p.add_argument("--out", type=Path, default=None, help="CSV (default results/glue.csv, or glue_tcp.csv)")
    p.add_argument("--results-md", type=Path, default=None,
                   help="report (default RESULTS.md, or results/glue_tcp.md with --over-tcp)")
    p.add_argument("--plots", type=Path, default=None, help="plot directory (default <out dir>/plots)")
    p.add_argument("--report-only", action="store_true", help="only regenerate RESULTS.md and the plots")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--max-dev", type=int, default=None, help=argparse.SUPPRESS)  # tests only: dev subset
    return p


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.study == "full":  # the real-budget preset; flags given explicitly still win
        parser.set_defaults(tasks=list(FULL_TASKS), configs=list(FULL_CONFIGS), bytes_only=["b"], epochs=3,
                            max_train=parse_max_train("SST-2=8000,all"), seeds=[0, 1, 2], out=FULL_CSV)
        args = parser.parse_args(argv)
    elif args.study == "short10":  # the short budget again, 10 seeds, for c4's gap to a and what k4 closes
        parser.set_defaults(tasks=["SST-2", "STS-B"], configs=["a", "c4", "k4"], seeds=list(range(10)), epochs=1,
                            max_train=parse_max_train("512"), lr=3e-4, out=SHORT10_CSV)
        args = parser.parse_args(argv)
    if args.lr_sweep:
        args.out = args.out or REPO / "results" / "lr_sweep.csv"
        if args.threads:
            torch.set_num_threads(args.threads)
        record_command(args.out, args)
        lr_sweep(args)
        return 0
    if args.out is None:
        args.out = REPO / "results" / ("glue_tcp.csv" if args.over_tcp else "glue.csv")
    if args.results_md is None:
        args.results_md = REPO / "results" / "glue_tcp.md" if args.over_tcp else REPO / "RESULTS.md"
    if args.threads:
        torch.set_num_threads(args.threads)
    plot_dir = args.plots or args.out.parent / "plots"
    if not args.report_only:
        done = {(r["task"], r["config"], r["seed"]) for r in read_rows(args.out)}
        todo = [(t, c, s) for s in args.seeds for t in args.tasks for c in args.configs
                if (t, c, str(s)) not in done]
        if not args.quiet:
            print(f"{len(todo)} runs to do ({len(done)} already in {args.out})", flush=True)
        if todo:
            record_command(args.out, args)
        t_all = time.perf_counter()
        for i, (t, c, s) in enumerate(todo):
            row = run_one(t, c, s, args)
            append_row(args.out, row)
            cell_checkpoint(args, t, c, s).unlink(missing_ok=True)
            if not args.quiet:
                print(f"[{i + 1}/{len(todo)}] {t:6s} {c:12s} seed {s}: {row['metric_name']} {row['metric']:.2f}  "
                      f"up {row['bytes_up_per_example']:.0f} B/ex  down {row['bytes_down_per_example']:.0f} B/ex  "
                      f"{row['seconds']:.1f} s  (elapsed {time.perf_counter() - t_all:.0f} s)", flush=True)
    full = args.out if args.study == "full" else FULL_CSV
    short = args.out if args.study == "short" else REPO / "results" / "glue.csv"
    text = render_report(short, args.results_md, plot_dir, data_dir=args.data_dir,
                         full_csv=None if args.over_tcp else full)
    if full.is_file() and not args.over_tcp:
        make_plots(summarize([r for r in read_rows(full) if not _nan(r["metric"])]), _baselines(FULL_TASKS, args.data_dir),
                   full.parent / "plots_full")
    if not args.quiet:
        start = text.find("## Scores")
        print(text[start:text.find("## Plots")])
        print(f"wrote {args.results_md} and {plot_dir}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
