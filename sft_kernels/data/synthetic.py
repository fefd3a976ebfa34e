"""A small synthetic sentiment task the package generates itself, so a demo runs with no GLUE files.

Sentences are built from templates and positive / negative word lists; label 1 =
positive, 0 = negative.  Exactly half of the rows of an even ``n`` are positive.
The output depends only on ``(n, seed)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["synthetic_sentiment"]

_POSITIVE = ("wonderful", "great", "delightful", "brilliant", "charming", "moving", "excellent", "superb",
             "touching", "funny", "beautiful", "smart", "gripping", "fresh", "enjoyable", "memorable")
_NEGATIVE = ("terrible", "boring", "awful", "dull", "tedious", "clumsy", "bland", "painful",
             "messy", "forgettable", "lifeless", "silly", "weak", "annoying", "predictable", "ugly")
_SUBJECTS = ("the film", "this movie", "the story", "the acting", "the script", "the soundtrack", "the ending",
             "the director's work", "the cast", "the dialogue")
_TEMPLATES = (
    "{s} is {w} .",
    "{s} was {w} from start to finish .",
    "i found {s} {w} .",
    "honestly , {s} feels {w} .",
    "{s} is {w} and {w2} .",
    "what a {w} experience : {s} is {w2} .",
    "critics call {s} {w} .",
    "{s} turned out {w} , even {w2} .",
)


def synthetic_sentiment(n: int, seed: int = 0):
    """``n`` generated sentiment sentences as a ``datasets.Dataset`` (``text_a``, ``text_b`` = None, ``label``).

    Deterministic in ``(n, seed)``; labels are balanced (``n // 2`` positives,
    the rest negative), in a seeded random order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    from .glue import _make_dataset

    rng = np.random.default_rng([seed, 7919])
    labels = np.zeros(n, dtype=np.int64)
    labels[: n // 2] = 1
    rng.shuffle(labels)
    texts = []
    for y in labels:
        words = _POSITIVE if y == 1 else _NEGATIVE
        tpl = _TEMPLATES[rng.integers(len(_TEMPLATES))]
        w, w2 = rng.choice(len(words), size=2, replace=False)
        s = _SUBJECTS[rng.integers(len(_SUBJECTS))]
        texts.append(tpl.format(s=s, w=words[w], w2=words[w2]))
    return _make_dataset(texts, None, labels.tolist(), regression=False)
