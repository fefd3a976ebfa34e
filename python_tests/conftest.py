"""Shared fixtures: deterministic seeds, the device axis of the op tests, real MiniLM activations.

Device axis: a test that takes the ``device`` fixture runs once per entry of
:data:`DEVICES`: on the CPU always, and on CUDA when a device is present (shown
as skipped otherwise), as in pytorch/extension-cpp's tests.  A test marked
``@pytest.mark.cuda`` runs only on a CUDA machine.
"""
from __future__ import annotations

import pytest
import torch

import sft_kernels  # noqa: F401  (registers torch.ops.sft.*)

HAS_CUDA = torch.cuda.is_available()
_NO_CUDA = "no CUDA device"
#: The devices every op test runs on.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not HAS_CUDA, reason=_NO_CUDA))]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"cuda: needs a CUDA device (skipped with '{_NO_CUDA}' without one)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(pytest.mark.skip(reason=_NO_CUDA))


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """The device an op test runs on (see :data:`DEVICES`)."""
    return request.param


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
