"""The calibrated bottleneck's fit: a rank-r code of the activations at the split, and its decoders.

``split_model(..., init="calibrated", calibration=...)`` runs the edge on the user's own
unlabelled text, collects the activations where the bottleneck cuts layer K (real tokens
only) and hands them to :func:`fit_code`, which returns the affine code and decoders (all
float64; the surgery copies them into ordinary trainable ``nn.Linear`` parameters):

* edge ``z = A (x − μ)`` (``A``: r × d; an edge Linear with weight ``A`` and bias ``−Aμ``);
* post-LN families (``x`` = the FFN input, also the residual): the FFN's up-projection from
  the code, ``pre ≈ B z + b`` (``B``: rows × r), and the residual rebuilt, ``x̂ = D z + c``,
  added where the paper drops the link;
* pre-LN families (``x`` = the residual stream before the FFN's norm): only ``x̂ = D z + c``;
  the cloud runs the norm, the full FFN and the residual on ``x̂``.

Fit methods (:data:`FIT_METHODS`; bench/init_fidelity.py measures them, see its table):

* ``"pca"`` (the default, the winner): ``A`` = the top-r principal directions of the centred
  ``x`` (orthonormal rows), ``D = Aᵀ``, ``c = μ``; post-LN ``B = W1 Aᵀ``, ``b = b1 + W1 μ``.
* ``"svd"``: the paper's code ``A = Σ_r V_rᵀ`` of W1 (post-LN: ``B = U_r``, ``b = b1 + U_r A μ``,
  the paper's pre-activation exactly) plus least-squares ``D, c``.
* ``"weighted"``: a reduced-rank regression of both targets, the FFN pre-activation
  ``W1·a + b1`` and ``x``, each output unit weighted by the RMS sensitivity of layer K's
  output to it (random probes through the layer's own modules, seeded), then
  least-squares decoders; ``A``'s rows are made orthonormal (z in activation units).

Why PCA won (bench/init_fidelity.py: MiniLM, layer 3, links eliminated, 300 SST-2 dev
sentences; relative error of the pooled output at r = 1 / 2 / 4 / 8 / 16):

* ``svd`` init (the paper):   1.89 / 1.79 / 1.81 / 1.84 / 1.72
* calibrated ``pca``:         0.63 / 0.64 / 0.69 / 0.67 / 0.62
* calibrated ``svd``:         1.16 / 1.16 / 0.98 / 0.86 / 0.74
* calibrated ``weighted``:    0.63 / 0.66 / 0.70 / 0.66 / 0.62

The error left is dominated by the rebuilt residual: a LayerNorm output spreads its energy
over many directions (held-out residual error ~0.6 at r = 4), so most of the gain comes from
restoring the residual's mean and its top directions, and PCA is the best rank-r
reconstruction of it.  Weighting the joint fit by the FFN's sensitivities moves the pooled
error by about 3% at most, never ahead by more than 0.5% (the fixed head's logits are mixed:
11% better at r = 8, 4% worse at r = 4), for an extra W1 pass and autograd probes, so the
simpler, W1-free PCA is the default; the paper's code with a least-squares residual
is far behind, its directions serve W1, not the residual.  A full downstream (Gauss-Newton)
metric through the later layers was also tried in a prototype and gained nothing either.

Init fidelity is not trainability (RESULTS.md, findings; ``bench/fit_variants.py``): on SST-2 every
calibrated fit starts closer to the unsplit model than the paper's code, yet collapses to the
majority class more often early in fine-tuning (16 steps at lr 3e-4: PCA on every seed tried, the
paper's code at 3 of 5; 63 steps at lr 1e-4: PCA and the svd fit on 1 seed of 2, the paper's code on
none).  The rebuilt residual adds a large token-independent part (its mean) and the code's few
outlier-dominated directions before layer K's output norm, so the cloud's tokens and pooled outputs
vary less between examples (pooled between-example spread on SST-2 dev: unsplit 0.70, paper's code
0.47, calibrated svd 0.34, calibrated PCA 0.21), and the fresh head has less to learn from.  Centring
the rebuild, shrinking its mean, standardising the PCA, or restoring the output mean after the norm
did not remove the collapse.  It is a delay: at 125 steps the PCA fit learns on the seed where it
had collapsed at 63 and ends above the paper's code (80.2 against 78.3, unsplit 82.7), so PCA stays
the default, and the real-budget study (``make glue``) is the measure.

Numerics: everything is fitted in float64 from one SVD of the (weighted) centred
activations; decoders are least squares with a relative cutoff (``gelsd``), never normal
equations, because post-LN activations (LayerNorm outputs) span only d − 1 directions.  The
numerical rank uses the cutoff :data:`RANK_RTOL`; a LayerNorm output's one structural null
direction is allowed (``null_dims``), so the full-rank code (r = d) stays exact.

Pre-LN token weights: the residual stream of pre-LN models carries massive activations on
a few tokens (the first token, delimiters); every reader of the stream is a norm, so what
matters is each token's *relative* error.  Every fit is therefore weighted per token by
``1 / mean(x_t²)`` (normalised to mean 1): those tokens are weighted, not excluded.

Knows tensors, tokenizers (called, not imported) and fits: no adapters, transformers models, codecs or
channels.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = ["FIT_METHODS", "DEFAULT_FIT", "RANK_RTOL", "CalibrationOptions", "CalibrationReport", "Code",
           "calibration_batches", "check_activations", "fit_code", "heldout_errors", "stream_token_weights",
           "sample_tokens"]

#: The ways :func:`fit_code` chooses the code; see the module docstring.
FIT_METHODS = ("pca", "svd", "weighted")
#: The fit ``init="calibrated"`` uses unless told otherwise (the winner of bench/init_fidelity.py).
DEFAULT_FIT = "pca"
#: Singular values below this fraction of the largest are rounding (fp32 activations carry ~1e-7).
RANK_RTOL = 1e-5
#: Random probes per token of the ``"weighted"`` fit's sensitivity estimate, and tokens probed (about).
_PROBES = 4
_PROBE_TOKENS = 2048


@dataclass(frozen=True)
class CalibrationOptions:
    """How ``init="calibrated"`` collects and fits (``split_model(..., calibration_options=...)``).

    Attributes:
        fit: one of :data:`FIT_METHODS`.
        max_tokens: at most this many real tokens are kept (a sample fixed by the split's seed).
        heldout: fraction of the kept tokens held out of the fit to report its error, in (0, 0.5].
        batch_size: sentences per edge forward when the calibration is a list of strings.
        max_length: truncation length when tokenizing strings.
        progress: show a tqdm progress bar over the calibration batches.
    """

    fit: str = DEFAULT_FIT
    max_tokens: int = 32768
    heldout: float = 0.1
    batch_size: int = 32
    max_length: int = 128
    progress: bool = True

    def __post_init__(self) -> None:
        if self.fit not in FIT_METHODS:
            raise ValueError(f"calibration_options.fit must be one of {FIT_METHODS}, got {self.fit!r}")
        for name in ("max_tokens", "batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"calibration_options.{name} must be a positive int, got {value!r}")
        if not 0 < self.heldout <= 0.5:
            raise ValueError(f"calibration_options.heldout must be in (0, 0.5], got {self.heldout!r}")


@dataclass(frozen=True)
class CalibrationReport:
    """What a calibrated split was fitted on and how well: ``edge.calibration`` / ``cloud.calibration``.

    ``errors``: relative errors on the held-out calibration tokens,
    ``‖estimate − truth‖ / ‖truth‖`` over those tokens (token-weighted as the fit is: pre-LN
    tokens by ``1 / mean(x_t²)``): ``"residual"`` (post-LN: ``D z + c`` vs the FFN input) and
    ``"ffn_pre"`` (post-LN: ``B z + b`` vs ``W1 a + b1``), or ``"stream"`` (pre-LN: ``x̂`` vs ``x``).
    """

    fit: str
    rank: int
    code: str
    tokens: int
    heldout_tokens: int
    errors: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        errs = ", ".join(f"{k} {v:.4f}" for k, v in self.errors.items())
        return (f"calibrated bottleneck (fit={self.fit}, rank={self.rank}, code={self.code}): fitted on "
                f"{self.tokens} tokens; held-out relative error ({self.heldout_tokens} tokens): {errs}")


@dataclass
class Code:
    """A fitted code, float64: ``z = A (x − mu)``; ``pre ≈ B z + b`` (post-LN only); ``x̂ = D z + c``."""

    A: torch.Tensor
    mu: torch.Tensor
    D: torch.Tensor
    c: torch.Tensor
    B: Optional[torch.Tensor] = None
    b: Optional[torch.Tensor] = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mu) @ self.A.t()


def calibration_batches(calibration: Iterable[Any], tokenizer: Any, accepted: Sequence[str],
                        options: CalibrationOptions) -> list[dict[str, torch.Tensor]]:
    """The edge's batches from ``calibration``: dicts kept with their ``accepted`` keys only (labels and
    the like are ignored), then the strings tokenized in batches of similar length (sorted by length,
    stably: less padding to run; right padding, truncation to ``options.max_length``)."""
    batches: list[dict[str, torch.Tensor]] = []
    texts: list[str] = []
    for item in calibration:
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibration holds strings but no tokenizer= was given: pass the model's tokenizer, "
                                 "or tokenized batches")
            texts.append(item)
        elif isinstance(item, Mapping):
            if "input_ids" not in item:
                raise ValueError(f"calibration: a batch has no input_ids (keys {sorted(item)})")
            batches.append({k: v for k, v in item.items() if k in accepted})
        else:
            raise ValueError(f"calibration items must be tokenized batches (dicts) or strings, got "
                             f"{type(item).__name__}")
    texts.sort(key=len)
    for i in range(0, len(texts), options.batch_size):
        enc = tokenizer(texts[i:i + options.batch_size], padding=True, truncation=True,
                        max_length=options.max_length, padding_side="right", return_tensors="pt")
        batches.append({k: v for k, v in enc.items() if k in accepted})
    return batches


def check_activations(x: torch.Tensor) -> None:
    """``ValueError`` naming ``calibration`` when ``x`` holds nan or inf."""
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"calibration: the activations at the split are not finite ({bad} of {x.numel()} values "
                         f"are nan/inf): check the model's weights and dtype, or the calibration inputs")


def stream_token_weights(x: torch.Tensor) -> torch.Tensor:
    """Per-token weights ``1 / mean(x_t²)`` normalised to mean 1 (pre-LN: relative error per token)."""
    ms = x.pow(2).mean(1)
    w = 1.0 / (ms + 1e-6 * ms.median().clamp_min(1e-30))
    return w / w.mean()


def sample_tokens(n: int, max_tokens: int, heldout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(fit rows, held-out rows)``: a seeded permutation of ``min(n, max_tokens)`` of ``n`` rows.

    Uses its own generator, so the global RNG is untouched.  At least one row is held out
    (none when ``n < 2``).
    """
    gen = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=gen)[:max_tokens]
    n_ho = min(max(1, int(round(heldout * len(perm)))), len(perm) - 1) if len(perm) >= 2 else 0
    return perm[n_ho:].sort().values, perm[:n_ho].sort().values


def _weighted_mean(y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (w[:, None] * y).sum(0) / w.sum()


def _decoder(z: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least squares ``y ≈ z Wᵀ + c`` for a weighted-centred ``z``: ``(W, c)``.

    ``z`` has weighted mean 0, so ``c`` is the weighted mean of ``y`` and ``W`` a least-squares
    solve with a relative cutoff (``gelsd``: an SVD, never the normal equations).
    """
    c = _weighted_mean(y, w)
    sw = w.sqrt()[:, None]
    sol = torch.linalg.lstsq(z * sw, (y - c) * sw, rcond=RANK_RTOL, driver="gelsd").solution
    return sol.t().contiguous(), c


def _orthonormal_code(a: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Rows spanning ``a``'s row space, orthonormal, ordered by the variance of the code on ``cw``."""
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    q = vh[s > s[0] * RANK_RTOL]
    rot = torch.linalg.svd(cw @ q.t(), full_matrices=False)[2]
    return rot @ q


def _sensitivities(layer_out: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], pre: torch.Tensor,
                   res: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS over tokens and seeded Gaussian probes ``v`` of ``∂(vᵀ y)/∂pre`` and ``∂(vᵀ y)/∂res``."""
    gen = torch.Generator().manual_seed(int(seed) + 1)
    p = pre.detach().clone().requires_grad_(True)
    r = res.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        y = layer_out(p, r)
        sp = torch.zeros(pre.shape[1], dtype=torch.float64)
        sr = torch.zeros(res.shape[1], dtype=torch.float64)
        for _ in range(_PROBES):
            v = torch.randn(y.shape, generator=gen, dtype=y.dtype)
            gp, gr = torch.autograd.grad(y, (p, r), v, retain_graph=True)
            sp += gp.double().pow(2).mean(0)
            sr += gr.double().pow(2).mean(0)
    return (sp / _PROBES).sqrt(), (sr / _PROBES).sqrt()


def fit_code(x: torch.Tensor, ffn_in: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], rank: int,
             method: str, *, pre_norm: bool, null_dims: int = 0,
             svd_factors: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
             layer_out: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
             seed: int = 0) -> Code:
    """Fit the rank-``rank`` code of ``x`` (``(tokens, d)``, the code input) with ``method``.

    Args:
        x: code input per real token: the FFN input (post-LN) or the residual stream (pre-LN).
        ffn_in: the FFN input per token (``x`` itself for post-LN, ``norm(x)`` for pre-LN).
        w1, b1: layer K's up-projection ``(rows, d)`` and its bias (or None).
        rank: r, ``1 <= r <= d``.
        method: one of :data:`FIT_METHODS`.
        pre_norm: pre-LN family: weight tokens by :func:`stream_token_weights`, fit no ``B``.
        null_dims: structural null directions of ``x`` (1 for a LayerNorm output) allowed on
            top of its numerical rank.
        svd_factors: ``(Σ_r V_rᵀ, U_r)`` of ``w1`` (method ``"svd"``).
        layer_out: ``(pre, residual) -> layer K's output`` through the layer's own modules
            (method ``"weighted"``: the sensitivities).
        seed: seeds the ``"weighted"`` fit's probes.

    Raises ``ValueError`` naming ``calibration`` when ``x`` is not finite or its centred
    numerical rank (plus ``null_dims``) is below ``rank``.
    """
    if method not in FIT_METHODS:
        raise ValueError(f"fit must be one of {FIT_METHODS}, got {method!r}")
    check_activations(x)
    x = x.double()
    n, d = x.shape
    w = stream_token_weights(x) if pre_norm else torch.ones(n, dtype=torch.float64)
    mu = _weighted_mean(x, w)
    cw = (x - mu) * w.sqrt()[:, None]
    q, r = torch.linalg.qr(cw)  # (n, d) = (n, d)(d, d): the SVD of cw from the small SVD of r
    u_r, s, vh = torch.linalg.svd(r, full_matrices=False)
    numerical = int((s > s[0] * RANK_RTOL).sum()) if s.numel() and s[0] > 0 else 0
    if numerical + null_dims < rank:
        raise ValueError(f"calibration: the centred activations at the split have numerical rank {numerical} over "
                         f"{n} fitted tokens (+{null_dims} structural), below rank={rank}: pass more (or more "
                         f"varied) calibration text, or a lower rank")
    w1, b1d = w1.detach().double(), (torch.zeros(w1.shape[0], dtype=torch.float64) if b1 is None
                                     else b1.detach().double())
    fin = ffn_in.double()
    if method == "pca":
        a = vh[:rank]
        code = Code(a, mu, a.t().contiguous(), mu.clone())
        if not pre_norm:
            code.B, code.b = w1 @ a.t(), b1d + w1 @ mu
        return code
    if method == "svd":
        if svd_factors is None:
            raise ValueError("fit='svd' needs svd_factors")
        a, u = (t.detach().double() for t in svd_factors)
        z = (x - mu) @ a.t()
        code = Code(a, mu, *_decoder(z, x, w))
        if not pre_norm:
            code.B, code.b = u, b1d + u @ (a @ mu)
        return code
    if layer_out is None:
        raise ValueError("fit='weighted' needs layer_out")
    pre = fin @ w1.t() + b1d
    probe = slice(None, None, max(1, n // _PROBE_TOKENS))  # every k-th token: enough for an RMS
    s_pre, s_res = _sensitivities(layer_out, pre[probe].to(ffn_in.dtype), x[probe].to(ffn_in.dtype), seed)
    targets = torch.cat([(pre - _weighted_mean(pre, w)) * s_pre, (x - mu) * s_res], 1) * w.sqrt()[:, None]
    # reduced-rank regression: least-squares fit of the targets from cw (via its SVD), then their top-r directions
    keep = s > s[0] * RANK_RTOL
    u_c = q @ u_r[:, keep]
    beta = (vh[keep].t() / s[keep]) @ (u_c.t() @ targets)
    v_r = torch.linalg.svd(u_c.t() @ targets, full_matrices=False)[2][:rank]
    a = _orthonormal_code((beta @ v_r.t()).t(), cw)
    if a.shape[0] < rank:  # targets of lower rank than r (full rank, post-LN): complete from the PCA directions
        extra = vh - (vh @ a.t()) @ a
        a = torch.cat([a, _orthonormal_code(extra, cw)[: rank - a.shape[0]]])
    z = (x - mu) @ a.t()
    code = Code(a, mu, *_decoder(z, x, w))
    if not pre_norm:
        code.B, code.b = _decoder(z, pre, w)
    return code


def heldout_errors(code: Code, x: torch.Tensor, ffn_in: torch.Tensor, w1: torch.Tensor,
                   b1: Optional[torch.Tensor], *, pre_norm: bool) -> dict[str, float]:
    """Relative errors of ``code``'s estimates on held-out tokens (see :class:`CalibrationReport`)."""
    if x.shape[0] == 0:
        return {}
    x = x.double()
    w = (stream_token_weights(x) if pre_norm else torch.ones(x.shape[0], dtype=torch.float64)).sqrt()[:, None]
    z = code.encode(x)

    def rel(est: torch.Tensor, truth: torch.Tensor) -> float:
        return float(((est - truth) * w).norm() / ((truth * w).norm()).clamp_min(1e-30))

    x_hat = z @ code.D.t() + code.c
    if pre_norm:
        return {"stream": rel(x_hat, x)}
    pre = ffn_in.double() @ w1.detach().double().t()
    if b1 is not None:
        pre = pre + b1.detach().double()
    return {"residual": rel(x_hat, x), "ffn_pre": rel(z @ code.B.t() + code.b, pre)}

