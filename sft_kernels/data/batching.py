"""Deterministic tokenised batches with dynamic padding.

The order of a shuffled epoch is a permutation drawn from ``numpy.random.default_rng([seed, epoch])``,
so a run that restarts at ``(epoch, start_batch)`` sees exactly the batches it would have seen.
"""
from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

__all__ = ["batch_order", "batches", "num_batches", "subsample", "SUBSAMPLE_SEED"]


def num_batches(n: int, batch_size: int) -> int:
    """Batches per epoch of ``n`` rows (the last one may be short)."""
    return (n + batch_size - 1) // batch_size


def batch_order(n: int, *, shuffle: bool, seed: int = 0, epoch: int = 0) -> np.ndarray:
    """Row order of one epoch: ``arange(n)`` or a permutation from ``(seed, epoch)``."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


def batches(tokenizer, ds, batch_size: int, *, max_length: int = 128, shuffle: bool = False, seed: int = 0,
            epoch: int = 0, start_batch: int = 0, sort_by_length: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Yield tokenised batches of ``ds`` (columns ``text_a``, ``text_b``, ``label``).

    Each batch has ``input_ids``, ``attention_mask``, ``token_type_ids`` (long,
    padded to the batch's longest sequence, truncated at ``max_length``) and
    ``labels`` (long, or float32 for a float label column).  ``shuffle`` uses the
    permutation of ``(seed, epoch)``; ``start_batch`` skips that many batches
    of the epoch (a resume cursor) without tokenising them.

    ``sort_by_length`` (only without ``shuffle``; meant for evaluation) orders
    rows by token count to cut padding, and then each batch also has ``index``:
    the rows' positions in ``ds``, to map predictions back.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if start_batch < 0:
        raise ValueError(f"start_batch must be >= 0, got {start_batch}")
    if sort_by_length and shuffle:
        raise ValueError("sort_by_length is for evaluation: it cannot be combined with shuffle=True")
    n = len(ds)
    order = batch_order(n, shuffle=shuffle, seed=seed, epoch=epoch)
    text_a, text_b = ds["text_a"], ds["text_b"] if "text_b" in ds.column_names else None
    if text_b is not None and all(t is None for t in text_b):
        text_b = None
    labels = np.asarray(ds["label"])
    if sort_by_length:
        enc = tokenizer(list(text_a), list(text_b) if text_b is not None else None, truncation=True,
                        max_length=max_length)
        lengths = np.array([len(ids) for ids in enc["input_ids"]])
        order = np.argsort(lengths, kind="stable")
    label_dtype = torch.float32 if labels.dtype.kind == "f" else torch.long
    for start in range(start_batch * batch_size, n, batch_size):
        idx = order[start:start + batch_size]
        a = [text_a[i] for i in idx]
        b: Optional[list] = [text_b[i] for i in idx] if text_b is not None else None
        enc = tokenizer(a, b, padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
                        return_token_type_ids=True)
        out = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
               "token_type_ids": enc["token_type_ids"],
               "labels": torch.as_tensor(labels[idx], dtype=label_dtype)}
        if sort_by_length:
            out["index"] = torch.as_tensor(idx, dtype=torch.long)
        yield out


#: Seed of the fixed permutation :func:`subsample` takes the head of (independent of any run seed).
SUBSAMPLE_SEED = 1234


def subsample(ds, n: Optional[int]):
    """The first ``n`` rows of a fixed permutation (seed :data:`SUBSAMPLE_SEED`) of ``ds`` (all rows for None).

    The same rows for every configuration and seed of a study, so runs compare on equal data.
    """
    if n is None or n >= len(ds):
        return ds
    if n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    return ds.select(np.random.default_rng(SUBSAMPLE_SEED).permutation(len(ds))[:n].tolist())
