"""How much of the text an attack recovered, and the guesses that need no attack at all.

* :func:`recovery`: top-1 token recovery over real tokens ([CLS]/[SEP]/[PAD] excluded), over
  content-word tokens only, and exact sentences (every real token right).
* Baselines an attack must beat, fitted on the attacker's own text: :func:`frequent_guess` (its
  most frequent real token, everywhere) and :func:`positional_guess` (the most frequent token at
  each (length, position), backing off to position from the end for the last tokens, then to
  position, then to the overall mode).  A label-conditioned guess needs text labelled in the
  victim's label space, which neither attacker corpus has (public tasks' labels mean other things;
  ``test.tsv`` is unlabelled), so the label adds nothing here and is not a key.

Knows token id tensors and a tokenizer's special ids; not models or codecs.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .text import Corpus, content_mask, special_mask

__all__ = ["Recovery", "recovery", "frequent_guess", "positional_guess"]


@dataclass
class Recovery:
    """Fractions in [0, 1] and the counts they are over."""

    token: float
    content: float
    exact: float
    tokens: int
    content_tokens: int
    sentences: int


def recovery(tok: Any, truth: Sequence[Sequence[int]], guess: Sequence[Sequence[int]]) -> Recovery:
    """Score ``guess`` (one id list per sentence, same lengths) against ``truth``.

    Sentences with no real token (only specials) are left out of the exact-sentence rate.
    """
    if len(truth) != len(guess):
        raise ValueError(f"guess must hold one sentence per true sentence ({len(truth)}), got {len(guess)}")
    hit = n = c_hit = c_n = exact = sentences = 0
    for t, g in zip(truth, guess):
        t_ids, g_ids = torch.as_tensor(list(t), dtype=torch.long), torch.as_tensor(list(g), dtype=torch.long)
        if t_ids.shape != g_ids.shape:
            raise ValueError(f"guess has {len(g_ids)} tokens for a sentence of {len(t_ids)}")
        real = ~special_mask(tok, t_ids)
        ok = (t_ids == g_ids) & real
        content = content_mask(tok, t) & real
        hit, n = hit + int(ok.sum()), n + int(real.sum())
        c_hit, c_n = c_hit + int((ok & content).sum()), c_n + int(content.sum())
        if bool(real.any()):
            sentences += 1
            exact += int(bool(ok[real].all()))
    return Recovery(hit / max(n, 1), c_hit / max(c_n, 1), exact / max(sentences, 1), n, c_n, sentences)


def _real_counts(tok: Any, corpus: Corpus) -> Counter:
    flat = corpus.flat_ids()
    return Counter(flat[~special_mask(tok, flat)].tolist())


def frequent_guess(tok: Any, attacker: Corpus, victim: Corpus) -> list[list[int]]:
    """The attacker's most frequent real token at every position of every victim sentence."""
    mode = _real_counts(tok, attacker).most_common(1)[0][0]
    return [[mode] * len(s) for s in victim.ids]


def positional_guess(tok: Any, attacker: Corpus, victim: Corpus, tail: int = 2) -> list[list[int]]:
    """The most frequent attacker token at each (length, position) of the victim sentence.

    Backs off to (position from the end) for the last ``tail`` real positions, then to (position),
    then to the overall mode, whenever the finer key never occurs in the attacker's text.
    """
    special = set(tok.all_special_ids)
    by_len_pos: dict[tuple[int, int], Counter] = {}
    by_end: dict[int, Counter] = {}
    by_pos: dict[int, Counter] = {}
    for s in attacker.ids:
        n = len(s)
        for i, t in enumerate(s):
            if t in special:
                continue
            by_len_pos.setdefault((n, i), Counter())[t] += 1
            if n - 1 - i <= tail:
                by_end.setdefault(n - 1 - i, Counter())[t] += 1
            by_pos.setdefault(i, Counter())[t] += 1
    mode = _real_counts(tok, attacker).most_common(1)[0][0]
    out = []
    for s in victim.ids:
        n = len(s)
        row = []
        for i in range(n):
            for table, key in ((by_len_pos, (n, i)), (by_end, n - 1 - i), (by_pos, i)):
                if key in table and (table is not by_end or n - 1 - i <= tail):
                    row.append(table[key].most_common(1)[0][0])
                    break
            else:
                row.append(mode)
        out.append(row)
    return out
