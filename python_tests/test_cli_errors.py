"""What ``sft`` says when a user gets something wrong, and what it does with run ids.

* Each mistake is one line ``sft CMD: ...`` naming the flag, exit status 2, no traceback (bad input:
  tokens, port, task, data directory, values out of range, usage), or one line with what to do
  next, status 1 (the link refused, the cloud refused the run); ``--debug`` shows the traceback.
  Cases test_cli_data covers (a missing ``--train-file``, a bad ``--model``, file columns, ``--lr 5``)
  are not repeated here.
* RunConfig's and SessionLimits' field names become flags through one table.
* ``sft demo --quiet`` prints its result and no progress (transformers' "Loading weights" bar included).
* The default run id: the same command resumes its run, a different run gets its own id; a checkpoint
  directory or an explicit run id that belongs to another run is refused with what to do.

Runs against a real in-process ``CloudServer`` with a tiny BERT (no mocks); the demo as a process.
"""
from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sft_kernels import cli
from sft_kernels.runtime import CloudServer, RunConfig
from sft_kernels.runtime.jobs import data_identity, default_run_id, write_tokens
from test_cli_data import TRAIN, assert_one_line_error, run_cli, write_csv
from tiny_checkpoints import make_tiny_checkpoint

TOKEN = "s3cret"


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_checkpoint("bert", tmp_path_factory.mktemp("ckpt") / "tiny-bert")


@pytest.fixture(autouse=True)
def _token(monkeypatch):
    monkeypatch.setenv("SFT_TOKEN", TOKEN)


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def failure(argv: list[str]) -> str:
    """``sft ARGV`` in this process, which must fail after the start (exit status 1): its one-line message."""
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert isinstance(exc.value.code, str), exc.value.code  # a message, which the interpreter prints, status 1
    assert "\n" not in exc.value.code
    return exc.value.code


# ----------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("content,needles", [(None, ("cannot read it", "No such file")),
                                             ("\n", ("is empty", "server's tokens file"))])
def test_token_file_missing_or_empty(tmp_path, capsys, content, needles):
    token_file = tmp_path / "edge.token"
    if content is not None:
        token_file.write_text(content)
    rc, err = run_cli(["train", "--connect", "127.0.0.1:1", "--token-file", str(token_file)], capsys)
    assert_one_line_error(rc, err, "train", f"--token-file {token_file}", *needles)


def test_no_token_at_all(capsys, monkeypatch):
    monkeypatch.delenv("SFT_TOKEN")
    rc, err = run_cli(["train", "--connect", "127.0.0.1:1"], capsys)
    assert_one_line_error(rc, err, "train", "no token", "--token-file FILE", "$SFT_TOKEN")


def test_serve_tokens_file_missing(tmp_path, capsys):
    rc, err = run_cli(["serve", "--tokens", str(tmp_path / "tokens")], capsys)
    assert_one_line_error(rc, err, "serve", "--tokens", "does not exist")


def test_serve_on_a_busy_port(tmp_path, capsys):
    tokens = write_tokens(tmp_path / "tokens", {"edge": TOKEN})
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        rc, err = run_cli(["serve", "--tokens", str(tokens), "--port", str(port)], capsys)
    assert_one_line_error(rc, err, "serve", f"--host 127.0.0.1 --port {port}: cannot listen there",
                          "another process listens there", "pick another --port (0 = any free port)")


def test_unknown_task(capsys):
    rc, err = run_cli(["train", "--connect", "127.0.0.1:1", "--task", "SST2"], capsys)
    assert_one_line_error(rc, err, "train", "--task SST2: no such task", "SST-2", "synthetic", "--train-file")


@pytest.mark.parametrize("command", ["train", "demo"])
def test_data_dir_not_found_is_an_error_not_the_synthetic_task(tmp_path, capsys, command):
    argv = ["train", "--connect", "127.0.0.1:1"] if command == "train" else ["demo"]
    missing = tmp_path / "glue-typo"
    rc, err = run_cli([*argv, "--data-dir", str(missing)], capsys)  # --task auto
    assert_one_line_error(rc, err, command, f"--data-dir '{missing}' is not a directory")
    rc, err = run_cli([*argv, "--data-dir", str(tmp_path)], capsys)  # a directory without SST-2
    assert_one_line_error(rc, err, command, f"--data-dir '{tmp_path}' has no SST-2/train.tsv",
                          "leave out --data-dir")
    rc, err = run_cli([*argv, "--task", "CoLA", "--data-dir", str(tmp_path)], capsys)
    assert_one_line_error(rc, err, command, "GLUE file not found", "CoLA/train.tsv", "--data-dir")


@pytest.mark.parametrize("flag,value,needles", [
    ("--lr", "abc", ("argument --lr: --lr must be a finite number", "'abc'", "sft train --help")),
    ("--lr", "1", ("--lr must be (0, 1), got 1.0",)),
    ("--max-length", "1", ("--max-length must be 2 .. 8192, got 1",)),
    ("--no-such-flag", "1", ("unrecognized arguments: --no-such-flag 1",)),
])
def test_values_and_usage_errors_are_one_line(capsys, flag, value, needles):
    rc, err = run_cli(["train", "--connect", "127.0.0.1:1", "--task", "synthetic", flag, value], capsys)
    assert_one_line_error(rc, err, "train", *needles)
    assert "RunConfig" not in err and "usage:" not in err


def test_config_field_names_become_flags_through_one_table():
    train = {a.dest for a in cli._commands(cli._parser())["train"]._actions}
    for field in dataclasses.fields(RunConfig):
        text = cli._with_flags(f"RunConfig.{field.name} must be x")
        if field.name in train or field.name in cli._FLAG_NAMES:
            assert "RunConfig" not in text and text.startswith(("--", "the number")), text
    assert cli._with_flags("SessionLimits.max_tokens must be >= 1") == "--max-tokens must be >= 1"
    assert cli._with_flags("RunConfig.total_steps must be 1 .. 1e8") == "--steps must be 1 .. 1e8"
    # quoted text (a path, a value) is left alone
    assert cli._with_flags("train_file not found: '/data/train_file.csv'") == \
        "--train-file not found: '/data/train_file.csv'"


# ----------------------------------------------------------------------------------------------- failures

def _train_argv(port: int, model: Path, *extra: str) -> list[str]:
    return ["train", "--connect", f"127.0.0.1:{port}", "--model", str(model), "--at", "1", "--task", "synthetic",
            "--max-train", "16", "--max-eval", "8", "--batch-size", "4", "--max-length", "16", "--quiet", "--json",
            *extra]


def test_connection_refused_names_connect(tiny_bert):
    port = _closed_port()
    text = failure(_train_argv(port, tiny_bert, "--retries", "0"))
    assert text.startswith(f"sft train: LinkRefused: cannot connect to 127.0.0.1:{port}: nothing listens there")
    assert text.endswith("; check --connect, and start sft serve there first")


def test_debug_shows_the_traceback(tmp_path, tiny_bert):
    from sft_kernels.channel import LinkRefused

    with pytest.raises(cli._Failed) as exc:  # raised, with the original exception as its cause
        cli.main(_train_argv(_closed_port(), tiny_bert, "--retries", "0", "--debug"))
    assert isinstance(exc.value.__cause__, LinkRefused)
    out = subprocess.run([sys.executable, "-m", "sft_kernels", "train", "--connect", "127.0.0.1:1", "--token-file",
                          str(tmp_path / "missing"), "--debug"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" in out.stderr
    assert "FileNotFoundError" in out.stderr and "_BadInput: --token-file" in out.stderr


# ----------------------------------------------------------------------------------------------- --quiet

# demo --quiet (the result and no progress): test_runtime.py::test_sft_demo_runs_two_processes_and_prints_the_table


# ----------------------------------------------------------------------------------------------- run ids

def test_default_run_id_follows_the_config_and_the_data(tmp_path):
    data = write_csv(tmp_path / "train.csv", TRAIN)
    cfg = RunConfig(task="train.csv", total_steps=3)
    ident = data_identity(train_file=data, label_column="label")
    rid = default_run_id(cfg, ident)
    assert rid.startswith("run-") and len(rid) == 16
    assert default_run_id(dataclasses.replace(cfg, run_id="other"), ident) == rid  # the id is no input of itself
    assert default_run_id(dataclasses.replace(cfg, lr=3e-4), ident) != rid
    assert default_run_id(cfg, data_identity(train_file=data, label_column="label", max_train=4)) != rid
    assert default_run_id(cfg, ident, model_dir=tmp_path) != rid
    write_csv(data, TRAIN[:-1])  # the same file name, other data
    assert default_run_id(cfg, data_identity(train_file=data, label_column="label")) != rid
    assert default_run_id(cfg, data_identity(task="synthetic")) != default_run_id(
        cfg, data_identity(task="synthetic", max_train=8))


@pytest.fixture
def server(tiny_bert):
    s = CloudServer({"edge": TOKEN.encode()}, None, model_dir=tiny_bert).start()  # any split, no checkpoints
    yield s.address[1]
    s.shutdown()


def test_same_command_resumes_and_another_run_gets_its_own_id(server, tiny_bert, tmp_path, capsys):
    first = _train_argv(server, tiny_bert, "--steps", "2", "--checkpoint-dir", str(tmp_path / "a"))
    assert cli.main(first) == 0
    one = json.loads(capsys.readouterr().out)
    assert one["config"]["run_id"].startswith("run-") and one["steps"] == 2
    assert cli.main(first) == 0  # restarted: the same run, resumed from its checkpoints (nothing left to train)
    again = json.loads(capsys.readouterr().out)
    assert again["config"] == one["config"] and again["losses"] == one["losses"]
    assert again["train_wire_bytes_up"] == one["train_wire_bytes_up"]  # no step ran twice
    other = _train_argv(server, tiny_bert, "--steps", "2", "--lr", "3e-4", "--checkpoint-dir", str(tmp_path / "b"))
    assert cli.main(other) == 0  # a different run: its own id and session, trained from step 0
    two = json.loads(capsys.readouterr().out)
    assert two["config"]["run_id"] != one["config"]["run_id"] and two["steps"] == 2
    # the first run's checkpoint directory for another run: refused, with what to do
    rc, err = run_cli(_train_argv(server, tiny_bert, "--steps", "2", "--lr", "3e-4", "--checkpoint-dir",
                                  str(tmp_path / "a")), capsys)
    assert_one_line_error(rc, err, "train", f"--checkpoint-dir '{tmp_path / 'a'}' holds the checkpoints of another run",
                          one["config"]["run_id"], "lr: 0.0001 there, 0.0003 now", "repeat the command",
                          "give another --checkpoint-dir")
    # an explicit run id that names another run on the server: refused, with what to do
    text = failure(_train_argv(server, tiny_bert, "--steps", "3", "--run-id", one["config"]["run_id"]))
    assert f"run id '{one['config']['run_id']}' is already open with a different config" in text
    assert "leave out --run-id" in text and "give this run its own --run-id" in text


def test_quiet_train_without_a_checkpoint_dir_run_twice_says_what_to_do(server, tiny_bert, capsys):
    argv = _train_argv(server, tiny_bert, "--steps", "2")
    assert cli.main(argv) == 0
    capsys.readouterr()
    text = failure(argv)  # the server holds this run at step 2; an edge without checkpoints cannot follow
    assert "the --checkpoint-dir it ran with" in text and "another --run-id" in text


def test_print_run_names_the_run_id(server, tiny_bert, capsys):
    assert cli.main([a for a in _train_argv(server, tiny_bert, "--steps", "1") if a != "--json"]) == 0
    assert "; run id: run-" in capsys.readouterr().out.splitlines()[0]
