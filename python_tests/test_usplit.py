"""Tests of the U-shaped split: ``split_model(..., u_split=True) -> (edge, cloud, top)``.

The tiny models and batches are test_split's.  Tolerances: fp32 eval; a layer U-split is
the unsplit computation (1e-5); a bottleneck U-split is the two-part bottleneck split with
the same seed and rank, and the merged model (1e-5).
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

from sft_kernels.split import BoundaryOutput, CloudModel, TopModel, merge, split_model
from test_split import DECODERS, ENCODERS, SENTENCES, _tiny, _tiny_batch

LABELS = torch.tensor([0, 2, 1])


@pytest.fixture(scope="module")
def minilm_case():
    """``(MiniLM's encoder under a fresh 2-class head, a padded batch of 4 sentences, labels)``."""
    from sft_kernels.split import load_minilm, minilm_classifier

    tok, encoder = load_minilm()
    model = minilm_classifier(num_labels=2, minilm=(tok, encoder))[1].eval()
    return model, dict(tok(SENTENCES, padding=True, return_tensors="pt")), torch.tensor([1, 0, 0, 1])


def _pooled_rows(model: torch.nn.Module, batch: dict, family: str) -> torch.Tensor:
    """The unsplit base model's final hidden states at the rows its head pools from (after ln_f / norm)."""
    hidden = model.base_model(**batch).last_hidden_state
    if family in DECODERS:  # right-padded: the last real token
        return hidden[torch.arange(hidden.shape[0]), batch["attention_mask"].sum(1) - 1]
    return hidden[:, 0]


def _assert_same_output(out, ref, atol: float = 1e-5) -> None:
    assert type(out) is type(ref)
    torch.testing.assert_close(out.logits, ref.logits, atol=atol, rtol=0)
    if ref.loss is None:
        assert out.loss is None
    else:
        torch.testing.assert_close(out.loss, ref.loss, atol=atol, rtol=0)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
@torch.no_grad()
def test_layer_usplit_matches_unsplit_at_every_k(family):
    model = _tiny(family)
    batch = _tiny_batch()
    ref = model(**batch, labels=LABELS)
    rows = _pooled_rows(model, batch, family)
    for k in range(1, model.config.num_hidden_layers):
        edge, cloud, top = split_model(copy.deepcopy(model), at=k, u_split=True)
        b = edge(**batch)
        assert (b.pool_index is not None) == (family in DECODERS)  # encoders pool [CLS]: nothing sent
        pooled = cloud(b)
        assert pooled.shape == (3, 32) and pooled.is_contiguous()  # one row per sequence
        torch.testing.assert_close(pooled, rows, atol=1e-5, rtol=0)  # ln_f / norm per token, then the row
        _assert_same_output(top(pooled, LABELS), ref)
        _assert_same_output(top(pooled), model(**batch))


@pytest.mark.parametrize("family,problem,labels", [
    ("bert", "regression", torch.tensor([[0.5, -1, 0], [2, 0, 1], [0, 0, -3.0]])),
    ("gpt2", "multi_label_classification", torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])),
    ("llama", "regression", torch.tensor([[0.5, 1, 0], [0, 2, 1], [1, 1, 3.0]])),
])
@torch.no_grad()
def test_usplit_loss_follows_the_heads_problem_type(family, problem, labels):
    model = _tiny(family)
    model.config.problem_type = problem
    batch = _tiny_batch()
    edge, cloud, top = split_model(copy.deepcopy(model), at=1, u_split=True)
    _assert_same_output(top(cloud(edge(**batch)), labels), model(**batch, labels=labels))


@pytest.mark.parametrize("eliminate_links", [True, False])
@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
@torch.no_grad()
def test_bottleneck_usplit_matches_two_part_split_and_merge(family, eliminate_links):
    model = _tiny(family)
    batch = _tiny_batch()
    kw = dict(at=1, mode="bottleneck", rank=4, eliminate_links=eliminate_links, seed=5)
    edge2, cloud2 = split_model(copy.deepcopy(model), **kw)
    ref = cloud2(edge2(**batch), labels=LABELS)
    u_model = copy.deepcopy(model)
    edge, cloud, top = split_model(u_model, **kw, u_split=True)
    pooled = cloud(edge(**batch))
    assert pooled.shape == (3, 32)
    out = top(pooled, LABELS)
    _assert_same_output(out, ref)
    merged = merge(edge, cloud, top)
    assert merged is u_model
    _assert_same_output(merged(**batch, labels=LABELS), out)


@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
def test_gradients_reach_all_three_parts(family):
    model = _tiny(family).train()
    parts = split_model(model, at=1, u_split=True)
    edge, cloud, top = parts
    top(cloud(edge(**_tiny_batch())), LABELS).loss.backward()
    for part in parts:
        missing = [n for n, p in part.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (type(part).__name__, missing)
        assert sum(p.grad.abs().sum() for p in part.parameters()) > 0
    ids = [{id(p) for p in part.parameters()} for part in parts]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert sum(map(len, ids)) == len(list(model.parameters()))  # shared with the model, each in one part


def test_trained_usplit_merges_to_the_model_with_its_outputs():
    model = _tiny("gpt2").train()
    batch = _tiny_batch()
    edge, cloud, top = split_model(model, at=2, mode="bottleneck", rank=3, u_split=True)
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters(), *top.parameters()], lr=0.5)
    top(cloud(edge(**batch)), LABELS).loss.backward()
    opt.step()
    for part in (edge, cloud, top):
        part.eval()
    with torch.no_grad():
        split = top(cloud(edge(**batch)), LABELS)
        merged = merge(edge, cloud, top).eval()
        _assert_same_output(merged(**batch, labels=LABELS), split)


# ----------------------------------------------------------------------------- MiniLM


@torch.no_grad()
def test_minilm_layer_usplit_matches_unsplit(minilm_case):
    model, batch, labels = minilm_case
    edge, cloud, top = split_model(copy.deepcopy(model), at=3, u_split=True)
    assert "pooler" in top.mods and "pooler" not in cloud.mods  # BERT's pooler runs on the edge's top
    pooled = cloud(edge(**batch))
    assert pooled.shape == (4, 384)
    _assert_same_output(top(pooled, labels), model(**batch, labels=labels))


@pytest.mark.parametrize("eliminate_links", [True, False])
@torch.no_grad()
def test_minilm_bottleneck_rank4_usplit_matches_two_part_split_and_merge(minilm_case, eliminate_links):
    model, batch, labels = minilm_case
    kw = dict(at=3, mode="bottleneck", rank=4, eliminate_links=eliminate_links)
    edge2, cloud2 = split_model(copy.deepcopy(model), **kw)
    edge, cloud, top = split_model(copy.deepcopy(model), **kw, u_split=True)
    b = edge(**batch)
    assert b.hidden.shape[1] == 4 and b.pool_index is None
    out = top(cloud(b), labels)
    _assert_same_output(out, cloud2(edge2(**batch), labels=labels))
    _assert_same_output(merge(edge, cloud, top)(**batch, labels=labels), out)


# ----------------------------------------------------------------------------- bad input


def test_u_split_must_be_a_bool():
    for bad in (1, "yes", None):
        with pytest.raises(ValueError, match=r"u_split must be a bool.*got"):
            split_model(_tiny("bert"), at=1, u_split=bad)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_u_split_of_a_base_model_is_refused(family):
    model = _tiny(family, head=False)
    with pytest.raises(ValueError, match=r"u_split=True needs a model with a task head"):
        split_model(model, at=1, u_split=True)
    split_model(model, at=1)  # the refusal left the model splittable


@torch.no_grad()
def test_top_refuses_anything_but_the_pooled_rows():
    edge, cloud, top = split_model(_tiny("bert"), at=1, u_split=True)
    b = edge(**_tiny_batch())
    pooled = cloud(b)
    with pytest.raises(TypeError, match=r"\(batch, 32\) torch.float32.*BoundaryOutput: run cloud\(boundary\) first"):
        top(b)
    with pytest.raises(TypeError, match=r"\(batch, 32\).*got dict"):
        top(b.to_tensors())
    for bad in (pooled[:, :16], pooled[:, None, :], pooled.half()):
        shape = re.escape(str(tuple(bad.shape)))
        with pytest.raises(ValueError, match=r"\(batch, 32\) torch.float32.*got shape " + shape):
            top(bad, LABELS)


@torch.no_grad()
def test_usplit_cloud_refuses_labels_and_wrong_pool_index():
    batch = _tiny_batch()
    edge, cloud, _ = split_model(_tiny("bert"), at=1, u_split=True)
    b = edge(**batch)
    with pytest.raises(ValueError, match="labels stay on the edge"):
        cloud(b, labels=LABELS)
    with pytest.raises(ValueError, match=r"pool_index: expected none \(an encoder pools position 0"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len, pool_index=torch.zeros(3, dtype=torch.int32)))
    edge, cloud, _ = split_model(_tiny("llama"), at=1, u_split=True)
    b = edge(**batch)
    assert isinstance(cloud, CloudModel) and cloud.takes_pool_index
    with pytest.raises(ValueError, match=r"pool_index: expected shape \(3,\)"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len))
    with pytest.raises(ValueError, match="pool_index: expected positions of real tokens"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len, pool_index=b.lengths.clone()))


def test_merge_checks_the_top():
    edge, cloud, top = split_model(_tiny("bert"), at=1, u_split=True)
    edge2, cloud2 = split_model(_tiny("bert"), at=1)
    _, _, top3 = split_model(_tiny("bert"), at=1, u_split=True)
    with pytest.raises(ValueError, match=r"all three parts of a u_split=True split"):
        merge(edge, cloud)
    with pytest.raises(ValueError, match=r"all three parts of a u_split=True split"):
        merge(edge, cloud, top3)
    with pytest.raises(ValueError, match=r"u_split=False, which has no top"):
        merge(edge2, cloud2, top)
    assert isinstance(top, TopModel) and merge(edge, cloud, top) is not None


def test_usplit_parts_and_model_cannot_be_split_again():
    model = _tiny("distilbert")
    parts = split_model(model, at=1, u_split=True)
    for m in (model, *parts):
        with pytest.raises(ValueError, match="already split"):
            split_model(m, at=1, u_split=True)


def test_package_exports_top_model():
    import sft_kernels.split as split

    assert split.TopModel is TopModel and issubclass(TopModel, torch.nn.Module)
