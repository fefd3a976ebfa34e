"""Shared fixtures: deterministic seeds and real MiniLM activations (loaded once per session)."""
from __future__ import annotations

import pytest
import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft.*)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def minilm_activations() -> torch.Tensor:
    """Layer-3 MiniLM hidden states of 48 SST-2 dev sentences (real tokens only), fp32 ``(T, 384)``."""
    from sft_kernels.data import read_sentences
    from sft_kernels.split import boundary_activations

    return boundary_activations(read_sentences("SST-2", "dev", limit=48), layer=3)
