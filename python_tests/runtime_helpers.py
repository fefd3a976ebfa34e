"""Helpers shared by the runtime tests: small run configs, trainers, the simulated reference run."""
from __future__ import annotations

import socket
import threading

import torch

from sft_kernels import SimulatedSplit
from sft_kernels.runtime import EdgeTrainer, RunConfig, StepBatches
from sft_kernels.runtime.edge import first_batches
from sft_kernels.runtime.parts import make_optimizer, make_scheduler
from sft_kernels.split import CalibrationOptions, minilm_classifier

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
    """``(losses, SimulatedSplit)`` of ``steps`` steps of ``cfg`` in one process: what a TCP run must equal.

    One optimizer over every part (edge, cloud and, with ``cfg.u_split``, the top), stepped by a plain loop.
    """
    tok, model = minilm_classifier(cfg.num_labels, seed=cfg.seed)
    batches = StepBatches(tok, ds, cfg.batch_size, cfg.max_length, cfg.seed)
    # a calibrated run fits on the run's first batches, as EdgeTrainer does by default
    kw = {} if cfg.init != "calibrated" else dict(init="calibrated", calibration=first_batches(cfg, batches),
                                                  calibration_options=CalibrationOptions(progress=False))
    sim = SimulatedSplit(model, at=cfg.at, mode=cfg.mode, rank=cfg.rank, fwd_codec=cfg.fwd_codec,
                         bwd_codec=cfg.bwd_codec, eliminate_links=cfg.eliminate_links, seed=cfg.seed,
                         u_split=cfg.u_split, pooled_codec=cfg.pooled_codec, pooled_grad_codec=cfg.pooled_grad_codec,
                         **kw)
    opt = make_optimizer(sim, cfg)
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


#: A training reply's JSON meta holds the loss.
REPLY_MARK = b'"loss"'


def close_sockets(*socks: socket.socket) -> None:
    """Shut down and close each socket, ignoring those already closed."""
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()


class Proxy:
    """A TCP proxy on 127.0.0.1 in front of ``target`` (which may change between connections).

    Each accepted connection gets a connection to ``target`` and the threads :meth:`_pipes` names,
    ``[(function, args), ...]``.  Subclasses set their attributes before calling ``__init__``.
    """

    def __init__(self, target):
        self.target = target
        self.lock = threading.Lock()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = self.sock.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _pipes(self, client, server) -> list:
        raise NotImplementedError

    def _accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            try:
                s = socket.create_connection(self.target)
            except OSError:
                c.close()
                continue
            for fn, args in self._pipes(c, s):
                threading.Thread(target=fn, args=args, daemon=True).start()

    def close(self):
        self.sock.close()


class ReplyDroppingProxy(Proxy):
    """A TCP proxy (a flaky network) that drops the connection once, instead of forwarding the ``drop_at``-th
    training reply (the edge must re-send that step), and counts the bytes it forwards each way (``up``,
    ``down``: what a byte-counting middlebox sees)."""

    def __init__(self, target, drop_at):
        self.drop_at, self.replies = drop_at, 0
        self.up = self.down = 0
        super().__init__(target)

    def _pipes(self, client, server) -> list:
        return [(self._pipe, (client, server, False)), (self._pipe, (server, client, True))]

    def _pipe(self, src, dst, from_server):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if from_server and REPLY_MARK in data:
                    with self.lock:
                        self.replies += data.count(REPLY_MARK)
                        drop = self.replies == self.drop_at
                    if drop:
                        break
                dst.sendall(data)
                with self.lock:
                    if from_server:
                        self.down += len(data)
                    else:
                        self.up += len(data)
        except OSError:
            pass
        close_sockets(src, dst)
