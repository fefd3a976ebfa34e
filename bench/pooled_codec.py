"""The U-split's downlink: what the pooled rows (and their gradient) cost and how training takes each codec.

Trains all-MiniLM-L6-v2 split at layer 3 (bottleneck rank 4, int8 boundary up, int8,sr gradient
down) as a U-split with ``SimulatedSplit`` on a fixed SST-2 training subsample, once per pooled-row
codec, then evaluates on the SST-2 dev set.  Also reports, for one batch of real pooled rows, the
encoded bytes per example and the relative reconstruction error of each codec.

    python bench/pooled_codec.py --steps 100 --out bench/results/pooled_codec.json
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sft_kernels import SimulatedSplit, from_spec  # noqa: E402
from sft_kernels.data import batches, compute_metrics, load_task, subsample  # noqa: E402
from sft_kernels.runtime.parts import linear_warmup  # noqa: E402
from sft_kernels.split import minilm_classifier, split_model  # noqa: E402

SPLIT = dict(at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr")
CODECS = [("int8", "int8,sr"), ("lowrank:r=8+int8", "lowrank:r=8+int8"), ("lowrank:r=4+int8", "lowrank:r=4+int8")]


def cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def codec_table(tok, dev) -> list[dict]:
    """Bytes per example and relative error of each codec on one batch of 32 real pooled rows."""
    _, model = minilm_classifier(2, seed=0)
    edge, cloud, _ = split_model(model, u_split=True, **{k: SPLIT[k] for k in ("at", "mode", "rank")})
    b = next(batches(tok, dev, 32, max_length=128))
    with torch.no_grad():
        pooled = cloud.eval()(edge.eval()(b["input_ids"], b["attention_mask"], token_type_ids=b["token_type_ids"]))
    rows = []
    for spec in ["none", "int8", "int4", "lowrank:r=16+int8", "lowrank:r=8+int8", "lowrank:r=4+int8"]:
        c = from_spec(spec)
        p = c.encode(pooled, 0)
        rows.append({"codec": spec, "bytes_per_example": p.nbytes / pooled.shape[0],
                     "rel_error": float((c.decode(p) - pooled).norm() / pooled.norm())})
    return rows


def train(tok, train_ds, dev, codecs, steps: int, seed: int) -> dict:
    _, model = minilm_classifier(2, seed=seed)
    sim = SimulatedSplit(model, u_split=True, seed=seed, pooled_codec=codecs[0], pooled_grad_codec=codecs[1], **SPLIT)
    opt = torch.optim.AdamW(sim.parameters(), lr=1e-4, weight_decay=0.01, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: linear_warmup(s, steps, steps // 10))
    t0 = time.perf_counter()
    step, losses = 0, []
    while step < steps:
        for b in batches(tok, train_ds, 32, max_length=128, shuffle=True, seed=seed, epoch=step):
            out = sim(b["input_ids"], b["attention_mask"], labels=b["labels"], token_type_ids=b["token_type_ids"])
            out.loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            losses.append(float(out.loss.detach()))
            step += 1
            if step == steps:
                break
    up, down = sim.bytes_sent / (32 * steps), sim.bytes_received / (32 * steps)
    sim.eval()
    preds = np.zeros(len(dev), dtype=np.int64)
    with torch.no_grad():
        for b in batches(tok, dev, 64, max_length=128, sort_by_length=True):
            preds[b["index"].numpy()] = sim(b["input_ids"], b["attention_mask"],
                                            token_type_ids=b["token_type_ids"]).logits.argmax(-1).numpy()
    acc = compute_metrics("SST-2", preds, np.asarray(dev["label"]))["accuracy"]
    return {"pooled_codec": codecs[0], "pooled_grad_codec": codecs[1], "seed": seed, "steps": steps,
            "accuracy": acc, "train_bytes_up_per_example": up, "train_bytes_down_per_example": down,
            "last_losses": losses[-5:], "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=100, help="training steps of batch 32 (default 100)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    a = ap.parse_args()
    tok, _ = minilm_classifier(2)
    _, train_full = load_task("SST-2", "train")
    train_ds = subsample(train_full, 32 * a.steps)
    _, dev = load_task("SST-2", "dev")
    result = {"command": "python " + " ".join(sys.argv), "cpu": cpu(), "torch": torch.__version__,
              "codecs": codec_table(tok, dev), "runs": []}
    for seed in a.seeds:
        for codecs in CODECS:
            r = train(tok, train_ds, dev, codecs, a.steps, seed)
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    print(json.dumps(result["codecs"], indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
