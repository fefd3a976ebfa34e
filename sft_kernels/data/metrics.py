"""The official GLUE metrics in numpy (no scipy or sklearn), the GLUE score and the majority baseline.

``compute_metrics`` returns the task's ``TaskSpec.metric_names`` as fractions in
[−1, 1] / [0, 1]; ``glue_score`` turns them into the GLUE number (x 100, the mean
of the two for MRPC and STS-B).

A task is a GLUE task name (looked up in :data:`~.glue.TASKS`) or a spec: a
:class:`~.glue.TaskSpec` such as a file task's :class:`~.files.FileTaskSpec`, or any object
with ``metric_names`` (and, for :func:`majority_baseline`, ``is_regression`` and
``num_labels``).  A file task's score is the same formula: its metrics' mean x 100.
"""
from __future__ import annotations

from typing import Mapping, Union

import numpy as np

from .glue import TASKS, TaskSpec

__all__ = ["accuracy", "matthews_corr", "f1_binary", "pearson", "spearman", "compute_metrics", "glue_score",
           "majority_baseline"]


def accuracy(pred: np.ndarray, label: np.ndarray) -> float:
    """Fraction of equal entries."""
    pred, label = np.asarray(pred), np.asarray(label)
    return float((pred == label).mean()) if label.size else 0.0


def matthews_corr(pred: np.ndarray, label: np.ndarray) -> float:
    """Matthews correlation of binary predictions; 0 when it is undefined (a constant row or column)."""
    p, y = np.asarray(pred).astype(bool), np.asarray(label).astype(bool)
    tp, tn = float(np.sum(p & y)), float(np.sum(~p & ~y))
    fp, fn = float(np.sum(p & ~y)), float(np.sum(~p & y))
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return float((tp * tn - fp * fn) / np.sqrt(denom)) if denom > 0 else 0.0


def f1_binary(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of the positive class (1); 0 when there are no true positives."""
    p, y = np.asarray(pred) == 1, np.asarray(label) == 1
    tp = float(np.sum(p & y))
    if tp == 0:
        return 0.0
    precision, recall = tp / float(np.sum(p)), tp / float(np.sum(y))
    return 2 * precision * recall / (precision + recall)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either input is constant (undefined)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt(np.sum(xc * xc) * np.sum(yc * yc))
    return float(np.sum(xc * yc) / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the mean of their ranks (as ``scipy.stats.rankdata``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman correlation: Pearson of the tie-averaged ranks."""
    return pearson(_ranks(x), _ranks(y))


_METRICS = {"accuracy": accuracy, "matthews_corr": matthews_corr, "f1": f1_binary, "pearson": pearson,
            "spearman": spearman}


#: A task as the functions here take it: a name of :data:`~.glue.TASKS` or a spec (any object with
#: ``metric_names`` will do: see the module docstring).
TaskLike = Union[str, TaskSpec]


def _spec(task: TaskLike):
    if not isinstance(task, str):
        names = getattr(task, "metric_names", None)
        if not names or not all(n in _METRICS for n in names):
            raise ValueError(f"task must be a task name or a spec whose metric_names are among {list(_METRICS)}, "
                             f"got {task!r}")
        return task
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}, got {task!r}")
    return TASKS[task]


def compute_metrics(task: TaskLike, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The task's official metrics, keyed by its spec's ``metric_names`` (``TASKS[task]`` for a name).

    ``predictions`` are class ids (or float scores for a regression task such as STS-B).
    """
    spec = _spec(task)
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions and labels must have the same shape, got {predictions.shape} "
                         f"and {labels.shape}")
    return {name: _METRICS[name](predictions, labels) for name in spec.metric_names}


def glue_score(task: TaskLike, metrics: Mapping[str, float]) -> float:
    """The GLUE number: the mean of the task's metrics x 100 (one metric for most tasks; two for MRPC and STS-B)."""
    spec = _spec(task)
    names = spec.metric_names
    missing = [n for n in names if n not in metrics]
    if missing:
        raise ValueError(f"{getattr(spec, 'name', task)} needs metrics {list(names)}; missing {missing}")
    return 100.0 * float(np.mean([metrics[n] for n in names]))


def majority_baseline(task: TaskLike, train_ds, dev_ds) -> dict[str, float]:
    """Metrics of a constant prediction on ``dev_ds``: the majority class of ``train_ds``.

    For the regression task (STS-B) the constant is the mean train score; its
    Pearson and Spearman correlations are undefined (a constant has no variance)
    and are reported as 0.
    """
    spec = _spec(task)
    train_y, dev_y = np.asarray(train_ds["label"]), np.asarray(dev_ds["label"])
    if spec.is_regression:
        const = float(train_y.mean()) if train_y.size else 0.0
        pred = np.full(dev_y.shape, const, dtype=np.float64)
    else:
        counts = np.bincount(train_y.astype(np.int64), minlength=spec.num_labels)
        pred = np.full(dev_y.shape, int(np.argmax(counts)), dtype=np.int64)
    return compute_metrics(spec, pred, dev_y)
