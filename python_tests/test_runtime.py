"""The TCP runtime: CloudServer + EdgeTrainer over real sockets.

Every test trains the real embedded MiniLM (tiny batches, synthetic task) through a real
``CloudServer``: in a thread of this process where that is enough, or as a separate
process (``LocalCloud``, ``python -m sft_kernels serve``) where a crash is the point.
Numerics: a run over TCP must equal the one-process ``SimulatedSplit`` run (same seed,
keyed dropout) exactly; resumed runs must equal uninterrupted ones to 1e-6.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from sft_kernels.channel import Listener, RemoteError
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudError, CloudServer, EdgeTrainer, LocalCloud, SessionLimits, StepBatches
from sft_kernels.runtime.config import state_hash
from sft_kernels.step.messages import OPEN, REPLY, TRAIN, StepRefused, boundary_to_wire, label_dtype, packet_to_wire
from sft_kernels.runtime.parts import build_parts

from runtime_helpers import STEPS, TOKEN, ReplyDroppingProxy, assert_same as _assert_same, make_trainer as _trainer, params as _params
from runtime_helpers import simulated_run as _simulated_losses, small_cfg as _cfg


@pytest.fixture(scope="module")
def train_ds():
    return load_task("synthetic", "train", limit=96)[1]


@pytest.fixture
def server(tmp_path):
    srv = CloudServer({"edge": TOKEN.encode()}, checkpoint_dir=tmp_path / "cloud").start()
    yield srv
    srv.shutdown()


@pytest.mark.parametrize("kw", [dict(), dict(eliminate_links=False, fwd_codec="int4", bwd_codec="int4,sr"),
                                dict(mode="layer", rank=None, fwd_codec="lowrank:r=8+int8", bwd_codec="int8,sr")],
                         ids=["bottleneck-int8", "links-kept-int4", "layer-lowrank"])
def test_tcp_run_equals_simulated_run(server, train_ds, kw):
    cfg = _cfg(total_steps=STEPS, **kw)
    t = _trainer(cfg, train_ds, *server.address)
    summary = t.train()
    t.finish()
    t.close()
    sim_losses, sim = _simulated_losses(cfg, train_ds, STEPS)
    assert summary.losses == pytest.approx(sim_losses, abs=1e-6)
    _assert_same(_params(t.model), _params(sim.edge))
    cloud = server.sessions[("edge", "t")].model
    _assert_same(_params(cloud), _params(sim.cloud))
    # the same fused step over the in-process link: the same losses, parameters and payload bytes (one counter)
    local = _trainer(cfg, train_ds, None, None)
    here = local.train()
    assert here.losses == summary.losses
    _assert_same(_params(local.model), _params(t.model), tol=0)
    _assert_same(_params(local.link.worker.model), _params(cloud), tol=0)
    assert (here.payload_up, here.payload_down) == (summary.payload_up, summary.payload_down)
    # SimulatedSplit takes the general path: the same payload plus the loss and logits down, the loss's
    # gradient up (4 bytes each way per step, and the logits)
    assert sim.bytes_sent == summary.payload_up + 4 * STEPS
    assert sim.bytes_received == summary.payload_down + STEPS * (4 + 8 * 2 * 4)


def test_split_mismatch_refused_on_both_sides(tmp_path, train_ds, caplog):
    split = dict(at=3, mode="bottleneck", rank=4, eliminate_links=True,
                 fwd_codec="int8", bwd_codec="int8,sr")
    srv = CloudServer({"edge": TOKEN.encode()}, split).start()
    try:
        t = _trainer(_cfg(rank=8, fwd_codec="int4"), train_ds, *srv.address)
        with caplog.at_level("WARNING", logger="sft_kernels.runtime"):
            with pytest.raises(CloudError, match=r"rank: edge asks 8, server serves 4.*fwd_codec: edge asks 'int4'"):
                t.train()
        assert any("split settings differ" in r.getMessage() for r in caplog.records)
        assert not srv.sessions
    finally:
        srv.shutdown()


def test_initial_parameter_hash_mismatch_refused(server, train_ds):
    t = _trainer(_cfg(), train_ds, *server.address)
    t.init_hashes = dict(t.init_hashes, edge="0" * 64)  # as if the edge loaded other model files
    with pytest.raises(CloudError, match="initial parameters differ"):
        t.train()


def _raw_train_frame(cfg, ds, step=0, poison=None):
    parts = build_parts(cfg)
    tok, edge = parts.tokenizer, parts.edge
    batch = StepBatches(tok, ds, cfg.batch_size, cfg.max_length, cfg.seed)(step)
    b = edge(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    if poison is not None:
        b.hidden = b.hidden.detach().clone()
        b.hidden[0, 0] = poison
    from sft_kernels import from_spec

    tensors, meta, _ = boundary_to_wire(b, from_spec(cfg.fwd_codec), 0)
    tensors["labels"] = batch["labels"].to(label_dtype(cfg.num_labels))
    return tensors, {"b": meta}


@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_non_finite_activation_refused_model_untouched(server, train_ds, poison):
    cfg = _cfg(fwd_codec="none")  # 'none' carries the NaN/Inf as is
    t = _trainer(cfg, train_ds, *server.address)
    t.open()  # creates the session
    session = server.sessions[("edge", "t")]
    before = state_hash(session.model)
    tensors, meta = _raw_train_frame(cfg, train_ds, poison=poison)
    with pytest.raises(RemoteError, match="non-finite value"):
        t.conn.request(TRAIN, tensors, meta, seq=0)
    assert state_hash(session.model) == before and session.step == 0
    # the same session and server keep serving: a real step now goes through
    t.train(steps=1)
    assert session.step == 1 and state_hash(session.model) != before
    t.close()


def test_malformed_step_refused_server_keeps_serving(server, train_ds):
    cfg = _cfg()
    t = _trainer(cfg, train_ds, *server.address)
    t.open()
    tensors, meta = _raw_train_frame(cfg, train_ds)
    cases = [
        ({k: v for k, v in tensors.items() if k != "labels"}, meta, "labels must be"),
        (dict(tensors, labels=torch.full_like(tensors["labels"], 5)), meta,
         r"labels must be in 0\.\.1 \(the head's 2 classes\), got values \[5\]"),
        (dict(tensors, labels=tensors["labels"].long()), meta, r"labels must be torch\.int8"),
        (dict(tensors, lengths=tensors["lengths"].long()), meta, "lengths must be int16 or int32"),
        (dict(tensors, seq_len=tensors["seq_len"].int()), meta, "seq_len must be one value of the lengths' dtype"),
        (dict(tensors, lengths=tensors["lengths"] * 100), meta, "every length must be"),
        (tensors, {"b": {"h": [9, *meta["b"]["h"][1:]]}}, "mode must be in 0..4"),
        (tensors, {"b": {"h": meta["b"]["h"][:3] + [3, 3]}}, r"packet 'h' shape \(3, 3\) must be"),
        (tensors, {"b": {"h": meta["b"]["h"], "r": meta["b"]["h"]}}, r"session expects \['h'\]"),
        (dict(tensors, extra=torch.zeros(2)), meta, r"unexpected tensors \['extra'\]"),
        (dict(tensors, pool_index=torch.zeros(3, 2, dtype=torch.int64)), meta, "takes no 'pool_index'"),
        (tensors, {}, "'b'"),
    ]
    for bad_tensors, bad_meta, msg in cases:
        with pytest.raises(RemoteError, match=msg):
            t.conn.request(TRAIN, bad_tensors, bad_meta, seq=0)
    with pytest.raises(RemoteError, match="out of order"):
        t.conn.request(TRAIN, tensors, meta, seq=5)
    assert server.sessions[("edge", "t")].step == 0
    t.train(steps=2)
    t.close()


def test_non_finite_gradient_refused_on_the_edge(train_ds):
    """A cloud that answers with a NaN gradient: the edge refuses the step and its part is untouched."""
    cfg = _cfg(bwd_codec="none")

    def bad_cloud(conn):
        while True:
            try:
                f = conn.recv()
            except Exception:
                return
            if f.kind == OPEN:
                conn.send(REPLY, {}, {"step": 0}, seq=f.seq)
            else:
                n = int(f.tensors["lengths"].sum())
                g = torch.full((n, 4), float("nan"))
                from sft_kernels import from_spec

                tt, mm = packet_to_wire(from_spec("none").encode(g), "g.h")
                conn.send(REPLY, tt, {"loss": 0.5, "h": mm}, seq=f.seq)

    lst = Listener({"edge": TOKEN.encode()}).start(bad_cloud)
    try:
        t = _trainer(cfg, train_ds, *lst.address)
        before = state_hash(t.model)
        with pytest.raises(StepRefused, match="received gradient 'h' has .* non-finite"):
            t.train()
        assert state_hash(t.model) == before and t.step == 0
    finally:
        lst.shutdown()


def test_lost_reply_is_replayed_not_applied_twice(server, train_ds, caplog):
    cfg = _cfg(total_steps=6)
    proxy = ReplyDroppingProxy(server.address, drop_at=3)  # the reply of step 2 never arrives
    try:
        t = _trainer(cfg, train_ds, *proxy.address, backoff_s=0.05)
        with caplog.at_level("INFO", logger="sft_kernels.runtime"):
            summary = t.train()
        t.close()
    finally:
        proxy.close()
    assert summary.reconnects == 1
    assert any("step 2 repeated, replaying its reply" in r.getMessage() for r in caplog.records)
    sim_losses, sim = _simulated_losses(cfg, train_ds, 6)
    assert summary.losses == pytest.approx(sim_losses, abs=1e-6)
    _assert_same(_params(t.model), _params(sim.edge))
    _assert_same(_params(server.sessions[("edge", "t")].model), _params(sim.cloud))


def test_edge_gives_up_after_bounded_reconnects(server, train_ds):
    """The server goes away for good mid-run: the edge reconnects ``retries`` times, then LinkLost."""
    from sft_kernels.runtime import LinkLost

    t = _trainer(_cfg(), train_ds, *server.address, retries=2, backoff_s=0.01)
    t.train(steps=1)
    server.shutdown()
    t0 = time.monotonic()
    with pytest.raises(LinkLost, match="2 reconnect"):
        t.train()
    assert time.monotonic() - t0 < 10


def _cloud_params(ckpt_root, step):
    return torch.load(ckpt_root / "edge" / "t" / f"step-{step:08d}.pt", weights_only=True)["model"]


def test_kill_cloud_mid_run_resume_equals_uninterrupted(tmp_path, train_ds):
    """SIGKILL the cloud server process mid-run, restart it from its checkpoint: same result as no crash."""
    cfg = _cfg(total_steps=STEPS)
    ref_root, run_root = tmp_path / "ref", tmp_path / "run"
    with LocalCloud(tmp_path / "ref-srv", extra=["--any-split", "--checkpoint-dir", str(ref_root)]) as cloud:
        ref = EdgeTrainer(cfg, None, host=cloud.host, port=cloud.port, client_id=cloud.client_id, token=cloud.token,
                          progress=False)
        ref.batch_at = StepBatches(ref.tokenizer, train_ds, cfg.batch_size, cfg.max_length, cfg.seed)
        ref_summary = ref.train()
        ref.finish()
        ref.close()
    with LocalCloud(tmp_path / "srv", extra=["--any-split", "--checkpoint-dir", str(run_root)]) as cloud:
        t = EdgeTrainer(cfg, None, host=cloud.host, port=cloud.port, client_id=cloud.client_id, token=cloud.token,
                        checkpoint_dir=tmp_path / "edge", checkpoint_every=4, progress=False, backoff_s=0.2)
        t.batch_at = StepBatches(t.tokenizer, train_ds, cfg.batch_size, cfg.max_length, cfg.seed)
        t.train(steps=6)
        cloud.kill()  # the cloud has applied steps 0..5 and checkpointed step 4 (the edge asked for it)
        restarter = threading.Timer(0.5, cloud.restart)
        restarter.start()
        summary = t.train()  # link errors, reconnect, the cloud resumes at 4, the edge rolls back to 4
        restarter.join()
        t.finish()
        t.close()
    assert summary.reconnects >= 1 and summary.replays_or_rollbacks == 1
    assert len(summary.losses) == STEPS
    assert summary.losses == pytest.approx(ref_summary.losses, abs=1e-6)
    _assert_same(_params(t.model), _params(ref.model))
    _assert_same(_cloud_params(run_root, STEPS), _cloud_params(ref_root, STEPS))


@pytest.mark.parametrize("every,crash_after,resume_at", [(4, 7, 4), (3, 8, 6)],
                         ids=["interval-4", "interval-3-mismatched-before"])
def test_edge_restart_rolls_the_cloud_back(server, tmp_path, train_ds, every, crash_after, resume_at):
    """The edge crashes after its checkpoint at ``resume_at`` while the cloud is further on: the cloud rolls back.

    The second case is the one that used to fail: a server with its own interval (50) had no
    checkpoint of step 6 ("FileNotFoundError: no checkpoint for step 6"); now the edge's interval
    drives both sides' checkpoints.
    """
    cfg = _cfg(total_steps=STEPS)
    t = _trainer(cfg, train_ds, *server.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=every)
    t.train(steps=crash_after)
    t.close()
    del t
    t2 = _trainer(cfg, train_ds, *server.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=every)
    assert t2.step == resume_at
    summary = t2.train()
    t2.close()
    sim_losses, sim = _simulated_losses(cfg, train_ds, STEPS)
    assert summary.losses == sim_losses
    steps = [s for s in range(STEPS + 1) if s % every == 0 or s == STEPS]
    assert server.sessions[("edge", "t")].store.regular_steps() == steps[-3:]
    _assert_same(_params(t2.model), _params(sim.edge))
    _assert_same(_params(server.sessions[("edge", "t")].model), _params(sim.cloud))


def test_sft_demo_runs_two_processes_and_prints_the_table():
    """The table, and with --quiet nothing else: no progress lines, no bars, no model-loading noise."""
    out = subprocess.run([sys.executable, "-m", "sft_kernels", "demo", "--quiet", "--task", "synthetic", "--steps",
                          "3", "--baseline-steps", "2", "--max-eval", "40", "--batch-size", "8"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "starting a cloud server" not in text  # progress, not result
    assert "Loading weights" not in out.stderr and "it/s" not in out.stderr, out.stderr[-3000:]
    assert "synthetic sentiment task (generated, not GLUE)" in text
    assert "bottleneck r=4, int8 up, int8+SR down" in text and "layer split, uncompressed fp32" in text
    assert "reduction on the same first 2 batches" in text
    assert "U-split r=4 int8, labels stay on the edge      2" in text  # 2 steps: --baseline-steps
    assert "U-split reduction vs the fp32 layer split" in text


def test_sft_demo_json():
    out = subprocess.run([sys.executable, "-m", "sft_kernels", "demo", "--task", "synthetic", "--steps", "2",
                          "--baseline-steps", "1", "--max-eval", "16", "--batch-size", "4", "--json"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["synthetic"] is True and r["steps"] == 2
    # rank-4 int8 codes vs fp32 hidden states of width 384: well over 50x less each way
    assert r["reduction_up"] > 50 and r["reduction_down"] > 50
    # the U-split sends the same codes up, plus per example the pooled row's gradient (int8, d = 384), and gets the
    # pooled row (int8) down beside the boundary gradient: still over 10x less than fp32 hidden states each way
    u = r["usplit_bottleneck_r4_int8"]
    assert u["steps"] == 1 and u["reduction_up"] > 10 and u["reduction_down"] > 10
    assert u["bytes_up_per_example"] > 384 and u["bytes_down_per_example"] > 384


@pytest.mark.parametrize("argv,msg", [
    (["train", "--connect", "nohost"], "--connect must be HOST:PORT"),
    (["train", "--connect", "127.0.0.1:1", "--task", "synthetic"], "no token"),
    (["serve", "--tokens", "/nonexistent/tokens"], "does not exist"),
    (["train", "--connect", "127.0.0.1:1", "--rank", "0"], "--rank must be an integer >= 1"),
])
def test_cli_errors_are_clear(argv, msg, monkeypatch):
    monkeypatch.delenv("SFT_TOKEN", raising=False)
    out = subprocess.run([sys.executable, "-m", "sft_kernels", *argv], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert msg in out.stderr + out.stdout


def test_sft_serve_and_train_over_mutual_tls(tmp_path):
    """The README's deployment flow on loopback: tokens file, mutual TLS, checkpoints, `sft train --json`."""
    from channel_helpers import make_certs
    from sft_kernels.runtime.jobs import write_tokens

    certs = make_certs(tmp_path)
    write_tokens(tmp_path / "tokens", {"edge-1": "s3cret-edge-1"})
    (tmp_path / "edge-1.token").write_text("s3cret-edge-1\n")
    port_file = tmp_path / "port"
    server = subprocess.Popen([sys.executable, "-m", "sft_kernels", "serve", "--port", "0", "--port-file",
                               str(port_file), "--tokens", str(tmp_path / "tokens"), "--tls-cert",
                               certs["server.pem"], "--tls-key", certs["server.key"], "--tls-ca", certs["ca.pem"],
                               "--checkpoint-dir", str(tmp_path / "cloud"), "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not port_file.exists():
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        train = [sys.executable, "-m", "sft_kernels", "train", "--connect", f"127.0.0.1:{port_file.read_text()}",
                 "--client-id", "edge-1", "--token-file", str(tmp_path / "edge-1.token"), "--tls-ca", certs["ca.pem"],
                 "--task", "synthetic", "--max-train", "12", "--max-eval", "8", "--batch-size", "4",
                 "--max-length", "32", "--checkpoint-dir", str(tmp_path / "edge"), "--checkpoint-every", "2",
                 "--run-id", "tls-run", "--quiet", "--json"]
        t0 = time.monotonic()
        refused = subprocess.run(train, capture_output=True, text=True, timeout=300)  # no client certificate
        assert refused.returncode != 0
        # a permanent refusal: no retries, and the cause is named (the CLI's own start-up takes a few seconds)
        assert time.monotonic() - t0 < 30
        assert "client certificate" in refused.stderr, refused.stderr[-2000:]
        assert "sft train: LinkRefused:" in refused.stderr and "Traceback" not in refused.stderr
        out = subprocess.run(train + ["--tls-cert", certs["client.pem"], "--tls-key", certs["client.key"]],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        r = json.loads(out.stdout)
        assert r["steps"] == 3 and r["eval_examples"] == 8 and len(r["losses"]) == 3
        assert (tmp_path / "cloud" / "edge-1" / "tls-run" / "step-00000003.pt").is_file()
        assert (tmp_path / "edge" / "step-00000003.pt").is_file()
    finally:
        server.terminate()
        server.wait(10)


def test_finished_sessions_make_room_unfinished_do_not(train_ds):
    srv = CloudServer({"edge": TOKEN.encode()}, sessions=SessionLimits(max_sessions=1)).start()
    try:
        a = _trainer(_cfg(total_steps=1, warmup_steps=0, run_id="first"), train_ds, *srv.address)
        a.train()
        b = _trainer(_cfg(total_steps=1, warmup_steps=0, run_id="second"), train_ds, *srv.address, retries=0)
        with pytest.raises(CloudError, match=r"server full \(1 sessions in use\); retry after"):
            b.train()
        a.finish()
        b.train()  # the finished session made room
        assert list(srv.sessions) == [("edge", "second")]
    finally:
        srv.shutdown()
