"""bench/init_fidelity.py: the tables render from a result dict (no model runs)."""
from __future__ import annotations


import pytest

from bench_helpers import load_bench


@pytest.fixture(scope="module")
def fid():
    return load_bench("init_fidelity")


def _row(init, fit, rank, pooled, logits, **extra):
    return {"rank": rank, "init": init, "fit": fit, "pooled_rel_err": pooled, "logits_rel_err": logits,
            "heldout_fit_errors": None, "seconds": 0.1, **extra}


META = {"command": "python bench/init_fidelity.py --tasks", "cpu": "CPU X", "threads": 1, "torch": "2.x", "at": 3}


def test_tasks_table(fid):
    rows = [_row("svd", None, r, 2.0, 4.0, task=t) for t in ("SST-2", "STS-B") for r in (1, 4)]
    rows += [_row("calibrated", "pca", r, 0.8, 1.0, task=t) for t in ("SST-2", "STS-B") for r in (1, 4)]
    result = {**META, "tasks": {"SST-2": {"dev": 872, "calibration": 512, "num_labels": 2, "pairs": False},
                                "STS-B": {"dev": 1500, "calibration": 512, "num_labels": 1, "pairs": True}},
              "rows": rows}
    lines = fid.tasks_table(result).splitlines()
    assert lines[0].startswith("`python bench/init_fidelity.py --tasks` -- CPU X, 1 threads, torch 2.x")
    assert lines[2] == ("| task | rank | svd pooled | svd logits | calibrated pooled | calibrated logits | "
                        "calibrated / svd pooled |")
    assert lines[3].count("|---") == 7
    assert lines[4:] == [f"| {t} | {r} | 2.000 | 4.000 | 0.800 | 1.000 | 0.40 |" for t in ("SST-2", "STS-B")
                         for r in (1, 4)]


def test_table_default(fid):
    rows = [_row("svd", None, 2, 1.5, 3.0)] + [_row("calibrated", f, 2, 0.5, 0.25) for f in fid.FIT_METHODS]
    out = fid.table({**META, "dev_sentences": 300, "calibration_sentences": 512, "rows": rows})
    assert out.splitlines()[-1] == "| 2 | 1.500 / 3.000 | " + " | ".join(["0.500 / 0.250"] * len(fid.FIT_METHODS)) + " |"
