"""The attacks of the honest-but-curious cloud (besides the learned inverter, :mod:`.inverter`).

* :func:`lookup`: nearest-neighbour lookup.  Raw embeddings: against the embedding table itself
  (the sanity end).  Other settings: against per-token centroids of the codes of the attacker's
  own text (what a context-free dictionary attack can do).
* :func:`rerank`: re-ranks an inverter's top-k guesses with the step-0 edge's forward pass: at each
  uncertain position the candidate whose whole-sentence code lies closest to the observed one wins.
* :func:`optimise`: optimisation against the step-0 edge weights: continuous input embeddings whose
  eval-mode code matches the observed one (Adam), projected to the vocabulary, then refined by the
  same re-ranking among each position's nearest vocabulary entries.
* :func:`estimate_rotation`: the adaptive attacker's estimate of a private rotation of the code
  from code statistics alone (second moments for the axes, mean and third moments for their signs).
* :func:`label_leakage`: U-split label recovery from the gradient of the cloud's output.
* :func:`accuracy_price`: a defence's cost in dev accuracy after a short fine-tune.

Knows split_model, codecs, the data loaders and :class:`.settings.Observer`; not the runner or the CLI.
"""
from __future__ import annotations

import copy
import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..codecs import boundary
from ..split import minilm_classifier, split_model
from .settings import AT, Observer, Setting, private_rotation
from .text import Corpus

__all__ = ["lookup", "code_centroids", "rerank", "optimise", "estimate_rotation", "label_leakage",
           "accuracy_price", "mean_views"]


def mean_views(views: Sequence[Sequence[torch.Tensor]]) -> list[torch.Tensor]:
    """Per sentence, the mean of its views (the attacker links a sentence's views across epochs)."""
    return [torch.stack([v[i] for v in views]).mean(0) for i in range(len(views[0]))]


@torch.no_grad()
def code_centroids(observer: Observer, corpus: Corpus, seed: int, chunk: int = 1024
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(keys, ids)``: the mean code of every token id in the attacker's text (one view of it).

    For raw embeddings the keys are the embedding table itself, every id.
    """
    if observer.setting.mode == "embeddings":
        return observer.table.clone(), torch.arange(observer.table.shape[0])
    vocab = observer.table.shape[0]
    sums = torch.zeros(vocab, observer.width, dtype=torch.float64)
    counts = torch.zeros(vocab, dtype=torch.float64)
    for s in range(0, len(corpus), chunk):
        part = corpus.subset(range(s, min(len(corpus), s + chunk)))
        codes, _ = observer.observe(part, seed=seed * 31 + s, private=False)
        ids = part.flat_ids()
        sums.index_add_(0, ids, torch.cat(codes).double())
        counts.index_add_(0, ids, torch.ones(len(ids), dtype=torch.float64))
    seen = counts > 0
    return (sums[seen] / counts[seen, None]).float(), torch.arange(vocab)[seen]


@torch.no_grad()
def lookup(codes: Sequence[torch.Tensor], keys: torch.Tensor, ids: torch.Tensor, chunk: int = 2048
           ) -> list[torch.Tensor]:
    """Nearest key (L2, in coordinates standardised by the keys' spread) of each token's code: ids per sentence."""
    scale = keys.std(0).clamp_min(1e-6)
    k = keys / scale
    k_sq = k.pow(2).sum(1)
    flat = torch.cat(list(codes)) / scale
    out = []
    for s in range(0, len(flat), chunk):
        q = flat[s:s + chunk]
        out.append(ids[torch.argmin(k_sq[None, :] - 2 * q @ k.T, 1)])
    return list(torch.cat(out).split([len(c) for c in codes]))


def _types_of(ids: torch.Tensor, sep_id: int) -> torch.Tensor:
    """Segment ids implied by a guessed sentence: 1 after the first [SEP] that is not the last token."""
    types = torch.zeros_like(ids)
    seps = (ids == sep_id).nonzero().flatten().tolist()
    if seps and seps[0] < len(ids) - 1:
        types[seps[0] + 1:] = 1
    return types


@torch.no_grad()
def _discrete_refine(observer: Observer, target: torch.Tensor, cur: torch.Tensor, cands: torch.Tensor,
                     positions: Sequence[int], sep_id: int, scale: torch.Tensor) -> torch.Tensor:
    """One left-to-right sweep: at each of ``positions`` keep the candidate whose code is nearest ``target``."""
    cur = cur.clone()
    for pos in positions:
        trial = cur[None, :].repeat(cands.shape[1], 1)
        trial[:, pos] = cands[pos]
        types = torch.stack([_types_of(t, sep_id) for t in trial])
        err = ((observer.code_fn(trial, types) - target[None]) / scale).pow(2).sum((1, 2))
        cur = trial[int(torch.argmin(err))]
    return cur


def rerank(observer: Observer, observed: Sequence[torch.Tensor], top_ids: Sequence[torch.Tensor],
           top_p: Sequence[torch.Tensor], threshold: float = 0.9) -> list[torch.Tensor]:
    """Re-rank an inverter's top-k guesses per sentence with the step-0 edge (see the module docstring).

    ``observed``: per sentence, the (un-rotated, view-averaged) codes; ``top_ids`` / ``top_p``:
    :func:`.inverter.predict`'s ``(len, k)`` outputs.  Positions whose top-1 probability is at least
    ``threshold`` are kept; the others are swept from the least confident up.
    """
    sep = observer.tok.sep_token_id
    scale = torch.cat(list(observed)).std(0).clamp_min(1e-6)
    out = []
    for obs, ids, p in zip(observed, top_ids, top_p):
        positions = [int(i) for i in torch.argsort(p[:, 0]) if float(p[i, 0]) < threshold]
        out.append(_discrete_refine(observer, obs, ids[:, 0], ids, positions, sep, scale) if positions else ids[:, 0])
    return out


def optimise(observer: Observer, observed: Sequence[torch.Tensor], *, steps: int = 200, lr: float = 0.01,
             k: int = 8, seed: int = 0) -> tuple[list[torch.Tensor], dict]:
    """Search input embeddings whose step-0 code matches ``observed`` (one tensor per sentence).

    All sentences are optimised together (padded, with their attention masks); the first and last
    positions are fixed to [CLS] and [SEP] (the structure every input has); segment ids are 0 (the
    attacker does not know where a pair's second sentence starts).  Then each position is projected
    to its nearest vocabulary entry and one sweep of :func:`_discrete_refine` picks among the ``k``
    nearest.  Returns ``(ids per sentence, info)``.
    """
    tok, table = observer.tok, observer.table
    edge = observer.edge
    if edge is None:
        raise ValueError("the optimisation attack needs an edge (the raw-embedding setting has none: use lookup)")
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([len(o) for o in observed])
    b, n = len(observed), int(lengths.max())
    mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
    ids = torch.full((b, n), tok.pad_token_id, dtype=torch.long)
    ids[:, 0] = tok.cls_token_id
    ids[torch.arange(b), lengths - 1] = tok.sep_token_id
    fixed = torch.zeros(b, n, dtype=torch.bool)
    fixed[:, 0] = True
    fixed[torch.arange(b), lengths - 1] = True
    mean = table.mean(0)
    x = (mean + 0.1 * table.std(0) * torch.randn(b, n, table.shape[1], generator=g)).requires_grad_(True)
    target = torch.cat(list(observed))
    scale = target.std(0).clamp_min(1e-6)
    opt = torch.optim.Adam([x], lr=lr)
    words = edge.mods["embeddings"].word_embeddings
    edge.eval()
    loss_v = float("nan")
    for _ in range(steps):
        emb = torch.where(fixed[..., None], table[ids], x)
        handle = words.register_forward_hook(lambda m, i, o: emb)
        try:
            code = edge(input_ids=ids, attention_mask=mask, token_type_ids=torch.zeros_like(ids)).hidden
        finally:
            handle.remove()
        loss = ((code - target) / scale).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        loss_v = float(loss.detach())
    with torch.no_grad():
        flat = x.detach()[mask.bool()]
        d = table.pow(2).sum(1)[None, :] - 2 * flat @ table.T
        near = torch.topk(-d, k, dim=1).indices
        out = []
        start = 0
        for i in range(b):
            m = int(lengths[i])
            cands = near[start:start + m].clone()
            cands[0] = tok.cls_token_id
            cands[m - 1] = tok.sep_token_id
            start += m
            guess = _discrete_refine(observer, observed[i], cands[:, 0], cands, range(1, m - 1), tok.sep_token_id,
                                     scale)
            out.append(guess)
    return out, {"seconds": time.perf_counter() - t0, "loss": loss_v, "steps": steps}


def estimate_rotation(reference: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """Estimate ``R`` with ``observed ≈ reference_distribution @ R.T`` from statistics alone.

    ``reference``: the attacker's unrotated codes of its own text ``(N, r)``; ``observed``: the
    victim's rotated codes ``(M, r)``.  The covariances' eigenvectors give the axes (R maps the
    reference's to the observed's, in order of eigenvalue); each axis's sign is set by the
    projected mean where that is clearly non-zero, else by the projected third moment.  Exact up to
    sampling error when the eigenvalues are distinct; degenerate eigenvalues leave that subspace's
    rotation undetermined.
    """
    def axes(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = z.double()
        mu = z.mean(0)
        c = z - mu
        _, vecs = torch.linalg.eigh(c.T @ c / len(z))
        proj = c @ vecs
        sd = proj.std(0).clamp_min(1e-12)
        return vecs, (mu @ vecs) / sd, (proj / sd).pow(3).mean(0)

    v, m_ref, s_ref = axes(reference)
    w, m_obs, s_obs = axes(observed)
    use_mean = (m_ref.abs() > 0.1) & (m_obs.abs() > 0.1)
    sign = torch.where(use_mean, torch.sign(m_ref * m_obs), torch.sign(s_ref * s_obs))
    sign[sign == 0] = 1.0
    return (w * sign) @ v.T


class _Defended(nn.Module):
    """An edge factor followed by the defence: noise of std ``sigma`` per coordinate, then a rotation."""

    def __init__(self, factor: nn.Module, sigma: Optional[torch.Tensor], rotation: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.factor = factor
        self.register_buffer("sigma", sigma if sigma is not None else torch.zeros(0), persistent=False)
        self.register_buffer("rotation", rotation if rotation is not None else torch.zeros(0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.factor(x)
        if self.sigma.numel():
            z = z + self.sigma * torch.randn_like(z)
        if self.rotation.numel():
            z = z @ self.rotation.T
        return z


def _batches(tok: Any, a: list, b: Optional[list], labels: list, size: int, order: list[int]):
    for s in range(0, len(order), size):
        idx = order[s:s + size]
        enc = tok([a[i] for i in idx], [b[i] for i in idx] if b is not None else None, padding=True,
                  truncation=True, max_length=128, return_tensors="pt")
        yield dict(enc), torch.tensor([labels[i] for i in idx])


def accuracy_price(setting: Setting, tok: Any, encoder: nn.Module, train: tuple, dev: tuple, *,
                   noise_rms: Optional[torch.Tensor] = None, steps: int = 128, batch_size: int = 32,
                   lr: float = 3e-4, seed: int = 0) -> dict:
    """Dev accuracy after ``steps`` fine-tuning steps of ``setting``'s split (two-part, links eliminated).

    ``train`` / ``dev``: ``(text_a, text_b or None, labels)``.  The defence sits on the edge, so it is
    in every forward, training and evaluation alike; the cloud starts from the step-0 weights (it does
    not know the rotation and adapts to it by training).  Codecs: the setting's forward, ``int8,sr`` back.
    """
    t0 = time.perf_counter()
    _, model = minilm_classifier(2, minilm=(tok, copy.deepcopy(encoder)), seed=seed)
    kw = dict(rank=setting.rank) if setting.mode == "bottleneck" else {}
    edge, cloud = split_model(model, at=AT, mode=setting.mode, seed=0, **kw)
    if setting.noise or setting.rotate:
        sigma = setting.noise * noise_rms if setting.noise else None
        edge.factor = _Defended(edge.factor, sigma, private_rotation(setting.rank) if setting.rotate else None)
    params = [p for p in [*edge.parameters(), *cloud.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.0, 1 - s / steps))
    a, b, y = train
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed)).tolist()
    order = (order * (1 + steps * batch_size // max(1, len(order))))[:steps * batch_size]
    torch.manual_seed(seed)
    edge.train()
    cloud.train()
    for step, (batch, labels) in enumerate(_batches(tok, a, b, y, batch_size, order)):
        bo = edge(**batch)
        bo.hidden = boundary(bo.hidden, fwd=setting.codec, bwd="int8,sr", seed=step)
        loss = cloud(bo, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    edge.eval()
    cloud.eval()
    a, b, y = dev
    hit = 0
    with torch.no_grad():
        for step, (batch, labels) in enumerate(_batches(tok, a, b, y, 64, list(range(len(a))))):
            bo = edge(**batch)
            bo.hidden = boundary(bo.hidden, fwd=setting.codec, seed=10**6 + step)
            hit += int((cloud(bo).logits.argmax(-1) == labels).sum())
    return {"dev_acc": hit / len(a), "seconds": time.perf_counter() - t0, "steps": steps}


def label_leakage(tok: Any, encoder: nn.Module, train: tuple, *, steps: int = 60, batch_size: int = 32,
                  lr: float = 1e-4, rank: int = 4, codec: str = "int8", grad_codec: str = "int8,sr",
                  seed: int = 0) -> dict:
    """Label recovery by the cloud of a U-split while the edge fine-tunes on ``train`` for ``steps`` steps.

    Each step the cloud receives, through ``grad_codec``, the gradient of the loss with respect to the
    pooled rows it sent down.  Two attacks on it, scored over every example of every step:

    * ``known_head``: the cloud keeps the top's step-0 weights (it knows them: both sides build the
      initial parts from the run's seed) and, at its own pooled rows, computes the gradient each
      label would give; the nearer one in cosine wins.  Stale once the top has trained.
    * ``sign``: the received gradients of a binary task are ±(one direction per example) times
      ``p − y``: project each batch's gradients on their top singular vector, orient it like the
      previous step's (at step 0 like the step-0 head's gradient difference), and read the label
      from the sign.  Needs no head weights after step 0.
    """
    t0 = time.perf_counter()
    _, model = minilm_classifier(2, minilm=(tok, copy.deepcopy(encoder)), seed=seed)
    edge, cloud, top = split_model(model, at=AT, mode="bottleneck", rank=rank, seed=0, u_split=True)
    top0 = copy.deepcopy(top).eval()
    for p in top0.parameters():
        p.requires_grad_(False)
    params = [p for p in [*edge.parameters(), *cloud.parameters(), *top.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    a, b, y = train
    order = torch.randperm(len(a), generator=torch.Generator().manual_seed(seed)).tolist()[:steps * batch_size]
    torch.manual_seed(seed)
    for m in (edge, cloud, top):
        m.train()
    hits = {"known_head": 0, "sign": 0}
    first = {"known_head": 0, "sign": 0}
    n = n_first = 0
    prev: Optional[torch.Tensor] = None
    for step, (batch, labels) in enumerate(_batches(tok, a, b, y, batch_size, order)):
        bo = edge(**batch)
        bo.hidden = boundary(bo.hidden, fwd=codec, bwd=grad_codec, seed=2 * step)
        pooled = cloud(bo)
        box: list[torch.Tensor] = []
        down = boundary(pooled, fwd=codec, bwd=grad_codec, seed=2 * step + 1)
        # what reaches ``pooled`` is the gradient after the link's codec: what the cloud decodes
        pooled.register_hook(lambda g: box.append(g.detach().clone()))
        loss = top(down, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        got = box[0]
        rows = down.detach()
        cand = []
        for lab in (0, 1):  # what each label would send, with the step-0 top, at the cloud's own rows
            r = rows.clone().requires_grad_(True)
            out = top0(r, labels=torch.full((len(r),), lab, dtype=torch.long))
            (gr,) = torch.autograd.grad(out.loss * len(r), r)
            cand.append(gr)
        cos = torch.stack([nn.functional.cosine_similarity(got, c, dim=1) for c in cand], 1)
        pred_known = cos.argmax(1)
        u = torch.linalg.svd(got, full_matrices=False).Vh[0]
        ref = (cand[0] - cand[1]).mean(0) if prev is None else prev
        if float(u @ ref) < 0:
            u = -u
        prev = u
        pred_sign = (got @ u < 0).long()  # label 0's gradient lies along cand[0] - cand[1]
        for name, pred in (("known_head", pred_known), ("sign", pred_sign)):
            hits[name] += int((pred == labels).sum())
            if step == 0:
                first[name] += int((pred == labels).sum())
        n += len(labels)
        n_first = len(labels) if step == 0 else n_first
    return {"known_head": hits["known_head"] / n, "sign": hits["sign"] / n,
            "known_head_step0": first["known_head"] / n_first, "sign_step0": first["sign"] / n_first,
            "examples": n, "steps": steps, "seconds": time.perf_counter() - t0}
