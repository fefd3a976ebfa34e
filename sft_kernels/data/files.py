"""A user's own labelled text files (CSV, TSV, JSON, JSON lines) as a task, like transformers' ``run_classification.py``.

:func:`load_files` reads a training file and an optional validation file and returns
``(FileTaskSpec, train, validation)``.  The datasets have the columns of every other task in
this package (``text_a``, ``text_b``, ``label``: see :mod:`.glue`), so :func:`~.batching.batches`
and a GLUE-style training loop take them unchanged; the spec is a :class:`~.glue.TaskSpec`
(``num_labels``, ``is_regression``, ``text_a`` / ``text_b``) that also carries the label
mapping (``label2id`` / ``id2label``) a caller writes into its run's config.

Formats, by extension:

* ``.csv``: comma-separated, RFC 4180 quoting, a header row naming the columns.
* ``.tsv``: tab-separated with a header row, quoting off (a ``"`` is text, as in the GLUE files).
* ``.jsonl``: one JSON object per line.
* ``.json``: a JSON array of objects; JSON lines (what ``datasets.Dataset.to_json`` writes);
  an object of equal-length column lists; or either of those under a ``"data"`` key.

Files are UTF-8 (a BOM is dropped).  They are parsed here with :mod:`csv` / :mod:`json`, not with
``datasets.load_dataset``: pandas' CSV reader would turn text such as ``NA`` or ``null`` into a
missing value and infer column types chunk by chunk, the loader writes a cache under
``~/.cache``, and neither gives the row number an error should name.  The parsed columns go to
``datasets.Dataset.from_dict`` in memory, with ``HF_DATASETS_OFFLINE`` set (as for GLUE).

Rules (each violation is a ``ValueError`` naming the argument and the file; a missing file is a
``FileNotFoundError``):

* **Text columns.** ``text_columns`` names one column (a sentence) or two (a sentence pair).
  Without it: ``sentence1`` + ``sentence2`` if both exist, else ``sentence``, else ``text``,
  else ``text_a`` (+ ``text_b`` if present: the columns this package writes), else the columns
  other than the label that hold text (not only numbers, so an ``id`` column is skipped) when
  there are one or two of them; more is ambiguous and an error.  Text is stripped; an empty
  cell is an error giving its row.  Rows are counted from 1 after any header; for CSV, TSV
  and JSON lines the file's line is given too.
* **Labels.** A label is read from its text (``"1"`` in a CSV and ``1`` in JSON are the same):
  an integer, a decimal number, or otherwise a name.  A column must not mix numbers and names.

  - *Names* are classes mapped to ids in sorted (code point) order, or in the order of
    ``label_names`` when given (then every label must be one of them).
  - *Integers* are class ids as written: ``k`` is class ``k``, negative is an error, and
    ``num_labels`` is the largest training label + 1 (at least 2).  For other integer codes
    (say stars 1..5) pass ``label_names=["1", "2", "3", "4", "5"]``.
  - *Any non-integer number* (``0.5``, also ``1.0``) makes the task a regression with
    ``num_labels == 1``, as float labels do in ``run_classification.py``.  Integer labels
    with ``num_labels=1`` are a regression too.
* ``num_labels``, when given, is the classifier head's size: class ids must lie in
  ``0..num_labels-1``, and with names it must equal the number of classes.
* The validation file uses the training file's text columns and mapping: a label it has that
  training did not define is an error naming the label.

Must not know models, tokenizers, splits, channels or the runtime (it builds datasets; :mod:`.batching`
tokenises them).
"""
from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from .glue import PathLike, TaskSpec, _make_dataset, _rows

if TYPE_CHECKING:
    import datasets

__all__ = ["FileTaskSpec", "FILE_EXTENSIONS", "load_files"]

#: The file formats :func:`load_files` reads, by extension (lower case).
FILE_EXTENSIONS: tuple[str, ...] = (".csv", ".tsv", ".json", ".jsonl")

#: Default text columns, tried in order: the first whose columns all exist wins (``text_b`` is optional).
_DEFAULT_TEXT = (("sentence1", "sentence2"), ("sentence",), ("text",), ("text_a", "text_b"), ("text_a",))
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class FileTaskSpec(TaskSpec):
    """A :class:`TaskSpec` read from files, with its label names.

    ``label_names[i]`` is the name of class ``i`` (``"0"``, ``"1"``, ... for integer labels);
    empty for a regression.  ``metric_names`` are ``("accuracy",)`` for classification and
    ``("pearson", "spearman")`` for regression (the functions of :mod:`.metrics`).
    """

    label_names: tuple[str, ...] = ()

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: id}`` for a model config (empty for a regression)."""
        return {name: i for i, name in enumerate(self.label_names)}

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}`` for a model config (empty for a regression)."""
        return dict(enumerate(self.label_names))


@dataclass(frozen=True)
class _Rows:
    """One parsed file: its column names, and per row where it is and its cells."""

    arg: str
    path: Path
    columns: tuple[str, ...]
    rows: list[tuple[str, dict[str, Any]]]

    def where(self) -> str:
        return f"{self.arg} '{self.path}'"


@dataclass(frozen=True)
class _Label:
    text: str
    kind: str  # "int", "float" or "name"
    value: Union[int, float, str]


def load_files(
    train_file: PathLike,
    validation_file: Optional[PathLike] = None,
    *,
    text_columns: Union[str, Sequence[str], None] = None,
    label_column: str = "label",
    label_names: Optional[Sequence[str]] = None,
    num_labels: Optional[int] = None,
) -> tuple[FileTaskSpec, "datasets.Dataset", Optional["datasets.Dataset"]]:
    """``(spec, train, validation)`` from a user's labelled files; ``validation`` is None without a file.

    The datasets have columns ``text_a``, ``text_b`` (None for single sentences) and ``label``
    (int64 class id, or float32 for a regression), like :func:`~.glue.load_glue`.  The rules
    for columns and labels are in the module docstring.

    Example::

        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "train.csv").write_text("text,label\\ngreat film,pos\\ndull plot,neg\\n")
        >>> spec, train, _ = load_files(d / "train.csv")
        >>> spec.num_labels, spec.label2id, list(train["label"])
        (2, {'neg': 0, 'pos': 1}, [1, 0])
    """
    columns = _check_text_columns(text_columns, label_column)
    names = _check_label_names(label_names)
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                   or num_labels < 1):
        raise ValueError(f"num_labels must be an int >= 1 or None, got {num_labels!r}")
    if names is not None and num_labels is not None and num_labels != len(names):
        raise ValueError(f"num_labels={num_labels} disagrees with the {len(names)} label_names {list(names)}")

    train = _read(train_file, "train_file")
    columns = columns or _default_text_columns(train, label_column)
    a, b = _texts(train, columns)
    labels = _labels(train, label_column)
    spec, ids = _spec(train, columns, labels, names, num_labels)
    train_ds = _make_dataset(a, b, ids, spec.is_regression)

    val_ds = None
    if validation_file is not None:
        val = _read(validation_file, "validation_file")
        va, vb = _texts(val, columns)
        vids = _to_ids(val, _labels(val, label_column), spec, f"is not a label of train_file '{train.path}'")
        val_ds = _make_dataset(va, vb, vids, spec.is_regression)
    return spec, train_ds, val_ds


# ----------------------------------------------------------------------------------------------- arguments

def _check_text_columns(text_columns, label_column: str) -> Optional[tuple[str, ...]]:
    if not isinstance(label_column, str) or not label_column:
        raise ValueError(f"label_column must be a non-empty column name, got {label_column!r}")
    if text_columns is None:
        return None
    cols = (text_columns,) if isinstance(text_columns, str) else tuple(text_columns)
    if not 1 <= len(cols) <= 2:
        raise ValueError(f"text_columns takes one column (a sentence) or two (a sentence pair), got {len(cols)}: "
                         f"{list(cols)}")
    if not all(isinstance(c, str) and c for c in cols):
        raise ValueError(f"text_columns must be non-empty column names, got {list(cols)}")
    if len(set(cols)) != len(cols):
        raise ValueError(f"text_columns names the same column twice: {list(cols)}")
    if label_column in cols:
        raise ValueError(f"text_columns {list(cols)} includes the label_column {label_column!r}")
    return cols


def _check_label_names(label_names) -> Optional[tuple[str, ...]]:
    if label_names is None:
        return None
    if isinstance(label_names, str):
        raise ValueError(f"label_names must be a sequence of names, not one string: got {label_names!r}")
    names = tuple(label_names)
    if len(names) < 2 or not all(isinstance(n, str) and n.strip() == n and n for n in names):
        raise ValueError(f"label_names must be two or more non-empty names without surrounding spaces, "
                         f"got {list(names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"label_names has a repeated name: {list(names)}")
    return names


# ----------------------------------------------------------------------------------------------- reading

def _read(file: PathLike, arg: str) -> _Rows:
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{arg} not found: '{path}' ({'a directory' if path.is_dir() else 'no such file'})")
    ext = path.suffix.lower()
    if ext not in FILE_EXTENSIONS:
        raise ValueError(f"{arg} '{path}': unsupported extension {ext or '(none)'!r}; use one of "
                         f"{', '.join(FILE_EXTENSIONS)}")
    try:
        if ext == ".tsv":
            header, rows = _table(_rows(path, header=False), line_numbers=None)
        elif ext == ".csv":
            with open(path, encoding="utf-8-sig", newline="") as f:
                reader = csv.reader(f)
                ends = []
                cells = []
                for row in reader:
                    cells.append(row)
                    ends.append(reader.line_num)
            header, rows = _table(cells, line_numbers=ends)
        else:
            header, rows = _json(path.read_text(encoding="utf-8-sig"), ext)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{arg} '{path}' is not UTF-8 text ({exc})") from exc
    except csv.Error as exc:
        raise ValueError(f"{arg} '{path}': malformed CSV ({exc})") from exc
    except _Malformed as exc:
        raise ValueError(f"{arg} '{path}': {exc}") from exc
    if not rows:
        what = "has a header but no rows" if header else "is empty"
        raise ValueError(f"{arg} '{path}' {what}: it needs at least one labelled row")
    return _Rows(arg, path, header, rows)


class _Malformed(Exception):
    """A file's layout is wrong; :func:`_read` adds the argument and path."""


def _table(cells: list[list[str]], line_numbers: Optional[list[int]]) -> tuple[tuple[str, ...], list]:
    """Header and ``(where, {column: cell})`` rows of a delimited file; blank lines are skipped."""
    keep = [i for i, row in enumerate(cells) if row and row != [""]]
    if not keep:
        return (), []
    header = tuple(c.strip() for c in cells[keep[0]])
    dup = sorted({c for c in header if header.count(c) > 1})
    if dup:
        raise _Malformed(f"the header repeats the column name(s) {dup}")
    rows = []
    for n, i in enumerate(keep[1:], 1):
        line = line_numbers[i] if line_numbers is not None else i + 1
        where = f"row {n} (line {line})"
        if len(cells[i]) != len(header):
            raise _Malformed(f"{where} has {len(cells[i])} cells, the header has {len(header)}: {list(header)}")
        rows.append((where, dict(zip(header, cells[i]))))
    return header, rows


def _json(text: str, ext: str) -> tuple[tuple[str, ...], list]:
    """Columns (in order of first appearance) and ``(where, record)`` rows of a JSON / JSON-lines file."""
    if not text.strip():
        return (), []
    if ext == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # several values: JSON lines in a .json file
                raise _Malformed(f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
            records = _json_lines(text)
        else:
            records = _json_records(data)
    else:
        records = _json_lines(text)
    columns: dict[str, None] = {}
    for where, rec in records:
        if not isinstance(rec, dict):
            raise _Malformed(f"{where} is a JSON {type(rec).__name__}, not an object of column: value")
        columns.update(dict.fromkeys(rec))
    return tuple(columns), records


def _json_lines(text: str) -> list:
    records = []
    for i, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                records.append((f"row {len(records) + 1} (line {i})", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise _Malformed(f"invalid JSON on line {i}, column {exc.colno}: {exc.msg}") from exc
    return records


def _json_records(data: Any) -> list:
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    if isinstance(data, list):
        return [(f"row {i}", rec) for i, rec in enumerate(data, 1)]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {k: len(v) for k, v in data.items()}
        if len(set(lengths.values())) != 1:
            raise _Malformed(f"the column lists have different lengths: {lengths}")
        n = next(iter(lengths.values()))
        return [(f"row {i + 1}", {k: v[i] for k, v in data.items()}) for i in range(n)]
    raise _Malformed("expected a JSON array of objects, JSON lines, an object of equal-length column lists, "
                     f"or one of those under a \"data\" key; got a JSON {type(data).__name__}")


# ----------------------------------------------------------------------------------------------- columns

def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, str) and _NUMBER.fullmatch(value.strip()) is not None


def _default_text_columns(rows: _Rows, label_column: str) -> tuple[str, ...]:
    have = set(rows.columns)
    for cand in _DEFAULT_TEXT:
        if set(cand) <= have:
            return cand
    others = [c for c in rows.columns if c != label_column]
    texts = [c for c in others if not all(_is_number(r.get(c)) for _, r in rows.rows if r.get(c) is not None)]
    if 1 <= len(texts) <= 2:
        return tuple(texts)
    why = "none of them holds text" if not texts else f"{len(texts)} of them hold text: {texts}"
    raise ValueError(f"text_columns not given and {rows.where()} has no sentence1/sentence2, sentence, text or "
                     f"text_a column; of its columns {list(rows.columns)} other than the label, {why}. "
                     f"Pass text_columns=('a',) or ('a', 'b')")


def _require(rows: _Rows, column: str, arg: str) -> None:
    if column not in rows.columns:
        raise ValueError(f"{arg} {column!r} is not a column of {rows.where()}; its columns are {list(rows.columns)}")


def _texts(rows: _Rows, columns: tuple[str, ...]) -> tuple[list[str], Optional[list[str]]]:
    for c in columns:
        _require(rows, c, "text_columns")
    out: list[list[str]] = [[] for _ in columns]
    for where, rec in rows.rows:
        for c, col in zip(columns, out):
            v = rec.get(c)
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{rows.where()}: {where}: text_columns column {c!r} holds {v!r}, not a string")
            v = (v or "").strip()
            if not v:
                raise ValueError(f"{rows.where()}: {where}: empty text in text_columns column {c!r}")
            col.append(v)
    return out[0], (out[1] if len(out) == 2 else None)


def _labels(rows: _Rows, label_column: str) -> list[tuple[str, _Label]]:
    """Each row's label, typed by its text; an unreadable label or a mix of numbers and names is an error."""
    _require(rows, label_column, "label_column")
    out = []
    for where, rec in rows.rows:
        v = rec.get(label_column)
        bad = f"{rows.where()}: {where}: label_column {label_column!r} holds {v!r}"
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            if not math.isfinite(v):
                raise ValueError(f"{bad}, not a finite number")
            label = _Label(json.dumps(v), "int" if isinstance(v, int) else "float", v)
        elif isinstance(v, str) and v.strip():
            t = v.strip()
            if _INTEGER.fullmatch(t):
                label = _Label(t, "int", int(t))
            elif _NUMBER.fullmatch(t):
                label = _Label(t, "float", float(t))
            else:
                label = _Label(t, "name", t)
        else:
            raise ValueError(f"{bad}: a label must be a number or a non-empty name")
        out.append((where, label))
    named = [i for i, (_, lab) in enumerate(out) if lab.kind == "name"]
    if 0 < len(named) < len(out):
        numbers = [i for i, (_, lab) in enumerate(out) if lab.kind != "name"]
        odd = named if len(named) <= len(numbers) else numbers  # name the first row of the rarer kind
        where, lab = out[odd[0]]
        raise ValueError(f"{rows.where()}: {where}: cannot parse label {lab.text!r} in label_column "
                         f"{label_column!r}: the column mixes numbers and names ({len(out) - len(named)} numbers, "
                         f"{len(named)} names)")
    return out


# ----------------------------------------------------------------------------------------------- labels

def _spec(rows: _Rows, columns: tuple[str, ...], labels: list[tuple[str, _Label]],
          names: Optional[tuple[str, ...]], num_labels: Optional[int]) -> tuple[FileTaskSpec, list]:
    """The task the training labels define, and their ids (or scores)."""
    kinds = {lab.kind for _, lab in labels}
    given_names = names is not None
    common = dict(name=rows.path.name, text_a=columns[0], text_b=columns[1] if len(columns) == 2 else None)
    if names is None and kinds != {"name"} and ("float" in kinds or num_labels == 1):
        if num_labels not in (None, 1):
            where, lab = next((w, lab) for w, lab in labels if lab.kind == "float")
            raise ValueError(f"num_labels={num_labels}, but {rows.where()} has non-integer labels ({where}: "
                             f"{lab.text}), which make a regression (num_labels=1); write class labels as "
                             f"integers 0..{num_labels - 1} or names")
        spec = FileTaskSpec(num_labels=1, metric_names=("pearson", "spearman"), is_regression=True, **common)
        return spec, [float(lab.value) for _, lab in labels]
    if names is None and kinds == {"name"}:
        names = tuple(sorted({lab.text for _, lab in labels}))
        if num_labels is not None and num_labels != len(names):
            raise ValueError(f"num_labels={num_labels}, but the labels of {rows.where()} name {len(names)} "
                             f"classes {list(names)}; pass label_names to name every class of the head")
        if len(names) < 2:
            raise ValueError(f"{rows.where()} has one label name {list(names)}: a classifier needs two or more "
                             f"classes (pass label_names to name them all)")
    elif names is None:
        top = max(int(lab.value) for _, lab in labels)
        n = num_labels if num_labels is not None else max(top + 1, 2)
        names = tuple(str(i) for i in range(n))
    spec = FileTaskSpec(num_labels=len(names), metric_names=("accuracy",), label_names=names, **common)
    why = ("is not one of label_names" if given_names else f"is outside num_labels={num_labels}"
           if num_labels is not None else "is not a class id")
    return spec, _to_ids(rows, labels, spec, why)


def _to_ids(rows: _Rows, labels: list[tuple[str, _Label]], spec: FileTaskSpec, why: str) -> list:
    """Labels as the spec's ids (or scores); a label the spec does not define is an error naming it and ``why``."""
    if spec.is_regression:
        for where, lab in labels:
            if lab.kind == "name":
                raise ValueError(f"{rows.where()}: {where}: label {lab.text!r} is not a number, and the task is a "
                                 f"regression")
        return [float(lab.value) for _, lab in labels]
    ids = spec.label2id
    integer = spec.label_names == tuple(str(i) for i in range(spec.num_labels))
    out = []
    for where, lab in labels:
        if lab.kind == "int" and integer:
            key = str(lab.value)  # "+1" and "01" are class 1
        else:
            key = lab.text
        if key not in ids:
            if integer and lab.kind == "int":
                valid = f"class ids 0..{spec.num_labels - 1} (num_labels={spec.num_labels})"
            elif integer:
                valid = f"integer class ids 0..{spec.num_labels - 1}"
            else:
                valid = f"one of {list(spec.label_names)}"
            raise ValueError(f"{rows.where()}: {where}: label {lab.text!r} {why}: labels must be {valid}")
        out.append(ids[key])
    return out
