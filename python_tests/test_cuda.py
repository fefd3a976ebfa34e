"""The CUDA kernels of the ``sft::`` ops (:mod:`sft_kernels._cuda`), checked without a GPU.

CPU CI has no CUDA device, so these tests run the registered reference kernels
on *fake* CUDA tensors (``FakeTensorMode``): no data, but every op's device,
shape, dtype and strides are tracked.  A dispatch mode underneath records the
device of every tensor the kernels create, so a tensor made on the CPU (an
``arange`` without ``device=``) fails the test, and it counts the host syncs
(``.item()``, ``bool(tensor)``).  The numerical CUDA tests live with each op's
tests (``devices`` axis of conftest.py) and run where a GPU is present.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import sft_kernels
from sft_kernels import _cuda
from sft_kernels._cuda import CUDA_OPS, REFERENCE_KERNELS, SlowPathWarning

_SYNC = torch.ops.aten._local_scalar_dense.default


class _RecordDevices(TorchDispatchMode):
    """Records the device of every tensor any aten op returns, and each host sync.

    A host sync reads a tensor's value on the host; fake tensors have none, so it
    answers ``True`` (the reference's only sync asks "is the input all finite?").
    """

    def __init__(self) -> None:
        super().__init__()
        self.off_device: list[str] = []
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _SYNC:
            self.syncs += 1
            return True
        out = func(*args, **(kwargs or {}))
        self.off_device += [f"{func} -> {t.device}" for t in tree_leaves(out)
                            if isinstance(t, torch.Tensor) and t.device.type != "cuda"]
        return out


def _fake(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="cuda")


def _packed(rows: int, cols: int, bits: int, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _fake(rows, -(-cols * bits // 8), dtype=torch.uint8), _fake(rows, -(-cols // block))


# (op, args built inside FakeTensorMode, host syncs allowed): odd sizes, every dtype,
# non-contiguous and empty inputs, both rounding modes and all low-rank paths.
# Only the low-rank ops sync, once, for their non-finite input check.
FAKE_CASES = {
    "quantize-fp32-rn": ("quantize", lambda: (_fake(3, 5, 33), 4, 7, False, 0), 0),
    "quantize-bf16-sr-transposed": ("quantize", lambda: (_fake(90, 64, dtype=torch.bfloat16).t(), 2, 16, True, -1), 0),
    "quantize-fp16-0d": ("quantize", lambda: (_fake(dtype=torch.float16), 8, 4, True, 3), 0),
    "quantize-empty-rows": ("quantize", lambda: (_fake(0, 16), 8, 5, False, 0), 0),
    "dequantize-fp16": ("dequantize", lambda: (*_packed(15, 101, 4, 7), 4, 7, 101, torch.float16), 0),
    "dequantize-transposed": ("dequantize", lambda: (_fake(40, 96, dtype=torch.uint8).t(), _fake(3, 96).t(), 8, 16,
                                                     40, torch.bfloat16), 0),
    "lowrank-iters1": ("lowrank", lambda: (_fake(96, 48), 6, 10, 1, 7), 1),
    "lowrank-single-pass-3d-bf16": ("lowrank", lambda: (_fake(3, 20, 40, dtype=torch.bfloat16), 4, 8, -1, 5), 1),
    "lowrank-empty": ("lowrank", lambda: (_fake(0, 16), 4, 8, 1, 0), 0),
    "randomized_svd-fp16": ("randomized_svd", lambda: (_fake(120, 70, dtype=torch.float16), 8, 8, 2, 3), 1),
    "lowrank_quantize-sr": ("lowrank_quantize", lambda: (_fake(200, 72), 6, 8, 0, 4, 32, True, 5), 1),
    "lowrank_dequantize": ("lowrank_dequantize", lambda: (*_packed(4, 130, 8, 16), *_packed(4, 50, 8, 16), 130, 50,
                                                          4, 8, 16, torch.bfloat16), 0),
}


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", sorted(FAKE_CASES))
def test_reference_kernel_on_fake_cuda_tensors(case):
    """Outputs on cuda, contiguous, with the fake kernel's shapes, dtypes and strides; nothing made off the device."""
    name, build, syncs = FAKE_CASES[case]
    with FakeTensorMode():
        args = build()
        want = _as_tuple(getattr(torch.ops.sft, name)(*args))  # the fake kernel of ops.py
        with _RecordDevices() as rec, warnings.catch_warnings():
            warnings.simplefilter("ignore", SlowPathWarning)
            got = _as_tuple(REFERENCE_KERNELS[name](*args))
    assert rec.off_device == [], f"tensors created off the input's device: {rec.off_device}"
    assert rec.syncs == syncs, f"{rec.syncs} host sync(s), expected {syncs}"
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.device.type == "cuda"
        assert (g.shape, g.dtype, g.stride()) == (w.shape, w.dtype, w.stride())
        assert g.is_contiguous()


def test_reference_kernels_take_exactly_the_schema_arguments():
    for name in CUDA_OPS:
        schema = getattr(torch.ops.sft, name).default._schema
        code = REFERENCE_KERNELS[name].__code__
        assert code.co_varnames[:code.co_argcount] == tuple(a.name for a in schema.arguments), name


def test_reference_path_warns_once(monkeypatch):
    monkeypatch.setattr(_cuda, "_warned", False)
    with FakeTensorMode():
        x = _fake(4, 64)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            REFERENCE_KERNELS["quantize"](x, 8, 64, False, 0)
            REFERENCE_KERNELS["quantize"](x, 8, 64, True, 1)
            REFERENCE_KERNELS["dequantize"](*_packed(4, 64, 8, 64), 8, 64, 64, torch.float16)
    slow = [w for w in seen if issubclass(w.category, SlowPathWarning)]
    assert len(slow) == 1
    assert "slow pure-PyTorch reference" in str(slow[0].message)


def test_outputs_never_alias_inputs():
    """The kernel wrapper clones an output that shares storage with an input (or another output)."""
    x = torch.randn(4, 8)
    out = _cuda._fresh((x, x.t(), x[:2]), (x,))
    storages = {t.untyped_storage()._cdata for t in (x, *out)}
    assert len(storages) == 4 and all(t.is_contiguous() for t in out)
    assert torch.equal(out[1], x.t()) and torch.equal(out[2], x[:2])


# ----------------------------------------------------------------------------- registration


@pytest.mark.parametrize("name", CUDA_OPS)
def test_cuda_kernel_is_registered(name):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sft::{name}", "CUDA")


def test_crc32c_has_no_cuda_kernel():
    """crc32c is a CPU channel primitive."""
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("sft::crc32c", "CUDA")


def test_cuda_backend_reports_every_op():
    backend = sft_kernels.cuda_backend()
    assert tuple(backend) == CUDA_OPS
    assert set(backend.values()) <= {"reference", "fused"}
    assert all(backend[n] == "reference" for n in CUDA_OPS[2:]), "only quantize/dequantize have fused kernels"
    if os.environ.get(_cuda.FUSED_ENV) != "1":
        assert set(backend.values()) == {"reference"}, "the fused kernels are registered only on request"
    backend["quantize"] = "changed"
    assert sft_kernels.cuda_backend()["quantize"] != "changed", "cuda_backend() returns a copy"


_SWITCH_PROBE = """
import warnings
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as seen:
    import sft_kernels
import torch
print(sft_kernels.cuda_backend()["quantize"], sft_kernels.cuda_backend()["dequantize"])
print(all(torch._C._dispatch_has_kernel_for_dispatch_key(f"sft::{n}", "CUDA") for n in sft_kernels._cuda.CUDA_OPS))
print(" | ".join(str(w.message) for w in seen if issubclass(w.category, sft_kernels.SlowPathWarning)))
"""


def test_fused_switch_falls_back_to_the_reference_with_a_warning():
    """SFT_CUDA_FUSED=1 registers the fused quantize/dequantize, or warns why not and keeps the reference."""
    env = {**os.environ, _cuda.FUSED_ENV: "1"}
    out = subprocess.run([sys.executable, "-c", _SWITCH_PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.splitlines()
    backends, registered, warned = out[0].split(), out[1], out[2] if len(out) > 2 else ""
    assert registered == "True"
    if backends == ["fused", "fused"]:
        assert warned == ""
    else:
        assert backends == ["reference", "reference"]
        assert "SFT_CUDA_FUSED=1" in warned and "unavailable" in warned


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
def test_simulated_split_trains_on_cuda():
    """A split built on the CPU and moved to the GPU trains through the reference kernels like on the CPU."""
    transformers = pytest.importorskip("transformers")
    import copy

    from sft_kernels import SimulatedSplit

    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg).eval()
    ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = (torch.arange(9)[None, :] < torch.tensor([7, 4, 9])[:, None]).long()
    labels = torch.tensor([0, 2, 1])
    runs = {}
    for device in ("cpu", "cuda"):
        sim = SimulatedSplit(copy.deepcopy(model), at=1, mode="bottleneck", rank=4, fwd_codec="lowrank:r=2+int8",
                             bwd_codec="int8,sr").to(device)
        out = sim(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
        out.loss.backward()
        grads = [p.grad for p in sim.edge.parameters() if p.grad is not None]
        assert grads and all(g.device.type == device and torch.isfinite(g).all() for g in grads)
        runs[device] = (out.loss.item(), sim.bytes_sent, sim.bytes_received)
    assert runs["cuda"][1:] == runs["cpu"][1:]
    assert runs["cuda"][0] == pytest.approx(runs["cpu"][0], rel=1e-3)
