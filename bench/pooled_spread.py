"""How much the split model's pooled output varies between examples before training, and what a linear probe reads from it.

Companion of bench/init_fidelity.py (which measures how *close* the split is to the unsplit model): a
split can be close on average and still give a fresh task head little to learn from.  For the
unsplit MiniLM, the paper's ``svd`` split and each calibrated fit (layer 3, rank 4, links
eliminated; calibration on 512 unlabelled SST-2 training sentences, a sample fixed by seed 0):

* spread: the norm over dimensions of the per-dimension std of the pooled output over SST-2 dev;
* probe: dev accuracy of an L2-regularised logistic regression (LBFGS) on the standardised pooled
  outputs of 2000 other SST-2 training sentences (the best of three regularisation strengths).

    OMP_NUM_THREADS=1 python bench/pooled_spread.py
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from init_fidelity import AT, cpu_model, encode, pooled  # noqa: E402
from sft_kernels.data import load_task  # noqa: E402
from sft_kernels.split import load_minilm, split_model  # noqa: E402
from sft_kernels.split.calibrate import FIT_METHODS, CalibrationOptions  # noqa: E402

RANK = 4


def probe(train_x: torch.Tensor, train_y: torch.Tensor, dev_x: torch.Tensor, dev_y: torch.Tensor) -> float:
    """Best dev accuracy (%) of logistic regression on standardised features over three L2 strengths."""
    m, s = train_x.mean(0), train_x.std(0) + 1e-6
    tx, dx = (train_x - m) / s, (dev_x - m) / s
    best = 0.0
    for lam in (1e-3, 1e-2, 1e-1):
        w = torch.zeros(tx.shape[1], dtype=torch.float64, requires_grad=True)
        b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(tx @ w + b, train_y.double()) \
                + lam * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        best = max(best, float(((dx @ w + b > 0).long() == dev_y).double().mean()) * 100)
    return best


def main() -> int:
    tok, base = load_minilm()
    base.eval()
    _, train = load_task("SST-2", "train")
    _, dev = load_task("SST-2", "dev")
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0)).tolist()
    calibration = [train[i]["text_a"] for i in order[:512]]

    def batches(texts: list[str], labels: list[int]) -> tuple[list[dict], torch.Tensor]:
        pairs = sorted(zip(texts, labels), key=lambda p: len(p[0]))  # encode() sorts the same way
        return encode(tok, [t for t, _ in pairs], None, 64), torch.tensor([y for _, y in pairs])

    probe_rows = train.select(order[512:2512])
    train_b, train_y = batches(probe_rows["text_a"], probe_rows["label"])
    dev_b, dev_y = batches(dev["text_a"], dev["label"])
    settings = [("unsplit", None, None), ("svd", "svd", None)] + [(f"calibrated {f}", "calibrated", f)
                                                                  for f in FIT_METHODS]
    print(f"SST-2, MiniLM at layer {AT}, rank {RANK}; {cpu_model()}, torch {torch.__version__}\n")
    print("| model | pooled between-example spread | linear probe dev accuracy (%) |\n|---|---|---|")
    for name, init, fit in settings:
        if init is None:
            run = base
        else:
            kw = {} if fit is None else dict(calibration=calibration, tokenizer=tok,
                                             calibration_options=CalibrationOptions(fit=fit, progress=False))
            edge, cloud = split_model(copy.deepcopy(base), at=AT, mode="bottleneck", rank=RANK, seed=0, init=init,
                                      **kw)
            edge.eval(), cloud.eval()

            def run(**b: torch.Tensor):
                return cloud(edge(**b))
        feats_dev = pooled(lambda b: run(**b), dev_b).double()
        feats_train = pooled(lambda b: run(**b), train_b).double()
        print(f"| {name} | {float(feats_dev.std(0).norm()):.2f} | {probe(feats_train, train_y, feats_dev, dev_y):.1f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
