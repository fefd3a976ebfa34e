"""Tests of the calibrated bottleneck: ``split_model(..., init="calibrated", calibration=...)``.

The tiny models and batches are test_split's.  Tolerances: fp32 eval; the full-rank calibrated
split is the unsplit model up to the fit's rounding (1e-4); merged and reloaded models compute
what the split pair computes (1e-5).
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

import sft_kernels
from sft_kernels.split import merge, split_model
from sft_kernels.split.adapters import BottleneckLayer
from sft_kernels.split.calibrate import CalibrationOptions, CalibrationReport
from test_export_load import as_old_format
from test_split import _LAYER, DECODERS, ENCODERS, _tiny, _tiny_batch

FAMILIES = [*ENCODERS, *DECODERS]
QUIET = CalibrationOptions(progress=False)
LABELS = torch.tensor([0, 2, 1])


def _calibration(n: int = 8, seed: int = 100) -> list[dict]:
    """``n`` right-padded batches of 3 random sequences (padded with id 0), from their own generators."""
    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(seed + i)
        lengths = torch.tensor([9, 4 + i % 5, 6])
        ids = torch.randint(3, 100, (3, 9), generator=g)
        mask = (torch.arange(9)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.tensor([0, 1, 2])})
    return out


def _split(model: torch.nn.Module, rank: int = 4, **kw):
    kw = {"calibration": _calibration(), "calibration_options": QUIET, **kw}
    return split_model(model, at=1, mode="bottleneck", rank=rank, init="calibrated", **kw)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_full_rank_calibrated_split_is_the_unsplit_model(family):
    model = _tiny(family)
    batch = _tiny_batch()
    ref = model(**batch, labels=LABELS)
    edge, cloud = _split(copy.deepcopy(model), rank=32)
    b = edge(**batch)
    assert b.hidden.shape == (20, 32) and b.residual is None  # links eliminated: only the code crosses
    out = cloud(b, labels=LABELS)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=0)
    report = cloud.calibration
    assert isinstance(report, CalibrationReport) and edge.calibration is report
    assert report.fit == "pca" and report.rank == 32 and report.heldout_tokens > 0
    assert report.code == ("stream" if family in DECODERS else "ffn_input")
    assert all(err < 1e-5 for err in report.errors.values()), report
    # pre-LN: the split sits before the FFN's norm, the cloud holds the whole FFN; post-LN: W1 is factorised
    assert (cloud.factor is None) == (family in DECODERS) and cloud.decoder is not None
    assert edge.factor.bias is not None and cloud.width == 32


@pytest.mark.parametrize("family", ["bert", "llama"])
@torch.no_grad()
def test_full_rank_calibrated_usplit_is_the_unsplit_model(family):
    model = _tiny(family)
    batch = _tiny_batch()
    edge, cloud, top = _split(copy.deepcopy(model), rank=32, u_split=True)
    torch.testing.assert_close(top(cloud(edge(**batch)), LABELS).logits, model(**batch).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fit", ["svd", "weighted"])
@pytest.mark.parametrize("family", ["distilbert", "gpt2"])
@torch.no_grad()
def test_other_fit_methods_are_exact_at_full_rank(family, fit):
    model = _tiny(family)
    batch = _tiny_batch()
    edge, cloud = _split(copy.deepcopy(model), rank=32, calibration_options=CalibrationOptions(fit=fit,
                                                                                              progress=False))
    assert cloud.calibration.fit == fit
    torch.testing.assert_close(cloud(edge(**batch)).logits, model(**batch).logits, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("family", FAMILIES)
def test_same_seed_and_calibration_give_bit_identical_parts(family):
    model = _tiny(family)
    rng = torch.random.get_rng_state()
    parts = [_split(copy.deepcopy(model), seed=seed, calibration=_calibration(seed=cal))
             for seed, cal in ((0, 100), (0, 100), (1, 100), (0, 200))]
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global stream is untouched

    def state(pair):
        return {f"{i}.{k}": v for i, part in enumerate(pair) for k, v in part.state_dict().items()}

    a, b, other_seed, other_cal = map(state, parts)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["0.factor.weight"], other_seed["0.factor.weight"])  # another token sample
    assert not torch.equal(a["0.factor.weight"], other_cal["0.factor.weight"])


# ----------------------------------------------------------------------------- merge and export


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_export_give_the_split_pairs_outputs(family, tmp_path):
    model = _tiny(family).train()
    batch = _tiny_batch()
    edge, cloud = _split(model)
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters()], lr=0.5)
    cloud(edge(**batch), labels=LABELS).loss.backward()  # trained code and decoders, not the fit's
    assert cloud.decoder.weight.grad.abs().sum() > 0 and edge.factor.bias.grad.abs().sum() > 0
    opt.step()
    edge.eval(), cloud.eval()
    with torch.no_grad():
        split = cloud(edge(**batch), labels=LABELS)
        merged = merge(edge, cloud).eval()
        layer = merged.base_model.get_submodule(_LAYER[family])
        assert isinstance(layer, BottleneckLayer) and layer.stream == (family in DECODERS)
        torch.testing.assert_close(merged(**batch, labels=LABELS).logits, split.logits, atol=1e-5, rtol=0)
        saved = sft_kernels.save_split_model(merged, tmp_path / "calibrated")
        meta = json.loads((saved / "sft_split.json").read_text())
        assert meta["format"] == 3 and meta["init"] == "calibrated" and meta["decoder"] and meta["edge_bias"]
        assert meta["code"] == ("stream" if family in DECODERS else "ffn_input")
        loaded = sft_kernels.load_split_model(saved)
        torch.testing.assert_close(loaded(**batch).logits, split.logits, atol=1e-5, rtol=0)
        # the old format (svd splits, written before format 2) still loads
        edge, cloud = split_model(_tiny(family), at=1, mode="bottleneck", rank=4)
        svd_logits = cloud(edge(**batch)).logits
        saved = sft_kernels.save_split_model(merge(edge, cloud), tmp_path / "svd")
        as_old_format(saved, 1)
        torch.testing.assert_close(sft_kernels.load_split_model(saved)(**batch).logits, svd_logits, atol=1e-5,
                                   rtol=0)


def test_export_rejects_a_stream_code_for_a_post_ln_family(tmp_path):
    edge, cloud = _split(_tiny("bert"))
    saved = sft_kernels.save_split_model(merge(edge, cloud), tmp_path)
    meta = json.loads((saved / "sft_split.json").read_text())
    for key, value, match in [("code", "stream", "pre-LN form"), ("code", "bogus", "code must be one of"),
                              ("init", "random", "init must be one of"),
                              ("decoder", "yes", "decoder must be a bool"), ("format", 4, "format 4 is not")]:
        (saved / "sft_split.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=match):
            sft_kernels.load_split_model(saved)


# ----------------------------------------------------------------------------- pretrained


def test_minilm_rank4_calibrated_pooled_error_is_below_svd():
    from sft_kernels.data import load_task
    from sft_kernels.split import load_minilm

    tok, model = load_minilm()
    cal = list(load_task("SST-2", "train", limit=160)[1]["text_a"])
    dev = dict(tok(list(load_task("SST-2", "dev", limit=48)[1]["text_a"]), padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = model(**dev).pooler_output
        errors = {}
        for init, kw in (("svd", {}), ("calibrated", {"calibration": cal, "tokenizer": tok,
                                                      "calibration_options": QUIET})):
            edge, cloud = split_model(copy.deepcopy(model), at=3, mode="bottleneck", rank=4, init=init, **kw)
            errors[init] = float((cloud(edge(**dev)).pooler_output - ref).norm() / ref.norm())
    assert errors["calibrated"] < 0.5 * errors["svd"], errors


# ----------------------------------------------------------------------------- bad input


def test_bad_calibrated_arguments_name_the_argument():
    model = _tiny("bert")
    cases = [
        (dict(init="bogus"), r"init must be one of \('svd', 'calibrated'\)"),
        (dict(init="svd", calibration=_calibration()), "calibration applies to init='calibrated' only"),
        (dict(init="svd", tokenizer=object()), "tokenizer applies to init='calibrated' only"),
        (dict(init="calibrated"), "init='calibrated' needs calibration="),
        (dict(init="calibrated", calibration=_calibration(), eliminate_links=False),
         "init='calibrated' needs eliminate_links=True"),
        (dict(init="calibrated", calibration=_calibration(), mode="layer", rank=None),
         "init='calibrated' applies to mode='bottleneck' only"),
        (dict(init="calibrated", calibration="some text"), "calibration must be an iterable"),
        (dict(init="calibrated", calibration=[]), "calibration is empty"),
        (dict(init="calibrated", calibration=["a sentence", "another"]), "no tokenizer= was given"),
        (dict(init="calibrated", calibration=[3, 4]), "calibration items must be"),
        (dict(init="calibrated", calibration=_calibration(n=1), rank=32), r"numerical rank \d+ over"),
        (dict(init="calibrated", calibration=_calibration(), calibration_options={"fit": "pca"}),
         "calibration_options must be a CalibrationOptions"),
    ]
    for kw, match in cases:
        kw = {"mode": "bottleneck", "rank": 4, **kw}
        with pytest.raises(ValueError, match=match):
            split_model(model, at=1, **kw)
    with pytest.raises(ValueError, match="calibration_options.fit must be one of"):
        CalibrationOptions(fit="lsq")
    with pytest.raises(ValueError, match=r"calibration_options.heldout must be in \(0, 0.5\]"):
        CalibrationOptions(heldout=0.0)
    split_model(model, at=1)  # none of the refusals marked the model as split


def test_non_finite_activations_are_refused_and_modes_restored():
    model = _tiny("gpt2").train()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="calibration: the activations at the split are not finite"):
        _split(model)
    assert all(m.training for m in model.modules())  # the edge ran in eval mode, then the modes came back
    one_token = [{"input_ids": torch.tensor([[5]]), "attention_mask": torch.tensor([[1]])}]
    with pytest.raises(ValueError, match="calibration is empty"):
        _split(_tiny("gpt2"), calibration=one_token)
