"""Tests of the privacy audit (:mod:`sft_kernels.audit`, ``sft audit``).

The attacks on the raw input embeddings are the sanity end of the audit: the lookup must recover
>= 99% of real tokens and a small learned inverter >= 95% (the issue's thresholds), on SST-2 dev
sentences, with the public attacker text capped small so the file stays fast.  The metrics and the
rotation estimate are checked on constructed inputs whose answers are known; each bad input of
``sft audit`` gets its own test of the one-line error.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

from sft_kernels import cli
from sft_kernels.audit import (AuditConfig, InverterConfig, Observer, SETTINGS, estimate_rotation, frequent_guess,
                               lookup, plan, positional_guess, predict, read_results, recovery, render, run_audit,
                               train_inverter)
from sft_kernels.audit.attacks import code_centroids, mean_views
from sft_kernels.audit.text import content_mask, public_corpus, tokenize, victim_corpus
from sft_kernels.data import default_glue_dir

GLUE = os.environ.get("SFT_GLUE_DIR") or default_glue_dir()
needs_glue = pytest.mark.skipif(not os.path.isfile(os.path.join(GLUE, "SST-2", "dev.tsv")),
                                reason="GLUE TSVs not found (set SFT_GLUE_DIR)")


@pytest.fixture(scope="module")
def minilm():
    from sft_kernels.split import load_minilm

    return load_minilm()


@pytest.fixture(scope="module")
def tok(minilm):
    return minilm[0]


# ----------------------------------------------------------------------------- metrics


def test_recovery_counts_real_tokens_content_words_and_exact_sentences(tok):
    c = tokenize(tok, "t", ["the film is wonderful .", "a dull , tedious mess"])
    truth = c.ids
    # sentence 0: every real token right; sentence 1: only "dull" wrong (a content word)
    guess = [list(truth[0]), list(truth[1])]
    dull = tok.convert_tokens_to_ids("dull")
    guess[1][truth[1].index(dull)] = tok.convert_tokens_to_ids("bright")
    r = recovery(tok, truth, guess)
    real = sum(len(s) - 2 for s in truth)  # [CLS] and [SEP] never count
    assert r.tokens == real and r.sentences == 2
    assert r.token == pytest.approx((real - 1) / real)
    # content-word pieces: film, wonderful, dull, ted ##ious, mess ("the", "is", "a", punctuation are not)
    assert r.content_tokens == 6
    assert r.content == pytest.approx(5 / 6)
    assert r.exact == pytest.approx(1 / 2)


def test_recovery_ignores_specials_and_stop_words_in_content(tok):
    c = tokenize(tok, "t", ["the film is wonderful ."])
    ids = c.ids[0]
    # every stop word and punctuation wrong, specials wrong too: content recovery stays perfect
    guess = [t if content_mask(tok, ids)[i] else tok.convert_tokens_to_ids("zebra") for i, t in enumerate(ids)]
    r = recovery(tok, c.ids, [guess])
    assert r.content == 1.0
    assert r.token == pytest.approx(2 / 5)  # film, wonderful of five real tokens
    assert r.exact == 0.0


def test_content_mask_marks_every_piece_of_a_content_word(tok):
    ids = tok("unbelievably the")["input_ids"]
    pieces = tok.convert_ids_to_tokens(ids)
    mask = content_mask(tok, ids).tolist()
    assert any(p.startswith("##") for p in pieces), pieces  # the word is split
    assert mask == [p not in ("[CLS]", "[SEP]", "the") for p in pieces]


def test_recovery_rejects_mismatched_guess(tok):
    with pytest.raises(ValueError, match="one sentence per true sentence"):
        recovery(tok, [[101, 2000, 102]], [])


def test_baselines_guess_the_attackers_mode_and_positions(tok):
    attacker = tokenize(tok, "a", ["good film .", "good film !", "bad good idea"])  # mode: "good"
    victim = tokenize(tok, "v", ["good film .", "nice day !"])
    good = tok.convert_tokens_to_ids("good")
    assert all(t == good for s in frequent_guess(tok, attacker, victim) for t in s)
    pos = positional_guess(tok, attacker, victim)
    assert pos[0][1:4] == victim.ids[0][1:4]  # same length: the most frequent token at each position
    r = recovery(tok, victim.ids, pos)
    assert r.exact == pytest.approx(1 / 2)


# ----------------------------------------------------------------------------- rotation estimate


def test_estimate_rotation_recovers_a_private_rotation_from_statistics():
    g = torch.Generator().manual_seed(0)
    n, r = 20000, 4
    # skewed, differently scaled coordinates: what makes axes and their signs identifiable
    ref = torch.distributions.Exponential(torch.ones(r)).sample((n,)) * torch.tensor([3.0, 2.0, 1.3, 0.7])
    other = torch.distributions.Exponential(torch.ones(r)).sample((n,)) * torch.tensor([3.0, 2.0, 1.3, 0.7])
    q, rr = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))
    rot = (q * torch.sign(torch.diagonal(rr))).float()
    observed = other @ rot.T  # a different sample of the same distribution, rotated
    est = estimate_rotation(ref, observed).float()
    assert torch.linalg.matrix_norm(est - rot) < 0.15
    # the attacker undoes it: codes back in the reference's frame
    back = observed @ est
    assert torch.allclose(back.mean(0), other.mean(0), atol=0.1)


def test_estimate_rotation_is_not_fooled_into_identity():
    torch.manual_seed(1)
    ref = torch.distributions.Exponential(torch.ones(4)).sample((20000,)) * torch.tensor([3.0, 2.0, 1.3, 0.7])
    perm = torch.eye(4)[[1, 0, 3, 2]] * torch.tensor([1.0, -1.0, 1.0, -1.0])[:, None]  # swap and flip axes
    est = estimate_rotation(ref, ref @ perm.T).float()
    assert torch.allclose(est, perm, atol=0.1)
    assert torch.linalg.matrix_norm(est - torch.eye(4)) > 1.0


# ----------------------------------------------------------------------------- attacks on raw embeddings


@pytest.fixture(scope="module")
def raw_case(minilm):
    tok, enc = minilm
    victim = victim_corpus(tok, "SST-2", data_dir=GLUE, limit=48)
    attacker = public_corpus(tok, 4000, seed=0, data_dir=GLUE)
    return Observer(SETTINGS["embeddings"], tok, enc), victim, attacker


@needs_glue
def test_lookup_recovers_raw_embeddings(raw_case, tok):
    obs, victim, attacker = raw_case
    codes, nbytes = obs.observe(victim, seed=1)
    assert nbytes > 384 * 4 * 10  # fp32 rows of ~20 tokens per example
    keys, ids = code_centroids(obs, attacker, seed=0)
    r = recovery(tok, victim.ids, [g.tolist() for g in lookup(codes, keys, ids)])
    assert r.token >= 0.99 and r.tokens > 500


@needs_glue
def test_small_learned_inverter_recovers_raw_embeddings(raw_case, tok):
    obs, victim, attacker = raw_case
    cfg = InverterConfig(layers=1, d_model=64, heads=2, batch_tokens=512, ridge_tokens=2000, negatives=512)
    model, info = train_inverter(obs, attacker, seed=0, config=cfg)
    assert info["steps"] >= 5 and math.isfinite(info["loss"]) and info["tokens"] <= 4000
    views = [obs.observe(victim, seed=s)[0] for s in (1, 2)]
    got = predict(model, views, counts=[1, 2])
    for c in (1, 2):
        r = recovery(tok, victim.ids, [t[:, 0].tolist() for t in got[c][0]])
        assert r.token >= 0.95, (c, r)


@needs_glue
def test_bottleneck_code_hides_more_than_raw_embeddings(minilm, raw_case, tok):
    """The same lookup on a rank-4 code is far from the raw embeddings' ~100% (the audit is not rigged)."""
    _, victim, attacker = raw_case
    obs = Observer(SETTINGS["r4-svd-int8"], *minilm)
    codes, nbytes = obs.observe(victim.head(16), seed=1)
    assert nbytes < 200  # 4 int8 values per token plus scales, lengths and the label
    keys, ids = code_centroids(obs, attacker, seed=0)
    r = recovery(tok, victim.head(16).ids, [g.tolist() for g in lookup(mean_views([codes]), keys, ids)])
    assert r.token < 0.5


@needs_glue
def test_usplit_gradient_gives_the_labels_away(minilm):
    """The gradient of the pooled rows, after the int8,sr codec, names the label at step 0."""
    from sft_kernels.audit.attacks import label_leakage
    from sft_kernels.data import load_glue

    ds = load_glue("SST-2", "train", data_dir=GLUE, limit=64)
    train = (list(ds["text_a"]), None, list(ds["label"]))
    r = label_leakage(*minilm, train, steps=2, batch_size=16)
    assert r["examples"] == 32
    assert r["known_head_step0"] >= 0.9 and r["sign_step0"] >= 0.9, r


# ----------------------------------------------------------------------------- the runner


def test_plan_shares_and_restricts_cells():
    cells = plan(AuditConfig(settings=["embeddings", "usplit-r4-svd-int8", "r4-svd-int8-rot"], tasks=["SST-2"],
                             attacks=["lookup", "labels", "price", "inversion"]))
    keys = {(c.setting, c.attack, c.attacker) for c in cells}
    assert ("usplit-r4-svd-int8", "labels", "public") in keys
    assert ("usplit-r4-svd-int8", "lookup", "public") not in keys  # the U-split cell is about labels
    assert ("embeddings", "price", "public") not in keys  # price: defences (and their reference) only
    assert ("r4-svd-int8-rot", "price", "public") in keys
    assert ("embeddings", "inversion", "in-domain") not in keys
    # a rotated setting and its unrotated twin share the attacker's simulation (so one inverter)
    assert SETTINGS["r4-svd-int8-rot"].attacker_key("SST-2") == SETTINGS["r4-svd-int8"].attacker_key("RTE")
    assert SETTINGS["r4-cal-int8"].attacker_key("SST-2") != SETTINGS["r4-cal-int8"].attacker_key("RTE")


@needs_glue
def test_run_audit_writes_cells_and_skips_them_on_rerun(tmp_path):
    out = str(tmp_path / "audit.csv")
    cfg = AuditConfig(settings=["embeddings"], tasks=["SST-2"], attacks=["frequent", "lookup"], attackers=["public"],
                      budget_tokens=2000, max_victim=8, views=2, data_dir=GLUE, out=out, progress=False)
    first = run_audit(cfg)
    rows = read_results(out)
    assert first["done"] == 2 and first["skipped"] == 0
    assert {r["attack"] for r in rows} == {"frequent", "lookup"}
    assert {r["views"] for r in rows if r["attack"] == "lookup"} == {"1", "2"}
    assert float([r for r in rows if r["attack"] == "lookup"][0]["token"]) >= 0.99
    meta = json.loads((tmp_path / "audit.meta.json").read_text())
    assert meta["wall_s"] > 0 and meta["machine"]["cpu"] and meta["budget_tokens"] == 2000
    again = run_audit(cfg)
    assert again["done"] == 0 and again["skipped"] == 2 and len(read_results(out)) == len(rows)
    assert json.loads((tmp_path / "audit.meta.json").read_text())["wall_s"] >= meta["wall_s"]
    table = render(rows, None, "test")
    assert "| embeddings |" in table and "lookup" in table


def test_render_without_results_says_pending():
    assert render([]).startswith("pending: not yet run")


# ----------------------------------------------------------------------------- bad input: one line each


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("sft audit: ")
    return err


def test_audit_unknown_setting_is_one_line(capsys):
    err = _one_line_error(capsys, ["audit", "--settings", "r3-magic"])
    assert "--settings" in err and "'r3-magic'" in err and "r4-svd-int8" in err


def test_audit_missing_data_dir_is_one_line(capsys, tmp_path):
    err = _one_line_error(capsys, ["audit", "--data-dir", str(tmp_path / "nowhere")])
    assert "--data-dir" in err and "nowhere" in err and "does not exist" in err


def test_audit_zero_budget_is_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["audit", "--budget-tokens", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--budget-tokens must be an integer >= 1, got 0" in err


def test_audit_config_rejects_zero_budget_naming_the_range():
    with pytest.raises(ValueError, match=r"budget_tokens must be an int >= 1 .*200000.*got 0"):
        AuditConfig(budget_tokens=0)
