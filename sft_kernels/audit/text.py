"""The text of the privacy audit: the victim's sentences, the attacker's own text, and which tokens count.

* The *victim* text is a task's dev set (SST-2 sentences, RTE sentence pairs), tokenized as the
  split's training tokenizes it (pairs as pairs, truncated at ``max_length``).
* The *public* attacker text is the local training text of tasks other than the victims' (CoLA,
  MRPC, STS-B, WNLI train): one attacker corpus shared by both victim tasks, so one inverter per
  setting serves both.  The *in-domain* attacker text is the victim task's own ``test.tsv``
  (unlabelled GLUE test split, disjoint from dev).
* A corpus is capped at a token budget: sentences in a fixed random order (``seed``) until the
  budget of real tokens is spent.

Token classes used by the metrics: *real* tokens are every non-special token ([CLS], [SEP],
[PAD] excluded); *content* tokens are the wordpieces of content words (:mod:`.stopwords`).

Knows tokenizers and the GLUE files (through :mod:`sft_kernels.data`); not models, codecs or attacks.
"""
from __future__ import annotations

import csv
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from ..data import default_glue_dir, load_glue
from .stopwords import STOP_WORDS

__all__ = ["Corpus", "VICTIM_TASKS", "PUBLIC_TASKS", "ATTACKER_DATA", "tokenize", "victim_corpus",
           "public_corpus", "in_domain_corpus", "calibration_texts", "content_mask", "special_mask", "check_data_dir"]

#: Tasks whose dev text the audit attacks.
VICTIM_TASKS = ("SST-2", "RTE")
#: Tasks whose training text is the attacker's public text (every local task with a train split but the victims).
PUBLIC_TASKS = ("CoLA", "MRPC", "STS-B", "WNLI")
#: Which text the attacker trains on.
ATTACKER_DATA = ("public", "in-domain")
_MAX_LENGTH = 128


@dataclass
class Corpus:
    """Tokenized sentences (or pairs): ``ids[i]`` / ``types[i]`` are sentence i's token ids and segment ids.

    ``labels[i]`` is the class id, -1 where the text has no label the victim task would send.
    """

    name: str
    ids: list[list[int]]
    types: list[list[int]]
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of every sentence, special tokens included (what crosses the link)."""
        return sum(len(s) for s in self.ids)

    def subset(self, index: Sequence[int]) -> "Corpus":
        """The sentences at ``index``, in that order."""
        return Corpus(self.name, [self.ids[i] for i in index], [self.types[i] for i in index],
                      [self.labels[i] for i in index] if self.labels else [])

    def head(self, n: int) -> "Corpus":
        """The first ``n`` sentences (all of them if there are fewer)."""
        return self.subset(range(min(n, len(self))))

    def flat_ids(self) -> torch.Tensor:
        """Every token id, sentence after sentence: ``(num_tokens,)`` long."""
        return torch.tensor([t for s in self.ids for t in s], dtype=torch.long)


def check_data_dir(data_dir: Optional[str]) -> Path:
    """The GLUE directory (``data_dir``, else ``$SFT_GLUE_DIR``, else the default); ``FileNotFoundError``
    naming it when it does not hold the victim and public tasks."""
    root = Path(data_dir) if data_dir is not None else Path(default_glue_dir())
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {str(root)!r} does not exist (it must hold the GLUE TSVs: "
                                f"{', '.join(t + '/' for t in VICTIM_TASKS + PUBLIC_TASKS)})")
    missing = [f"{t}/{s}.tsv" for t in VICTIM_TASKS for s in ("dev", "test")] + [f"{t}/train.tsv" for t in PUBLIC_TASKS]
    missing = [m for m in missing if not (root / m).is_file()]
    if missing:
        raise FileNotFoundError(f"data directory {str(root)!r} lacks {', '.join(missing)}")
    return root


def tokenize(tok: Any, name: str, text_a: Sequence[str], text_b: Optional[Sequence[Optional[str]]] = None,
             labels: Optional[Sequence[int]] = None, max_length: int = _MAX_LENGTH) -> Corpus:
    """A :class:`Corpus` of ``text_a`` (and ``text_b``: pairs as pairs), truncated at ``max_length`` tokens."""
    if text_b is not None and all(b is None for b in text_b):
        text_b = None
    enc = tok(list(text_a), list(text_b) if text_b is not None else None, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids") or [[0] * len(s) for s in enc["input_ids"]]
    return Corpus(name, [list(s) for s in enc["input_ids"]], [list(t) for t in types],
                  [int(x) for x in labels] if labels is not None else [-1] * len(enc["input_ids"]))


def _columns(ds) -> tuple[list[str], Optional[list]]:
    b = ds["text_b"] if "text_b" in ds.column_names else None
    return list(ds["text_a"]), (list(b) if b is not None else None)


def victim_corpus(tok: Any, task: str, data_dir: Optional[str] = None, limit: Optional[int] = None) -> Corpus:
    """The victim task's dev text with its labels (what the cloud would receive while the edge trains on it)."""
    if task not in VICTIM_TASKS:
        raise ValueError(f"task must be one of {list(VICTIM_TASKS)}, got {task!r}")
    ds = load_glue(task, "dev", data_dir=data_dir, limit=limit)
    a, b = _columns(ds)
    return tokenize(tok, f"{task} dev", a, b, [int(x) for x in ds["label"]])


def calibration_texts(task: str, data_dir: Optional[str] = None, n: int = 512) -> tuple[list[str], Optional[list]]:
    """The first ``n`` training examples of the victim task (text only): what a calibrated edge fits its code to."""
    ds = load_glue(task, "train", data_dir=data_dir, limit=n)
    return _columns(ds)


def _capped(c: Corpus, budget: int, seed: int) -> Corpus:
    order = list(range(len(c)))
    random.Random(seed).shuffle(order)
    keep, used = [], 0
    for i in order:
        n = len(c.ids[i])
        if used + n > budget:
            break
        keep.append(i)
        used += n
    return c.subset(keep)


def public_corpus(tok: Any, budget: int, seed: int = 0, data_dir: Optional[str] = None) -> Corpus:
    """The attacker's public text: training text of :data:`PUBLIC_TASKS`, capped at ``budget`` tokens.

    Labels are -1: those tasks' labels mean nothing in the victims' label spaces.
    """
    parts = []
    for task in PUBLIC_TASKS:
        a, b = _columns(load_glue(task, "train", data_dir=data_dir))
        parts.append(tokenize(tok, task, a, b))
    whole = Corpus("public", [s for p in parts for s in p.ids], [t for p in parts for t in p.types],
                   [lab for p in parts for lab in p.labels])
    return _capped(whole, budget, seed)


def in_domain_corpus(tok: Any, task: str, budget: int, seed: int = 0, data_dir: Optional[str] = None) -> Corpus:
    """The in-domain attacker's text: the victim task's unlabelled ``test.tsv``, capped at ``budget`` tokens."""
    if task not in VICTIM_TASKS:
        raise ValueError(f"task must be one of {list(VICTIM_TASKS)}, got {task!r}")
    path = Path(data_dir if data_dir is not None else default_glue_dir()) / task / "test.tsv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    if task == "SST-2":  # index, sentence
        c = tokenize(tok, f"{task} test", [r[1].strip() for r in rows])
    else:  # RTE: index, sentence1, sentence2
        c = tokenize(tok, f"{task} test", [r[1] for r in rows], [r[2] for r in rows])
    return _capped(c, budget, seed)


def special_mask(tok: Any, ids: torch.Tensor) -> torch.Tensor:
    """True at special tokens ([CLS], [SEP], [PAD], ...): the positions no metric counts."""
    special = torch.tensor(sorted(tok.all_special_ids), dtype=torch.long)
    return torch.isin(ids, special)


def content_mask(tok: Any, ids: Sequence[int]) -> torch.Tensor:
    """True at the wordpieces of content words of one sentence (not a stop word, holds a letter or digit)."""
    pieces = tok.convert_ids_to_tokens(list(ids))
    special = set(tok.all_special_tokens)
    out = [False] * len(pieces)
    start = 0
    while start < len(pieces):
        end = start + 1
        while end < len(pieces) and pieces[end].startswith("##"):
            end += 1
        word = "".join(p[2:] if p.startswith("##") else p for p in pieces[start:end]).lower()
        if pieces[start] not in special and word not in STOP_WORDS and any(ch.isalnum() for ch in word):
            out[start:end] = [True] * (end - start)
        start = end
    return torch.tensor(out, dtype=torch.bool)
