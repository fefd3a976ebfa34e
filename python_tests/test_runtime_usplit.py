"""The U-shaped split through the runtime: ``EdgeTrainer`` / ``CloudServer`` with ``RunConfig(u_split=True)``.

The head and the loss stay on the edge, so each step is ``FORWARD`` (boundary up, pooled rows
down), ``BACKWARD`` (the pooled rows' gradient up, the boundary gradient down) and ``STEP`` (the
cloud's optimizer steps with the edge's hyper-parameters).  Numerics: in process, over TCP and
``SimulatedSplit(u_split=True)`` driven by a plain loop are the same computation, bit for bit;
so is a run whose replies are lost, whose server restarts mid-step, or whose edge crashes.
The wire is checked frame by frame: no label leaves the edge.
"""
from __future__ import annotations

import socket
import threading

import pytest
import torch

from sft_kernels.channel import wire
from sft_kernels.codecs import from_spec
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudError, CloudServer, LinkLost
from sft_kernels.runtime.parts import make_scheduler
from sft_kernels.step.messages import (BACKWARD, EVAL, FORWARD, REPLY, STEP, TRAIN, StepRefused, payload_nbytes)

from runtime_helpers import (STEPS, TOKEN, Proxy, assert_same, close_sockets, make_trainer, params, simulated_run,
                             small_cfg)

LAYER = dict(mode="layer", rank=None)
BOTTLENECK = dict(mode="bottleneck", rank=4)
KINDS = {"FORWARD": FORWARD, "BACKWARD": BACKWARD, "STEP": STEP}
#: A tensor descriptor on the wire starts with the name's length (one byte) and the name.
LABELS_DESCRIPTOR = bytes([len("labels")]) + b"labels"


@pytest.fixture(scope="module")
def ds():
    return load_task("synthetic", "train", limit=96)[1]


def _parts(trainer, cloud) -> dict[str, dict]:
    return {"edge": params(trainer.model), "top": params(trainer.top), "cloud": params(cloud)}


_REFERENCES: dict = {}


def reference(cfg, ds):
    """The undisturbed run of ``cfg`` in process (once per config): ``(losses, {part: params})``."""
    if cfg not in _REFERENCES:
        t = make_trainer(cfg, ds, None, None)
        _REFERENCES[cfg] = (t.train().losses, _parts(t, t.link.worker.model))
    return _REFERENCES[cfg]


def assert_parts_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert_same(a[k], b[k], tol=0)


def _recording(link) -> list:
    """Record every request through ``link``: ``(kind, seq, request tensors, meta, reply)``."""
    log, inner = [], link.request

    def request(kind, tensors, meta, seq):
        reply = inner(kind, tensors, meta, seq)
        log.append((kind, seq, dict(tensors), dict(meta), reply))
        return reply

    link.request = request
    return log


def _encoded(codec_spec: str, shape: tuple[int, ...]) -> int:
    """Payload bytes of a tensor of ``shape`` through the codec (a function of the shape only)."""
    packet = from_spec(codec_spec).encode(torch.randn(shape), 0)
    return payload_nbytes(packet.tensors)


# ----------------------------------------------------------------------------- in process, TCP, simulated


POOLED_LOWRANK = dict(BOTTLENECK, pooled_codec="lowrank:r=4+int8", pooled_grad_codec="lowrank:r=4+int8")


@pytest.mark.parametrize("kw", [LAYER, BOTTLENECK, POOLED_LOWRANK], ids=["layer", "bottleneck-r4", "pooled-lowrank"])
def test_in_process_tcp_and_simulated_are_bit_identical(ds, kw):
    cfg = small_cfg(u_split=True, **kw)
    here = make_trainer(cfg, ds, None, None)
    log = _recording(here.link)
    s_here = here.train()
    srv = CloudServer({"edge": TOKEN.encode()}).start()
    try:
        tcp = make_trainer(cfg, ds, *srv.address)
        s_tcp = tcp.train()
        tcp.finish()
        tcp.close()
        cloud = srv.sessions[("edge", "t")].model
    finally:
        srv.shutdown()
    sim_losses, sim = simulated_run(cfg, ds, STEPS)
    assert s_here.losses == s_tcp.losses == sim_losses
    ref = _parts(here, here.link.worker.model)
    assert_parts_equal(_parts(tcp, cloud), ref)
    assert_parts_equal({"edge": params(sim.edge), "top": params(sim.top), "cloud": params(sim.cloud)}, ref)
    # one byte counter: the same payload per step in process and over TCP, and in SimulatedSplit
    assert [b[:3] for b in s_here.step_bytes] == [b[:3] for b in s_tcp.step_bytes]
    assert (sim.bytes_sent, sim.bytes_received) == (s_here.payload_up, s_here.payload_down)

    # the cloud's learning rate is the edge's, step for step: the schedule the fused path's cloud scheduler runs
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, want = make_scheduler(opt, cfg), []
    for _ in range(STEPS):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    sent = [m["hp"]["lr"] for kind, _, _, m, _ in log if kind == STEP]
    assert sent == want
    assert here.link.worker.opt.param_groups[0]["lr"] == want[-1]

    # traffic: four payloads per step, all through the codecs, no labels
    width = 384 if cfg.mode == "layer" else cfg.rank
    assert [(k, s) for k, s, *_ in log] == [(k, s) for s in range(STEPS) for k in (FORWARD, BACKWARD, STEP)]
    for step in range(STEPS):
        batch = here.batch_at(step)
        n, tokens = batch["labels"].shape[0], int(batch["attention_mask"].sum())
        (_, _, f_up, f_meta, f_rep), (_, _, b_up, _, b_rep), (_, _, st_up, _, st_rep) = log[3 * step:3 * step + 3]
        assert "labels" not in f_up and "labels" not in b_up and not st_up and not st_rep.tensors
        aux = 2 * n + 2  # int16 lengths and the padded length; MiniLM pools [CLS]: no pool_index
        down_codec, up_codec = cfg.pooled_codec or cfg.fwd_codec, cfg.pooled_grad_codec or cfg.bwd_codec
        boundary, pooled = _encoded(cfg.fwd_codec, (tokens, width)), _encoded(down_codec, (n, 384))
        pooled_grad, boundary_grad = _encoded(up_codec, (n, 384)), _encoded(cfg.bwd_codec, (tokens, width))
        assert payload_nbytes(f_up) == boundary + aux and payload_nbytes(f_rep.tensors) == pooled
        assert payload_nbytes(b_up) == pooled_grad and payload_nbytes(b_rep.tensors) == boundary_grad
        assert sorted(f_rep.tensors) == sorted(f"o.pooled.{k}" for k in from_spec(down_codec).encode(
            torch.randn(n, 384), 0).tensors)
        up, down, examples = s_here.step_bytes[step][:3]
        assert (up, down, examples) == (boundary + aux + pooled_grad, pooled + boundary_grad, n)


# ----------------------------------------------------------------------------- the wire: no label leaves the edge


def _recv(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _read_raw_frame(sock: socket.socket) -> tuple[wire.Header, bytes]:
    head = _recv(sock, wire.HEADER_SIZE)
    h = wire.decode_header(head, wire.Limits())
    rest = _recv(sock, h.payload_len + (wire.CRC_SIZE if h.chflags & wire.CHFLAG_PAYLOAD_CRC else 0))
    return h, head + rest


class FrameProxy(Proxy):
    """A TCP proxy that forwards whole frames and records every frame edge -> cloud.

    ``up``: ``(kind, seq, tensor names)`` of each frame the edge sent (read with the channel's own
    decoder); ``up_bytes``: every byte the edge sent.  ``fault = (kind, seq, when)`` acts once, at the
    first request of that kind and sequence number: ``when="request"`` drops the connection instead of
    forwarding the request, ``when="reply"`` forwards it and drops the connection instead of forwarding
    its reply.  ``on_fault()`` runs at that moment (a server restart); it may change ``target``.
    """

    def __init__(self, target, fault=None, on_fault=None):
        self.fault, self.on_fault = fault, on_fault
        self.up: list = []
        self.up_bytes = bytearray()
        self.fired = False
        super().__init__(target)

    def _pipes(self, client, server) -> list:
        drop_reply = threading.Event()
        return [(self._upstream, (client, server, drop_reply)), (self._downstream, (server, client, drop_reply))]

    def _fault(self, h: wire.Header, when: str) -> bool:
        with self.lock:
            hit = (not self.fired and self.fault is not None
                   and self.fault == (h.kind, h.seq, when))
            self.fired = self.fired or hit
        return hit

    def _upstream(self, src, dst, drop_reply):
        try:
            while True:
                h, raw = _read_raw_frame(src)
                frame = wire.decode_frame(raw)
                with self.lock:
                    self.up.append((h.kind, h.seq, sorted(frame.tensors)))
                    self.up_bytes += raw
                if self._fault(h, "request"):
                    if self.on_fault is not None:
                        self.on_fault()
                    break
                if self._fault(h, "reply"):
                    drop_reply.set()
                dst.sendall(raw)
        except (OSError, EOFError, wire.ProtocolError):
            pass
        close_sockets(src, dst)

    def _downstream(self, src, dst, drop_reply):
        try:
            while True:
                h, raw = _read_raw_frame(src)
                if drop_reply.is_set() and h.kind == REPLY:
                    if self.on_fault is not None:
                        self.on_fault()
                    break
                dst.sendall(raw)
        except (OSError, EOFError, wire.ProtocolError):
            pass
        close_sockets(src, dst)


@pytest.mark.parametrize("u_split", [True, False], ids=["u-split", "plain-positive-control"])
def test_no_frame_edge_to_cloud_carries_labels(ds, u_split):
    cfg = small_cfg(u_split=u_split, total_steps=3)
    srv = CloudServer({"edge": TOKEN.encode()}).start()
    proxy = FrameProxy(srv.address)
    try:
        t = make_trainer(cfg, ds, *proxy.address)
        t.train()
        logits = t.predict([t.batch_at(0)])  # EVAL frames too
        t.finish()
        t.close()
    finally:
        proxy.close()
        srv.shutdown()
    assert logits.shape == (cfg.batch_size, 2)
    kinds = {k for k, _, _ in proxy.up}
    with_labels = [(k, s) for k, s, names in proxy.up if "labels" in names]  # decoded frame descriptors
    in_descriptors = proxy.up_bytes.count(LABELS_DESCRIPTOR)  # the raw bytes, searched
    if u_split:
        assert {FORWARD, BACKWARD, STEP, EVAL} <= kinds and TRAIN not in kinds
        assert with_labels == [] and in_descriptors == 0
        # the word occurs upstream only inside the run config's "num_labels" (OPEN): never as data or a name
        assert proxy.up_bytes.count(b"labels") == proxy.up_bytes.count(b'"num_labels"') == 1
    else:  # the positive control: the same searches find the labels in every TRAIN frame
        assert {TRAIN, EVAL} <= kinds
        assert with_labels == [(TRAIN, s) for s in range(3)] and in_descriptors == 3


# ----------------------------------------------------------------------------- faults


@pytest.mark.parametrize("kind", ["FORWARD", "BACKWARD", "STEP"])
def test_lost_reply_is_replayed_never_applied_twice(ds, kind, caplog):
    """The reply of ``kind`` 2 never arrives: the edge reconnects and re-sends, the cloud replays.

    The server keeps no checkpoints, so a rollback is impossible: the run can only finish by a replay.
    """
    cfg = small_cfg(u_split=True, total_steps=5)
    srv = CloudServer({"edge": TOKEN.encode()}).start()
    proxy = FrameProxy(srv.address, fault=(KINDS[kind], 2, "reply"))
    try:
        t = make_trainer(cfg, ds, *proxy.address, backoff_s=0.05)
        summary = t.train()
        t.close()
        session = srv.sessions[("edge", "t")]
    finally:
        proxy.close()
        srv.shutdown()
    assert proxy.fired and summary.reconnects == 1 and summary.replays_or_rollbacks == 0
    assert session.step == 5
    assert [(k, s) for k, s, _ in proxy.up if k == KINDS[kind]].count((KINDS[kind], 2)) == 2  # sent twice
    losses, ref = reference(cfg, ds)
    assert summary.losses == losses
    assert_parts_equal(_parts(t, session.model), ref)


class _Restartable:
    """A ``CloudServer`` in a thread that can be stopped and replaced by a fresh one on the same checkpoints."""

    def __init__(self, checkpoint_dir):
        self.checkpoint_dir = checkpoint_dir
        self.servers = [self._new()]
        self.proxy = None

    def _new(self) -> CloudServer:
        return CloudServer({"edge": TOKEN.encode()}, checkpoint_dir=self.checkpoint_dir).start()

    @property
    def server(self) -> CloudServer:
        return self.servers[-1]

    def restart(self) -> None:
        self.server.shutdown()
        self.servers.append(self._new())
        self.proxy.target = self.server.address

    def shutdown(self) -> None:
        for s in self.servers:
            s.shutdown()


@pytest.mark.parametrize("kind,seq,when,outcome", [
    ("FORWARD", 7, "request", "rollback"),  # the cloud restarts from step 6, the edge (at 7) rolls back to 6
    ("BACKWARD", 6, "request", "redo"),     # restarts from 6 = the edge's step: the forward's graph is gone
    ("STEP", 6, "request", "redo"),         # ... and the accumulated gradient: refused, not stepped on nothing
    ("STEP", 4, "reply", "rollback"),       # applied, not checkpointed: back to 3, the edge rolls back to 3
    ("STEP", 5, "reply", "replay"),         # applied and checkpointed (6): the re-sent STEP is acknowledged
], ids=lambda v: str(v))
def test_server_restart_mid_step_resumes_bit_identical(ds, tmp_path, caplog, kind, seq, when, outcome):
    """The server stops at a chosen moment of a step and a new one starts on its checkpoints."""
    cfg = small_cfg(u_split=True)
    cloud = _Restartable(tmp_path / "cloud")
    cloud.proxy = proxy = FrameProxy(cloud.server.address, fault=(KINDS[kind], seq, when), on_fault=cloud.restart)
    try:
        t = make_trainer(cfg, ds, *proxy.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=3,
                         backoff_s=0.05)
        with caplog.at_level("WARNING", logger="sft_kernels.runtime"):
            summary = t.train()
        t.finish()
        t.close()
        session = cloud.server.sessions[("edge", "t")]
    finally:
        proxy.close()
        cloud.shutdown()
    assert proxy.fired and len(cloud.servers) == 2 and summary.reconnects >= 1
    redone = [r for r in caplog.records if "running the step again" in r.getMessage()]
    assert summary.replays_or_rollbacks == (outcome == "rollback")
    assert len(redone) == (outcome == "redo")
    assert session.step == STEPS and session.store.regular_steps() == [6, 9, 10]
    losses, ref = reference(cfg, ds)
    assert summary.losses == losses
    assert_parts_equal(_parts(t, session.model), ref)


@pytest.mark.parametrize("kind,seq,when,cloud_restores", [
    ("STEP", 6, "request", False),   # the cloud holds micro-batch 6's gradient: the new edge (fresh) drops it
    ("BACKWARD", 6, "reply", False),  # the same, the reply lost on the way
    ("STEP", 6, "reply", True),      # the cloud applied step 6, the edge never knew: the cloud goes back to 6
    ("STEP", 7, "reply", True),      # the cloud is at 8, the edge restarts from 6: the cloud goes back to 6
], ids=lambda v: str(v))
def test_edge_crash_mid_step_and_restart_bit_identical(ds, tmp_path, caplog, kind, seq, when, cloud_restores):
    """The edge dies at a chosen moment of step ``seq``; a new edge process resumes from its checkpoint (6)."""
    cfg = small_cfg(u_split=True)
    srv = CloudServer({"edge": TOKEN.encode()}, checkpoint_dir=tmp_path / "cloud").start()
    proxy = FrameProxy(srv.address, fault=(KINDS[kind], seq, when))
    try:
        t = make_trainer(cfg, ds, *proxy.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=3, retries=0)
        with pytest.raises(LinkLost):  # the edge dies at the fault
            t.train()
        t.close()
        t2 = make_trainer(cfg, ds, *srv.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=3)
        assert t2.step == 6
        with caplog.at_level("INFO", logger="sft_kernels.runtime"):
            summary = t2.train()
        t2.finish()
        t2.close()
        session = srv.sessions[("edge", "t")]
    finally:
        proxy.close()
        srv.shutdown()
    assert any("restored step 6" in r.getMessage() for r in caplog.records) == cloud_restores
    assert session.step == STEPS
    losses, ref = reference(cfg, ds)
    assert summary.losses == losses
    assert_parts_equal(_parts(t2, session.model), ref)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("edge_u,served_u", [(True, False), (False, True)])
def test_split_kind_mismatch_refused_at_open(ds, edge_u, served_u):
    srv = CloudServer({"edge": TOKEN.encode()}, split={"u_split": served_u}).start()
    try:
        t = make_trainer(small_cfg(u_split=edge_u), ds, *srv.address)
        with pytest.raises(CloudError, match=f"split settings differ: u_split: edge asks {edge_u}, server serves "
                                             f"{served_u}"):
            t.train(steps=1)
        assert srv.sessions == {}
    finally:
        srv.shutdown()


def test_u_session_refuses_labels_and_the_fused_step(ds):
    t = make_trainer(small_cfg(u_split=True), ds, None, None)
    batch = t.batch_at(0)
    with pytest.raises(StepRefused, match="TRAIN .the fused step. needs the loss on the cloud"):
        t.client.fused_step(0, t._inputs(batch), batch["labels"], 2)
    _, tensors, meta = t.client.encode(0, t._inputs(batch))
    tensors["labels"] = batch["labels"]
    with pytest.raises(StepRefused, match="no label may cross the link"):
        t.link.request(FORWARD, tensors, meta, 0)
    assert t.link.worker.pending == {} and t.link.worker.step == 0
