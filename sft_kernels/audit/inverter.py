"""The learned inversion attack: a small bidirectional transformer from codes back to token ids.

Input per token: the decoded code (standardised), plus embeddings of its position, of the
sentence's length and of the label where one is sent (the attacker's text carries no label of
the victim's label space, so training uses the "unknown" label and the channel stays inert;
see :mod:`.metrics`).  Output: an estimate ``ê`` of the token's input word embedding, scored
against the public embedding table ``E`` (MiniLM's, frozen) as ``s · (2 ê·E_v − |E_v|²)``, i.e.
a nearest-neighbour readout in embedding space.  Tying the output to ``E`` lets the attacker name
tokens its own text never contained (about 4% of SST-2 dev tokens).  ``ê`` is a linear readout
of the code (initialised by ridge regression on the attacker's text) plus the transformer's
correction (zero at the start), so training starts from the best linear inversion.

Training goes through the real setting: every batch is a fresh train-mode (dropout) view of the
attacker's own sentences through the step-0 edge, the defence's noise and the codec
(:meth:`.settings.Observer.observe` with ``private=False``).  One pass over at most the token
budget (the issue's cap: 200k tokens, one epoch).

Weights are cached as safetensors (no pickle) with a JSON sidecar, so a resumed run reuses them.

Knows torch and :class:`.settings.Observer`; not the runner, files of results or the CLI.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .settings import Observer
from .text import Corpus

__all__ = ["InverterConfig", "Inverter", "train_inverter", "predict", "save_inverter", "load_inverter"]

_MAX_LEN = 128


@dataclass(frozen=True)
class InverterConfig:
    """Size and training of the inverter (defaults: the audit's; tests shrink them)."""

    layers: int = 2
    d_model: int = 256
    heads: int = 4
    lr: float = 2e-3
    batch_tokens: int = 1024
    ridge_tokens: int = 16384
    dropout: float = 0.1
    #: Training scores the batch's own tokens plus this many uniformly drawn vocabulary entries (a sampled
    #: softmax: the full 30522-way softmax would cost most of the budget); 0 scores the whole vocabulary.
    #: Prediction always scores the whole vocabulary.
    negatives: int = 4096

    def __post_init__(self) -> None:
        if not 1 <= self.layers <= 4:
            raise ValueError(f"layers must be in [1, 4] (the issue's 2-4-layer inverter; 1 for tests), "
                             f"got {self.layers}")


class Inverter(nn.Module):
    """Codes ``(batch, seq, width)`` -> logits over the vocabulary at every position (see the module docstring)."""

    def __init__(self, width: int, table: torch.Tensor, config: InverterConfig = InverterConfig(),
                 num_labels: int = 2) -> None:
        super().__init__()
        self.config, self.width, self.num_labels = config, width, num_labels
        d, e = config.d_model, table.shape[1]
        self.register_buffer("table", table.detach().float(), persistent=False)
        self.register_buffer("table_sq", table.detach().float().pow(2).sum(1), persistent=False)
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        self.inp = nn.Linear(width, d)
        self.pos = nn.Embedding(_MAX_LEN, d)
        self.length = nn.Embedding(_MAX_LEN + 1, d)
        self.label = nn.Embedding(num_labels + 1, d)  # the last id: unknown / not sent
        layer = nn.TransformerEncoderLayer(d, config.heads, 4 * d, config.dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out = nn.Linear(d, e)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.skip = nn.Linear(width, e)
        self.log_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def embed_estimate(self, codes: torch.Tensor, lengths: torch.Tensor,
                       labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``ê``: ``(batch, seq, d_embedding)`` for right-padded ``codes`` with ``lengths`` real tokens each."""
        b, n, _ = codes.shape
        x = (codes - self.mean) / self.std
        pad = torch.arange(n)[None, :] >= lengths[:, None]
        if labels is None:
            labels = torch.full((b,), self.num_labels, dtype=torch.long)
        h = (self.inp(x) + self.pos(torch.arange(n))[None] + self.length(lengths.clamp(max=_MAX_LEN))[:, None]
             + self.label(labels)[:, None])
        h = self.norm(self.encoder(h, src_key_padding_mask=pad))
        return self.skip(x) + self.out(h)

    def logits(self, est: torch.Tensor, vocab: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores for ``est`` rows ``(N, d)`` of every vocabulary entry ``(N, vocab)``, or of the ids ``vocab``."""
        if vocab is None:
            return self.log_scale.exp() * (2 * est @ self.table.T - self.table_sq)
        return self.log_scale.exp() * (2 * est @ self.table[vocab].T - self.table_sq[vocab])


def _pad_codes(codes: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in codes])
    out = torch.zeros(len(codes), int(lengths.max()), codes[0].shape[1])
    for i, c in enumerate(codes):
        out[i, :len(c)] = c
    return out, lengths


def _token_batches(corpus: Corpus, batch_tokens: int, seed: int) -> list[list[int]]:
    order = torch.randperm(len(corpus), generator=torch.Generator().manual_seed(seed)).tolist()
    out, cur, used = [], [], 0
    for i in order:
        cur.append(i)
        used += len(corpus.ids[i])
        if used >= batch_tokens:
            out.append(cur)
            cur, used = [], 0
    if cur:
        out.append(cur)
    return out


def _fit_linear(model: Inverter, codes: torch.Tensor, ids: torch.Tensor) -> None:
    """Standardisation of the input and the ridge-regression readout ``skip`` (codes -> word embeddings)."""
    model.mean.copy_(codes.mean(0))
    model.std.copy_(codes.std(0).clamp_min(1e-6))
    x = (codes - model.mean) / model.std
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    y = model.table[ids].double()
    lam = 1e-3 * len(x)
    w = torch.linalg.solve(x1.T @ x1 + lam * torch.eye(x1.shape[1], dtype=torch.float64), x1.T @ y)
    model.skip.weight.data.copy_(w[:-1].T.float())
    model.skip.bias.data.copy_(w[-1].float())
    # start the temperature where the linear readout's residual puts it
    resid = (x1 @ w - y).pow(2).sum(1).mean().clamp_min(1e-6)
    model.log_scale.data.fill_(float(torch.log(1.0 / resid)))


def train_inverter(observer: Observer, corpus: Corpus, *, seed: int = 0, config: InverterConfig = InverterConfig(),
                   progress: Optional[Callable[[int], None]] = None) -> tuple[Inverter, dict]:
    """Train an inverter on ``corpus`` (the attacker's text) for one pass through ``observer``.

    Returns ``(inverter, info)``; ``info``: tokens trained on, steps, seconds, final loss.
    ``progress(tokens)`` is called after each step.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = Inverter(observer.width, observer.table, config)
    # the linear readout, from the first views of the attacker's own text
    take, used = 0, 0
    while take < len(corpus) and used < config.ridge_tokens:
        used += len(corpus.ids[take])
        take += 1
    sample = corpus.head(take)
    codes, _ = observer.observe(sample, seed=seed * 7919 + 1, private=False)
    _fit_linear(model, torch.cat(codes), sample.flat_ids())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.01)
    batches = _token_batches(corpus, config.batch_tokens, seed)
    warm = max(1, len(batches) // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / max(1, len(batches))))
    g = torch.Generator().manual_seed(seed + 99)
    model.train()
    loss_v, tokens = float("nan"), 0
    for step, index in enumerate(batches):
        part = corpus.subset(index)
        codes, _ = observer.observe(part, seed=seed * 1_000_003 + step + 17, private=False)
        x, lengths = _pad_codes(codes)
        est = model.embed_estimate(x, lengths)
        mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
        target = part.flat_ids()
        if config.negatives:
            vocab = torch.unique(torch.cat([target, torch.randint(len(model.table), (config.negatives,), generator=g)]))
            loss = nn.functional.cross_entropy(model.logits(est[mask], vocab), torch.searchsorted(vocab, target))
        else:
            loss = nn.functional.cross_entropy(model.logits(est[mask]), target)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        tokens += int(lengths.sum())
        if progress is not None:
            progress(int(lengths.sum()))
    model.eval()
    return model, {"tokens": tokens, "sentences": len(corpus), "steps": len(batches),
                   "seconds": time.perf_counter() - t0, "loss": loss_v}


@torch.no_grad()
def predict(model: Inverter, views: Sequence[Sequence[torch.Tensor]], k: int = 1, batch_size: int = 32,
            counts: Optional[Sequence[int]] = None) -> dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]]:
    """Top-``k`` token ids and their probabilities per sentence, from the first ``c`` views for each ``c``.

    ``views[v][i]``: view v of sentence i's codes.  The attacker links a sentence's views and averages
    its embedding estimates over them before scoring the whole vocabulary.  Returns
    ``{c: (ids, probs)}``, each a list of ``(len_i, k)`` tensors (``counts`` defaults to ``[len(views)]``).
    """
    model.eval()
    counts = sorted(set(counts or [len(views)]))
    if counts[0] < 1 or counts[-1] > len(views):
        raise ValueError(f"counts must be in [1, {len(views)}] (the views given), got {counts}")
    n = len(views[0])
    out: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {c: ([], []) for c in counts}
    for s in range(0, n, batch_size):
        index = list(range(s, min(n, s + batch_size)))
        sizes = [len(views[0][i]) for i in index]
        ests = []
        for view in views[:counts[-1]]:
            x, lengths = _pad_codes([view[i] for i in index])
            mask = torch.arange(x.shape[1])[None, :] < lengths[:, None]
            ests.append(model.embed_estimate(x, lengths)[mask])
        for c in counts:
            p, top = torch.topk(torch.softmax(model.logits(torch.stack(ests[:c]).mean(0)), -1), k, dim=-1)
            out[c][0].extend(top.split(sizes))
            out[c][1].extend(p.split(sizes))
    return out


def save_inverter(model: Inverter, info: dict, path: Path) -> None:
    """Write ``path`` (safetensors weights) and ``path.json`` (config, width, training info)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    meta = {"config": asdict(model.config), "width": model.width, "num_labels": model.num_labels, "info": info}
    Path(str(path) + ".json").write_text(json.dumps(meta, indent=1))
    tmp.replace(path)


def load_inverter(path: Path, table: torch.Tensor) -> Optional[tuple[Inverter, dict]]:
    """The inverter cached at ``path`` with its training info, or None if there is none."""
    from safetensors.torch import load_file

    meta_path = Path(str(path) + ".json")
    if not path.is_file() or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    model = Inverter(meta["width"], table, InverterConfig(**meta["config"]), meta["num_labels"])
    model.load_state_dict(load_file(str(path)))
    return model.eval(), meta["info"]
