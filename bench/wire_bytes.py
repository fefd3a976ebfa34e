"""Payload vs wire bytes of the GLUE study's split settings, measured over a real TCP link.

RESULTS.md's traffic table counts payload: the encoded tensors, aux data and labels.  What a
byte-counting proxy sees is more: frame headers, JSON metadata, tensor descriptors and CRC
trailers.  This script trains each setting for a few steps over loopback TCP (an in-process
``CloudServer`` on 127.0.0.1, the edge in this process, the study's batches: batch 32, max
length 128, seed 0, the first ``--steps`` batches of each task's 512-example subsample) and
records, per step, the payload bytes and the bytes of the TRAIN frame and its reply on the
socket.  Bytes are deterministic for a given code state and data, so a few steps suffice; the
rows feed the "Payload vs wire" section of RESULTS.md (``bench/glue.py --report-only``).

    python bench/wire_bytes.py                       # every task, the settings below (~3 min on 2 cores)
    python bench/wire_bytes.py --tasks SST-2 --steps 2
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from common import machine  # noqa: E402
from glue import CONFIGS, SPLIT_AT, parse_max_train, max_train_for  # noqa: E402

from sft_kernels.runtime import CloudServer, EdgeTrainer, RunConfig, StepBatches  # noqa: E402
from sft_kernels.runtime.jobs import load_train_dev  # noqa: E402

OUT = REPO / "bench" / "results" / "wire.json"
TASKS = ("SST-2", "CoLA", "MRPC", "STS-B", "RTE", "WNLI")
SETTINGS = ("b", "c4", "d4_int8", "d4_int4", "f_int8")
_TOKEN = "wire-bench"


def measure(task: str, config: str, steps: int, batch_size: int, max_length: int, server: CloudServer,
            max_train: str) -> dict:
    """Per-step payload and wire bytes of ``steps`` steps of ``config`` on ``task``."""
    spec, train, _ = load_train_dev(task, max_train=max_train_for(task, parse_max_train(max_train)))
    split = dict(CONFIGS[config].split)
    split.setdefault("rank", None)
    cfg = RunConfig(task="glue", num_labels=spec.num_labels, at=SPLIT_AT, seed=0, lr=3e-4, total_steps=steps,
                    batch_size=batch_size, max_length=max_length, run_id=f"{task}-{config}", **split)
    t = EdgeTrainer(cfg, None, host=server.address[0], port=server.address[1], client_id="edge", token=_TOKEN,
                    progress=False)
    t.batch_at = StepBatches(t.tokenizer, train, batch_size, max_length, 0)
    try:
        s = t.train()
        t.finish()
    finally:
        t.close()
    return {"task": task, "config": config, "steps": steps, "examples": s.examples,
            "payload_up": s.payload_up, "payload_down": s.payload_down, "wire_up": s.wire_up,
            "wire_down": s.wire_down, "per_step": [list(r) for r in s.step_bytes]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), help="GLUE tasks (default all six)")
    p.add_argument("--configs", nargs="+", default=list(SETTINGS), choices=[c for c in CONFIGS if c != "a"],
                   help=f"study settings (default {' '.join(SETTINGS)})")
    p.add_argument("--steps", type=int, default=3, help="training steps per cell (default 3)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-train", default="512,WNLI=all", help="as bench/glue.py (default 512,WNLI=all)")
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args(argv)
    from tqdm.auto import tqdm

    server = CloudServer({"edge": _TOKEN.encode()}).start()
    rows = []
    try:
        for task in tqdm(a.tasks, desc="tasks"):
            for config in a.configs:
                rows.append(measure(task, config, a.steps, a.batch_size, a.max_length, server, a.max_train))
                r = rows[-1]
                tqdm.write(f"{task:6s} {config:8s} payload {r['payload_up'] / r['examples']:9.1f} / "
                           f"{r['payload_down'] / r['examples']:9.1f} B/ex   wire {r['wire_up'] / r['examples']:9.1f}"
                           f" / {r['wire_down'] / r['examples']:9.1f} B/ex")
    finally:
        server.shutdown()
    cmd = "python bench/wire_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    a.out.write_text(json.dumps({"machine": machine(), "command": cmd.strip(), "batch_size": a.batch_size,
                                 "max_length": a.max_length, "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
