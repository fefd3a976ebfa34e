"""Init fidelity of the bottleneck split before any training: ``svd`` vs ``calibrated`` (each fit method).

all-MiniLM-L6-v2 split at layer 3, links eliminated, ranks 1, 2, 4, 8, 16.  For each split the
relative error ``‖out_split − out_unsplit‖ / ‖out_unsplit‖`` over SST-2 dev sentences of

* the base model's pooled output (BERT's pooler on [CLS]), and
* the logits of a fixed 2-class head (``minilm_classifier(seed=0)``'s classifier on that pooled output).

The calibrated splits are fitted on 512 unlabelled SST-2 *train* sentences (a sample fixed by
seed 0); nothing labelled is used.  Prints a markdown table (with the command, the CPU and the
torch version) and writes ``bench/results/init_fidelity.json``.

    python bench/init_fidelity.py                 # 300 dev sentences
    python bench/init_fidelity.py --dev 872       # the whole dev set

Time (AMD EPYC, 2 cores shared with other work): 2.6 min with ``OMP_NUM_THREADS=1``; ~10 min
with torch's default 2 threads under a load average of ~6 (oversubscribed OpenMP threads
spin).  The numbers are the same either way.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sft_kernels.data import load_task  # noqa: E402
from sft_kernels.split import load_minilm, minilm_classifier, split_model  # noqa: E402
from sft_kernels.split.calibrate import FIT_METHODS, CalibrationOptions  # noqa: E402

OUT = REPO / "bench" / "results" / "init_fidelity.json"
AT = 3
RANKS = (1, 2, 4, 8, 16)


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


@torch.no_grad()
def pooled(run, batches: list[dict]) -> torch.Tensor:
    """Pooled outputs ``(sentences, d)`` of ``run(batch)`` over the dev batches."""
    return torch.cat([run(b).pooler_output for b in batches])


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).norm() / ref.norm())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dev", type=int, default=300, help="dev sentences (the first N; 872 = all)")
    ap.add_argument("--cal", type=int, default=512, help="unlabelled train sentences to calibrate on")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    t0 = time.time()
    tok, base = load_minilm()
    head = minilm_classifier(num_labels=2, minilm=(tok, base), seed=args.seed)[1].classifier.eval()
    cal, dev = sentences(args.cal, args.dev, args.seed)
    dev = sorted(dev, key=len)  # batches of similar length: less padding (the same batches for every setting)
    batches = [dict(tok(dev[i:i + 64], padding=True, truncation=True, max_length=128, return_tensors="pt"))
               for i in range(0, len(dev), 64)]
    ref = pooled(lambda b: base(**b), batches)
    with torch.no_grad():
        ref_logits = head(ref)
    rows = []
    for rank in RANKS:
        settings = [("svd", None)] + [("calibrated", fit) for fit in FIT_METHODS]
        for init, fit in settings:
            kw = {} if fit is None else dict(calibration=cal, tokenizer=tok,
                                             calibration_options=CalibrationOptions(fit=fit, progress=False))
            t = time.time()
            edge, cloud = split_model(copy.deepcopy(base), at=AT, mode="bottleneck", rank=rank, seed=args.seed,
                                      init=init, **kw)
            edge.eval(), cloud.eval()
            out = pooled(lambda b: cloud(edge(**b)), batches)
            with torch.no_grad():
                logits = head(out)
            rows.append({"rank": rank, "init": init, "fit": fit, "pooled_rel_err": rel(out, ref),
                         "logits_rel_err": rel(logits, ref_logits),
                         "heldout_fit_errors": cloud.calibration.errors if cloud.calibration else None,
                         "seconds": round(time.time() - t, 2)})
            print(f"r={rank} {init}{'/' + fit if fit else ''}: pooled {rows[-1]['pooled_rel_err']:.4f} "
                  f"logits {rows[-1]['logits_rel_err']:.4f} ({rows[-1]['seconds']} s)", file=sys.stderr, flush=True)
    env = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    given = argv if argv is not None else sys.argv[1:]
    command = env + "python bench/init_fidelity.py" + "".join(" " + a for a in given)
    result = {"command": command, "cpu": cpu_model(), "threads": torch.get_num_threads(), "torch": torch.__version__,
              "model": "all-MiniLM-L6-v2", "at": AT, "eliminate_links": True, "dev_sentences": len(dev),
              "calibration_sentences": len(cal), "seed": args.seed, "rows": rows,
              "total_seconds": round(time.time() - t0, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(table(result))
    return result


def table(result: dict) -> str:
    """The markdown table of ``result``: one row per rank, pooled / logits relative error per setting."""
    names = ["svd"] + [f"calibrated/{f}" for f in FIT_METHODS]
    lines = [f"`{result['command']}` -- {result['cpu']}, {result['threads']} threads, torch {result['torch']}; "
             f"MiniLM at layer {result['at']}, links eliminated, {result['dev_sentences']} SST-2 dev sentences, "
             f"calibration on {result['calibration_sentences']} unlabelled train sentences; "
             f"relative error pooled / logits", "",
             "| rank | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for rank in sorted({r["rank"] for r in result["rows"]}):
        cells = []
        for name in names:
            init, _, fit = name.partition("/")
            row = next(r for r in result["rows"] if r["rank"] == rank and r["init"] == init
                       and (r["fit"] or "") == fit)
            cells.append(f"{row['pooled_rel_err']:.3f} / {row['logits_rel_err']:.3f}")
        lines.append(f"| {rank} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
