"""pytest-benchmark cases for the sft ops (``make bench``; not part of ``make test``).

Each group times our op next to the PyTorch composite a user would write, on the
same tensor, so ``--benchmark-group-by=group`` shows them side by side.
"""
from __future__ import annotations

import pytest
import torch

import sft_kernels  # noqa: F401
from sft_kernels import ops

from common import baseline_lowrank_encode, composite_quantize, decaying  # noqa: E402

pytestmark = pytest.mark.benchmark


@pytest.fixture(scope="module")
def x16k():
    return torch.randn(16384, 768)


@pytest.mark.benchmark(group="quantize int8 16384x768 fp32")
def test_clone(benchmark, x16k):
    benchmark(x16k.clone)


@pytest.mark.benchmark(group="quantize int8 16384x768 fp32")
def test_sft_quantize_int8(benchmark, x16k):
    benchmark(ops.quantize, x16k, 8, 64, False, 0)


@pytest.mark.benchmark(group="quantize int8 16384x768 fp32")
def test_composite_quantize_int8(benchmark, x16k):
    benchmark(composite_quantize, x16k)


@pytest.fixture(scope="module")
def x4k():
    return decaying(4096, 768)


@pytest.mark.benchmark(group="lowrank r=8 int8 4096x768 fp32")
def test_sft_lowrank_quantize(benchmark, x4k):
    benchmark(ops.lowrank_quantize, x4k, 8, 8, 1, 8, 64, False, 0)


@pytest.mark.benchmark(group="lowrank r=8 int8 4096x768 fp32")
def test_svd_lowrank_composite(benchmark, x4k):
    benchmark(baseline_lowrank_encode, x4k, 8, 2)
