"""Helpers shared by the runtime tests: small run configs, trainers, the simulated reference run."""
from __future__ import annotations

import torch

from sft_kernels import SimulatedSplit
from sft_kernels.runtime import EdgeTrainer, RunConfig, StepBatches
from sft_kernels.runtime.parts import make_optimizer, make_scheduler
from sft_kernels.split import minilm_classifier

TOKEN = "t0ken-for-tests"
STEPS = 10


def small_cfg(**kw) -> RunConfig:
    """10 steps of batch 8, max length 32, warmup 2 (override with ``kw``)."""
    base = dict(total_steps=STEPS, batch_size=8, max_length=32, run_id="t", warmup_steps=2)
    base.update(kw)
    return RunConfig(**base)


def make_trainer(cfg, ds, host, port, client_id: str = "edge", token: str = TOKEN, **kw) -> EdgeTrainer:
    """An :class:`EdgeTrainer` on ``ds`` (no progress bar unless asked)."""
    kw.setdefault("progress", False)
    t = EdgeTrainer(cfg, None, host=host, port=port, client_id=client_id, token=token, **kw)
    t.batch_at = StepBatches(t.tokenizer, ds, cfg.batch_size, cfg.max_length, cfg.seed)
    return t


def simulated_run(cfg, ds, steps):
    """``(losses, SimulatedSplit)`` of ``steps`` steps of ``cfg`` in one process: what a TCP run must equal."""
    tok, model = minilm_classifier(cfg.num_labels, seed=cfg.seed)
    sim = SimulatedSplit(model, at=cfg.at, mode=cfg.mode, rank=cfg.rank, fwd_codec=cfg.fwd_codec,
                         bwd_codec=cfg.bwd_codec, eliminate_links=cfg.eliminate_links, seed=cfg.seed)
    opt, batches = make_optimizer(sim, cfg), StepBatches(tok, ds, cfg.batch_size, cfg.max_length, cfg.seed)
    sched = make_scheduler(opt, cfg)
    losses = []
    for step in range(steps):
        out = sim(**batches(step))
        out.loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    return losses, sim


def params(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a, b, tol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=tol, rtol=0, msg=lambda m: f"{k}: {m}")
