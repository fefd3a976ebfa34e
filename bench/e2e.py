"""End-to-end step time and traffic of split fine-tuning over a real TCP link at 10/100/1000 Mbps.

For each emulated link speed a cloud server process (``python -m sft_kernels serve``) runs on
loopback with ``--link-mbps``, and an edge trainer in this process sends through the same
token-bucket limiter, so both directions see the link.  Four settings:

* layer split, no codec (``none``): the hidden states in fp32;
* layer split, ``int8`` up / ``int8,sr`` down;
* bottleneck rank 4, fp32 (``none``) -- the paper's method without quantization;
* bottleneck rank 4, ``int8`` up / ``int8,sr`` down -- this framework's default;

and each of them as a U-split (``U ...``, ``RunConfig(u_split=True)``): the head and the loss stay
on the edge, so no label goes up; the cloud's pooled rows (one hidden vector per example) come
down and their gradient goes up, through the same codecs, on top of the boundary tensors, in
two round trips (FORWARD, BACKWARD) and a STEP per step instead of one TRAIN.

Each run trains MiniLM on SST-2 (batch 32) for ``--steps`` steps; the first step is warm-up and
the median of the others is reported, with payload and on-wire bytes per step each way and the
payload per training example.

    python bench/e2e.py                      # the table in bench/README.md
    python bench/e2e.py --steps 4 --mbps 10  # quicker
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
if str(REPO) not in sys.path:  # the package from this checkout, installed or not (as bench/glue.py does)
    sys.path.insert(1, str(REPO))

from common import machine  # noqa: E402

from sft_kernels.channel import LinkLimiter  # noqa: E402
from sft_kernels.runtime import EdgeTrainer, LocalCloud, RunConfig, StepBatches  # noqa: E402
from sft_kernels.runtime.jobs import load_train_dev  # noqa: E402

SETTINGS = {
    "layer/none": dict(mode="layer", rank=None, fwd_codec="none", bwd_codec="none"),
    "layer/int8": dict(mode="layer", rank=None, fwd_codec="int8", bwd_codec="int8,sr"),
    "bottleneck r=4 fp32": dict(mode="bottleneck", rank=4, fwd_codec="none", bwd_codec="none"),
    "bottleneck r=4 int8": dict(mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr"),
}
SETTINGS.update({f"U {name}": {**kw, "u_split": True} for name, kw in SETTINGS.items()})


def run_setting(name: str, mbps: float, cloud: LocalCloud, train, steps: int, batch_size: int) -> dict:
    """Train ``steps`` steps of one setting through ``cloud``; per-step times and bytes."""
    cfg = RunConfig(task="SST-2", num_labels=2, total_steps=steps, batch_size=batch_size, max_length=128,
                    run_id=f"e2e-{name.replace(' ', '_').replace('/', '-').replace('=', '')}-{int(mbps)}",
                    **SETTINGS[name])
    t = EdgeTrainer(cfg, None, host=cloud.host, port=cloud.port, client_id=cloud.client_id, token=cloud.token,
                    link=LinkLimiter(mbps), progress=False)
    t.batch_at = StepBatches(t.tokenizer, train, cfg.batch_size, cfg.max_length, cfg.seed)
    t.open()
    times = []
    w0 = (t.conn.stats.wire_bytes_sent, t.conn.stats.wire_bytes_received)
    for _ in range(steps):
        t0 = time.perf_counter()
        t.train_step()
        times.append(time.perf_counter() - t0)
    st = t.conn.stats
    wire_up, wire_down = st.wire_bytes_sent - w0[0], st.wire_bytes_received - w0[1]
    t.finish()  # the server drops a finished session: more settings than its per-client quota of open ones
    t.close()
    s = t.summary
    return {"setting": name, "mbps": mbps, "steps": steps, "step_s_median": statistics.median(times[1:] or times),
            "step_s_all": times, "payload_up_per_step": s.payload_up / steps,
            "payload_down_per_step": s.payload_down / steps, "wire_up_per_step": wire_up / steps,
            "wire_down_per_step": wire_down / steps, "examples_per_step": s.examples / steps,
            "payload_up_per_example": s.per_example()[0], "payload_down_per_example": s.per_example()[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mbps", type=float, nargs="+", default=[10, 100, 1000], help="link speeds (default 10 100 1000)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=6, help="steps per run; the first is warm-up (default 6)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "e2e.json")
    p.add_argument("--data-dir", default=None)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error(f"--steps must be >= 2 (the first is warm-up), got {a.steps}")
    _, train, _ = load_train_dev("SST-2", a.data_dir, max_train=a.steps * a.batch_size, max_eval=1)
    rows = []
    for mbps in a.mbps:
        with LocalCloud(extra=["--any-split", "--quiet", "--link-mbps", str(mbps)]) as cloud:
            for name in a.settings:
                r = run_setting(name, mbps, cloud, train, a.steps, a.batch_size)
                rows.append(r)
                print(f"{name:22s} {mbps:6.0f} Mbps  step {r['step_s_median']:7.3f} s  "
                      f"up {r['payload_up_per_step'] / 1e3:9.1f} kB  down {r['payload_down_per_step'] / 1e3:9.1f} kB  "
                      f"per example up {r['payload_up_per_example']:8.1f} B  down {r['payload_down_per_example']:8.1f} B",
                      flush=True)
    print(f"\nmachine: {machine()}\n")
    print("| setting | link | step time (median) | payload up / step | payload down / step | wire up / step | "
          "wire down / step | payload up / example | payload down / example |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['mbps']:.0f} Mbps | {r['step_s_median']:.3f} s | "
              f"{r['payload_up_per_step'] / 1e3:.1f} kB | {r['payload_down_per_step'] / 1e3:.1f} kB | "
              f"{r['wire_up_per_step'] / 1e3:.1f} kB | {r['wire_down_per_step'] / 1e3:.1f} kB | "
              f"{r['payload_up_per_example']:.1f} B | {r['payload_down_per_example']:.1f} B |")
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"machine": machine(), "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
