"""bench/glue.py: one tiny run writes a correct CSV row, a resumed run skips it, the report has the table and PNGs."""
from __future__ import annotations

import csv

import pytest
import torch

from bench_helpers import load_bench


@pytest.fixture(scope="module")
def glue():
    return load_bench("glue")


def _args(glue, tmp_path, *extra):
    return ["--tasks", "WNLI", "--configs", "a", "d4_int8", "--seeds", "0", "--max-train", "16",
            "--batch-size", "8", "--max-dev", "8", "--max-length", "32", "--quiet", "--lr", "3e-4",
            "--out", str(tmp_path / "glue.csv"), "--results-md", str(tmp_path / "RESULTS.md"), *extra]


def test_parse_max_train(glue):
    assert glue.parse_max_train("512") == {"*": 512}
    assert glue.parse_max_train("SST-2=2000,RTE=1000") == {"SST-2": 2000, "RTE": 1000}
    spec = glue.parse_max_train("512,WNLI=all")
    assert glue.max_train_for("WNLI", spec) is None and glue.max_train_for("RTE", spec) == 512
    with pytest.raises(Exception, match="unknown task"):
        glue.parse_max_train("XYZ=3")


def test_run_resume_report(glue, tmp_path):
    assert glue.main(_args(glue, tmp_path)) == 0
    rows = list(csv.DictReader(open(tmp_path / "glue.csv")))
    assert list(rows[0])[:10] == glue.CSV_COLUMNS
    assert [(r["task"], r["config"], r["seed"]) for r in rows] == [("WNLI", "a", "0"), ("WNLI", "d4_int8", "0")]
    a, d = rows
    assert a["metric_name"] == "accuracy" and 0 <= float(a["metric"]) <= 100
    assert a["train_examples"] == "16" and a["epochs"] == "1"
    assert float(a["bytes_up_per_example"]) == 0 and float(a["bytes_down_per_example"]) == 0
    assert float(d["bytes_up_per_example"]) > 0 and float(d["bytes_down_per_example"]) > 0
    assert len(d["first_losses"].split()) == 2  # 16 examples / batch 8
    # resume: nothing new
    assert glue.main(_args(glue, tmp_path)) == 0
    assert len(list(csv.DictReader(open(tmp_path / "glue.csv")))) == 2
    md = (tmp_path / "RESULTS.md").read_text()
    assert "| (a) no split (reference) |" in md and "WNLI" in md and "majority class" in md
    assert (tmp_path / "plots" / "WNLI.png").stat().st_size > 1000
    # findings survive regeneration
    md = md.replace(glue.FINDINGS_START + "\n", glue.FINDINGS_START + "\nOur finding.\n")
    (tmp_path / "RESULTS.md").write_text(md)
    assert glue.main(_args(glue, tmp_path, "--report-only")) == 0
    assert "Our finding." in (tmp_path / "RESULTS.md").read_text()


def test_run_one_returns_losses_and_same_bytes_reading(glue, tmp_path):
    args = glue.build_parser().parse_args(_args(glue, tmp_path))
    row = glue.run_one("WNLI", "b", 0, args)
    assert len(row["losses"]) == 2 and row["first_losses"].split()[0] == f"{row['losses'][0]:.5f}"
    # layer split, fp32 both ways: per example up >= 384 floats per token; down the same without labels/aux
    assert row["bytes_up_per_example"] > row["bytes_down_per_example"] > 384 * 4


def test_reference_runner_has_the_split_runs_recipe():
    """Config (a): the plain classifier under the split runs' optimizer (AdamW, foreach=False) and schedule."""
    from sft_kernels.runtime import make_runner
    from sft_kernels.runtime.parts import linear_warmup

    with pytest.raises(ValueError, match="unknown keys"):
        make_runner({"mode": "layer", "ranks": 4}, 2, 0, lr=3e-4, weight_decay=0.01, total_steps=10,
                    warmup_steps=2, batch_size=8, max_length=32)
    r = make_runner(None, 2, 0, lr=3e-4, weight_decay=0.01, total_steps=10, warmup_steps=2, batch_size=8,
                    max_length=32)
    try:
        assert isinstance(r.opt, torch.optim.AdamW) and r.opt.defaults["foreach"] is False
        assert r.opt.defaults["weight_decay"] == 0.01
        assert r.opt.param_groups[0]["lr"] == pytest.approx(3e-4 * linear_warmup(0, 10, 2))
        batch = r.tokenizer(["a good film", "a bad one"], padding=True, return_tensors="pt")
        r.train_step({**batch, "labels": torch.tensor([1, 0])})
        assert r.opt.param_groups[0]["lr"] == pytest.approx(3e-4 * linear_warmup(1, 10, 2))
        assert r.predict(batch).shape == (2, 2) and r.bytes_up == r.bytes_down == 0
    finally:
        r.close()


@pytest.mark.slow
@pytest.mark.parametrize("config", ["d4_int8", "e_lr16_int8", "k4"])
def test_in_process_and_over_tcp_train_the_same_run(glue, config):
    """A split config in process and --over-tcp (EdgeTrainer + a `sft serve` process) is one step over two links:
    the same losses (==), metrics and bytes."""
    common = ["--tasks", "WNLI", "--configs", config, "--seeds", "1", "--max-train", "40", "--batch-size", "4",
              "--max-dev", "8", "--max-length", "32", "--quiet", "--lr", "3e-4"]
    here = glue.run_one("WNLI", config, 1, glue.build_parser().parse_args(common))
    tcp = glue.run_one("WNLI", config, 1, glue.build_parser().parse_args(common + ["--over-tcp"]))
    assert len(here["losses"]) == len(tcp["losses"]) == 10
    assert tcp["losses"] == here["losses"]
    for key in ("metric", "metrics", "first_losses", "bytes_up_per_example", "bytes_down_per_example"):
        assert tcp[key] == here[key], key


@pytest.mark.parametrize("config", ["a", "k4"])
def test_interrupted_cell_resumes_from_its_last_epoch(glue, tmp_path, monkeypatch, config):
    """A cell killed after an epoch resumes from that epoch's checkpoint and ends as the uninterrupted run."""
    args = glue.build_parser().parse_args(_args(glue, tmp_path, "--epochs", "2"))
    whole = glue.run_one("WNLI", config, 0, args)
    ckpt = glue.cell_checkpoint(args, "WNLI", config, 0)
    ckpt.unlink()  # main() removes it once the row is written

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(glue, "evaluate", killed)  # dies after the last epoch: epoch 1's checkpoint is left
    with pytest.raises(KeyboardInterrupt):
        glue.run_one("WNLI", config, 0, args)
    assert ckpt.is_file()
    monkeypatch.undo()
    resumed = glue.run_one("WNLI", config, 0, args)
    assert resumed["losses"] == whole["losses"] and len(whole["losses"]) == 4
    for key in ("metric", "metrics", "bytes_up_per_example", "bytes_down_per_example", "handshake_bytes"):
        assert resumed[key] == whole[key], key


def test_bytes_only_config_and_first_step_bytes(glue, tmp_path):
    """A --bytes-only config trains --bytes-steps steps and is not evaluated; every row has its first steps' bytes,
    over the same examples for every config, and a calibrated config its handshake bytes."""
    args = glue.build_parser().parse_args(_args(glue, tmp_path, "--bytes-only", "b", "--bytes-steps", "1"))
    b = glue.run_one("WNLI", "b", 0, args)
    k = glue.run_one("WNLI", "k4", 0, args)
    assert b["steps"] == 1 and b["metric"] != b["metric"] and b["metrics"] == ""  # nan: not evaluated
    assert k["steps"] == 2 and 0 <= k["metric"] <= 100
    assert b["first_examples"] == k["first_examples"] == 8
    assert b["bytes_up_first"] > 300 * k["bytes_up_first"] > 0
    assert k["handshake_bytes"] == 4 * (384 * 4 + 384 + 1536 * 4 + 1536) and b["handshake_bytes"] == 0
