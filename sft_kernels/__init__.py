"""sft_kernels: split fine-tuning between an edge device and a cloud server.

Importing the package loads the compiled ``sft_kernels._C`` extension, which
registers the ``torch.ops.sft.*`` custom ops, then their Python wrappers, fake
kernels and autograd registrations (:mod:`sft_kernels.ops`), then their CUDA
kernels (:mod:`sft_kernels._cuda`: the pure-PyTorch reference, which warns once
with :class:`SlowPathWarning`, unless ``SFT_CUDA_FUSED=1`` enables the fused
quantize/dequantize; :func:`cuda_backend` says which is active), then the codecs.

Example::

    import torch, sft_kernels
    x = torch.randn(512, 384, requires_grad=True)
    y = sft_kernels.boundary(x, fwd="lowrank:r=8+int8", bwd="int8,sr", seed=0)
    y.sum().backward()
"""
from __future__ import annotations

import torch  # noqa: F401  (loads libc10/libtorch before the extension)

try:
    from . import _C  # noqa: F401  (registers torch.ops.sft.*)
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "sft_kernels._C is not built. Run `make install` (or "
        f"`pip install --no-build-isolation -e .`) in the repository root. ({exc})"
    ) from exc

from . import ops  # noqa: E402
from ._cuda import SlowPathWarning, cuda_backend  # noqa: E402  (registers the CUDA kernels)
from . import codecs  # noqa: E402
from .codecs import Codec, Packet, boundary, from_spec  # noqa: E402
from .split import BoundaryOutput, load_split_model, merge, save_split_model, split_model  # noqa: E402
from .step import SimulatedSplit  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    """``RemoteSplit`` / ``RemoteSplitCallback`` load the runtime (channel, TLS) on first use only."""
    if name in ("RemoteSplit", "RemoteSplitCallback"):
        from .runtime import remote

        return getattr(remote, name)
    raise AttributeError(f"module 'sft_kernels' has no attribute {name!r}")

__all__ = [
    "ops", "codecs", "Codec", "Packet", "boundary", "from_spec", "BoundaryOutput", "SimulatedSplit", "split_model",
    "merge", "save_split_model", "load_split_model", "SlowPathWarning", "cuda_backend", "RemoteSplit",
    "RemoteSplitCallback",
]
