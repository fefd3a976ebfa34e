"""``SimulatedSplit``: train a split model in one process, its traffic through the codecs and counted.

It is the split step of :mod:`.edge` / :mod:`.cloud` over an :class:`~.link.InProcessLink`:
the same encoding, decoding, seeds and messages as a run over TCP, without sockets.  Its
``forward`` takes the wrapped model's inputs (``input_ids``, ``attention_mask``, ...,
``labels``) and returns the wrapped model's output type, so it drops into a training loop
written for the unsplit model.  Every forward is a micro-batch with its own index: codec
seeds and dropout keys are ``(seed, index, part)``, so a run is reproducible and equals the
same run over a real link.  ``parameters()`` holds every part (edge, cloud, and in the U-split
the top): one optimizer in the caller's loop trains them all.

Byte counters (payload bytes, what a real link would carry in tensor data):

* sent (edge -> cloud): encoded boundary tensors + auxiliary data (``BoundaryOutput``'s lengths,
  padded length, pooling positions) + the labels (not in the U-split) + the gradients of the
  cloud's outputs (their backward);
* received (cloud -> edge): the cloud's outputs (loss and logits raw; in the U-split the encoded
  pooled rows) + the encoded gradients of the boundary tensors.

Knows the split and the step; no sockets, data loading or runtime.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from ..codecs import Codec, from_spec
from ..split import CalibrationOptions, merge, save_split_model, split_model
from ..split.adapters import BottleneckLayer
from ..split.surgery import Calibration
from .cloud import CloudWorker
from .edge import EdgeClient, StepBytes, pooled_codecs
from .link import CountsTraffic, InProcessLink

__all__ = ["SimulatedSplit", "StepBytes"]


class SimulatedSplit(CountsTraffic, nn.Module):
    """A split model whose edge-cloud traffic goes through ``fwd_codec`` / ``bwd_codec``, with byte counters.

    Attributes:
        edge, cloud, top: the parts (``split_model``'s; ``top`` is None outside the U-split).
        bytes_sent, bytes_received: payload bytes each way (see the module docstring).
        aux_bytes: total auxiliary bytes (a part of ``bytes_sent``).
        last_step: :class:`StepBytes` of the latest forward (and its backward).
        link: the :class:`~.link.InProcessLink` (its ``traffic`` is the one byte counter).

    Args:
        model: a ``*ForSequenceClassification`` (or base model) of a supported family; the parts share its weights.
        at, mode, rank, eliminate_links, seed, u_split: the split, as :func:`~sft_kernels.split.split_model`'s.
        fwd_codec, bwd_codec: codecs of the activations (edge -> cloud) and their gradients (back).
        pooled_codec, pooled_grad_codec: the U-split's codecs of the pooled rows and their gradients
            (None: ``fwd_codec`` / ``bwd_codec``).
        init, calibration, tokenizer, calibration_options: how the bottleneck's code starts, as
            :func:`~sft_kernels.split.split_model` takes them: ``init="calibrated"`` fits the code and the
            cloud's decoders to ``calibration`` (unlabelled batches, or strings with ``tokenizer``) before
            the first step.  In process nothing crosses for the fit; over a real link (``RemoteSplit``,
            ``sft train``) the cloud's decoders cross once per session open.

    It works as a transformers ``Trainer``'s model: ``labels`` is in ``forward``'s signature,
    and ``accepts_loss_kwargs = False`` tells ``Trainer`` not to pass loss keywords
    (``num_items_in_batch``), which the wrapped model's loss does not take through the split.

    Saving the trained model: :meth:`save_pretrained` writes the merged model, which
    :func:`sft_kernels.load_split_model` (bottleneck split) or transformers' ``from_pretrained``
    (layer split) loads.  ``Trainer.save_model()`` and ``Trainer``'s checkpoints do not call it:
    ``Trainer`` calls ``save_pretrained`` on a ``PreTrainedModel`` only, and for any other module
    writes ``model.safetensors`` with its ``state_dict`` (here ``edge.*``, ``cloud.*``, ``top.*``)
    and no ``config.json`` -- what ``trainer.train(resume_from_checkpoint=...)`` reads back, not a
    model to load.  After training, call ``model.save_pretrained(path)`` yourself.  (Being a
    ``PreTrainedModel`` would make ``Trainer`` call it, at the cost of importing
    ``transformers.modeling_utils`` with ``sft_kernels`` and of transformers' attention checks on
    the wrapped model's config.)
    """

    #: Read by transformers' ``Trainer``: the loss is the cloud's (mean over the batch), no loss kwargs.
    accepts_loss_kwargs = False

    def __init__(self, model: nn.Module, at: int, mode: str = "layer", rank: Optional[int] = None,
                 fwd_codec: Union[str, Codec] = "int8", bwd_codec: Union[str, Codec] = "int8,sr",
                 eliminate_links: bool = True, seed: int = 0, u_split: bool = False,
                 pooled_codec: Union[str, Codec, None] = None, pooled_grad_codec: Union[str, Codec, None] = None,
                 init: str = "svd", calibration: Optional[Calibration] = None, tokenizer: Any = None,
                 calibration_options: Optional[CalibrationOptions] = None) -> None:
        super().__init__()
        self.fwd_codec, self.bwd_codec = from_spec(fwd_codec), from_spec(bwd_codec)
        parts = split_model(model, at=at, mode=mode, rank=rank, eliminate_links=eliminate_links, seed=seed,
                            u_split=u_split, init=init, calibration=calibration, tokenizer=tokenizer,
                            calibration_options=calibration_options)
        self.edge, self.cloud = parts[0], parts[1]
        self.top = parts[2] if u_split else None
        self.seed, self.steps = seed, 0
        self.num_labels = int(getattr(model.config, "num_labels", 2))
        pooled = pooled_codecs(self.fwd_codec, self.bwd_codec, pooled_codec, pooled_grad_codec)
        self.link = InProcessLink(CloudWorker(self.cloud, self.fwd_codec, self.bwd_codec, seed, pooled=pooled))
        self.client = EdgeClient(self.edge, self.link, self.fwd_codec, self.bwd_codec, seed, top=self.top,
                                 head=self.cloud.head is not None, pooled=pooled)

    @property
    def aux_bytes(self) -> int:
        """Auxiliary bytes (lengths, padded length, pooling positions) so far: a part of ``bytes_sent``."""
        return self.client.aux_bytes

    @property
    def last_step(self) -> StepBytes:
        """:class:`StepBytes` of the latest forward (and its backward, once it ran)."""
        return self.client.last_step

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, **inputs: Optional[torch.Tensor]) -> Any:
        """The wrapped model's forward, across an in-process link; returns the wrapped model's output."""
        index = self.steps
        self.steps += 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, **inputs}
        return self.client.forward(index, {k: v for k, v in batch.items() if v is not None}, labels,
                                   self.num_labels)

    def merged(self) -> nn.Module:
        """The trained model as one module, in eval mode: :func:`~sft_kernels.split.merge` of copies of the parts.

        The copies keep this split as it was (``merge`` installs the bottleneck into the model the
        parts came from), so training may go on after a save.
        """
        parts = copy.deepcopy((self.edge, self.cloud, self.top))  # one copy: the parts keep sharing weights
        return merge(*(p for p in parts if p is not None)).eval()

    def save_pretrained(self, save_directory: Union[str, Path]) -> Path:
        """Write the trained model to directory ``save_directory`` (created if needed); returns its path.

        A bottleneck split is written by :func:`~sft_kernels.save_split_model` and loads with
        :func:`~sft_kernels.load_split_model` (transformers' auto classes refuse it unless given
        ``trust_remote_code=True``, which loads it the same way); a layer split is the original
        transformers model, written by its own ``save_pretrained`` and loaded by ``from_pretrained``.
        The U-split merges its top too.  The codecs are not part of the model: it computes what the
        split pair computes without them.
        """
        model = self.merged()
        if any(isinstance(m, BottleneckLayer) for m in model.modules()):
            return save_split_model(model, save_directory)
        model.save_pretrained(save_directory)
        return Path(save_directory)

