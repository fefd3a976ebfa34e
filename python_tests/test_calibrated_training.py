"""The calibrated bottleneck trains at learning rates the paper's split cannot take.

One fixed SST-2 batch of 32, twelve AdamW steps at lr 1e-3, MiniLM split at layer 3, rank 4,
int8 both ways: the unsplit model takes the loss to under 5 % of its first value and the
calibrated split to under 25 % (measured: 0.11 % and 0.21 %); the paper's ``init="svd"`` split
stays at ~99 % on this batch (not asserted: it is the motivation, not a property to keep).
"""
from __future__ import annotations

import pytest
import torch

from sft_kernels import SimulatedSplit
from sft_kernels.data import batches, load_task
from sft_kernels.split import CalibrationOptions, minilm_classifier


@pytest.fixture(scope="module")
def data():
    _, ds = load_task("SST-2", "train", limit=288)
    tok, _ = minilm_classifier(2, seed=0)
    batch = next(batches(tok, ds.select(range(32)), 32, max_length=64))
    return tok, batch, list(ds.select(range(32, 288))["text_a"])  # calibration: 256 other sentences, unlabelled


def _losses(model: torch.nn.Module, batch: dict, steps: int = 12) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out = []
    for _ in range(steps):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
    return out


@pytest.mark.parametrize("kind,bound", [("unsplit", 0.05), ("calibrated", 0.25)])
def test_fixed_batch_at_lr_1e3(data, kind, bound):
    tok, batch, calibration = data
    torch.manual_seed(0)
    _, model = minilm_classifier(2, seed=0)
    if kind == "calibrated":
        model = SimulatedSplit(model, at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr",
                               init="calibrated", calibration=calibration, tokenizer=tok,
                               calibration_options=CalibrationOptions(progress=False))
    losses = _losses(model, batch)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < bound * losses[0], losses
