"""Tests of sft_kernels.split: split_model (layer and bottleneck), adapters, BoundaryOutput.

Tolerances: fp32 eval; a layer split is bitwise the same computation (checked to 1e-5);
full-rank bottlenecks go through a randomized SVD, so 1e-4.
"""
from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import transformers

import sft_kernels
from sft_kernels import SimulatedSplit
from sft_kernels.split import BoundaryOutput, CloudModel, EdgeModel, merge, split_model
from sft_kernels.split.adapters import BottleneckLayer

SENTENCES = ["a gripping, funny film", "dull.", "the plot never quite comes together, sadly", "superb acting"]


@pytest.fixture(scope="session")
def minilm():
    from sft_kernels.split import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def minilm_batch(minilm):
    tok, _ = minilm
    return dict(tok(SENTENCES, padding=True, return_tensors="pt"))


ENCODERS = ["bert", "roberta", "distilbert"]
DECODERS = ["gpt2", "llama", "qwen2", "mistral"]
#: Where layer 1 sits in each family's base model.
_LAYER = {"bert": "encoder.layer.1", "roberta": "encoder.layer.1", "distilbert": "transformer.layer.1",
          "gpt2": "h.1", "llama": "layers.1", "qwen2": "layers.1", "mistral": "layers.1"}


def _config(family: str, layers: int = 3) -> transformers.PretrainedConfig:
    """Tiny random-init config: hidden 32, 4 heads, vocab 100; decoders pad with id 0."""
    kw = dict(vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=64, num_labels=3)
    dec = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "bert":
        return transformers.BertConfig(**kw)
    if family == "roberta":
        return transformers.RobertaConfig(**kw)
    if family == "distilbert":
        return transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=64, num_labels=3)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=layers, n_head=4, n_positions=64,
                                       num_labels=3, **dec)
    if family == "llama":
        return transformers.LlamaConfig(**kw, num_key_value_heads=2, **dec)
    if family == "qwen2":  # layers 1.. use sliding-window attention (window 4 < sequence 9)
        return transformers.Qwen2Config(**kw, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                                        max_window_layers=1, **dec)
    if family == "mistral":
        return transformers.MistralConfig(**kw, num_key_value_heads=2, sliding_window=4, **dec)
    raise AssertionError(family)


def _tiny(family: str, head: bool = True, layers: int = 3) -> torch.nn.Module:
    cfg = _config(family, layers)
    auto = transformers.AutoModelForSequenceClassification if head else transformers.AutoModel
    return auto.from_config(cfg).eval()


@pytest.fixture(scope="session")
def minilm_classifier(minilm):
    """MiniLM's pretrained encoder under a fresh 2-class head (``BertForSequenceClassification``)."""
    from sft_kernels.split import minilm_classifier

    return minilm_classifier(num_labels=2, minilm=minilm)[1].eval()


def _tiny_batch(lengths=(7, 4, 9)) -> dict:
    g = torch.Generator().manual_seed(1)
    t = max(lengths)
    ids = torch.randint(3, 100, (len(lengths), t), generator=g)
    mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}  # padded with id 0 (the decoders' pad_token_id)


def _real(x: torch.Tensor, batch: dict) -> torch.Tensor:
    return x[batch["attention_mask"].bool()]


# ----------------------------------------------------------------------------- layer split


@torch.no_grad()
def test_layer_split_minilm_matches_unsplit(minilm, minilm_batch):
    _, model = minilm
    ref = model(**minilm_batch)
    for k in (1, 3, 5):
        edge, cloud = split_model(copy.deepcopy(model), at=k)
        b = edge(**minilm_batch)
        out = cloud(b)
        n_real = int(minilm_batch["attention_mask"].sum())
        assert b.hidden.shape == (n_real, 384) and b.lengths.dtype == torch.int32
        torch.testing.assert_close(_real(out.last_hidden_state, minilm_batch),
                                   _real(ref.last_hidden_state, minilm_batch), atol=1e-5, rtol=0)
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
@torch.no_grad()
def test_layer_split_tiny_classifier_matches_unsplit_at_every_k(family):
    model = _tiny(family)
    batch = _tiny_batch()
    labels = torch.tensor([0, 2, 1])
    ref = model(**batch, labels=labels)
    for k in range(1, model.config.num_hidden_layers):
        edge, cloud = split_model(copy.deepcopy(model), at=k)
        out = cloud(edge(**batch), labels=labels)
        assert type(out) is type(ref)
        torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=0)


@torch.no_grad()
def test_boundary_output_round_trips_through_tensors():
    model = _tiny("bert")
    batch = _tiny_batch()
    edge, cloud = split_model(model, at=2)
    b = edge(**batch)
    d = b.to_tensors()
    assert set(d) == {"hidden", "lengths", "seq_len"}
    assert d["lengths"].tolist() == [7, 4, 9] and d["seq_len"].tolist() == [9]
    assert b.aux_nbytes == 2 * 3 + 2  # int16 lengths and padded length
    b2 = BoundaryOutput.from_tensors({k: v.clone() for k, v in d.items()})
    torch.testing.assert_close(cloud(b2).logits, cloud(b).logits, atol=0, rtol=0)
    with pytest.raises(KeyError, match="missing keys \\['lengths'\\]"):
        BoundaryOutput.from_tensors({"hidden": d["hidden"], "seq_len": d["seq_len"]})


def test_split_trains_both_parts():
    model = _tiny("bert").train()
    edge, cloud = split_model(model, at=1)
    out = cloud(edge(**_tiny_batch()), labels=torch.tensor([0, 2, 1]))
    out.loss.backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0
    assert model.classifier.weight.grad.abs().sum() > 0
    edge_ids = {id(p) for p in edge.parameters()}
    assert edge_ids.isdisjoint(id(p) for p in cloud.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in edge.parameters()) + sum(p.numel() for p in cloud.parameters()) == n_all


# ----------------------------------------------------------------------------- bottleneck split


@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
@torch.no_grad()
def test_bottleneck_full_rank_with_links_matches_unsplit(family):
    model = _tiny(family)
    batch = _tiny_batch()
    ref = model(**batch)
    for k in range(1, model.config.num_hidden_layers):
        edge, cloud = split_model(copy.deepcopy(model), at=k, mode="bottleneck", rank=32, eliminate_links=False)
        b = edge(**batch)
        assert b.hidden.shape == (20, 32) and b.residual.shape == (20, 32)
        assert set(b.to_tensors()) >= {"hidden", "residual", "lengths", "seq_len"}
        torch.testing.assert_close(cloud(b).logits, ref.logits, atol=1e-4, rtol=0)


@torch.no_grad()
def test_bottleneck_full_rank_with_links_matches_unsplit_minilm(minilm, minilm_batch):
    _, model = minilm
    ref = model(**minilm_batch)
    edge, cloud = split_model(copy.deepcopy(model), at=4, mode="bottleneck", rank=384, eliminate_links=False)
    out = cloud(edge(**minilm_batch))
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-4, rtol=0)
    torch.testing.assert_close(_real(out.last_hidden_state, minilm_batch),
                               _real(ref.last_hidden_state, minilm_batch), atol=1e-4, rtol=0)


def _without_ffn_residual(model: torch.nn.Module, k: int, weight: torch.Tensor | None = None) -> torch.nn.Module:
    """A copy of ``model`` whose layer-k FFN has no residual ("+ h" zeroed), optionally with W1 replaced."""
    ref = copy.deepcopy(model)
    if isinstance(ref.base_model, transformers.DistilBertModel):
        layer = ref.base_model.transformer.layer[k]
        if weight is not None:
            layer.ffn.lin1.weight.data.copy_(weight)
        seen = {}
        layer.ffn.register_forward_hook(lambda mod, args, out: seen.__setitem__("ffn", out))
        layer.output_layer_norm.register_forward_pre_hook(lambda mod, args: (seen.pop("ffn"),))
        return ref
    layer = ref.base_model.encoder.layer[k]
    if weight is not None:
        layer.intermediate.dense.weight.data.copy_(weight)
    layer.output.register_forward_pre_hook(lambda mod, args: (args[0], torch.zeros_like(args[1])))
    return ref


@pytest.mark.parametrize("family", ENCODERS)
@torch.no_grad()
def test_bottleneck_eliminated_links_equals_recomputation_tiny(family):
    model = _tiny(family)
    batch = _tiny_batch()
    edge, cloud = split_model(copy.deepcopy(model), at=1, mode="bottleneck", rank=32)
    b = edge(**batch)
    assert b.residual is None and b.to_tensors().keys() == {"hidden", "lengths", "seq_len"}
    want = _without_ffn_residual(model, 1)(**batch).logits
    torch.testing.assert_close(cloud(b).logits, want, atol=1e-4, rtol=0)
    assert (cloud(b).logits - model(**batch).logits).abs().max() > 1e-3  # the link really is gone
    # rank 4: the recomputation uses W1 = U_r Σ_r V_rᵀ taken from the split's factors
    edge, cloud = split_model(copy.deepcopy(model), at=1, mode="bottleneck", rank=4)
    b = edge(**batch)
    assert b.hidden.shape == (20, 4)
    want = _without_ffn_residual(model, 1, cloud.factor.weight @ edge.factor.weight)(**batch).logits
    torch.testing.assert_close(cloud(b).logits, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_bottleneck_rank4_minilm_equals_recomputation_and_is_96x_smaller(minilm, minilm_batch):
    _, model = minilm
    edge, cloud = split_model(copy.deepcopy(model), at=3, mode="bottleneck", rank=4)
    b = edge(**minilm_batch)
    w1 = cloud.factor.weight @ edge.factor.weight  # U_r Σ_r V_rᵀ
    ref = _without_ffn_residual(model, 3, w1)(**minilm_batch)
    out = cloud(b)
    torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-5, rtol=0)
    torch.testing.assert_close(_real(out.last_hidden_state, minilm_batch),
                               _real(ref.last_hidden_state, minilm_batch), atol=1e-4, rtol=0)
    layer_b = split_model(copy.deepcopy(model), at=3)[0](**minilm_batch)
    per_token = lambda t: t.shape[1] * t.element_size()  # noqa: E731
    assert b.hidden.dtype == layer_b.hidden.dtype == torch.float32
    assert b.hidden.shape[0] == layer_b.hidden.shape[0]
    assert per_token(layer_b.hidden) == 96 * per_token(b.hidden)


def test_bottleneck_factors_match_full_svd_and_are_trainable(minilm):
    _, model = minilm
    w = model.encoder.layer[2].intermediate.dense.weight.detach()
    edge, cloud = split_model(copy.deepcopy(model), at=2, mode="bottleneck", rank=8, seed=3)
    # edge weight = Σ_r V_rᵀ with orthonormal V_r: its row norms are the singular values
    s = edge.factor.weight.detach().norm(dim=1)
    s_full = torch.linalg.svdvals(w)[:8]
    assert ((s - s_full).abs() / s_full).max() < 1e-3
    u = cloud.factor.weight.detach()
    torch.testing.assert_close(u.t() @ u, torch.eye(8), atol=1e-4, rtol=0)
    torch.testing.assert_close(cloud.factor.bias, model.encoder.layer[2].intermediate.dense.bias, atol=0, rtol=0)
    assert all(p.requires_grad for p in (edge.factor.weight, cloud.factor.weight, cloud.factor.bias))
    assert any(p is edge.factor.weight for p in edge.parameters())
    assert any(p is cloud.factor.weight for p in cloud.parameters())
    edge2, cloud2 = split_model(copy.deepcopy(model), at=2, mode="bottleneck", rank=8, seed=3)
    assert torch.equal(edge2.factor.weight, edge.factor.weight) and torch.equal(cloud2.factor.weight, u)
    # W1 is replaced by the factors: it belongs to neither part
    w1 = model.encoder.layer[2].intermediate.dense.weight
    assert all(p.data_ptr() != w1.data_ptr() for p in [*edge.parameters(), *cloud.parameters()])


def test_bottleneck_factor_singular_values_match_full_svd_on_every_minilm_layer(minilm):
    _, model = minilm
    for k in range(1, model.config.num_hidden_layers):
        s_full = torch.linalg.svdvals(model.encoder.layer[k].intermediate.dense.weight.detach())[:4]
        edge, _ = split_model(copy.deepcopy(model), at=k, mode="bottleneck", rank=4)
        s = edge.factor.weight.detach().norm(dim=1)
        assert ((s - s_full).abs() / s_full).max() < 1e-3, k


def test_bottleneck_gradients_reach_both_factors():
    model = _tiny("bert").train()
    edge, cloud = split_model(model, at=1, mode="bottleneck", rank=4)
    cloud(edge(**_tiny_batch()), labels=torch.tensor([0, 2, 1])).loss.backward()
    assert edge.factor.weight.grad.abs().sum() > 0 and cloud.factor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_decoder_base_model_layer_split_matches_on_real_tokens(family):
    model = _tiny(family, head=False)
    batch = _tiny_batch()
    ref = model(**batch).last_hidden_state
    edge, cloud = split_model(copy.deepcopy(model), at=2)
    out = cloud(edge(**batch)).last_hidden_state
    torch.testing.assert_close(_real(out, batch), _real(ref, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
@torch.no_grad()
def test_sliding_window_masks_are_rebuilt_on_the_cloud(family):
    model = _tiny(family)
    batch = _tiny_batch()
    no_window = copy.deepcopy(model)
    if family == "qwen2":
        no_window.config.layer_types = ["full_attention"] * 3
    else:
        no_window.config.sliding_window = None
    edge, cloud = split_model(copy.deepcopy(model), at=1)
    logits = cloud(edge(**batch)).logits
    torch.testing.assert_close(logits, model(**batch).logits, atol=1e-5, rtol=0)
    assert (logits - no_window(**batch).logits).abs().max() > 1e-2  # the window (4 < 9 tokens) matters


def _mlp_without_residual(model: torch.nn.Module, family: str, k: int, w: torch.Tensor) -> torch.nn.Module:
    """A copy of decoder ``model`` whose layer-k MLP up-projection is ``w`` and whose "+ x" around it is gone.

    Uses only the transformers modules: the layer's output is replaced by its MLP's output via hooks.
    """
    ref = copy.deepcopy(model)
    base = ref.base_model
    layer = base.h[k] if family == "gpt2" else base.layers[k]
    with torch.no_grad():
        if family == "gpt2":
            layer.mlp.c_fc.weight.copy_(w.t())
        else:
            gate, up = w.chunk(2)
            layer.mlp.gate_proj.weight.copy_(gate)
            layer.mlp.up_proj.weight.copy_(up)
    seen = {}
    layer.mlp.register_forward_hook(lambda mod, args, out: seen.__setitem__("mlp", out))
    layer.register_forward_hook(lambda mod, args, out: seen.pop("mlp"))
    return ref


@pytest.mark.parametrize("family", DECODERS)
@torch.no_grad()
def test_decoder_bottleneck_eliminated_links_equals_recomputation(family):
    model = _tiny(family)
    batch = _tiny_batch()
    edge, cloud = split_model(copy.deepcopy(model), at=1, mode="bottleneck", rank=4)
    b = edge(**batch)
    assert b.hidden.shape == (20, 4) and b.residual is None
    w = cloud.factor.weight @ edge.factor.weight
    want = _mlp_without_residual(model, family, 1, w)(**batch).logits
    torch.testing.assert_close(cloud(b).logits, want, atol=1e-5, rtol=0)


@torch.no_grad()
def test_decoder_pool_index_and_padding_errors():
    edge, cloud = split_model(_tiny("gpt2"), at=1)
    batch = _tiny_batch()
    b = edge(**batch)
    assert b.pool_index.tolist() == [6, 3, 8] and b.pool_index.dtype == torch.int32
    assert set(b.to_tensors()) == {"hidden", "lengths", "seq_len", "pool_index"}
    assert b.aux_nbytes == 2 * 3 + 2 + 2 * 3  # int16 lengths, padded length, pooling positions
    with pytest.raises(ValueError, match="boundary pool_index: expected shape \\(3,\\)"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len))
    bad = dict(batch, input_ids=batch["input_ids"] + 5 * (1 - batch["attention_mask"]))  # pads are not pad_token_id
    with pytest.raises(ValueError, match=r"pool_index: expected positions of real tokens"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len, pool_index=b.lengths.clone()))
    assert split_model(_tiny("gpt2", head=False), at=1)[0](**batch).pool_index is None  # no head: nothing to pool
    with pytest.raises(ValueError, match="pool from a padding position"):
        edge(**bad)
    with pytest.raises(ValueError, match="right-padded"):
        edge(input_ids=batch["input_ids"].flip(1), attention_mask=batch["attention_mask"].flip(1))


def test_merge_layer_split_returns_the_trained_model():
    model = _tiny("bert").train()
    batch, labels = _tiny_batch(), torch.tensor([0, 2, 1])
    edge, cloud = split_model(model, at=2)
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters()], lr=0.5)
    cloud(edge(**batch), labels=labels).loss.backward()
    opt.step()
    merged = merge(edge, cloud)
    assert merged is model
    edge.eval(), cloud.eval(), merged.eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, cloud(edge(**batch)).logits, atol=1e-5, rtol=0)
    split_model(merged, at=1)  # merged models split again


def test_merge_layer_split_saves_and_loads_with_transformers(tmp_path):
    model = _tiny("gpt2")
    batch = _tiny_batch()
    edge, cloud = split_model(model, at=1)
    with torch.no_grad():
        split_logits = cloud(edge(**batch)).logits
    merged = merge(edge, cloud)
    assert type(merged) is transformers.GPT2ForSequenceClassification
    merged.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, split_logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("eliminate_links", [True, False])
@pytest.mark.parametrize("family", [*ENCODERS, *DECODERS])
def test_merge_bottleneck_gives_the_split_pairs_logits(family, eliminate_links):
    model = _tiny(family).train()
    batch, labels = _tiny_batch(), torch.tensor([0, 2, 1])
    edge, cloud = split_model(model, at=1, mode="bottleneck", rank=4, eliminate_links=eliminate_links)
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters()], lr=0.5)
    cloud(edge(**batch), labels=labels).loss.backward()  # trained factors, not the SVD's
    opt.step()
    edge.eval(), cloud.eval()
    with torch.no_grad():
        split = cloud(edge(**batch), labels=labels)
        merged = merge(edge, cloud).eval()
        assert merged is model and isinstance(model.base_model.get_submodule(_LAYER[family]), BottleneckLayer)
        out = merged(**batch, labels=labels)
    assert type(out) is type(split)
    torch.testing.assert_close(out.logits, split.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, split.loss, atol=1e-5, rtol=0)
    assert not any("intermediate.dense" in k or "c_fc" in k or "lin1" in k or "gate_proj" in k
                   for k in merged.state_dict() if ".1." in k)  # layer K's dense up-projection is gone
    with pytest.raises(ValueError, match="merged bottleneck model"):
        split_model(merged, at=2)


def test_merge_bottleneck_without_links_differs_from_with_links():
    batch = _tiny_batch()
    logits = []
    for links in (True, False):
        edge, cloud = split_model(_tiny("bert"), at=1, mode="bottleneck", rank=4, eliminate_links=links)
        with torch.no_grad():
            logits.append(merge(edge, cloud)(**batch).logits)
    assert not torch.allclose(logits[0], logits[1], atol=1e-3)


def test_merge_refuses_foreign_parts():
    edge, cloud = split_model(_tiny("bert"), at=1, mode="bottleneck", rank=4)
    edge2, _ = split_model(_tiny("bert"), at=1)
    with pytest.raises(ValueError, match="pair returned by one split_model call"):
        merge(edge2, cloud)
    with pytest.raises(ValueError, match="pair returned by one split_model call"):
        merge(cloud, edge)


# ----------------------------------------------------------------------------- export


def _trained_bottleneck_merge(model: torch.nn.Module, batch: dict, labels: torch.Tensor, steps: int = 2,
                              **split_kw) -> tuple[torch.nn.Module, torch.Tensor]:
    """Train a bottleneck split a few SGD steps, merge it; returns ``(merged, split pair's eval logits)``."""
    edge, cloud = split_model(model.train(), mode="bottleneck", **split_kw)
    init = edge.factor.weight.detach().clone()
    opt = torch.optim.SGD([*edge.parameters(), *cloud.parameters()], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        cloud(edge(**batch), labels=labels).loss.backward()
        opt.step()
    assert not torch.equal(edge.factor.weight, init)
    edge.eval(), cloud.eval()
    with torch.no_grad():
        logits = cloud(edge(**batch)).logits
    return merge(edge, cloud).eval(), logits


def test_save_and_load_merged_minilm_bottleneck(minilm_classifier, minilm_batch, tmp_path):
    labels = torch.tensor([1, 0, 0, 1])
    merged, split_logits = _trained_bottleneck_merge(copy.deepcopy(minilm_classifier), minilm_batch, labels,
                                                     at=3, rank=4, eliminate_links=True)
    out = sft_kernels.save_split_model(merged, tmp_path / "m")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "sft_kernels_split.py",
                                                     "sft_split.json"]
    loaded = sft_kernels.load_split_model(out)
    assert type(loaded) is transformers.BertForSequenceClassification and not loaded.training
    assert loaded.bert.encoder.layer[3].rank == 4 and not loaded.bert.encoder.layer[3].keep_link
    with torch.no_grad():
        torch.testing.assert_close(loaded(**minilm_batch).logits, split_logits, atol=1e-5, rtol=0)


def test_save_and_load_merged_decoder_bottleneck(tmp_path):
    batch, labels = _tiny_batch(), torch.tensor([0, 2, 1])
    merged, split_logits = _trained_bottleneck_merge(_tiny("qwen2"), batch, labels, at=2, rank=3,
                                                     eliminate_links=False)
    loaded = sft_kernels.load_split_model(sft_kernels.save_split_model(merged, tmp_path))
    assert loaded.model.layers[2].keep_link
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, split_logits, atol=1e-5, rtol=0)


def test_load_split_model_bad_input(tmp_path):
    import json

    edge, cloud = split_model(_tiny("gpt2"), at=1, mode="bottleneck", rank=4)
    saved = sft_kernels.save_split_model(merge(edge, cloud), tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="nowhere/config.json is missing"):
        sft_kernels.load_split_model(tmp_path / "nowhere")
    (saved / "model.safetensors").rename(tmp_path / "w")
    with pytest.raises(FileNotFoundError, match=re.escape(str(saved / "model.safetensors"))):
        sft_kernels.load_split_model(saved)
    (tmp_path / "w").rename(saved / "model.safetensors")
    meta = json.loads((saved / "sft_split.json").read_text())
    for key, value, match in [("rank", 5, "does not match"), ("rank", 0, "rank=0 is not in"),
                              ("at", 7, "at=7 is not in"), ("family", "bert", "family 'bert' does not match"),
                              ("model_class", "os", "not a transformers model class"),
                              ("eliminate_links", "yes", "eliminate_links must be a bool")]:
        (saved / "sft_split.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=match):
            sft_kernels.load_split_model(saved)
    with pytest.raises(ValueError, match="save it with model.save_pretrained"):
        sft_kernels.save_split_model(_tiny("bert"), tmp_path / "layer")


# ----------------------------------------------------------------------------- bad input


def test_bad_split_arguments():
    model = _tiny("bert")
    with pytest.raises(ValueError, match=r"at must be an int in \[1, 2\]"):
        split_model(copy.deepcopy(model), at=0)
    with pytest.raises(ValueError, match=r"at must be an int in \[1, 2\]"):
        split_model(copy.deepcopy(model), at=3)
    for rank in (0, -1, 33):
        with pytest.raises(ValueError, match=r"rank must be an int in \[1, 32\]"):
            split_model(copy.deepcopy(model), at=1, mode="bottleneck", rank=rank)
    with pytest.raises(ValueError, match="rank applies to mode='bottleneck' only"):
        split_model(copy.deepcopy(model), at=1, rank=4)
    with pytest.raises(ValueError, match="mode must be one of"):
        split_model(copy.deepcopy(model), at=1, mode="bogus")


def test_unsupported_architecture_lists_supported_and_the_interface():
    cfg = transformers.ElectraConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, embedding_size=32)
    with pytest.raises(TypeError, match=r"cannot split a ElectraModel.*BertModel.*DistilBertModel.*GPT2Model.*"
                                        r"LlamaModel.*adapters\.base\.Adapter"):
        split_model(transformers.ElectraModel(cfg), at=1)


def test_already_split_model_is_refused():
    model = _tiny("bert")
    edge, cloud = split_model(model, at=1)
    for m in (model, edge, cloud):
        with pytest.raises(ValueError, match="already split"):
            split_model(m, at=1)
    split_model(copy.deepcopy(model), at=2)  # a copy is a new model


@torch.no_grad()
def test_cloud_rejects_wrong_boundary():
    edge, cloud = split_model(_tiny("bert"), at=1)
    b = edge(**_tiny_batch())
    with pytest.raises(ValueError, match=r"expected shape \(20, 32\) torch.float32.*arrived \(20, 16\)"):
        cloud(BoundaryOutput(b.hidden[:, :16], b.lengths, b.seq_len))
    with pytest.raises(ValueError, match=r"expected shape \(20, 32\) torch.float32.*arrived \(20, 32\) torch.float16"):
        cloud(BoundaryOutput(b.hidden.half(), b.lengths, b.seq_len))
    with pytest.raises(ValueError, match=r"expected shape \(19, 32\).*arrived \(20, 32\)"):
        cloud(BoundaryOutput(b.hidden, b.lengths - torch.tensor([1, 0, 0], dtype=torch.int32), b.seq_len))
    with pytest.raises(ValueError, match=r"lengths: expected in \[0, seq_len=8\], arrived \[7, 4, 9\]"):
        cloud(BoundaryOutput(b.hidden, b.lengths, 8))
    with pytest.raises(TypeError, match="expects a BoundaryOutput"):
        cloud(b.to_tensors())
    with pytest.raises(ValueError, match="residual: expected none"):
        cloud(BoundaryOutput(b.hidden, b.lengths, b.seq_len, residual=b.hidden))
    with pytest.raises(ValueError, match="labels given"):
        split_model(_tiny("bert", head=False), at=1)[1](b, labels=torch.tensor([0, 1, 2]))


def test_edge_rejects_left_padding_and_unknown_inputs():
    edge, _ = split_model(_tiny("bert"), at=1)
    batch = _tiny_batch()
    with pytest.raises(ValueError, match="right-padded"):
        edge(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].flip(1))
    with pytest.raises(TypeError, match="unexpected inputs \\['labels'\\]"):
        edge(**batch, labels=torch.tensor([0, 1, 2]))


def test_package_exports_split_model():
    assert sft_kernels.split_model is split_model
    assert sft_kernels.BoundaryOutput is BoundaryOutput
    assert issubclass(EdgeModel, torch.nn.Module) and issubclass(CloudModel, torch.nn.Module)


# ----------------------------------------------------------------------------- SimulatedSplit


def test_simulated_split_training_lowers_loss(minilm_classifier, minilm_batch):
    sim = SimulatedSplit(copy.deepcopy(minilm_classifier), at=3, mode="bottleneck", rank=4)
    labels = torch.tensor([1, 0, 0, 1])
    with torch.no_grad():
        before = sim.eval()(**minilm_batch, labels=labels)
    assert type(before) is transformers.modeling_outputs.SequenceClassifierOutput
    opt = torch.optim.AdamW(sim.parameters(), lr=1e-3)
    sim.train()
    for _ in range(6):
        opt.zero_grad()
        sim(**minilm_batch, labels=labels).loss.backward()
        opt.step()
    with torch.no_grad():
        after = sim.eval()(**minilm_batch, labels=labels)
    assert after.loss < 0.5 * before.loss, (before.loss, after.loss)


@pytest.mark.parametrize("mode,rank,links", [("layer", None, True), ("bottleneck", 4, False), ("bottleneck", 4, True)])
def test_simulated_split_counts_codec_bytes(minilm_classifier, minilm_batch, mode, rank, links):
    sim = SimulatedSplit(copy.deepcopy(minilm_classifier), at=2, mode=mode, rank=rank, eliminate_links=links,
                         fwd_codec="int8", bwd_codec="int8,sr")
    labels = torch.tensor([1, 0, 0, 1])
    out = sim(**minilm_batch, labels=labels)
    b = sim.edge(**minilm_batch)
    crossing = [t for t in (b.hidden, b.residual) if t is not None]
    fwd = sum(sft_kernels.from_spec("int8").encode(t).nbytes for t in crossing)
    assert sim.last_step.aux == sim.aux_bytes == b.aux_nbytes == 2 * 4 + 2  # int16
    assert sim.last_step.labels == 4 * 1  # int8 class ids
    assert sim.bytes_sent == sim.last_step.sent == fwd + b.aux_nbytes + 4 * 1
    outputs = 4 + 4 * 2 * 4  # the loss and the logits come back raw fp32 (general path)
    assert sim.bytes_received == sim.last_step.received == outputs
    out.loss.backward()
    bwd = sum(sft_kernels.from_spec("int8,sr").encode(torch.randn_like(t)).nbytes for t in crossing)
    assert sim.bytes_sent == sim.last_step.sent == fwd + b.aux_nbytes + 4 * 1 + 4  # + the loss's gradient
    assert sim.bytes_received == sim.last_step.received == outputs + bwd
    n = int(minilm_batch["attention_mask"].sum())
    if mode == "layer":  # int8 with a fp32 scale per 64 values: 384 + 24 bytes per token instead of 1536
        assert fwd == n * (384 + 6 * 4)
    sim(**minilm_batch, labels=labels).loss.backward()
    assert sim.bytes_sent == 2 * (fwd + b.aux_nbytes + 4 * 1 + 4) and sim.bytes_received == 2 * (outputs + bwd)


def _example(name: str):
    """Import ``examples/<name>.py`` as a module, with examples/ importable as when run as a script."""
    import importlib
    import sys
    from pathlib import Path

    examples = str(Path(__file__).resolve().parents[1] / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    return importlib.import_module(name)


def test_example_split_finetune_runs_and_cuts_traffic(minilm):
    example = _example("split_finetune")
    r = example.main(steps=4, minilm=minilm)
    assert r["last_loss"] < r["first_loss"]
    # rank-4 int8 code + aux + labels vs fp32 hidden states: far more than 96x less each way
    assert r["sent_per_example"] * 96 < r["fp32_layer_split_per_example"]
    assert r["received_per_example"] * 96 < r["fp32_layer_split_per_example"]


def test_example_trainer_split_runs_with_transformers_trainer(minilm):
    example = _example("trainer_split")
    r = example.main(steps=3, minilm=minilm)
    assert r["steps"] == 3 and math.isfinite(r["loss"]) and r["loss"] > 0
    assert r["sent_bytes"] > 0 and r["received_bytes"] > 0  # the traffic went through the simulated link
    assert 0.0 <= r["train_accuracy"] <= 1.0


def test_readme_merging_example_runs():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Merging and exporting"):]
    code = section[section.index("```python") + len("```python"):]
    exec(compile(code[:code.index("```")], "README.md", "exec"), {})  # asserts merged == split pair
