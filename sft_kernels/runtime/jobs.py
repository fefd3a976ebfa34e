"""Jobs the ``sft`` command runs: a cloud server process, an edge training run, the demo.

* :class:`StepBatches` maps a training step to its batch (epoch and position from the
  step, order from ``(seed, epoch)``), so a rolled-back or resumed run sees the same data;
  regression targets are divided by the task's :func:`~sft_kernels.data.regression_scale`
  (5 for STS-B, as bench/glue.py trains it).
* :class:`LocalCloud` starts ``python -m sft_kernels serve`` as a separate process on
  loopback with a fresh tokens file, and stops it; the demo, the benchmarks and the
  tests use it to get a real second process.
* :func:`load_train_dev` reads a GLUE / synthetic task by name or a user's own files
  (:func:`~sft_kernels.data.load_files`); :func:`train_and_evaluate` is one edge run: train,
  evaluate on the dev set with the task's metrics (a spec: GLUE or file task), summarise.  With a
  ``checkpoint_dir`` it writes the run's record beside the checkpoints: ``labels.json`` (the
  task and its ``label2id``, the run id and config) before training, ``run.json`` (everything
  ``--json`` prints) after; a directory whose ``labels.json`` holds another config is refused
  (:class:`OtherRun`), so two runs never share checkpoints.
* :func:`default_run_id`: ``sft train``'s run id when none is given, a hash of the run's config and
  its training data (:func:`data_identity`): the same command resumes, another run gets its own id.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from ..data import (TASKS, TaskSpec, batches, compute_metrics, glue_score, label_mapping, load_files, load_task,
                    num_batches, regression_scale, subsample)
from .config import RunConfig
from .edge import EdgeTrainer, TrainSummary, first_batches

__all__ = ["StepBatches", "LocalCloud", "EdgeRun", "train_and_evaluate", "write_tokens", "run_demo", "resolve_task",
           "load_train_dev", "print_run", "task_record", "write_json", "data_identity", "default_run_id", "OtherRun",
           "demo_table"]


class StepBatches:
    """``step -> batch`` over ``ds`` for ``epochs`` passes, order keyed by ``(seed, epoch)``.

    ``label_scale``: the batches' ``labels`` are divided by it (a regression task's
    :func:`~sft_kernels.data.regression_scale`); 1.0 leaves them untouched.
    """

    def __init__(self, tokenizer, ds, batch_size: int, max_length: int, seed: int, label_scale: float = 1.0) -> None:
        if len(ds) == 0:
            raise ValueError("the training set is empty")
        if not label_scale > 0:
            raise ValueError(f"label_scale must be > 0, got {label_scale!r}")
        self.tokenizer, self.ds, self.batch_size, self.max_length, self.seed = tokenizer, ds, batch_size, max_length, seed
        self.label_scale = label_scale
        self.per_epoch = num_batches(len(ds), batch_size)
        self._it = None
        self._next: Optional[int] = None

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(step, self.per_epoch)
        if self._next != step:
            self._it = batches(self.tokenizer, self.ds, self.batch_size, max_length=self.max_length, shuffle=True,
                               seed=self.seed, epoch=epoch, start_batch=pos)
        batch = next(self._it)
        self._next = step + 1 if pos + 1 < self.per_epoch else None
        if self.label_scale != 1.0:
            batch["labels"] = batch["labels"] / self.label_scale
        return batch


def write_tokens(path: Union[str, Path], tokens: Mapping[str, str]) -> Path:
    """Write a tokens file (``client_id secret`` per line), readable by its owner only."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# client_id secret\n")
        for cid, secret in tokens.items():
            f.write(f"{cid} {secret}\n")
    return path


class LocalCloud:
    """A ``sft serve`` process on 127.0.0.1 with a fresh token for one client; a context manager.

    ``extra``: more ``serve`` flags (e.g. ``["--checkpoint-dir", d]``).  The process's output goes to
    ``workdir/server.log``; :meth:`kill` sends SIGKILL (for fault tests), :meth:`restart` starts it again
    on the same port.
    """

    def __init__(self, workdir: Union[str, Path, None] = None, extra: Sequence[str] = (), client_id: str = "edge",
                 port: int = 0, startup_timeout: float = 180.0) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="sft-cloud-") if workdir is None else None
        self.workdir = Path(workdir or self._tmp.name)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_id, self.token = client_id, secrets.token_hex(32)
        self.tokens_file = write_tokens(self.workdir / "tokens", {client_id: self.token})
        self.extra, self.port, self.timeout = list(extra), port, startup_timeout
        self.proc: Optional[subprocess.Popen] = None
        self.host = "127.0.0.1"

    def start(self) -> "LocalCloud":
        """Start the server and wait until it listens."""
        port_file = self.workdir / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "sft_kernels", "serve", "--host", self.host, "--port", str(self.port),
               "--tokens", str(self.tokens_file), "--port-file", str(port_file), *self.extra]
        self._log = open(self.workdir / "server.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while not port_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"the cloud server exited with code {self.proc.returncode}; its log:\n"
                                   + (self.workdir / "server.log").read_text()[-4000:])
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"the cloud server did not listen within {self.timeout} s")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    def kill(self) -> None:
        """SIGKILL the server (nothing flushed, nothing cleaned up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def restart(self) -> "LocalCloud":
        """Start again on the same port (after :meth:`kill` or :meth:`stop`)."""
        return self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> "LocalCloud":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


@dataclass
class EdgeRun:
    """Result of :func:`train_and_evaluate`."""

    config: RunConfig
    summary: TrainSummary
    metrics: dict
    score: Optional[float]
    eval_examples: int
    wire_up: int    # every byte sent on every connection of the run (handshakes, eval, reconnects included)
    wire_down: int
    spec: Optional[TaskSpec] = None  # the task (GLUE or file); None: ``TASKS[config.task]``

    def to_json(self) -> dict:
        """Machine-readable form (``--json``): payload and wire bytes side by side, the task and its label2id."""
        up, down = self.summary.per_example()
        wup, wdown = self.summary.wire_per_example()
        return {**task_record(self.spec or TASKS[self.config.task]),
                "config": self.config.to_dict(), "steps": self.summary.steps, "examples": self.summary.examples,
                "losses": self.summary.losses, "metrics": self.metrics, "score": self.score,
                "eval_examples": self.eval_examples, "bytes_up_per_example": up, "bytes_down_per_example": down,
                "wire_bytes_up_per_example": wup, "wire_bytes_down_per_example": wdown,
                "train_payload_bytes_up": self.summary.payload_up, "train_payload_bytes_down": self.summary.payload_down,
                "train_wire_bytes_up": self.summary.wire_up, "train_wire_bytes_down": self.summary.wire_down,
                "wire_bytes_up": self.wire_up, "wire_bytes_down": self.wire_down,
                "reconnects": self.summary.reconnects, "seconds": self.summary.seconds}


def steps_for(train_size: int, batch_size: int, epochs: float) -> int:
    """Training steps for ``epochs`` passes (at least 1)."""
    return max(1, math.ceil(epochs * num_batches(train_size, batch_size)))


def task_record(spec: TaskSpec) -> dict:
    """What a run records of its task: ``{"task": {...}, "label2id": {...}, "id2label": {...}}``.

    ``task`` holds the name, ``num_labels``, ``is_regression``, ``metric_names``, the text columns and
    the training targets' ``regression_scale``; ``label2id`` is :func:`~sft_kernels.data.label_mapping`
    (``{}`` for a regression), ``id2label`` its inverse.
    """
    mapping = label_mapping(spec)
    return {"task": {"name": spec.name, "num_labels": spec.num_labels, "is_regression": spec.is_regression,
                     "metric_names": list(spec.metric_names),
                     "text_columns": [c for c in (spec.text_a, spec.text_b) if c is not None],
                     "regression_scale": regression_scale(spec)},
            "label2id": mapping, "id2label": {str(i): name for name, i in mapping.items()}}


def write_json(path: Union[str, Path], obj: Any) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (a temporary file, then a rename); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(obj) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


class OtherRun(ValueError):
    """A checkpoint directory holds another run's checkpoints (its ``labels.json`` records another config)."""


def _check_record_dir(record_dir: Path, cfg: RunConfig) -> None:
    """Refuse (:class:`OtherRun`) a ``checkpoint_dir`` whose ``labels.json`` records another run config.

    Resuming there would load the other run's checkpoints (the edge refuses them deep in its set-up)
    or, with a config that happens to load, mix two runs.  A ``labels.json`` written before it
    recorded the config is not checked.
    """
    try:
        record = json.loads((record_dir / "labels.json").read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return
    old = record.get("config") if isinstance(record, dict) else None
    new = cfg.to_dict()
    if isinstance(old, dict) and old != new:
        diff = ", ".join(f"{k}: {old.get(k)!r} there, {v!r} now" for k, v in new.items()
                         if old.get(k) != v and k != "run_id") or "only the run id differs"
        raise OtherRun(f"checkpoint_dir '{record_dir}' holds the checkpoints of another run (run id "
                       f"{old.get('run_id')!r}; {diff}): to resume that run, repeat the command that started it; "
                       f"for this one, give another checkpoint_dir")


def _task_spec(cfg: RunConfig, spec: Optional[TaskSpec]) -> TaskSpec:
    """``spec``, or the built-in task ``cfg.task`` names; its label count must be ``cfg.num_labels``."""
    if spec is None:
        if cfg.task not in TASKS:
            raise ValueError(f"task {cfg.task!r} is not one of {sorted(TASKS)}: pass its spec (e.g. the one "
                             "load_files returns) as spec=")
        spec = TASKS[cfg.task]
    if spec.num_labels != cfg.num_labels:
        raise ValueError(f"the task {spec.name!r} has num_labels={spec.num_labels}, the run config "
                         f"{cfg.num_labels}")
    return spec


def train_and_evaluate(cfg: RunConfig, train_ds, dev_ds, *, host: str, port: int, client_id: str, token: str,
                       spec: Optional[TaskSpec] = None, eval_batch_size: int = 64, **edge_kw: Any) -> EdgeRun:
    """Train ``cfg`` against the cloud at ``host:port``, then evaluate on ``dev_ds`` (None: skip) with its metric.

    ``spec``: the task (a :class:`~sft_kernels.data.TaskSpec`, e.g. a file task's); default the built-in
    task ``cfg.task`` names.  Its metrics evaluate the dev set and its
    :func:`~sft_kernels.data.regression_scale` divides the training targets.  ``edge_kw`` go to
    :class:`EdgeTrainer`; with a ``checkpoint_dir`` among them, ``labels.json`` is written there before
    training and ``run.json`` after (see the module docstring).  A calibrated run (``cfg.init``) fits the
    code on the first ``cfg.calibration_size`` examples of the run's training order, unlabelled (unless
    ``edge_kw`` holds a ``calibration``).
    """
    spec = _task_spec(cfg, spec)
    scale = regression_scale(spec)
    record_dir = edge_kw.get("checkpoint_dir")
    if record_dir is not None:
        _check_record_dir(Path(record_dir), cfg)
    if cfg.init == "calibrated" and edge_kw.get("calibration") is None:
        # the batches need the model's tokenizer, which the trainer loads: it calls this with it
        edge_kw["calibration"] = lambda tok: first_batches(
            cfg, StepBatches(tok, train_ds, cfg.batch_size, cfg.max_length, cfg.seed, label_scale=scale))
    trainer = EdgeTrainer(cfg, None, host=host, port=port, client_id=client_id, token=token, **edge_kw)
    trainer.batch_at = StepBatches(trainer.tokenizer, train_ds, cfg.batch_size, cfg.max_length, cfg.seed,
                                   label_scale=scale)
    if record_dir is not None:  # after the trainer took the directory (an older run's checkpoints refuse it)
        write_json(Path(record_dir) / "labels.json", {"model": cfg.model, "run_id": cfg.run_id,
                                                      "config": cfg.to_dict(), **task_record(spec)})
    try:
        summary = trainer.train()
        metrics: dict = {}
        score = None
        if dev_ds is not None and len(dev_ds):
            dev = list(batches(trainer.tokenizer, dev_ds, eval_batch_size, max_length=cfg.max_length,
                               sort_by_length=True))
            logits = trainer.predict(dev)
            index = torch.cat([b["index"] for b in dev]).numpy()
            order = np.empty_like(index)
            order[index] = np.arange(len(index))
            logits = logits.numpy()[order]
            preds = logits[:, 0] if cfg.num_labels == 1 else logits.argmax(-1)
            metrics = compute_metrics(spec, preds, np.asarray(dev_ds["label"]))
            score = glue_score(spec, metrics)
        trainer.finish()
        wire_up, wire_down = trainer.wire_bytes()
        run = EdgeRun(cfg, summary, metrics, score, len(dev_ds) if dev_ds is not None else 0, wire_up, wire_down,
                      spec)
    finally:
        trainer.close()
    if record_dir is not None:
        write_json(Path(record_dir) / "run.json", run.to_json())
    return run


def load_train_dev(task: Optional[str] = None, data_dir=None, max_train: Optional[int] = None,
                   max_eval: Optional[int] = None, *, train_file=None, validation_file=None,
                   text_columns: Optional[Sequence[str]] = None, label_column: str = "label"):
    """``(TaskSpec, train, dev)``; train subsampled to ``max_train`` rows (:func:`~sft_kernels.data.subsample`).

    Either a built-in ``task`` (GLUE or synthetic, read from ``data_dir``) or a user's ``train_file``
    (and optional ``validation_file``; ``dev`` is None without one) read by
    :func:`~sft_kernels.data.load_files` with ``text_columns`` / ``label_column`` (the spec is then a
    :class:`~sft_kernels.data.FileTaskSpec`).  ``dev`` keeps its first ``max_eval`` rows.
    Raises ``ValueError`` for both or neither, and load_files' errors for bad files.
    """
    if train_file is not None:
        if task is not None:
            raise ValueError(f"give a task or a train_file, not both (task {task!r}, train_file {str(train_file)!r})")
        spec, train, dev = load_files(train_file, validation_file, text_columns=text_columns,
                                      label_column=label_column)
        if dev is not None and max_eval is not None and max_eval < len(dev):
            dev = dev.select(range(max_eval))
        return spec, subsample(train, max_train), dev
    if task is None:
        raise ValueError("give a task or a train_file")
    if validation_file is not None or text_columns is not None:
        raise ValueError("validation_file and text_columns need a train_file")
    spec, train = load_task(task, "train", data_dir)
    _, dev = load_task(task, "dev", data_dir, limit=max_eval)
    return spec, subsample(train, max_train), dev


def dumps(obj: Any) -> str:
    """JSON for ``--json`` output."""
    return json.dumps(obj, indent=2, sort_keys=True)


def resolve_task(task: str, data_dir=None) -> str:
    """``"auto"`` -> SST-2 when its GLUE files are found, else ``"synthetic"``; other names unchanged.

    A ``data_dir`` given is a promise of data: ``FileNotFoundError`` when it is not a directory, or
    (for ``"auto"``) has no SST-2, rather than the synthetic task in its place.  ``ValueError`` for a
    name that is no task.
    """
    from ..data import TASKS, default_glue_dir

    if task != "auto" and task not in TASKS:
        raise ValueError(f"no such task: choose auto or one of {', '.join(sorted(TASKS))}, or give your own data "
                         f"as train_file")
    if data_dir is not None and not Path(data_dir).is_dir():
        raise FileNotFoundError(f"data_dir '{data_dir}' is not a directory (it should hold the GLUE tasks' "
                                f"<TASK>/train.tsv and dev.tsv)")
    if task != "auto":
        return task
    root = Path(data_dir) if data_dir is not None else default_glue_dir()
    if (root / "SST-2" / "train.tsv").is_file():
        return "SST-2"
    if data_dir is not None:
        raise FileNotFoundError(f"data_dir '{data_dir}' has no SST-2/train.tsv, the data of task 'auto': name a "
                                f"task whose files are there, or leave out data_dir (without GLUE files, 'auto' "
                                f"is the built-in synthetic task)")
    return "synthetic"


def data_identity(*, task: Optional[str] = None, data_dir=None, train_file=None,
                  text_columns: Optional[Sequence[str]] = None, label_column: Optional[str] = None,
                  max_train: Optional[int] = None) -> dict:
    """What tells one run's training data from another's, for :func:`default_run_id` (a JSON-able dict).

    A file (``train_file``, or a GLUE task's ``train.tsv`` under ``data_dir``): its resolved path, size
    and modification time, so an edited file is other data; the synthetic task: its name.  With the
    columns read and the ``max_train`` subsample.  ``task`` is a resolved name (not ``"auto"``).
    """
    from ..data import TASKS
    from ..data.glue import _tsv_path

    if train_file is not None:
        path: Optional[Path] = Path(train_file)
    elif task in TASKS and task != "synthetic":
        path = _tsv_path(task, "train", data_dir)
    else:
        path = None
    ident: dict = {"task": task, "text_columns": list(text_columns) if text_columns else None,
                   "label_column": label_column, "max_train": max_train}
    if path is not None:
        st = path.stat()
        ident.update(file=str(path.resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def default_run_id(cfg: RunConfig, data: Mapping[str, Any], model_dir=None) -> str:
    """``run-`` and 12 hex digits of a hash of ``cfg`` (its ``run_id`` left out), ``data`` and ``model_dir``.

    ``data``: :func:`data_identity` of the run's training data; ``model_dir``: the checkpoint the run
    loads (None: the embedded model).  Repeating a command gives the same id, so a restarted run
    resumes its session and checkpoints on the server; changing a setting, the data or the model
    gives another id, so a different run is never taken for the old one (which the server would
    resume with the wrong data, or refuse).
    """
    record = {"config": {k: v for k, v in cfg.to_dict().items() if k != "run_id"}, "data": dict(data),
              "model": str(Path(model_dir).resolve()) if model_dir is not None else None}
    digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()
    return f"run-{digest[:12]}"


def _task_label(task: str) -> str:
    if task == "synthetic":
        return "synthetic sentiment task (generated, not GLUE)"
    return f"GLUE {task}" if task in TASKS else f"{task} (your files)"


def print_run(run: EdgeRun) -> str:
    """Human-readable summary of one edge run (the task's label2id included)."""
    up, down = run.summary.per_example()
    wup, wdown = run.summary.wire_per_example()
    metric = ", ".join(f"{k} {v:.4f}" for k, v in run.metrics.items()) or "not evaluated"
    rec = task_record(run.spec or TASKS[run.config.task])
    scale = rec["task"]["regression_scale"]
    labels = (json.dumps(rec["label2id"]) if rec["label2id"] else
              "none (regression" + (f"; targets trained / {scale:g})" if scale != 1.0 else ")"))
    return (f"task: {_task_label(run.config.task)}; model: {run.config.model}; run id: {run.config.run_id}\n"
            f"label2id: {labels}\n"
            f"steps: {run.summary.steps} ({run.summary.examples} examples), "
            f"final loss {run.summary.losses[-1]:.4f}\ndev ({run.eval_examples} examples): {metric}\n"
            f"training bytes per example: payload up {up:.1f}, down {down:.1f}; on the wire up {wup:.1f}, "
            f"down {wdown:.1f}\nall wire bytes of the run (handshakes, eval, reconnects): up {run.wire_up}, "
            f"down {run.wire_down}\nreconnects: {run.summary.reconnects}; wall time {run.summary.seconds:.1f} s")


def _first_steps_bytes(s: TrainSummary, k: int, wire: bool = False) -> tuple[float, float]:
    """Payload (or ``wire``) bytes per example over the first ``k`` steps, (up, down)."""
    rows = s.step_bytes[:k]
    n = max(1, sum(r[2] for r in rows))
    i = 3 if wire else 0
    return sum(r[i] for r in rows) / n, sum(r[i + 1] for r in rows) / n


def run_demo(steps: int = 60, baseline_steps: int = 3, task: str = "auto", data_dir=None,
             max_eval: Optional[int] = None, batch_size: int = 32, seed: int = 0, progress: bool = True) -> dict:
    """``sft demo``: cloud and edge as two processes on loopback; returns the measured rows (:func:`demo_table`).

    Trains MiniLM with the bottleneck split (rank 4, int8 activations, int8 stochastic-rounded
    gradients) for ``steps`` steps and evaluates on the dev set; then runs ``baseline_steps`` steps of
    the uncompressed layer split on the same first batches to measure the bytes it would send, and
    ``baseline_steps`` steps of the U-split with the same bottleneck and codecs (the head and the loss
    on the edge, no label sent; the pooled rows and their gradient cross too) to measure its bytes.
    ``progress``: print what it is doing and show the training's progress bars (the result is the
    caller's to print).
    """
    t0 = time.perf_counter()
    task = resolve_task(task, data_dir)
    spec, train, dev = load_train_dev(task, data_dir, max_train=steps * batch_size, max_eval=max_eval)
    say = print if progress else (lambda *a, **k: None)
    say(f"sft demo: {_task_label(task)}: {len(train)} training examples, {len(dev)} dev examples; "
        "starting a cloud server process on 127.0.0.1 ...", flush=True)
    # lr 3e-4: a short run; bench/glue.py's calibration at 16 steps learned SST-2 at 3e-4, not at 1e-4
    common = dict(task=task, num_labels=spec.num_labels, seed=seed, batch_size=batch_size, max_length=128, lr=3e-4)
    main_cfg = RunConfig(**common, total_steps=steps, warmup_steps=steps // 10, mode="bottleneck", rank=4,
                         fwd_codec="int8", bwd_codec="int8,sr", run_id="demo-bottleneck")
    base_cfg = RunConfig(**common, total_steps=baseline_steps, mode="layer", rank=None, fwd_codec="none",
                         bwd_codec="none", run_id="demo-layer")
    u_cfg = dataclasses.replace(main_cfg, total_steps=baseline_steps, warmup_steps=0, u_split=True,
                                run_id="demo-usplit")
    with tempfile.TemporaryDirectory(prefix="sft-demo-") as wd, \
            LocalCloud(Path(wd) / "cloud", extra=["--any-split", "--quiet", "--checkpoint-dir",
                                                 str(Path(wd) / "cloud" / "ckpt")]) as cloud:
        kw = dict(host=cloud.host, port=cloud.port, client_id=cloud.client_id, token=cloud.token, progress=progress)
        run = train_and_evaluate(main_cfg, train, dev, checkpoint_dir=Path(wd) / "edge", **kw)
        base = train_and_evaluate(base_cfg, train, None, **kw)
        u_run = train_and_evaluate(u_cfg, train, None, **kw)
    k = min(baseline_steps, steps)
    m_up, m_down = _first_steps_bytes(run.summary, k)
    b_up, b_down = _first_steps_bytes(base.summary, k)
    u_up, u_down = _first_steps_bytes(u_run.summary, k)
    mw_up, mw_down = _first_steps_bytes(run.summary, k, wire=True)
    bw_up, bw_down = _first_steps_bytes(base.summary, k, wire=True)
    uw_up, uw_down = _first_steps_bytes(u_run.summary, k, wire=True)
    up, down = run.summary.per_example()
    wup, wdown = run.summary.wire_per_example()
    metric_name = "/".join(spec.metric_names)
    rows = {
        "task": task, "synthetic": task == "synthetic", "metric_name": metric_name, "metrics": run.metrics,
        "score": run.score, "steps": run.summary.steps, "train_examples": run.summary.examples,
        "eval_examples": run.eval_examples,
        "bottleneck_r4_int8": {"bytes_up_per_example": up, "bytes_down_per_example": down,
                               "wire_bytes_up_per_example": wup, "wire_bytes_down_per_example": wdown,
                               "first_steps_up": m_up, "first_steps_down": m_down,
                               "first_steps_wire_up": mw_up, "first_steps_wire_down": mw_down,
                               "seconds": run.summary.seconds, "wire_up": run.wire_up, "wire_down": run.wire_down},
        "layer_none": {"steps": base.summary.steps, "bytes_up_per_example": b_up, "bytes_down_per_example": b_down,
                       "wire_bytes_up_per_example": bw_up, "wire_bytes_down_per_example": bw_down,
                       "seconds": base.summary.seconds},
        "usplit_bottleneck_r4_int8": {"steps": u_run.summary.steps, "bytes_up_per_example": u_up,
                                      "bytes_down_per_example": u_down, "wire_bytes_up_per_example": uw_up,
                                      "wire_bytes_down_per_example": uw_down, "seconds": u_run.summary.seconds,
                                      "reduction_up": b_up / u_up, "reduction_down": b_down / u_down,
                                      "wire_reduction_up": bw_up / uw_up, "wire_reduction_down": bw_down / uw_down},
        "reduction_up": b_up / m_up, "reduction_down": b_down / m_down,
        "wire_reduction_up": bw_up / mw_up, "wire_reduction_down": bw_down / mw_down,
        "wall_seconds": time.perf_counter() - t0,
    }
    return rows


def _bytes_row(label: str, steps: int, metric: str, d: dict) -> str:
    """A row of the demo's table: bytes per example of one setting (``d``: its entry of the demo's rows)."""
    return (f"{label:42s} {steps:5d} {metric:>12s} {d['bytes_up_per_example']:10.1f} "
            f"{d['bytes_down_per_example']:8.1f} {d['wire_bytes_up_per_example']:9.1f} "
            f"{d['wire_bytes_down_per_example']:8.1f} {d['seconds']:6.1f}")


def _reduction_row(label: str, d: dict) -> str:
    """A row of the demo's table: the fp32 layer split's bytes over a setting's (``d`` holds ``*reduction_*``)."""
    return (f"{label:42s} {'':5s} {'':>12s} {d['reduction_up']:9.1f}x {d['reduction_down']:7.1f}x "
            f"{d['wire_reduction_up']:8.1f}x {d['wire_reduction_down']:7.1f}x")


def demo_table(r: dict) -> str:
    """The table ``sft demo`` prints of :func:`run_demo`'s rows ``r``."""
    m, b, u = r["bottleneck_r4_int8"], r["layer_none"], r["usplit_bottleneck_r4_int8"]
    metric_names = r["metric_name"].split("/")
    metric = " / ".join(f"{r['metrics'][k]:.3f}" for k in metric_names)
    return "\n".join([
        "",
        f"sft demo -- {_task_label(r['task'])}, MiniLM split after layer 3 of 6; dev metric on "
        f"{r['eval_examples']} examples",
        "bytes per training example: payload = encoded tensors; wire = every byte of the TRAIN frames and "
        "their replies on the TCP socket",
        f"{'setting':42s} {'steps':>5s} {r['metric_name']:>12s} {'payload up':>10s} {'down':>8s} "
        f"{'wire up':>9s} {'down':>8s} {'s':>6s}",
        _bytes_row("bottleneck r=4, int8 up, int8+SR down", r["steps"], metric, m),
        _bytes_row("layer split, uncompressed fp32 (measured)", b["steps"], "-", b),
        _reduction_row(f"reduction on the same first {b['steps']} batches", r),
        _bytes_row("U-split r=4 int8, labels stay on the edge", u["steps"], "-", u),
        _reduction_row("U-split reduction vs the fp32 layer split", u),
        "U-split: head and loss stay on the edge, no label sent; its pooled rows (down) and their gradient (up) "
        "cross too",
        f"wall time (both processes, model loading included): {r['wall_seconds']:.1f} s"])
