"""``sft train`` / ``sft serve`` with any model (``--model``) and any data (``--train-file`` ...).

* Bad input: each case is a one-line ``sft train: ...`` / ``sft serve: ...`` on stderr naming the
  flag, exit status 2, no traceback (in-process through :func:`sft_kernels.cli.main`, one case as a
  real process).
* The data layer's task-generic pieces the CLI relies on: metrics of a file task, the STS-B recipe
  (``regression_scale``), ``label_mapping``, ``load_train_dev`` with files, ``train_and_evaluate``'s
  wiring (a fake edge trainer: no processes).
* End to end (``slow``): tiny BERT and GPT-2 checkpoints served by ``sft serve --model DIR`` in a
  real process and trained by ``python -m sft_kernels train --model DIR --train-file ...``; an edge
  with other weights, and a U-split edge against a server without ``--u-split``, are refused with a
  clear message.
"""
from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sft_kernels import cli
from sft_kernels.data import (REGRESSION_TARGET_SCALE, TASKS, compute_metrics, glue_score, label_mapping, load_files,
                              majority_baseline, regression_scale)
from sft_kernels.runtime import jobs
from sft_kernels.runtime.jobs import LocalCloud, StepBatches, load_train_dev
from tiny_checkpoints import make_tiny_checkpoint

TRAIN = [("the cat sat on the mat", "pos"), ("a dog ran in the park", "neg"), ("edge devices keep text", "pos"),
         ("the cloud runs the rest", "neg"), ("fine tuning is cheap", "pos"), ("hello world", "neg"),
         ("a tiny checkpoint", "pos"), ("the ball in the park", "neg")]
DEV = [("the cat ran", "pos"), ("the dog sat", "neg"), ("cheap tiny model", "pos"), ("hello cloud", "neg")]


def write_csv(path: Path, rows, header=("sentence", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture
def files(tmp_path):
    """``(train.csv, dev.csv)`` with string labels pos/neg."""
    return write_csv(tmp_path / "train.csv", TRAIN), write_csv(tmp_path / "dev.csv", DEV)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny base BERT checkpoint (2 layers, hidden 32) named ``tiny-bert``."""
    return make_tiny_checkpoint("bert", tmp_path_factory.mktemp("ckpt") / "tiny-bert")


def run_cli(argv, capsys) -> tuple[int, str]:
    """``sft ARGV`` in this process: ``(exit status, stderr)``."""
    try:
        rc = cli.main(argv)
    except SystemExit as exc:
        rc = exc.code if isinstance(exc.code, int) else 1
    return rc, capsys.readouterr().err


def assert_one_line_error(rc: int, err: str, command: str, *needles: str) -> None:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"sft {command}: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


TRAIN_ARGS = ["train", "--connect", "127.0.0.1:1"]


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("SFT_TOKEN", "unused")  # a bad input must be found before the token or the link matters


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("command", ["train", "serve"])
def test_model_directory_missing(tmp_path, capsys, command):
    missing = str(tmp_path / "no-such-model")
    argv = TRAIN_ARGS if command == "train" else ["serve", "--tokens", str(tmp_path / "tokens")]
    rc, err = run_cli([*argv, "--model", missing], capsys)
    assert_one_line_error(rc, err, command, "--model", missing, "no such directory")


@pytest.mark.parametrize("command", ["train", "serve"])
def test_model_unsupported_family(tmp_path, capsys, command):
    t5 = tmp_path / "t5-small"
    t5.mkdir()
    (t5 / "config.json").write_text(json.dumps({"model_type": "t5"}))
    argv = TRAIN_ARGS if command == "train" else ["serve", "--tokens", str(tmp_path / "tokens")]
    rc, err = run_cli([*argv, "--model", str(t5)], capsys)
    assert_one_line_error(rc, err, command, "--model", str(t5), "'t5'", "bert", "gpt2")


def test_model_dir_is_a_deprecated_alias_of_model(tmp_path, capsys):
    missing = str(tmp_path / "old")
    rc, err = run_cli([*TRAIN_ARGS, "--model-dir", missing], capsys)
    warning, error = err.strip().splitlines()
    assert "--model-dir is deprecated; use --model" in warning
    assert_one_line_error(rc, error, "train", "--model", missing)


def test_at_beyond_the_models_layers(bert_dir, capsys):
    rc, err = run_cli([*TRAIN_ARGS, "--task", "synthetic", "--model", str(bert_dir)], capsys)  # default --at 3
    assert_one_line_error(rc, err, "train", "--at 3", "tiny-bert has 2 layers")


def test_train_file_missing(tmp_path, capsys):
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(tmp_path / "nope.csv")], capsys)
    assert_one_line_error(rc, err, "train", "--train-file", "nope.csv", "not found")


def test_text_column_not_in_file(files, capsys):
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(files[0]), "--text-column", "review"], capsys)
    assert_one_line_error(rc, err, "train", "--text-column", "'review'", "sentence")


def test_text_column_missing_and_not_inferable(tmp_path, capsys):
    train = write_csv(tmp_path / "t.csv", [("a", "b", "x", "pos"), ("c", "d", "y", "neg")],
                      header=("title", "body", "summary", "label"))
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(train)], capsys)
    assert_one_line_error(rc, err, "train", "--text-column not given", "3 of them hold text")


def test_empty_text_in_a_row(tmp_path, capsys):
    train = write_csv(tmp_path / "t.csv", [("good", "pos"), ("  ", "neg")])
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(train)], capsys)
    assert_one_line_error(rc, err, "train", "--train-file", "row 2 (line 3)", "empty text")


def test_file_without_rows(tmp_path, capsys):
    train = write_csv(tmp_path / "t.csv", [])
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(train)], capsys)
    assert_one_line_error(rc, err, "train", "--train-file", "no rows")


def test_unparseable_label(tmp_path, capsys):
    train = write_csv(tmp_path / "t.csv", [("good", "1"), ("bad", "0"), ("fine", "positive")])
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(train)], capsys)
    assert_one_line_error(rc, err, "train", "--label-column", "'positive'", "row 3")


def test_validation_label_unknown_to_training(files, tmp_path, capsys):
    dev = write_csv(tmp_path / "d.csv", [("so so", "neutral")])
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(files[0]), "--validation-file", str(dev)], capsys)
    assert_one_line_error(rc, err, "train", "--validation-file", "'neutral'", "--train-file")


def test_task_with_train_file(files, capsys):
    rc, err = run_cli([*TRAIN_ARGS, "--task", "SST-2", "--train-file", str(files[0])], capsys)
    assert_one_line_error(rc, err, "train", "--task", "--train-file", "alternatives")


@pytest.mark.parametrize("flag", ["--validation-file", "--text-column", "--label-column"])
def test_file_flags_without_train_file(files, capsys, flag):
    rc, err = run_cli([*TRAIN_ARGS, "--task", "synthetic", flag, str(files[1])], capsys)
    assert_one_line_error(rc, err, "train", flag, "needs --train-file")


def test_bad_config_value_names_its_flag(files, capsys):
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(files[0]), "--lr", "5"], capsys)
    assert_one_line_error(rc, err, "train", "--lr")
    rc, err = run_cli([*TRAIN_ARGS, "--train-file", str(files[0]), "--fwd-codec", "int7"], capsys)
    assert_one_line_error(rc, err, "train", "--fwd-codec", "int7")


def test_bad_input_as_a_process_has_no_traceback(tmp_path):
    missing = str(tmp_path / "nope")
    out = subprocess.run([sys.executable, "-m", "sft_kernels", *TRAIN_ARGS, "--model", missing],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "SFT_TOKEN": "x"})
    assert_one_line_error(out.returncode, out.stderr, "train", "--model", missing)


@pytest.mark.parametrize("command", ["train", "serve"])
def test_help_shows_worked_examples(capsys, command):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for example in ("--task SST-2", "--train-file train.csv", "--model ./bert-base-uncased", "--u-split"):
        assert example in out
    assert "sft train --connect 127.0.0.1:7000 --token-file edge.token --train-file train.csv \\\n" in out


def test_split_kwargs_carry_u_split():
    a = cli._parser().parse_args(["serve", "--tokens", "t", "--u-split"])
    assert cli._split_kwargs(a)["u_split"] is True
    assert cli._split_kwargs(cli._parser().parse_args(["serve", "--tokens", "t"]))["u_split"] is False


# ----------------------------------------------------------------------------------------------- data layer

def test_metrics_take_a_spec_and_glue_names_are_unchanged(files):
    spec, train, dev = load_files(*files)
    preds, labels = np.array([1, 0, 0, 0]), np.asarray(dev["label"])
    assert compute_metrics(spec, preds, labels) == {"accuracy": 0.75}
    assert glue_score(spec, {"accuracy": 0.75}) == 75.0
    assert compute_metrics(SimpleNamespace(metric_names=("pearson", "spearman")), [1.0, 2.0, 3.0], [2.0, 4.0, 7.0])[
        "spearman"] == pytest.approx(1.0)
    for name in ("SST-2", "MRPC", "STS-B", "CoLA"):
        y = np.array([0.0, 1.0, 1.0, 0.0, 1.0]) if TASKS[name].is_regression else np.array([0, 1, 1, 0, 1])
        p = np.array([0.2, 0.9, 0.4, 0.1, 0.8]) if TASKS[name].is_regression else np.array([0, 1, 0, 0, 1])
        assert compute_metrics(name, p, y) == compute_metrics(TASKS[name], p, y)
        assert glue_score(name, compute_metrics(name, p, y)) == glue_score(TASKS[name], compute_metrics(name, p, y))
    assert majority_baseline(spec, train, dev) == {"accuracy": 0.5}  # a 4:4 tie -> class 0 (neg): half of dev
    with pytest.raises(ValueError, match="metric_names"):
        compute_metrics(SimpleNamespace(metric_names=("bleu",)), [1], [1])


def test_regression_scale_is_the_sts_b_recipe(tmp_path, monkeypatch):
    assert REGRESSION_TARGET_SCALE == 5.0 and regression_scale(TASKS["STS-B"]) == 5.0
    assert all(regression_scale(s) == 1.0 for n, s in TASKS.items() if n != "STS-B")
    sts_like = write_csv(tmp_path / "STS-B.csv", [("a", "b", "0.5"), ("c", "d", "4.5")],
                         header=("sentence1", "sentence2", "label"))
    spec, _, _ = load_files(sts_like)
    assert spec.is_regression and regression_scale(spec) == 1.0  # a user's own scores are trained as written
    bench = importlib.util.spec_from_file_location("bench_glue", Path(__file__).parents[1] / "bench" / "glue.py")
    bench_glue = importlib.util.module_from_spec(bench)
    monkeypatch.setitem(sys.modules, "bench_glue", bench_glue)  # its dataclasses look their module up
    bench.loader.exec_module(bench_glue)
    assert bench_glue.REGRESSION_TARGET_SCALE is REGRESSION_TARGET_SCALE  # the harness takes the package's constant


def test_label_mapping(files):
    spec, _, _ = load_files(*files)
    assert label_mapping(spec) == {"neg": 0, "pos": 1}
    assert label_mapping(TASKS["RTE"]) == {"entailment": 0, "not_entailment": 1}
    assert label_mapping(TASKS["STS-B"]) == {}
    assert label_mapping(SimpleNamespace(name="x", num_labels=3, is_regression=False)) == {"0": 0, "1": 1, "2": 2}


def test_step_batches_divide_regression_targets(bert_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(bert_dir), local_files_only=True)
    scores = write_csv(tmp_path / "s.csv", [("a cat", "b dog", "0.5"), ("c", "d", "4.5")],
                       header=("sentence1", "sentence2", "label"))
    _, ds, _ = load_files(scores)
    plain = StepBatches(tok, ds, 2, 16, seed=0)(0)["labels"]
    scaled = StepBatches(tok, ds, 2, 16, seed=0, label_scale=REGRESSION_TARGET_SCALE)(0)["labels"]
    assert torch.equal(scaled, plain / 5.0)


def test_load_train_dev_from_files(files):
    spec, train, dev = load_train_dev(train_file=files[0], validation_file=files[1], text_columns=["sentence"],
                                      max_train=5, max_eval=3)
    assert (spec.name, len(train), len(dev), spec.label2id) == ("train.csv", 5, 3, {"neg": 0, "pos": 1})
    assert load_train_dev(train_file=files[0])[2] is None
    with pytest.raises(ValueError, match="not both"):
        load_train_dev("SST-2", train_file=files[0])


class _FakeTrainer:
    """Stands in for EdgeTrainer in train_and_evaluate: records the labels of the first batch, predicts."""

    seen: dict = {}

    def __init__(self, cfg, batch_at, **kw):
        from transformers import AutoTokenizer

        self.cfg, self.kw = cfg, kw
        self.tokenizer = AutoTokenizer.from_pretrained(str(kw["model_dir"]), local_files_only=True)

    def train(self):
        _FakeTrainer.seen["labels"] = self.batch_at(0)["labels"]
        return jobs.TrainSummary(steps=1, examples=2, losses=[0.5])

    def predict(self, batches):
        return torch.cat([torch.nn.functional.one_hot(b["labels"].long(), 2).float() for b in batches])

    def finish(self):
        pass

    def wire_bytes(self):
        return 10, 20

    def close(self):
        pass


def test_train_and_evaluate_with_a_file_task(files, bert_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(jobs, "EdgeTrainer", _FakeTrainer)
    spec, train, dev = load_files(*files)
    cfg = jobs.RunConfig(model="tiny-bert", task=spec.name, num_labels=2, total_steps=1, batch_size=2,
                         max_length=16)
    run = jobs.train_and_evaluate(cfg, train, dev, spec=spec, host="h", port=1, client_id="c", token="t",
                                  model_dir=bert_dir, checkpoint_dir=tmp_path / "ckpt")
    assert run.metrics == {"accuracy": 1.0} and run.score == 100.0  # the fake predicts the labels
    record = run.to_json()
    assert record["label2id"] == {"neg": 0, "pos": 1} and record["id2label"] == {"0": "neg", "1": "pos"}
    assert record["task"]["name"] == "train.csv" and record["task"]["text_columns"] == ["sentence"]
    assert json.loads((tmp_path / "ckpt" / "labels.json").read_text())["label2id"] == {"neg": 0, "pos": 1}
    assert json.loads((tmp_path / "ckpt" / "run.json").read_text())["metrics"] == {"accuracy": 1.0}
    text = jobs.print_run(run)
    assert 'label2id: {"neg": 0, "pos": 1}' in text and "train.csv (your files)" in text
    with pytest.raises(ValueError, match="pass its spec"):
        jobs.train_and_evaluate(cfg, train, dev, host="h", port=1, client_id="c", token="t", model_dir=bert_dir)


def test_train_and_evaluate_scales_sts_b_targets(bert_dir, monkeypatch):
    from sft_kernels.data import load_task

    monkeypatch.setattr(jobs, "EdgeTrainer", _FakeTrainer)
    _, train = load_task("STS-B", "train", limit=4)
    cfg = jobs.RunConfig(task="STS-B", num_labels=1, total_steps=1, batch_size=4, max_length=16)
    jobs.train_and_evaluate(cfg, train, None, host="h", port=1, client_id="c", token="t", model_dir=bert_dir)
    first = StepBatches(_FakeTrainer(cfg, None, model_dir=bert_dir).tokenizer, train, 4, 16, 0)(0)["labels"]
    assert torch.equal(_FakeTrainer.seen["labels"], first / REGRESSION_TARGET_SCALE)


# ----------------------------------------------------------------------------------------------- end to end

def train_cli(cloud: LocalCloud, model: Path, files, *extra: str) -> subprocess.CompletedProcess:
    """``python -m sft_kernels train`` against ``cloud`` with the tiny ``model``, split after layer 1."""
    argv = [sys.executable, "-m", "sft_kernels", "train", "--connect", f"{cloud.host}:{cloud.port}",
            "--client-id", cloud.client_id, "--model", str(model), "--at", "1",
            "--train-file", str(files[0]), "--validation-file", str(files[1]), "--text-column", "sentence",
            "--label-column", "label", "--steps", "3", "--batch-size", "4", "--max-length", "16", "--quiet",
            "--json", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SFT_TOKEN": cloud.token})


@pytest.fixture(scope="module")
def bert_cloud(bert_dir, tmp_path_factory):
    """``sft serve --model tiny-bert --at 1`` with the default split pinned (no --any-split, no --u-split)."""
    with LocalCloud(tmp_path_factory.mktemp("bert-cloud"), extra=["--model", str(bert_dir), "--at", "1",
                                                                   "--quiet"]) as cloud:
        yield cloud


def check_run(out: subprocess.CompletedProcess, model_name: str) -> dict:
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["steps"] == 3 and len(r["losses"]) == 3 and all(np.isfinite(r["losses"]))
    assert set(r["metrics"]) == {"accuracy"} and r["eval_examples"] == len(DEV)
    assert r["label2id"] == {"neg": 0, "pos": 1} and r["task"]["name"] == "train.csv"
    assert r["config"]["model"] == model_name and r["config"]["num_labels"] == 2
    return r


@pytest.mark.slow
def test_tiny_bert_on_a_csv_end_to_end(bert_cloud, bert_dir, files, tmp_path):
    out = train_cli(bert_cloud, bert_dir, files, "--run-id", "bert-csv", "--checkpoint-dir", str(tmp_path / "edge"))
    check_run(out, "tiny-bert")
    assert json.loads((tmp_path / "edge" / "labels.json").read_text())["label2id"] == {"neg": 0, "pos": 1}
    assert json.loads((tmp_path / "edge" / "run.json").read_text())["steps"] == 3


@pytest.mark.slow
def test_edge_with_other_weights_is_refused(bert_cloud, files, tmp_path):
    other = make_tiny_checkpoint("bert", tmp_path / "tiny-bert", seed=1)  # same family and shapes, other weights
    out = train_cli(bert_cloud, other, files, "--run-id", "other-model")
    assert out.returncode != 0
    assert "sft train: CloudError:" in out.stderr and "model differs from the server's" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_u_split_edge_against_a_server_without_it_is_refused(bert_cloud, bert_dir, files):
    out = train_cli(bert_cloud, bert_dir, files, "--run-id", "u-split", "--u-split")
    assert out.returncode != 0
    assert "split settings differ: u_split: edge asks True, server serves False" in out.stderr, out.stderr
    assert "--any-split" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_tiny_gpt2_on_a_csv_end_to_end(files, tmp_path):
    from sft_kernels.split import load_classifier, model_inputs

    gpt2 = make_tiny_checkpoint("gpt2", tmp_path / "tiny-gpt2")
    tok, clf = load_classifier(gpt2, 2)
    assert tok.pad_token == tok.eos_token and model_inputs(clf) == ("input_ids", "attention_mask")
    with LocalCloud(tmp_path / "cloud", extra=["--model", str(gpt2), "--any-split", "--quiet"]) as cloud:
        check_run(train_cli(cloud, gpt2, files, "--run-id", "gpt2-csv"), "tiny-gpt2")
