"""sft_kernels.data: GLUE loading (row counts vs the data README), labels, metrics, synthetic task, batching."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sft_kernels.data import (TASKS, batches, compute_metrics, glue_score, load_glue, load_task, majority_baseline,
                              read_sentences, synthetic_sentiment)
from sft_kernels.data.metrics import _ranks, matthews_corr, spearman

ROWS = {("SST-2", "train"): 67349, ("SST-2", "dev"): 872, ("CoLA", "train"): 8551, ("CoLA", "dev"): 1043,
        ("MRPC", "train"): 3668, ("MRPC", "dev"): 408, ("STS-B", "train"): 5749, ("STS-B", "dev"): 1500,
        ("RTE", "train"): 2490, ("RTE", "dev"): 277, ("WNLI", "train"): 635, ("WNLI", "dev"): 71,
        ("QNLI", "dev"): 5463}
#: Label counts from the data README: (count of 1, count of 0).
COUNTS = {("SST-2", "train"): (37569, 29780), ("CoLA", "dev"): (721, 322), ("MRPC", "train"): (2474, 1194),
          ("RTE", "train"): (1241, 1249), ("WNLI", "dev"): (31, 40), ("QNLI", "dev"): (2761, 2702)}


@pytest.mark.parametrize("task,split", sorted(ROWS))
def test_row_counts_match_readme(task, split):
    ds = load_glue(task, split)
    assert len(ds) == ROWS[(task, split)]
    assert ds.column_names == ["text_a", "text_b", "label"]
    assert all(isinstance(t, str) and t for t in ds["text_a"][:50])
    if TASKS[task].text_b is None:
        assert ds[0]["text_b"] is None
    else:
        assert isinstance(ds[0]["text_b"], str) and ds[0]["text_b"]


@pytest.mark.parametrize("task,split", sorted(COUNTS))
def test_label_counts_and_mapping(task, split):
    y = np.asarray(load_glue(task, split)["label"])
    assert set(np.unique(y)) == {0, 1}
    assert (int((y == 1).sum()), int((y == 0).sum())) == COUNTS[(task, split)]


def test_specific_rows():
    rte = load_glue("RTE", "dev", limit=1)[0]  # "not_entailment" -> 1
    assert rte["label"] == 1 and rte["text_b"] == "Christopher Reeve had an accident."
    mrpc = load_glue("MRPC", "dev", limit=1)[0]  # header has a BOM; text contains '"'
    assert mrpc["label"] == 1 and mrpc["text_b"].startswith('"The foodservice pie')
    sts = load_glue("STS-B", "dev", limit=2)
    assert sts["label"][0] == 5.0 and isinstance(sts["label"][1], float)
    cola = load_glue("CoLA", "dev", limit=1)[0]
    assert cola == {"text_a": "The sailors rode the breeze clear of the rocks.", "text_b": None, "label": 1}
    assert len(load_glue("SST-2", "train", limit=5)) == 5
    assert read_sentences("SST-2", "dev", limit=1) == ["it 's a charming and often affecting journey ."]
    assert read_sentences("CoLA", "test", limit=1) == ["Bill whistled past the house."]


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="SST-2"):
        load_glue("MNLI")
    with pytest.raises(ValueError, match="train"):
        load_glue("RTE", "test")
    with pytest.raises(ValueError, match="synthetic"):
        load_task("nope", "train")
    with pytest.raises(FileNotFoundError, match=r"data-dir") as e:
        load_glue("RTE", "train", data_dir=tmp_path)
    assert str(tmp_path / "RTE" / "train.tsv") in str(e.value)
    with pytest.raises(FileNotFoundError):
        load_glue("QNLI", "train")  # no QNLI train file
    with pytest.raises(ValueError, match="limit"):
        load_glue("RTE", "dev", limit=-1)


def test_metrics_hand_computed():
    p, y = np.array([1, 1, 0, 0, 1]), np.array([1, 0, 0, 1, 1])
    # tp=2 fp=1 fn=1 tn=1
    assert compute_metrics("SST-2", p, y) == {"accuracy": pytest.approx(0.6)}
    assert compute_metrics("MRPC", p, y) == {"f1": pytest.approx(2 / 3), "accuracy": pytest.approx(0.6)}
    assert compute_metrics("CoLA", p, y)["matthews_corr"] == pytest.approx((2 - 1) / math.sqrt(3 * 3 * 2 * 2))
    assert matthews_corr(np.ones(4), np.array([1, 0, 1, 0])) == 0.0  # degenerate: constant prediction
    assert compute_metrics("MRPC", np.zeros(3), np.array([1, 0, 1]))["f1"] == 0.0
    x, t = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 6.0, 9.0])
    r = np.corrcoef(x, t)[0, 1]
    m = compute_metrics("STS-B", x, t)
    assert m["pearson"] == pytest.approx(r) and m["spearman"] == pytest.approx(1.0)


def test_spearman_ties_averaged():
    assert _ranks(np.array([10.0, 20.0, 20.0, 30.0])).tolist() == [1.0, 2.5, 2.5, 4.0]
    a, b = np.array([1.0, 2.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0, 4.0])
    ra, rb = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4.0])
    assert spearman(a, b) == pytest.approx(np.corrcoef(ra, rb)[0, 1])  # = 0.9486...
    assert spearman(np.ones(3), np.arange(3.0)) == 0.0


def test_glue_score_convention():
    assert glue_score("SST-2", {"accuracy": 0.9}) == pytest.approx(90.0)
    assert glue_score("MRPC", {"f1": 0.9, "accuracy": 0.8}) == pytest.approx(85.0)
    assert glue_score("STS-B", {"pearson": 0.8, "spearman": 0.7}) == pytest.approx(75.0)
    assert glue_score("CoLA", {"matthews_corr": 0.5}) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="spearman"):
        glue_score("STS-B", {"pearson": 0.8})


def test_majority_baseline():
    _, tr = load_task("WNLI", "train")
    _, dv = load_task("WNLI", "dev")
    assert majority_baseline("WNLI", tr, dv)["accuracy"] == pytest.approx(40 / 71)  # train majority 0
    m = majority_baseline("MRPC", load_glue("MRPC", "train"), load_glue("MRPC", "dev"))
    assert m["accuracy"] == pytest.approx(279 / 408)
    assert majority_baseline("CoLA", load_glue("CoLA", "train"), load_glue("CoLA", "dev")) == {"matthews_corr": 0.0}
    sts = majority_baseline("STS-B", load_glue("STS-B", "train", limit=50), load_glue("STS-B", "dev", limit=50))
    assert sts == {"pearson": 0.0, "spearman": 0.0}


def test_synthetic_deterministic_and_balanced():
    a, b = synthetic_sentiment(100, seed=3), synthetic_sentiment(100, seed=3)
    assert a[:] == b[:]
    assert synthetic_sentiment(100, seed=4)["text_a"] != a["text_a"]
    assert sum(a["label"]) == 50 and a.column_names == ["text_a", "text_b", "label"]
    spec, tr = load_task("synthetic", "train")
    _, dv = load_task("synthetic", "dev", limit=20)
    assert spec.name == "synthetic" and spec.metric_names == ("accuracy",)
    assert len(tr) == 2000 and len(dv) == 20 and tr["text_a"][:20] != dv["text_a"]


class _Tok:
    """A tiny whitespace tokenizer with the HF call signature used by ``batches``."""

    def __call__(self, a, b=None, padding=False, truncation=False, max_length=None, return_tensors=None,
                 return_token_type_ids=True):
        ids, types = [], []
        for i, s in enumerate(a):
            x = [101] + [hash(w) % 1000 + 1000 for w in s.split()] + [102]
            t = [0] * len(x)
            if b is not None:
                y = [hash(w) % 1000 + 1000 for w in b[i].split()] + [102]
                x, t = x + y, t + [1] * len(y)
            if truncation and max_length:
                x, t = x[:max_length], t[:max_length]
            ids.append(x)
            types.append(t)
        if return_tensors != "pt":
            return {"input_ids": ids}
        n = max(len(x) for x in ids)
        return {"input_ids": torch.tensor([x + [0] * (n - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (n - len(x)) for x in ids]),
                "token_type_ids": torch.tensor([t + [0] * (n - len(t)) for t in types])}


def test_batches_deterministic_padding_and_cursor():
    tok, ds = _Tok(), load_glue("RTE", "dev", limit=50)
    kw = dict(shuffle=True, seed=5, epoch=1, max_length=24)
    b1, b2 = list(batches(tok, ds, 8, **kw)), list(batches(tok, ds, 8, **kw))
    assert len(b1) == 7 and len(b1[-1]["labels"]) == 2
    for x, y in zip(b1, b2):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = list(batches(tok, ds, 8, shuffle=True, seed=5, epoch=2, max_length=24))
    assert not torch.equal(b1[0]["labels"], other[0]["labels"]) or not torch.equal(b1[0]["input_ids"],
                                                                                   other[0]["input_ids"])
    for b in b1:
        assert b["input_ids"].shape[1] <= 24 and b["labels"].dtype == torch.long
        assert b["attention_mask"][:, -1].any()  # padded to the batch's longest, not further
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    tail = list(batches(tok, ds, 8, start_batch=3, **kw))
    assert len(tail) == 4 and all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(tail, b1[3:]))
    plain = list(batches(tok, ds, 8))
    assert plain[0]["labels"].tolist() == ds["label"][:8]


def test_batches_sorted_eval_and_float_labels():
    tok, ds = _Tok(), load_glue("STS-B", "dev", limit=30)
    bs = list(batches(tok, ds, 7, sort_by_length=True))
    idx = torch.cat([b["index"] for b in bs])
    assert sorted(idx.tolist()) == list(range(30))
    lens = [int(b["attention_mask"].sum(1).max()) for b in bs]
    assert lens == sorted(lens) and bs[0]["labels"].dtype == torch.float32
    labels = torch.cat([b["labels"] for b in bs])
    assert torch.allclose(labels, torch.tensor(ds["label"])[idx])
    with pytest.raises(ValueError, match="shuffle"):
        next(batches(tok, ds, 4, shuffle=True, sort_by_length=True))
