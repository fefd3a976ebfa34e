"""Train calibrated-bottleneck variants that are not package options, through the GLUE harness.

The study behind the choice of ``init="calibrated"``'s fit (RESULTS.md, findings): does a code that
rebuilds the eliminated residual *train* as well as the paper's code, and which part of the rebuild
helps or hurts?  Each variant wraps the package's own fit (:func:`sft_kernels.split.calibrate.fit_code`)
and runs ``bench/glue.py`` unchanged otherwise, so the numbers compare with the harness's configs
(use ``--configs k4``: the variant replaces k4's fit; write to a separate ``--out``):

* ``--fit pca|svd|weighted``: a package fit method; ``--fit spca``: principal directions of the
  standardised activations (each dimension divided by its std, so BERT's few outlier dimensions
  do not own the code), with least-squares decoders of the residual and of the FFN pre-activation.
* ``--mean-scale K``: the rebuilt residual's constant ``c`` times K (0: a centred rebuild).
* ``--output-mean``: after the fit, shift layer K's output LayerNorm bias so that the split layer's
  mean output over the calibration tokens equals the unsplit layer's (the mean put back after the
  norm instead of before it).

Each run prints the layer-K relative error and the token spread (norm of the per-dimension std over
calibration tokens) of the split and unsplit layer, then the harness writes its CSV row.

    python bench/fit_variants.py --fit svd --mean-scale 0 -- --tasks SST-2 --configs k4 --seeds 0 1 2 \\
        --out results/fit_variants/svd_c0.csv --results-md results/fit_variants/report.md --quiet

Knows the package's split internals it wraps (``surgery.fit_code``, ``_calibrate``, ``_check_init``); the
package never imports this.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from sft_kernels.split import calibrate, surgery  # noqa: E402
from sft_kernels.split.calibrate import Code  # noqa: E402

FITS = (*calibrate.FIT_METHODS, "spca")


def standardised_pca(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], rank: int) -> Code:
    """The ``spca`` code: top-r principal directions of ``(x − μ) / σ`` (rows normalised), LS decoders."""
    xd = x.double()
    w = torch.ones(xd.shape[0], dtype=torch.float64)
    mu, sd = xd.mean(0), xd.std(0).clamp_min(1e-6)
    a = torch.linalg.svd((xd - mu) / sd, full_matrices=False)[2][:rank] / sd
    a = a / a.norm(dim=1, keepdim=True)
    z = (xd - mu) @ a.t()
    d, c = calibrate._decoder(z, xd, w)
    pre = xd @ w1.detach().double().t() + (0 if b1 is None else b1.detach().double())
    b_mat, b_vec = calibrate._decoder(z, pre, w)
    return Code(a, mu, d, c, b_mat, b_vec)


def install(fit: str, mean_scale: float, output_mean: bool) -> None:
    """Wrap the package's fit and calibration with the variant (post-LN families: the BERT layer's modules)."""
    package_fit = calibrate.fit_code
    package_calibrate = surgery._calibrate
    package_check = surgery._check_init

    def _check_init(*a: Any, **kw: Any):  # the split then prepares what the fit needs (the svd fit: W1's factors)
        options = package_check(*a, **kw)
        if options is None or fit not in calibrate.FIT_METHODS:
            return options
        return dataclasses.replace(options, fit=fit)

    def fit_code(x: torch.Tensor, ffn_in: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], rank: int,
                 method: str, **kw: Any) -> Code:
        code = (standardised_pca(x, w1, b1, rank) if fit == "spca"
                else package_fit(x, ffn_in, w1, b1, rank, fit, **kw))
        code.c = code.c * mean_scale
        return code

    def _calibrate(edge, cloud, layer, calibration, tokenizer, options, *a: Any, **kw: Any):
        report = package_calibrate(edge, cloud, layer, calibration, tokenizer, options, *a, **kw)
        modes = {m: m.training for m in (*edge.modules(), *cloud.modules(), *layer.modules())}
        edge.eval(), cloud.eval(), layer.eval()
        with torch.no_grad():
            accepted = ("input_ids", "attention_mask", *edge.adapter.extra_inputs)
            x = torch.cat([edge.code_input(**b) for b in
                           calibrate.calibration_batches(calibration, tokenizer, accepted, options)])
            z = edge.factor(x)
            split_out = edge.adapter.ffn_output(cloud.ffn, cloud.factor(z), cloud.decoder(z))
            unsplit_out = layer.output(layer.intermediate(x), x)
            if output_mean:
                cloud.ffn["output"].LayerNorm.bias.add_(unsplit_out.mean(0) - split_out.mean(0))
                split_out = edge.adapter.ffn_output(cloud.ffn, cloud.factor(z), cloud.decoder(z))
            print(f"[fit_variants] layer-K relative error {float((split_out - unsplit_out).norm() / unsplit_out.norm()):.3f}; "
                  f"token spread split {float(split_out.std(0).norm()):.2f}, unsplit {float(unsplit_out.std(0).norm()):.2f}",
                  file=sys.stderr, flush=True)
        for m, training in modes.items():
            m.train(training)
        return report

    surgery.fit_code = fit_code
    surgery._calibrate = _calibrate
    surgery._check_init = _check_init


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Arguments after -- go to bench/glue.py (use --configs k4 and a separate --out).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fit", choices=FITS, default=calibrate.DEFAULT_FIT, help="the code's fit")
    p.add_argument("--mean-scale", type=float, default=1.0, help="factor on the rebuilt residual's constant c")
    p.add_argument("--output-mean", action="store_true", help="match layer K's mean output after its LayerNorm")
    a = p.parse_args(own)
    if not rest:
        p.error("no bench/glue.py arguments after --: give at least --configs k4 --out FILE")
    install(a.fit, a.mean_scale, a.output_mean)
    import glue

    return glue.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
