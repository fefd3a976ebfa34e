"""load_classifier: the embedded default, tiny local checkpoints of each family, seeded heads, padding, bad input."""
from __future__ import annotations

import json

import pytest
import torch

from sft_kernels.split import pretrained, split_model
from sft_kernels.split.pretrained import (EMBEDDED_MODEL, load_classifier, load_minilm, minilm_classifier,
                                          model_inputs, supported_model_types)

from tiny_checkpoints import FAMILIES, make_tiny_checkpoint

SENTENCES = ["the cat sat on the mat", "hello", "a dog ran in the park with a red ball, twice!"]
#: What a batch carries for each family (BERT-style encoders with two token types also carry token_type_ids).
INPUTS = {"bert": ("input_ids", "attention_mask", "token_type_ids"),
          **{f: ("input_ids", "attention_mask") for f in ("distilbert", "roberta", "gpt2", "llama")}}
DECODERS = ("gpt2", "llama")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """``{family: base checkpoint dir}`` for every family, plus ``{family}+head`` (2-label head) for BERT and GPT-2."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {f: str(make_tiny_checkpoint(f, root / f)) for f in FAMILIES}
    dirs.update({f"{f}+head": str(make_tiny_checkpoint(f, root / f"{f}+head", with_head=True, num_labels=2))
                 for f in ("bert", "gpt2")})
    return dirs


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _head(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The task model's tensors outside its base model: the classification head."""
    prefix = model.base_model_prefix + "."
    return {k: v for k, v in model.state_dict().items() if not k.startswith(prefix)}


def _batch(tok, model, labels: bool = True) -> dict[str, torch.Tensor]:
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    batch = {k: enc[k] for k in model_inputs(model)}
    if labels:
        batch["labels"] = torch.tensor([0, 2, 1])
    return batch


# ------------------------------------------------------------------------------------------ embedded default
@pytest.fixture(scope="module")
def minilm():
    """The embedded ``(tokenizer, encoder)``, loaded once."""
    return load_minilm()


@pytest.fixture
def cached_minilm(minilm, monkeypatch):
    """Make ``load_classifier(None)`` reuse :func:`minilm` instead of reading the package's files again."""
    monkeypatch.setattr(pretrained, "load_minilm", lambda: minilm)
    return minilm


def test_embedded_default_is_minilm_classifier_bit_for_bit(minilm):
    expected = minilm_classifier(3, minilm=minilm, seed=7)[1]
    tok, model = load_classifier(None, 3, seed=7)  # loads the package's files itself
    assert type(model) is type(expected) and model.training
    assert _same_tensors(model, expected)
    assert tok.padding_side == "right" and model.config.pad_token_id == tok.pad_token_id
    assert model_inputs(model) == INPUTS["bert"]


def test_embedded_model_by_name(cached_minilm):
    expected = minilm_classifier(3, minilm=cached_minilm, seed=7)[1]
    assert _same_tensors(load_classifier(EMBEDDED_MODEL, 3, seed=7)[1], expected)


# ------------------------------------------------------------------------------------------ local checkpoints
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_checkpoint_loads_tokenizes_and_trains(tiny, family):
    tok, model = load_classifier(tiny[family], 3, seed=0)
    assert model.training and model.num_labels == 3 and model.dtype == torch.float32
    batch = _batch(tok, model)
    mask = batch["attention_mask"]
    assert tok.padding_side == "right" and mask[1, -1] == 0 and mask[1, 0] == 1  # "hello" is right-padded
    assert bool((batch["input_ids"][mask == 0] == tok.pad_token_id).all())
    out = model(**batch)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_inputs_per_family(tiny, family):
    tok, model = load_classifier(tiny[family], 2)
    assert model_inputs(model) == INPUTS[family]
    assert model_inputs(model.base_model) == INPUTS[family]
    assert set(INPUTS[family]) <= set(tok(SENTENCES[:1]).keys())  # the tokenizer produces them
    edge, _ = split_model(model, at=1)
    assert model_inputs(edge) == INPUTS[family]


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_model_inputs_of_other_llama_style_families(family):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2)
    assert model_inputs(AutoModelForSequenceClassification.from_config(cfg)) == ("input_ids", "attention_mask")


@pytest.mark.parametrize("family", FAMILIES)
def test_split_of_a_loaded_checkpoint_matches_the_model(tiny, family):
    """The padding rules make the split pair compute the model's loss on a right-padded batch."""
    tok, model = load_classifier(tiny[family], 3, seed=0)
    model.eval()
    batch = _batch(tok, model)
    labels = batch.pop("labels")
    edge, cloud = split_model(model, at=1)
    with torch.no_grad():
        want = model(**batch, labels=labels)
        got = cloud(edge(**batch), labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_same_seed_same_model_other_seed_other_head(tiny, family):
    a = load_classifier(tiny[family], 3, seed=1)[1]
    b = load_classifier(tiny[family], 3, seed=1)[1]
    c = load_classifier(tiny[family], 3, seed=2)[1]
    assert _same_tensors(a, b)
    head_a, head_c = _head(a), _head(c)
    assert head_a and all(not torch.equal(head_a[k], head_c[k]) for k in head_a if k.endswith("weight"))
    body = {k: v for k, v in c.state_dict().items() if k not in head_c}
    assert all(torch.equal(v, a.state_dict()[k]) for k, v in body.items())  # the pretrained weights are the same


def test_load_leaves_the_global_rng_alone(tiny):
    before = torch.get_rng_state()
    load_classifier(tiny["llama"], 2, seed=3)
    with pytest.warns(UserWarning, match="replaced by a fresh head"):
        load_classifier(tiny["bert+head"], 3, seed=3)  # the head-replacing path too
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("family", DECODERS)
def test_decoder_without_pad_token_pads_with_eos(tiny, family):
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tiny[family], local_files_only=True).pad_token is None  # as saved
    tok, model = load_classifier(tiny[family], 2)
    assert tok.pad_token == tok.eos_token and tok.pad_token_id == tok.eos_token_id
    assert model.config.pad_token_id == tok.eos_token_id


def test_existing_head_of_the_right_size_is_kept(tiny):
    from transformers import AutoModelForSequenceClassification

    for name in ("bert+head", "gpt2+head"):
        saved = AutoModelForSequenceClassification.from_pretrained(tiny[name], local_files_only=True)
        tok, model = load_classifier(tiny[name], 2, seed=5)
        assert _same_tensors(model, saved)


def test_existing_label_names_are_kept(tiny, tmp_path):
    import shutil

    ckpt = shutil.copytree(tiny["gpt2+head"], tmp_path / "named")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(id2label={"0": "neg", "1": "pos"}, label2id={"neg": 0, "pos": 1})
    (ckpt / "config.json").write_text(json.dumps(cfg))
    config = load_classifier(ckpt, 2)[1].config
    assert config.id2label == {0: "neg", 1: "pos"} and config.label2id == {"neg": 0, "pos": 1}


def test_existing_head_of_another_size_is_replaced_by_a_seeded_one(tiny):
    with pytest.warns(UserWarning, match=r"classification head of another size.*num_labels=3"):
        a = load_classifier(tiny["bert+head"], 3, seed=4)[1]
    with pytest.warns(UserWarning):
        b = load_classifier(tiny["bert+head"], 3, seed=4)[1]
    assert a.num_labels == 3 and _same_tensors(a, b)


def test_label2id_goes_into_the_config(tiny, cached_minilm):
    label2id = {"negative": 0, "neutral": 1, "positive": 2}
    for model in (tiny["gpt2"], None):
        cfg = load_classifier(model, 3, label2id=label2id)[1].config
        assert cfg.label2id == label2id and cfg.id2label == {0: "negative", 1: "neutral", 2: "positive"}


def test_supported_model_types_cover_the_adapters():
    assert {"bert", "roberta", "distilbert", "gpt2", "llama", "qwen2", "mistral"} <= set(supported_model_types())
    assert "t5" not in supported_model_types()


# ------------------------------------------------------------------------------------------ bad input
def test_missing_path_is_refused(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"model: no such directory .*{missing.name}"):
        load_classifier(missing, 2)
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_classifier("bert-base-uncased-not-a-local-dir", 2)


def test_file_instead_of_directory_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="model must be a checkpoint directory"):
        load_classifier(f, 2)


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(FileNotFoundError, match=r"model: .* is not a transformers checkpoint: it has no config.json"):
        load_classifier(tmp_path, 2)


def test_unsupported_family_is_refused_with_the_supported_list(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    with pytest.raises(ValueError, match=r"'t5' model, which the split does not support.*bert.*gpt2.*llama"):
        load_classifier(tmp_path, 2)


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", "{}"])
def test_unreadable_config_is_refused(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError, match="model: "):
        load_classifier(tmp_path, 2)


@pytest.mark.parametrize("num_labels", [0, -1, True, 2.0])
def test_bad_num_labels_is_refused(tiny, num_labels):
    with pytest.raises(ValueError, match="num_labels must be a positive int"):
        load_classifier(tiny["bert"], num_labels)


@pytest.mark.parametrize("label2id", [{"a": 0}, {"a": 0, "b": 2}, {"a": 1, "b": 1}, {0: 0, 1: 1}])
def test_bad_label2id_is_refused(tiny, label2id):
    with pytest.raises(ValueError, match="label2id must map 2 label names"):
        load_classifier(tiny["bert"], 2, label2id=label2id)
