"""Init fidelity of the bottleneck split before any training: ``svd`` vs ``calibrated`` (each fit method).

all-MiniLM-L6-v2 split at layer 3, links eliminated, ranks 1, 2, 4, 8, 16.  For each split the
relative error ``‖out_split − out_unsplit‖ / ‖out_unsplit‖`` over dev sentences of

* the base model's pooled output (BERT's pooler on [CLS]), and
* the logits of a fixed fresh head (``minilm_classifier(num_labels, seed=0)``'s classifier on that
  pooled output; 2 classes on SST-2).

Default mode: SST-2 dev sentences, ``svd`` and every calibrated fit method; the calibrated splits
are fitted on 512 unlabelled SST-2 *train* sentences (a sample fixed by seed 0); nothing labelled
is used.  Prints a markdown table (with the command, the CPU and the torch version) and writes
``bench/results/init_fidelity.json``.

Per-task mode (``--tasks``): for each task, the calibration is 512 unlabelled train sentences of
that task (sentence pairs for MRPC, STS-B and RTE, tokenized as pairs; a sample fixed by the
seed), the evaluation is the task's whole dev set (pairs as pairs, max_length 128) and the head
has the task's number of labels (STS-B: 1); ``svd`` and ``calibrated`` with the default fit
(``pca``; ``--fits`` picks others).  Prints one table row per (task, rank), with the ratio of the
calibrated to the svd pooled error, and writes ``bench/results/init_fidelity_tasks.json``
(:func:`tasks_table` renders it).

    python bench/init_fidelity.py                 # 300 dev sentences
    python bench/init_fidelity.py --dev 872       # the whole dev set
    python bench/init_fidelity.py --tasks SST-2 CoLA MRPC STS-B RTE   # per task, whole dev sets

Time (AMD EPYC, 2 cores shared with other work): 2.6 min with ``OMP_NUM_THREADS=1``; ~10 min
with torch's default 2 threads under a load average of ~6 (oversubscribed OpenMP threads
spin).  The numbers are the same either way.  The per-task mode over the five tasks (whole dev
sets, 4100 sentences): 21.7 min with ``OMP_NUM_THREADS=1``, the other core busy with a training run.

Per-task result (bench/results/init_fidelity_tasks.json): at rank 4 the calibrated (pca) pooled
error is under half the svd init's on every task: calibrated / svd = 0.38 (SST-2), 0.42 (CoLA),
0.44 (MRPC), 0.48 (STS-B), 0.46 (RTE); the pair tasks sit closest to the bound.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sft_kernels.data import load_task  # noqa: E402
from sft_kernels.split import load_minilm, minilm_classifier, split_model  # noqa: E402
from sft_kernels.split.calibrate import DEFAULT_FIT, FIT_METHODS, CalibrationOptions  # noqa: E402

OUT = REPO / "bench" / "results" / "init_fidelity.json"
OUT_TASKS = REPO / "bench" / "results" / "init_fidelity_tasks.json"
AT = 3
RANKS = (1, 2, 4, 8, 16)
#: Sentences per dev batch, and the truncation length (dev and calibration).
DEV_BATCH = 64
MAX_LENGTH = 128

#: ``(init, fit)``: ``("svd", None)`` or ``("calibrated", one of FIT_METHODS)``.
Setting = tuple[str, Optional[str]]


def cpu_model() -> str:
    """The ``Model name`` line of lscpu (the CPU this ran on)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")),
                "unknown")


def sentences(n_cal: int, n_dev: int, seed: int) -> tuple[list[str], list[str]]:
    """``(calibration: n_cal seeded-sampled train sentences, dev: the first n_dev dev sentences)``."""
    _, train = load_task("SST-2", "train")
    _, dev = load_task("SST-2", "dev", limit=n_dev)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_cal].tolist()
    return [train[i]["text_a"] for i in pick], list(dev["text_a"])


def encode(tok: Any, text_a: Sequence[str], text_b: Optional[Sequence[str]], batch_size: int,
           max_length: int = MAX_LENGTH) -> list[dict[str, torch.Tensor]]:
    """Tokenized batches of ``batch_size`` (pairs as pairs when ``text_b`` is given), sorted by length
    (characters; stable) so that a batch pads little; right padding, truncation to ``max_length``."""
    pairs = list(zip(text_a, text_b)) if text_b is not None else [(a, None) for a in text_a]
    pairs.sort(key=lambda p: len(p[0]) + len(p[1] or ""))
    batches = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        second = [b for _, b in chunk] if text_b is not None else None
        batches.append(dict(tok([a for a, _ in chunk], second, padding=True, truncation=True, max_length=max_length,
                                padding_side="right", return_tensors="pt")))
    return batches


@torch.no_grad()
def pooled(run: Callable[[dict], Any], batches: list[dict]) -> torch.Tensor:
    """Pooled outputs ``(sentences, d)`` of ``run(batch)`` over the dev batches."""
    return torch.cat([run(b).pooler_output for b in batches])


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``‖a − ref‖ / ‖ref‖`` (Frobenius, over every sentence at once)."""
    return float((a - ref).norm() / ref.norm())


def measure(base: torch.nn.Module, tok: Any, head: torch.nn.Module, batches: list[dict], calibration: list,
            ranks: Sequence[int], settings: Sequence[Setting], seed: int, label: str = "") -> list[dict]:
    """Split ``base`` at layer :data:`AT` (bottleneck, links eliminated) for every rank and setting;
    one row per (rank, setting): the relative errors of the pooled output and of ``head``'s logits
    over ``batches`` against the unsplit ``base``, the calibration's held-out fit errors, seconds.

    ``calibration`` is what ``split_model(calibration=...)`` takes: strings (tokenized with ``tok``) or
    tokenized batches.  ``label`` prefixes the progress lines (stderr).
    """
    ref = pooled(lambda b: base(**b), batches)
    with torch.no_grad():
        ref_logits = head(ref)
    strings = any(isinstance(c, str) for c in calibration)
    rows = []
    for rank in ranks:
        for init, fit in settings:
            kw = {} if fit is None else dict(calibration=calibration, tokenizer=tok if strings else None,
                                             calibration_options=CalibrationOptions(fit=fit, progress=False))
            t = time.time()
            edge, cloud = split_model(copy.deepcopy(base), at=AT, mode="bottleneck", rank=rank, seed=seed,
                                      init=init, **kw)
            edge.eval(), cloud.eval()
            out = pooled(lambda b: cloud(edge(**b)), batches)
            with torch.no_grad():
                logits = head(out)
            rows.append({"rank": rank, "init": init, "fit": fit, "pooled_rel_err": rel(out, ref),
                         "logits_rel_err": rel(logits, ref_logits),
                         "heldout_fit_errors": cloud.calibration.errors if cloud.calibration else None,
                         "seconds": round(time.time() - t, 2)})
            print(f"{label}r={rank} {init}{'/' + fit if fit else ''}: pooled {rows[-1]['pooled_rel_err']:.4f} "
                  f"logits {rows[-1]['logits_rel_err']:.4f} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    return rows


def task_data(task: str, tok: Any, n_cal: int, n_dev: Optional[int], seed: int
              ) -> tuple[Any, list[dict], list[dict], int]:
    """``(spec, dev batches, calibration batches, dev size)`` of one GLUE task.

    Calibration: ``n_cal`` train rows (a sample fixed by ``seed``; labels unused), tokenized in the
    batches ``init="calibrated"`` would make of strings.  Dev: the first ``n_dev`` rows (None: all),
    batches of :data:`DEV_BATCH`.  Pair tasks are tokenized as pairs in both.
    """
    spec, train = load_task(task, "train")
    _, dev = load_task(task, "dev", limit=n_dev)
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_cal].tolist()
    cal = train.select(pick)
    pair = spec.text_b is not None
    opts = CalibrationOptions()
    cal_batches = encode(tok, cal["text_a"], cal["text_b"] if pair else None, opts.batch_size, opts.max_length)
    dev_batches = encode(tok, dev["text_a"], dev["text_b"] if pair else None, DEV_BATCH)
    return spec, dev_batches, cal_batches, len(dev)


def command_line(argv: Optional[list[str]]) -> str:
    """The command as run (with ``OMP_NUM_THREADS`` when set)."""
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    given = argv if argv is not None else sys.argv[1:]
    return env + "python bench/init_fidelity.py" + "".join(" " + a for a in given)


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the default (SST-2) or the per-task (``--tasks``) mode; write the JSON, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", type=int, default=None,
                    help="dev sentences (the first N); default 300 (of 872) in the default mode, all with --tasks")
    ap.add_argument("--cal", type=int, default=512, help="unlabelled train sentences to calibrate on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", nargs="+", default=None, metavar="TASK",
                    help="per-task mode: these GLUE tasks, each calibrated on its own train text, whole dev set")
    ap.add_argument("--fits", nargs="+", choices=FIT_METHODS, default=None,
                    help=f"calibrated fit methods (default: all in the default mode, {DEFAULT_FIT!r} with --tasks)")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"JSON output (default {OUT.relative_to(REPO)}, with --tasks {OUT_TASKS.relative_to(REPO)})")
    args = ap.parse_args(argv)
    t0 = time.time()
    tok, base = load_minilm()
    base.eval()
    meta = {"command": command_line(argv), "cpu": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "model": "all-MiniLM-L6-v2", "at": AT, "eliminate_links": True}
    if args.tasks:
        fits = args.fits or [DEFAULT_FIT]
        settings = [("svd", None)] + [("calibrated", fit) for fit in fits]
        rows, tasks = [], {}
        for task in args.tasks:
            spec, batches, cal, n_dev = task_data(task, tok, args.cal, args.dev, args.seed)
            head = minilm_classifier(num_labels=spec.num_labels, minilm=(tok, base), seed=args.seed)[1]
            head = head.classifier.eval()
            tasks[task] = {"dev": n_dev, "calibration": sum(len(b["input_ids"]) for b in cal),
                           "num_labels": spec.num_labels, "pairs": spec.text_b is not None}
            rows += [{"task": task, **r} for r in measure(base, tok, head, batches, cal, RANKS, settings, args.seed,
                                                          label=f"{task} ")]
        result = {**meta, "fits": list(fits), "seed": args.seed, "dev_limit": args.dev, "tasks": tasks, "rows": rows,
                  "total_seconds": round(time.time() - t0, 1)}
        render, out = tasks_table, args.out or OUT_TASKS
    else:
        fits = args.fits or list(FIT_METHODS)
        settings = [("svd", None)] + [("calibrated", fit) for fit in fits]
        head = minilm_classifier(num_labels=2, minilm=(tok, base), seed=args.seed)[1].classifier.eval()
        cal, dev = sentences(args.cal, 300 if args.dev is None else args.dev, args.seed)
        dev = sorted(dev, key=len)  # batches of similar length: less padding (the same batches for every setting)
        batches = [dict(tok(dev[i:i + DEV_BATCH], padding=True, truncation=True, max_length=MAX_LENGTH,
                            return_tensors="pt")) for i in range(0, len(dev), DEV_BATCH)]
        rows = measure(base, tok, head, batches, cal, RANKS, settings, args.seed)
        result = {**meta, "dev_sentences": len(dev), "calibration_sentences": len(cal), "seed": args.seed,
                  "rows": rows, "total_seconds": round(time.time() - t0, 1)}
        render, out = table, args.out or OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(render(result))
    return result


def _names(rows: list[dict]) -> list[str]:
    """The settings present, in order: ``svd`` then ``calibrated/<fit>`` in :data:`FIT_METHODS` order."""
    fits = {r["fit"] for r in rows if r["init"] == "calibrated"}
    return ["svd"] * any(r["init"] == "svd" for r in rows) + [f"calibrated/{f}" for f in FIT_METHODS if f in fits]


def _row(rows: list[dict], name: str, **where: Any) -> dict:
    """The row of setting ``name`` (``svd`` or ``calibrated/<fit>``) matching ``where``."""
    init, _, fit = name.partition("/")
    return next(r for r in rows if r["init"] == init and (r["fit"] or "") == fit
                and all(r.get(k) == v for k, v in where.items()))


def _header(result: dict) -> str:
    """The table's first line: the command, the CPU, the threads and the torch version."""
    return f"`{result['command']}` -- {result['cpu']}, {result['threads']} threads, torch {result['torch']}"


def table(result: dict) -> str:
    """The markdown table of ``result``: one row per rank, pooled / logits relative error per setting."""
    names = _names(result["rows"])
    lines = [f"{_header(result)}; "
             f"MiniLM at layer {result['at']}, links eliminated, {result['dev_sentences']} SST-2 dev sentences, "
             f"calibration on {result['calibration_sentences']} unlabelled train sentences; "
             f"relative error pooled / logits", "",
             "| rank | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for rank in sorted({r["rank"] for r in result["rows"]}):
        cells = [f"{row['pooled_rel_err']:.3f} / {row['logits_rel_err']:.3f}"
                 for row in (_row(result["rows"], name, rank=rank) for name in names)]
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def tasks_table(result: dict) -> str:
    """The markdown table of a per-task ``result`` (``--tasks``): one row per (task, rank); the pooled
    and logits relative errors of ``svd`` and of each calibrated fit, and the ratio calibrated / svd of
    the pooled error (under 0.5: the calibrated init at least halves the svd init's error)."""
    rows = result["rows"]
    names = _names(rows)
    cal = [n for n in names if n != "svd"]
    short = {n: ("calibrated" if len(cal) == 1 and n in cal else n) for n in names}
    dev = ", ".join(f"{t} {info['dev']}" for t, info in result["tasks"].items())
    n_cal = sorted({info["calibration"] for info in result["tasks"].values()})
    lines = [f"{_header(result)}; MiniLM at layer {result['at']}, links eliminated, dev sets ({dev} sentences; "
             f"pairs as pairs), calibration on {'/'.join(map(str, n_cal))} unlabelled train sentences of the task; "
             f"relative error against the unsplit model of the pooled output and of a fresh head's logits", "",
             "| task | rank | " + " | ".join(f"{short[n]} pooled | {short[n]} logits" for n in names)
             + "".join(f" | {short[n]} / svd pooled" for n in cal if "svd" in names) + " |",
             "|---" * (2 + 2 * len(names) + (len(cal) if "svd" in names else 0)) + "|"]
    for task in result["tasks"]:
        for rank in sorted({r["rank"] for r in rows if r["task"] == task}):
            got = {n: _row(rows, n, task=task, rank=rank) for n in names}
            cells = [f"{got[n]['pooled_rel_err']:.3f} | {got[n]['logits_rel_err']:.3f}" for n in names]
            if "svd" in names:
                cells += [f"{got[n]['pooled_rel_err'] / got['svd']['pooled_rel_err']:.2f}" for n in cal]
            lines.append(f"| {task} | {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
