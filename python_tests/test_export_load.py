"""Loading what ``save_split_model`` and ``SimulatedSplit.save_pretrained`` write, the way users load models.

* A bottleneck export through transformers' auto classes: refused without ``trust_remote_code``
  (never a model with a re-initialised layer K), the same logits as ``load_split_model`` with it.
* A layer-split export is an ordinary transformers checkpoint: ``from_pretrained`` gives its logits.
* Older formats (1, 2) still load.
* ``SimulatedSplit.save_pretrained`` after a real ``transformers.Trainer`` run, for the bottleneck,
  layer and U-split; what ``Trainer.save_model()`` writes for it (its state dict, no config).

Tiny random models from test_split; logits compared to 1e-5 (fp32, eval mode).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import sft_kernels
from sft_kernels import SimulatedSplit
from sft_kernels.split import merge, split_model
from sft_kernels.split.adapters import BottleneckLayer
from test_split import _tiny, _tiny_batch

LABELS = torch.tensor([0, 2, 1])


def as_old_format(saved: Path, version: int) -> None:
    """Rewrite a saved bottleneck model as the format-``version`` writer wrote it (1 or 2).

    Both kept the family's own config.json and wrote no sft_kernels_split.py; format 1 knew only the
    split's place and shape, format 2 added how the bottleneck is built.
    """
    meta = json.loads((saved / "sft_split.json").read_text())
    assert meta["format"] == 3
    config = json.loads((saved / "config.json").read_text())
    config.pop("auto_map")
    config.update(model_type=meta["base_model_type"], architectures=[meta["model_class"]])
    (saved / "config.json").write_text(json.dumps(config, indent=2))
    (saved / "sft_kernels_split.py").unlink()
    keys = ["family", "model_class", "at", "rank", "eliminate_links", "factor_bias"]
    if version == 2:
        keys += ["init", "code", "edge_bias", "decoder"]
    else:
        assert meta["init"] == "svd", "format 1 knew the svd bottleneck only"
    (saved / "sft_split.json").write_text(json.dumps({"format": version, **{k: meta[k] for k in keys}}, indent=2))


def _trained_pair(model: torch.nn.Module, **split: object) -> tuple[torch.nn.Module, torch.Tensor]:
    """``(merge(edge, cloud), the pair's eval logits)`` after one SGD step, so no weight is as initialised."""
    edge, cloud = split_model(model.train(), at=1, **split)
    batch = _tiny_batch()
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters()], lr=0.5)
    cloud(edge(**batch), labels=LABELS).loss.backward()
    opt.step()
    edge.eval(), cloud.eval()
    with torch.no_grad():
        logits = cloud(edge(**batch)).logits
    return merge(edge, cloud).eval(), logits


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**_tiny_batch()).logits


# ----------------------------------------------------------------------------- save_split_model


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_bottleneck_export_refuses_plain_auto_loading_and_loads_with_trust_remote_code(family, tmp_path):
    merged, want = _trained_pair(_tiny(family), mode="bottleneck", rank=4)
    saved = sft_kernels.save_split_model(merged, tmp_path / f"{family}-r4")
    config = json.loads((saved / "config.json").read_text())
    assert config["model_type"] == "sft_kernels_split" and config["architectures"] == ["SftKernelsSplitModel"]
    auto = transformers.AutoModelForSequenceClassification
    for load in (transformers.AutoConfig.from_pretrained, auto.from_pretrained):
        with pytest.raises(ValueError, match=r"(?s)contains custom code.*trust_remote_code=True"):
            load(str(saved))
    reference = sft_kernels.load_split_model(saved)
    torch.testing.assert_close(_logits(reference), want, atol=1e-5, rtol=0)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(saved), trust_remote_code=True)
    assert type(loaded) is type(reference) and not loaded.training
    assert isinstance(loaded.base_model.get_submodule("h.1" if family == "gpt2" else "encoder.layer.1"),
                      BottleneckLayer)
    torch.testing.assert_close(_logits(loaded), _logits(reference), atol=1e-5, rtol=0)
    half = transformers.AutoModelForSequenceClassification.from_pretrained(str(saved), trust_remote_code=True,
                                                                             dtype=torch.float64)
    assert next(half.parameters()).dtype == torch.float64
    with pytest.raises(TypeError, match=r"does not take \['device_map'\]"):
        transformers.AutoModelForSequenceClassification.from_pretrained(str(saved), trust_remote_code=True,
                                                                        device_map="cpu")


def test_layer_split_export_is_an_ordinary_transformers_model(tmp_path):
    merged, want = _trained_pair(_tiny("bert"), mode="layer")
    assert type(merged) is transformers.BertForSequenceClassification
    merged.save_pretrained(tmp_path / "layer")
    assert json.loads((tmp_path / "layer" / "config.json").read_text())["model_type"] == "bert"
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "layer")).eval()
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_still_load(version, tmp_path):
    merged, want = _trained_pair(_tiny("roberta"), mode="bottleneck", rank=3)
    saved = sft_kernels.save_split_model(merged, tmp_path / "old")
    as_old_format(saved, version)
    torch.testing.assert_close(_logits(sft_kernels.load_split_model(saved)), want, atol=1e-5, rtol=0)


def test_format_3_config_must_carry_the_split_model_type(tmp_path):
    saved = sft_kernels.save_split_model(_trained_pair(_tiny("bert"), mode="bottleneck", rank=4)[0], tmp_path)
    meta = json.loads((saved / "sft_split.json").read_text())
    (saved / "sft_split.json").write_text(json.dumps({**meta, "base_model_type": "no-such-type"}))
    with pytest.raises(ValueError, match="base_model_type 'no-such-type' is not a model type"):
        sft_kernels.load_split_model(saved)
    (saved / "sft_split.json").write_text(json.dumps(meta))
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type must be 'sft_kernels_split'"):
        sft_kernels.load_split_model(saved)


# ----------------------------------------------------------------------------- SimulatedSplit


def _rows(n: int = 8) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 100, (9,), generator=g), "attention_mask": torch.ones(9, dtype=torch.long),
             "labels": torch.tensor(i % 3)} for i in range(n)]


def _collate(items: list[dict]) -> dict:
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _pair_logits(sim: SimulatedSplit) -> torch.Tensor:
    """The split pair's eval logits without codecs: what the merged model must compute."""
    sim.eval()
    with torch.no_grad():
        out = sim.cloud(sim.edge(**_tiny_batch()))
        return (sim.top(out) if sim.top is not None else out).logits


def test_simulated_split_save_pretrained_after_a_trainer_run(tmp_path):
    model = _tiny("bert")
    sim = SimulatedSplit(model, at=1, mode="bottleneck", rank=4)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                          learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                          seed=0, remove_unused_columns=False, disable_tqdm=True)
    trainer = transformers.Trainer(model=sim, args=args, train_dataset=_rows(), data_collator=_collate)
    trainer.train()
    assert trainer.state.global_step == 2
    # Trainer.save_model: this module's state dict only (what resume_from_checkpoint reads), no config
    trainer.save_model(str(tmp_path / "trainer"))
    keys = load_file(str(tmp_path / "trainer" / "model.safetensors")).keys()
    assert {k.split(".")[0] for k in keys} == {"edge", "cloud"} and not (tmp_path / "trainer" / "config.json").exists()
    saved = sim.save_pretrained(tmp_path / "model")
    assert not any(isinstance(m, BottleneckLayer) for m in model.modules())  # the split is left as it was
    want = _pair_logits(sim)
    torch.testing.assert_close(_logits(sft_kernels.load_split_model(saved)), want, atol=1e-5, rtol=0)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(saved), trust_remote_code=True)
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("split", [dict(mode="layer"), dict(mode="bottleneck", rank=4, u_split=True)],
                         ids=["layer", "usplit"])
def test_simulated_split_save_pretrained_layer_and_usplit(split, tmp_path):
    sim = SimulatedSplit(_tiny("gpt2"), at=1, **split)
    opt = torch.optim.SGD(sim.parameters(), lr=0.5)
    batch = _tiny_batch()
    sim.train()(**batch, labels=LABELS).loss.backward()
    opt.step()
    saved = sim.save_pretrained(tmp_path / "model")
    want = _pair_logits(sim)
    if split["mode"] == "layer":
        loaded = transformers.AutoModelForSequenceClassification.from_pretrained(str(saved)).eval()
    else:
        loaded = sft_kernels.load_split_model(saved)
    torch.testing.assert_close(_logits(loaded), want, atol=1e-5, rtol=0)
