"""The boundary settings the audit attacks, and what the cloud receives in each: :class:`Observer`.

A :class:`Setting` names a split of MiniLM at layer 3 (``at=3``), its codec and an optional
defence.  :class:`Observer` builds the edge of that split exactly as ``split_model`` does at step 0
and produces, for a list of sentences, the per-token codes the cloud decodes: the edge runs in
train mode (dropout on, a new draw per view, as each epoch gives the cloud a new dropout-noised
view of every sentence), the defence is applied to ``z``, then the codec encodes the whole batch's
boundary tensor (so int8 blocks span the batch's tokens as on the wire) and the decoded tensor is
split back per sentence.  Bytes per example are the codec's ``Packet.nbytes`` plus the auxiliary
data (``BoundaryOutput.aux_nbytes``) plus one int8 label per example outside the U-split.

Defences (rank 4 only, per the issue):

* ``noise=σ``: Gaussian noise of standard deviation ``σ · rms_j`` on coordinate j of z before
  quantization (``rms_j``: coordinate j's RMS on a fixed sample of public text, known to both
  sides).  No norm clipping and no accounting: this is noise, not differential privacy.
* ``rotate``: a private random orthogonal ``r × r`` rotation of z, fixed on the edge from a
  secret seed; the attacker does not know it (``private=False`` observations leave it out) and
  has to estimate it (:func:`.attacks.estimate_rotation`).

The attacker's simulation (``private=False``) is the same edge, codec and noise level with its own
random draws and without the rotation: the honest-but-curious cloud knows the family, the step-0
edge weights, the split settings and the codecs.

Knows split_model, codecs and the embedded model; not attacks, files or the CLI.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..codecs import from_spec
from ..split import split_model
from .text import Corpus, calibration_texts

__all__ = ["Setting", "SETTINGS", "CORE_SETTINGS", "DEFENCE_SETTINGS", "USPLIT_SETTINGS", "Observer", "AT",
           "get_setting"]

#: The split point: MiniLM after 3 of its 6 layers.
AT = 3
_PRIVATE_ROTATION_SEED = 0x5EC12E7


@dataclass(frozen=True)
class Setting:
    """One boundary setting: what crosses, through which codec, with which defence."""

    name: str
    mode: str  # "embeddings" (sanity: the raw input word embeddings), "layer" or "bottleneck"
    rank: Optional[int] = None
    init: str = "svd"
    codec: str = "none"
    noise: float = 0.0
    rotate: bool = False
    u_split: bool = False
    defence: bool = False

    @property
    def calibrated(self) -> bool:
        """Whether the edge's code is fitted to the victim task's own text (one edge per task)."""
        return self.init == "calibrated"

    def attacker_key(self, task: str) -> str:
        """Names the attacker's simulation of this setting: settings that differ only in the private
        rotation share it (the adaptive attacker un-rotates, then uses the unrotated setting's inverter)."""
        key = f"{self.mode}-r{self.rank}-{self.init}-{self.codec}-n{self.noise:g}"
        return key + (f"-{task}" if self.calibrated else "")

    def describe(self) -> str:
        """One line for tables."""
        if self.mode == "embeddings":
            return "raw input word embeddings (fp32)"
        what = "layer split (hidden states)" if self.mode == "layer" else f"bottleneck r={self.rank} {self.init}"
        extra = (f", noise σ={self.noise:g}" if self.noise else "") + (", private rotation" if self.rotate else "")
        codec = "fp32" if self.codec == "none" else self.codec
        return f"{what}, {codec}{extra}" + (", U-split" if self.u_split else "")


def _b(name: str, rank: int, init: str, codec: str, **kw: Any) -> Setting:
    return Setting(name, "bottleneck", rank, init, codec, **kw)


CORE_SETTINGS: tuple[Setting, ...] = (
    Setting("embeddings", "embeddings"),
    Setting("layer-fp32", "layer"), Setting("layer-int8", "layer", codec="int8"),
    _b("r4-svd-fp32", 4, "svd", "none"), _b("r4-svd-int8", 4, "svd", "int8"),
    _b("r16-svd-fp32", 16, "svd", "none"), _b("r16-svd-int8", 16, "svd", "int8"),
    _b("r4-cal-fp32", 4, "calibrated", "none"), _b("r4-cal-int8", 4, "calibrated", "int8"),
    _b("r16-cal-fp32", 16, "calibrated", "none"), _b("r16-cal-int8", 16, "calibrated", "int8"),
)
DEFENCE_SETTINGS: tuple[Setting, ...] = (
    _b("r2-svd-int8", 2, "svd", "int8", defence=True), _b("r1-svd-int8", 1, "svd", "int8", defence=True),
    _b("r4-svd-int8-noise0.5", 4, "svd", "int8", noise=0.5, defence=True),
    _b("r4-svd-int8-noise1", 4, "svd", "int8", noise=1.0, defence=True),
    _b("r4-svd-int8-rot", 4, "svd", "int8", rotate=True, defence=True),
)
USPLIT_SETTINGS: tuple[Setting, ...] = (_b("usplit-r4-svd-int8", 4, "svd", "int8", u_split=True),)
#: Every setting by name.
SETTINGS: dict[str, Setting] = {s.name: s for s in CORE_SETTINGS + DEFENCE_SETTINGS + USPLIT_SETTINGS}


def get_setting(name: str) -> Setting:
    """The setting called ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in SETTINGS:
        raise ValueError(f"unknown setting {name!r}; valid: {', '.join(SETTINGS)}")
    return SETTINGS[name]


def private_rotation(rank: int, seed: int = _PRIVATE_ROTATION_SEED) -> torch.Tensor:
    """The edge's secret ``rank × rank`` orthogonal matrix (Haar-distributed, from ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(rank, rank, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


def _pad(c: Corpus, index: Sequence[int]) -> dict[str, torch.Tensor]:
    n = max(len(c.ids[i]) for i in index)
    ids = torch.zeros(len(index), n, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for row, i in enumerate(index):
        m = len(c.ids[i])
        ids[row, :m] = torch.tensor(c.ids[i])
        types[row, :m] = torch.tensor(c.types[i])
        mask[row, :m] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


class Observer:
    """What the cloud receives for ``setting``: ``observe(corpus, seed=...)`` gives per-sentence codes.

    Args:
        setting: the boundary setting.
        tok, encoder: ``load_minilm()``'s tokenizer and ``BertModel`` (copied, never modified).
        task: the victim task, for calibrated settings (the edge fits its code to that task's first
            512 training examples, text only); ignored otherwise.
        data_dir: GLUE directory (calibrated settings).
        noise_scale_text: public sentences whose code RMS sets the noise scale (noise settings only).
    """

    def __init__(self, setting: Setting, tok: Any, encoder: torch.nn.Module, task: Optional[str] = None,
                 data_dir: Optional[str] = None, noise_scale_text: Optional[Corpus] = None) -> None:
        self.setting, self.tok = setting, tok
        self.codec = from_spec(setting.codec)
        self.table = encoder.get_input_embeddings().weight.detach().clone()
        self.edge: Optional[torch.nn.Module] = None
        if setting.mode != "embeddings":
            kw: dict[str, Any] = {}
            if setting.calibrated:
                if task is None:
                    raise ValueError(f"setting {setting.name!r} is calibrated on the victim's text: pass task=")
                a, b = calibration_texts(task, data_dir)
                enc = tok(a, b, padding=True, truncation=True, max_length=128, return_tensors="pt")
                batches = [{k: v[i:i + 32] for k, v in enc.items()} for i in range(0, len(a), 32)]
                kw = dict(init="calibrated", calibration=batches)
            mode_kw = dict(rank=setting.rank) if setting.mode == "bottleneck" else {}
            self.edge = split_model(copy.deepcopy(encoder), at=AT, mode=setting.mode, seed=0, **mode_kw, **kw)[0]
            for p in self.edge.parameters():
                p.requires_grad_(False)
        self.width = int(setting.rank) if setting.mode == "bottleneck" else int(self.table.shape[1])
        self.rotation = private_rotation(setting.rank) if setting.rotate else None
        self.noise_rms: Optional[torch.Tensor] = None
        if setting.noise:
            if noise_scale_text is None:
                raise ValueError(f"setting {setting.name!r} adds noise: pass noise_scale_text= (public sentences)")
            sample = noise_scale_text.subset(range(min(64, len(noise_scale_text))))
            codes = torch.cat(self.clean_codes(sample))
            self.noise_rms = codes.pow(2).mean(0).sqrt()

    # ------------------------------------------------------------------ the edge
    def _edge_hidden(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """``(real tokens × width, aux bytes)`` of one padded batch, in the edge's current mode."""
        if self.edge is None:
            mask = batch["attention_mask"].bool()
            return self.table[batch["input_ids"][mask]], 2 * (batch["input_ids"].shape[0] + 1)
        b = self.edge(**batch)
        return b.hidden, b.aux_nbytes

    def clean_codes(self, corpus: Corpus, batch_size: int = 32) -> list[torch.Tensor]:
        """Eval-mode codes without noise, rotation or codec (the expected observation): one tensor per sentence."""
        out: list[torch.Tensor] = []
        if self.edge is not None:
            self.edge.eval()
        with torch.no_grad():
            for s in range(0, len(corpus), batch_size):
                index = list(range(s, min(s + batch_size, len(corpus))))
                h, _ = self._edge_hidden(_pad(corpus, index))
                out.extend(h.split([len(corpus.ids[i]) for i in index]))
        return out

    def observe(self, corpus: Corpus, *, seed: int, private: bool = True, batch_size: int = 32,
                shuffle: bool = True) -> tuple[list[torch.Tensor], float]:
        """One view of ``corpus`` as the cloud decodes it: ``(codes per sentence, bytes per example)``.

        ``seed`` keys the batch order, the dropout draw, the noise and the codec's seeds.  ``private``:
        the edge's own view (with its secret rotation); ``False``: the attacker's simulation of it.
        """
        n = len(corpus)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist() if shuffle else list(range(n))
        codes: list[Optional[torch.Tensor]] = [None] * n
        total_bytes = 0
        g = torch.Generator().manual_seed(seed + 1)
        if self.edge is not None:
            self.edge.train()
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for step, s in enumerate(range(0, n, batch_size)):
                index = order[s:s + batch_size]
                h, aux = self._edge_hidden(_pad(corpus, index))
                if self.noise_rms is not None:
                    h = h + self.setting.noise * self.noise_rms * torch.randn(h.shape, generator=g)
                if private and self.rotation is not None:
                    h = h @ self.rotation.T
                packet = self.codec.encode(h.contiguous(), seed=seed * 100003 + step)
                h = self.codec.decode(packet)
                total_bytes += packet.nbytes + aux + (0 if self.setting.u_split else len(index))
                for i, c in zip(index, h.split([len(corpus.ids[i]) for i in index])):
                    codes[i] = c
        if self.edge is not None:
            self.edge.eval()
        return [c for c in codes if c is not None], total_bytes / max(n, 1)

    def code_fn(self, ids: torch.Tensor, types: torch.Tensor, embeds: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Differentiable eval-mode codes ``(batch, seq, width)`` of full-length (unpadded) rows.

        ``embeds`` replaces the word embeddings of ``ids`` (the optimisation attack's variables); the
        position and segment embeddings, LayerNorm and layers are the edge's.
        """
        if self.edge is None:
            return self.table[ids] if embeds is None else embeds
        self.edge.eval()
        words = self.edge.mods["embeddings"].word_embeddings
        handle = words.register_forward_hook(lambda m, i, o: embeds) if embeds is not None else None
        try:
            b = self.edge(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=types)
        finally:
            if handle is not None:
                handle.remove()
        return b.hidden.reshape(ids.shape[0], ids.shape[1], -1)
