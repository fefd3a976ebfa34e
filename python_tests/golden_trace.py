"""The golden trace: per-step losses of 10 steps of seed 0, simulated and over TCP, layer and bottleneck.

Recorded from main before the runtime hardening (``python python_tests/golden_trace.py --write``)
into ``python_tests/golden/trace.json``; ``test_golden.py`` recomputes it and requires the same
bits.  A single session's numbers must never change with a runtime change, so the GLUE results
in RESULTS.md stay valid.  Losses are stored as ``float.hex`` (exact).
"""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

import torch

from runtime_helpers import make_trainer, simulated_run
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudServer, RunConfig

PATH = Path(__file__).parent / "golden" / "trace.json"
STEPS = 10
TOKEN = "golden-token"
MODES = {"layer": dict(mode="layer", rank=None), "bottleneck": dict(mode="bottleneck", rank=4)}


def config(mode: str) -> RunConfig:
    """The run of the trace: seed 0, batch 8, max length 32, 10 steps, warmup 2, int8 up, int8+SR down."""
    return RunConfig(total_steps=STEPS, batch_size=8, max_length=32, run_id=f"golden-{mode}", warmup_steps=2,
                     seed=0, **MODES[mode])


def train_data():
    return load_task("synthetic", "train", limit=96)[1]


def simulated_losses(cfg: RunConfig, ds) -> list[float]:
    return simulated_run(cfg, ds, cfg.total_steps)[0]


def tcp_losses(cfg: RunConfig, ds) -> list[float]:
    srv = CloudServer({"edge": TOKEN.encode()}).start()
    try:
        t = make_trainer(cfg, ds, *srv.address, token=TOKEN)
        summary = t.train()
        t.finish()
        t.close()
        return list(summary.losses)
    finally:
        srv.shutdown()


def compute() -> dict[str, list[float]]:
    ds = train_data()
    out = {}
    for mode in MODES:
        cfg = config(mode)
        out[f"simulated/{mode}"] = simulated_losses(cfg, ds)
        out[f"tcp/{mode}"] = tcp_losses(cfg, ds)
    return out


def machine() -> dict[str, str]:
    """What the trace's bits depend on besides the code: CPU, torch build."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "python": sys.version.split()[0],
            "blas": torch.backends.mkl.is_available() and "mkl" or "other", "threads": str(torch.get_num_threads())}


def load() -> dict:
    data = json.loads(PATH.read_text())
    data["losses"] = {k: [float.fromhex(x) for x in v] for k, v in data["losses"].items()}
    return data


if __name__ == "__main__":
    if "--write" not in sys.argv:
        raise SystemExit("usage: python python_tests/golden_trace.py --write   (records the trace; only on purpose)")
    losses = compute()
    PATH.write_text(json.dumps({"machine": machine(), "losses": {k: [x.hex() for x in v] for k, v in losses.items()},
                                "decimal": losses}, indent=1) + "\n")
    print(json.dumps(losses, indent=1))
