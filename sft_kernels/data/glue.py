"""GLUE tasks from local TSV files, as ``datasets.Dataset`` objects.

The data directory defaults to ``$SFT_GLUE_DIR`` or ``../shared/data/glue``
beside the repository.  Nothing is downloaded: the files are split on tabs
with quoting off (the text contains ``"`` characters, as the GLUE README
warns) and handed to ``datasets.Dataset.from_dict``; ``HF_DATASETS_OFFLINE``
is set so the library never contacts a hub.

Every dataset has the same columns: ``text_a`` (str), ``text_b`` (str, or
``None`` for single-sentence tasks) and ``label`` (int class id, or float
score for STS-B).  RTE and QNLI map ``entailment`` -> 0 and
``not_entailment`` -> 1, the GLUE convention.

Must not know models, splits, channels or the runtime.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]

__all__ = ["TaskSpec", "TASKS", "GLUE_TASKS", "SPLITS", "default_glue_dir", "load_glue", "load_task",
           "read_sentences"]


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: its label space, its text columns and its official GLUE metric(s).

    ``num_labels`` is 1 for regression (STS-B).  ``text_b`` is ``None`` for a
    single-sentence task.  ``metric_names`` are the keys :func:`compute_metrics`
    returns, in GLUE order; the GLUE score is their mean x 100.
    """

    name: str
    num_labels: int
    text_a: str
    text_b: Optional[str]
    metric_names: tuple[str, ...]
    is_regression: bool = False


#: Every task this package knows.  ``"synthetic"`` is generated (:func:`synthetic_sentiment`), not read.
TASKS: dict[str, TaskSpec] = {
    "SST-2": TaskSpec("SST-2", 2, "sentence", None, ("accuracy",)),
    "CoLA": TaskSpec("CoLA", 2, "sentence", None, ("matthews_corr",)),
    "MRPC": TaskSpec("MRPC", 2, "#1 String", "#2 String", ("f1", "accuracy")),
    "STS-B": TaskSpec("STS-B", 1, "sentence1", "sentence2", ("pearson", "spearman"), is_regression=True),
    "RTE": TaskSpec("RTE", 2, "sentence1", "sentence2", ("accuracy",)),
    "WNLI": TaskSpec("WNLI", 2, "sentence1", "sentence2", ("accuracy",)),
    "QNLI": TaskSpec("QNLI", 2, "question", "sentence", ("accuracy",)),
    "synthetic": TaskSpec("synthetic", 2, "sentence", None, ("accuracy",)),
}

#: The GLUE tasks read from TSV files.
GLUE_TASKS: tuple[str, ...] = ("SST-2", "CoLA", "MRPC", "STS-B", "RTE", "WNLI", "QNLI")
#: Labelled splits.
SPLITS: tuple[str, ...] = ("train", "dev")

#: Per task: has header, text_a column, text_b column (or None), label column, label parser.
_NLI = {"entailment": 0, "not_entailment": 1}
_LAYOUT = {
    "SST-2": (True, 0, None, 1, int),
    "CoLA": (False, 3, None, 1, int),
    "MRPC": (True, 3, 4, 0, int),
    "STS-B": (True, 7, 8, 9, float),
    "RTE": (True, 1, 2, 3, _NLI.__getitem__),
    "WNLI": (True, 1, 2, 3, int),
    "QNLI": (True, 1, 2, 3, _NLI.__getitem__),
}


def default_glue_dir() -> Path:
    """``$SFT_GLUE_DIR`` if set, else ``<repo>/../shared/data/glue``."""
    env = os.environ.get("SFT_GLUE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def _check_task_split(task: str, split: str, tasks=GLUE_TASKS) -> None:
    if task not in tasks:
        raise ValueError(f"task must be one of {list(tasks)}, got {task!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")


def _check_limit(limit: Optional[int]) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")


def _tsv_path(task: str, split: str, data_dir: Optional[PathLike]) -> Path:
    path = Path(data_dir or default_glue_dir()) / task / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(
            f"GLUE file not found: {path} (pass --data-dir or set $SFT_GLUE_DIR to the directory holding "
            f"<TASK>/{{train,dev}}.tsv; see ../shared/data/glue/README.md)")
    return path


def _rows(path: Path, header: bool) -> list[list[str]]:
    """Tab-split lines of a TSV file, quoting off; the header line and a BOM are dropped."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if header:
        lines = lines[1:]
    return [line.rstrip("\r").split("\t") for line in lines]


@lru_cache(maxsize=32)
def _load_columns(task: str, split: str, path: str) -> tuple[tuple[str, ...], Optional[tuple[str, ...]], tuple]:
    header, ca, cb, cl, parse = _LAYOUT[task]
    a, b, y = [], [], []
    for i, parts in enumerate(_rows(Path(path), header)):
        try:
            a.append(parts[ca].strip())
            if cb is not None:
                b.append(parts[cb].strip())
            y.append(parse(parts[cl].strip()))
        except (IndexError, KeyError, ValueError) as exc:
            raise ValueError(f"{path}: malformed row {i + 1 + header}: {parts!r} ({exc!r})") from exc
    return tuple(a), (tuple(b) if cb is not None else None), tuple(y)


def _make_dataset(text_a, text_b, labels, regression: bool):
    """A ``datasets.Dataset`` with the package's columns and fixed features."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    features = datasets.Features({
        "text_a": datasets.Value("string"),
        "text_b": datasets.Value("string"),
        "label": datasets.Value("float32" if regression else "int64"),
    })
    n = len(text_a)
    return datasets.Dataset.from_dict(
        {"text_a": list(text_a), "text_b": list(text_b) if text_b is not None else [None] * n, "label": list(labels)},
        features=features)


def load_glue(task: str, split: str = "train", data_dir: Optional[PathLike] = None, limit: Optional[int] = None):
    """One split of a GLUE task as a ``datasets.Dataset`` with columns ``text_a``, ``text_b``, ``label``.

    ``split`` is ``"train"`` or ``"dev"`` (QNLI has dev only).  ``limit`` keeps the
    first ``limit`` rows in file order.  The parsed files are cached in memory, so a
    second call is cheap; the result is deterministic.

    Raises ``ValueError`` for an unknown task or split (naming the valid ones) and
    ``FileNotFoundError`` naming the missing path (and ``--data-dir``).
    """
    _check_task_split(task, split)
    _check_limit(limit)
    path = _tsv_path(task, split, data_dir)
    a, b, y = _load_columns(task, split, str(path.resolve()))
    if limit is not None:
        a, y = a[:limit], y[:limit]
        b = b[:limit] if b is not None else None
    return _make_dataset(a, b, y, TASKS[task].is_regression)


#: Sizes of the generated synthetic task.
SYNTHETIC_SIZES = {"train": 2000, "dev": 500}
_SYNTHETIC_SEEDS = {"train": 0, "dev": 1}


def load_task(task: str, split: str = "train", data_dir: Optional[PathLike] = None,
              limit: Optional[int] = None):
    """``(TaskSpec, Dataset)`` for a GLUE task or ``"synthetic"``.

    ``"synthetic"`` is generated by :func:`synthetic_sentiment` (train: 2000 rows,
    seed 0; dev: 500 rows, seed 1) and needs no files.
    """
    _check_task_split(task, split, tasks=tuple(TASKS))
    _check_limit(limit)
    if task == "synthetic":
        from .synthetic import synthetic_sentiment

        n = SYNTHETIC_SIZES[split]
        ds = synthetic_sentiment(n, seed=_SYNTHETIC_SEEDS[split])
        if limit is not None and limit < n:
            ds = ds.select(range(limit))
        return TASKS[task], ds
    return TASKS[task], load_glue(task, split, data_dir=data_dir, limit=limit)


def read_sentences(
    task: str = "SST-2", split: str = "dev", limit: Optional[int] = None, data_dir: Optional[PathLike] = None
) -> list[str]:
    """Sentences of a single-sentence GLUE task (``SST-2`` or ``CoLA``), in file order.

    Raises ``ValueError`` for an unknown task or split and ``FileNotFoundError``
    naming the path when the data is missing.
    """
    single = ("SST-2", "CoLA")
    if task not in single:
        raise ValueError(f"task must be one of {list(single)}, got '{task}'")
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got '{split}'")
    _check_limit(limit)
    if split != "test":
        path = _tsv_path(task, split, data_dir)
        a, _, _ = _load_columns(task, split, str(path.resolve()))
        return list(a[:limit] if limit is not None else a)
    path = _tsv_path(task, split, data_dir)
    rows = _rows(path, header=True)  # test.tsv: "index<TAB>sentence" with a header, both tasks
    out = [r[1].strip() for r in rows]
    return out[:limit] if limit is not None else out
