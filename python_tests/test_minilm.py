"""Low-rank kernels on real MiniLM boundary activations, and the demo that reports them."""
from __future__ import annotations

import pytest
import torch

from sft_kernels import ops, reference as R
from sft_kernels.runtime import codec_report
from sft_kernels.split import load_minilm, minilm_path


def _rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("rank,iters", [(4, 1), (8, 1), (8, 2), (32, 1)])
def test_lowrank_error_on_minilm_within_5pct_of_svd_lowrank(minilm_activations, rank, iters):
    x = minilm_activations
    oversample = 8
    k = rank + oversample
    ours, base = [], []
    for seed in range(5):
        p, q = ops.lowrank(x, rank, oversample, iters, seed)
        ours.append(_rel(p @ q.T, x))
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(x.float(), q=k, niter=iters)
        base.append(_rel((u[:, :rank] * s[:rank]) @ v[:, :rank].T, x))
    mean_ours, mean_base = sum(ours) / 5, sum(base) / 5
    assert mean_ours <= 1.05 * mean_base, (mean_ours, mean_base)


def test_lowrank_on_minilm_matches_reference(minilm_activations):
    x = minilm_activations
    p, q = ops.lowrank(x, 8, 8, 1, 3)
    rp, rq = R.lowrank(x, 8, 8, 1, 3)
    assert _rel(p @ q.T, rp @ rq.T) < 1e-3


def test_lowrank_quantize_on_minilm_matches_reference(minilm_activations):
    x = minilm_activations
    n, h = x.shape
    out = ops.lowrank_quantize(x, 8, 8, 1, 8, 64, False, 5)
    y = ops.lowrank_dequantize(*out, n, h, 8, 8, 64, torch.float32)
    ref = R.lowrank_dequantize(*R.lowrank_quantize(x, 8, 8, 1, 8, 64, False, 5), n, h, 8, 8, 64, torch.float32)
    assert _rel(y, ref) < 2e-2
    # int8 factors add little error to the rank-8 approximation itself
    p, q = ops.lowrank(x, 8, 8, 1, 5)
    assert _rel(y, x) <= _rel(p @ q.T, x) * 1.01


def test_codec_report_on_minilm(minilm_activations):
    rows = {r.spec: r for r in codec_report(minilm_activations, ["none", "int8", "lowrank:r=8+int8"])}
    assert rows["none"].reduction == 1.0 and rows["none"].rel_error == 0.0
    assert rows["int8"].reduction > 3.5 and rows["int8"].rel_error < 0.02
    assert rows["lowrank:r=8+int8"].reduction > 90
    assert rows["lowrank:r=8+int8"].rel_error < 1.0


def test_missing_model_dir_raises_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model at"):
        minilm_path(tmp_path)
    with pytest.raises(FileNotFoundError, match="no model at"):
        load_minilm(tmp_path / "absent")
