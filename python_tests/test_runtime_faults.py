"""The server under attack and faults: each fault found by trying the server as a hostile user would.

Real MiniLM, real sockets, a real ``CloudServer`` (in a thread of this process; the process
crash tests are in test_runtime.py).  Faults are injected where a real one would strike: a
checkpoint write that fails with ENOSPC, an encoder that raises, hostile frames sent by an
authenticated client, idle sockets from other loopback addresses.
"""
from __future__ import annotations

import errno
import socket
import threading
import time

import pytest
import torch

from runtime_helpers import TOKEN, ReplyDroppingProxy, make_trainer, params, simulated_run, small_cfg
from sft_kernels.channel import Limits, LinkRefused, ProtocolError, RemoteError
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudError, CloudServer, SessionLimits, StepBatches
from sft_kernels.runtime.cloud import CloudSession
from sft_kernels.runtime.config import state_hash
from sft_kernels.step.messages import EVAL, TRAIN, boundary_to_wire
from sft_kernels.runtime.parts import build_parts


@pytest.fixture(scope="module")
def ds():
    return load_task("synthetic", "train", limit=96)[1]


def _server(tmp_path=None, tokens=None, **kw) -> CloudServer:
    tokens = tokens or {"edge": TOKEN.encode()}
    return CloudServer(tokens, checkpoint_dir=None if tmp_path is None else tmp_path / "cloud", **kw).start()


class _Spy:
    """Wraps a (frozen) codec: counts ``decode`` calls and can make ``encode`` fail."""

    def __init__(self, codec, fail_encode=False):
        self.codec, self.fail_encode, self.decoded = codec, fail_encode, 0

    def encode(self, *a, **k):
        if self.fail_encode:
            raise RuntimeError("encoder exploded")
        return self.codec.encode(*a, **k)

    def decode(self, packet):
        self.decoded += 1
        return self.codec.decode(packet)

    def __str__(self):
        return str(self.codec)


def _raw_request(cfg, ds, step=0):
    """The tensors and meta an honest edge would send for ``step`` (to be tampered with)."""
    from sft_kernels import from_spec

    parts = build_parts(cfg)
    tok, edge = parts.tokenizer, parts.edge
    batch = StepBatches(tok, ds, cfg.batch_size, cfg.max_length, cfg.seed)(step)
    b = edge(batch["input_ids"], batch["attention_mask"], token_type_ids=batch["token_type_ids"])
    tensors, meta, _ = boundary_to_wire(b, from_spec(cfg.fwd_codec), 0)
    tensors["labels"] = batch["labels"]
    return tensors, {"b": meta}


# ------------------------------------------------------------------------------------------ retries

def test_unwritable_checkpoint_bounded_retries_step_applied_once(tmp_path, ds):
    """A server that cannot write its checkpoint: the edge gives up after ``retries`` answered failures with
    the server's reason (no reconnects), the step stays applied exactly once with its reply cached, and once
    the disk is back the run continues and equals the simulated run."""
    srv = _server(tmp_path)
    try:
        cfg = small_cfg(total_steps=6)
        t = make_trainer(cfg, ds, *srv.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=2, retries=3,
                         backoff_s=0.01)
        t.open()
        s = srv.sessions[("edge", "t")]
        real_save, calls = s.store.save, []

        def disk_full(*a, **k):
            calls.append(a[0])
            raise OSError(errno.ENOSPC, "No space left on device")

        s.store.save = disk_full
        t0 = time.monotonic()
        with pytest.raises(CloudError, match=r"failed TRAIN 1 4 times in a row.*checkpoint could not be written"
                                             r".*No space left"):
            t.train()
        assert time.monotonic() - t0 < 10
        assert t.summary.reconnects == 0 and t.step == 1
        assert s.step == 2 and s.last_reply["step"] == 1 and s.save_pending  # applied once, reply cached
        assert calls == [2] * 4  # the first try and three retries each tried to write step 2's checkpoint
        s.store.save = real_save
        summary = t.train()  # step 1 is replayed (its checkpoint written first), then the run goes on
        t.close()
        sim_losses, sim = simulated_run(cfg, ds, 6)
        assert summary.losses == sim_losses
        assert s.store.regular_steps() == [2, 4, 6]
        for k, v in params(sim.cloud).items():
            assert torch.equal(v, s.model.state_dict()[k]), k
    finally:
        srv.shutdown()


def test_hostile_pool_index_refused_once_connection_kept(ds):
    """The request that made the edge reconnect 116 times in 30 s: an encoder session sent a pool_index of
    the wrong shape.  Now it is refused before use, as permanent, and the connection stays up."""
    srv = _server()
    try:
        cfg = small_cfg()
        t = make_trainer(cfg, ds, *srv.address)
        t.open()
        tensors, meta = _raw_request(cfg, ds)
        for bad in (torch.zeros(3, 2, dtype=torch.int64), torch.zeros(8, dtype=torch.int32)):
            with pytest.raises(RemoteError, match="takes no 'pool_index'") as err:
                t.conn.request(TRAIN, dict(tensors, pool_index=bad), meta, seq=0)
            assert err.value.retryable is False
        assert not t.conn.closed and srv.listener.accepted == 1
        t.train(steps=1)  # same connection, same session
        assert srv.listener.accepted == 1 and srv.sessions[("edge", "t")].step == 1
        t.close()
    finally:
        srv.shutdown()


def test_failed_step_leaves_no_gradients_behind(ds):
    srv = _server()
    try:
        cfg = small_cfg()
        t = make_trainer(cfg, ds, *srv.address, retries=2, backoff_s=0.01)
        t.open()
        s = srv.sessions[("edge", "t")]
        before = state_hash(s.model)
        real = s.worker.bwd
        s.worker.bwd = _Spy(real, fail_encode=True)  # fails after the backward pass, before the optimizer step
        with pytest.raises(CloudError, match="refused TRAIN 0: server failed on this request: RuntimeError: "
                                             "encoder exploded"):
            t.train(steps=1)
        assert all(p.grad is None for p in s.model.parameters())
        assert state_hash(s.model) == before and s.step == 0 and t.summary.reconnects == 0
        s.worker.bwd = real
        t.train(steps=2)
        t.close()
        assert t.summary.losses == simulated_run(cfg, ds, 2)[0]
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ concurrency

def test_concurrent_sessions_and_a_late_joiner_equal_their_runs_alone(ds):
    """Two edges train at once, a third joins mid-run and a refused OPEN (wrong hash) lands in the middle:
    every accepted run equals its run alone bit for bit, and the refused session is not kept."""
    srv = _server(sessions=SessionLimits(max_sessions_per_client=8))
    cfgs = {"a": small_cfg(run_id="a", seed=0), "b": small_cfg(run_id="b", seed=1),
            "late": small_cfg(run_id="late", seed=2)}
    results, errors = {}, []
    a_at_4 = threading.Event()

    def run(name):
        try:
            t = make_trainer(cfgs[name], ds, *srv.address)
            if name == "a":
                t.train(steps=4)
                a_at_4.set()
            results[name] = t.train().losses
            t.close()
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append((name, exc))
            a_at_4.set()

    try:
        threads = {n: threading.Thread(target=run, args=(n,)) for n in ("a", "b")}
        for th in threads.values():
            th.start()
        a_at_4.wait(300)
        threads["late"] = threading.Thread(target=run, args=("late",))
        threads["late"].start()
        bad = make_trainer(small_cfg(run_id="bad"), ds, *srv.address)
        bad.init_hashes = dict(bad.init_hashes, cloud="1" * 64)
        with pytest.raises(CloudError, match="initial parameters differ"):
            bad.open()
        for th in threads.values():
            th.join(600)
        assert not errors, errors
        assert ("edge", "bad") not in srv.sessions
        for name, cfg in cfgs.items():
            assert results[name] == simulated_run(cfg, ds, cfg.total_steps)[0], name
    finally:
        srv.shutdown()


def test_building_a_model_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    want = torch.get_rng_state()
    build_parts(small_cfg(seed=7))
    assert torch.equal(torch.get_rng_state(), want)


def test_corrupted_step0_checkpoint_refused_after_restart(tmp_path, ds):
    """A step-0 checkpoint holding a wrong head (what the RNG race used to save) is refused after a restart:
    the handshake checks the hash recorded with what will actually train, not a fresh build."""
    cfg = small_cfg()
    s = CloudSession("edge", cfg, checkpoint_dir=tmp_path / "cloud")
    with torch.no_grad():
        list(s.model.parameters())[-1].add_(0.01)  # the classifier's bias: a head the edge never built
    s.init_hashes = dict(s.init_hashes, cloud=state_hash(s.model))  # the hash of the wrong head, as then
    s.save()
    srv = _server(tmp_path)
    try:
        t = make_trainer(cfg, ds, *srv.address)
        with pytest.raises(CloudError, match="initial parameters differ"):
            t.train()
        assert not srv.sessions
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ exhaustion

def _idle_socket(address, source_ip):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source_ip, 0))
    s.connect(address)
    return s


def test_slot_flood_from_other_addresses_legit_trainer_finishes(ds):
    """3x the connection pool of idle sockets from 127.0.0.2.., and more opening all along: the trainer on
    127.0.0.1 still authenticates and finishes its run."""
    pool = 8
    srv = _server(limits=Limits(max_connections=pool))
    held, stop = [], threading.Event()

    def keep_flooding():
        i = 0
        while not stop.is_set():
            try:
                held.append(_idle_socket(srv.address, f"127.0.0.{2 + i % 200}"))
            except OSError:
                pass
            i += 1
            time.sleep(0.05)

    try:
        for i in range(3 * pool):
            held.append(_idle_socket(srv.address, f"127.0.0.{2 + i}"))
        flooder = threading.Thread(target=keep_flooding, daemon=True)
        flooder.start()
        cfg = small_cfg(total_steps=4)
        t = make_trainer(cfg, ds, *srv.address, backoff_s=0.05)
        t0 = time.monotonic()
        summary = t.train()
        t.finish()
        t.close()
        assert len(summary.losses) == 4 and time.monotonic() - t0 < 120
        assert srv.listener.evicted > 0
    finally:
        stop.set()
        for s in held:
            s.close()
        srv.shutdown()


def test_session_quota_per_client_and_refused_sessions_keep_no_slot(ds):
    srv = _server(tokens={"edge": TOKEN.encode(), "other": b"other-token"},
                  sessions=SessionLimits(max_sessions_per_client=2))
    try:
        first = make_trainer(small_cfg(run_id="r1"), ds, *srv.address)
        first.open()
        wrong = make_trainer(small_cfg(run_id="r2"), ds, *srv.address)
        wrong.init_hashes = dict(wrong.init_hashes, edge="0" * 64)
        for _ in range(3):  # refused OPENs keep no slot, however often they come
            with pytest.raises(CloudError, match="initial parameters differ"):
                wrong.open()
        second = make_trainer(small_cfg(run_id="r2"), ds, *srv.address)
        second.open()
        third = make_trainer(small_cfg(run_id="r3"), ds, *srv.address, retries=3, backoff_s=0.01)
        t0 = time.monotonic()
        with pytest.raises(CloudError, match=r"client 'edge' already holds 2 unfinished sessions, its quota is 2"):
            third.train()
        assert time.monotonic() - t0 < 5  # a quota refusal is permanent: no retries
        other = make_trainer(small_cfg(run_id="r1"), ds, *srv.address, client_id="other", token="other-token")
        other.train(steps=1)  # another client is not affected
        assert sorted(srv.sessions) == [("edge", "r1"), ("edge", "r2"), ("other", "r1")]
        first.finish()  # a finished run frees its place in the quota
        third.open()
        assert sorted(srv.sessions) == [("edge", "r2"), ("edge", "r3"), ("other", "r1")]
        for t in (first, second, third, other):
            t.close()
    finally:
        srv.shutdown()


def test_full_server_says_retry_after_idle_session_checkpointed_evicted_and_resumed(tmp_path, ds):
    """One session slot.  A trains 3 steps and goes silent; B is told 'server full, retry after', backs off,
    and gets in once A has been idle for the session timeout (A is checkpointed, then evicted).  When B is
    done, A comes back from its checkpoint and finishes: its losses equal its run alone."""
    srv = _server(tmp_path, sessions=SessionLimits(max_sessions=1, session_timeout=1.5))
    try:
        cfg_a = small_cfg(run_id="a", total_steps=6)
        a = make_trainer(cfg_a, ds, *srv.address)
        a.train(steps=3)
        a.close()
        b = make_trainer(small_cfg(run_id="b", total_steps=2, warmup_steps=0, seed=3), ds, *srv.address,
                         backoff_s=0.05)
        b.train()
        b.finish()
        b.close()
        assert (tmp_path / "cloud" / "edge" / "a" / "step-00000003.idle.pt").is_file()
        assert ("edge", "a") not in srv.sessions or srv.sessions[("edge", "a")].step == 3
        summary = a.train()
        a.close()
        assert summary.losses == simulated_run(cfg_a, ds, 6)[0]
    finally:
        srv.shutdown()


def test_oversized_requests_refused_before_decoding(ds):
    srv = _server(sessions=SessionLimits(max_tokens=512, max_seq_len=64))
    try:
        too_long = make_trainer(small_cfg(max_length=128, run_id="long"), ds, *srv.address)
        with pytest.raises(CloudError, match="max_length 128 exceeds the server's limit of 64"):
            too_long.open()
        too_big = make_trainer(small_cfg(batch_size=32, max_length=32, run_id="big"), ds, *srv.address)
        with pytest.raises(CloudError, match=r"32 x max_length 32 = 1024 tokens exceeds the server's limit of 512"):
            too_big.open()
        cfg = small_cfg()
        t = make_trainer(cfg, ds, *srv.address)
        t.open()
        s = srv.sessions[("edge", "t")]
        s.worker.fwd = spy = _Spy(s.worker.fwd)
        # an eval batch claiming 64 sequences padded to 32 tokens: over the token cap, refused before decoding
        tensors, meta = _raw_request(cfg, ds)
        del tensors["labels"]
        tensors.update(lengths=torch.ones(64, dtype=torch.int32), seq_len=torch.tensor([32], dtype=torch.int32))
        with pytest.raises(RemoteError, match="batch 64 x padded length 32 = 2048 tokens exceeds the server's limit"):
            t.conn.request(EVAL, tensors, meta)
        assert spy.decoded == 0
        # after OPEN the connection's frame limit is what the session can need: a huge frame dies at its header
        assert srv.listener.limits.max_frame_bytes > s.frame_limit()
        big = {"h.codes": torch.zeros(s.frame_limit() + 1, dtype=torch.uint8)}
        # the server answers at the header and closes: the edge reads that ERROR, or (when the close lands
        # while it is still sending the body) a broken pipe; the server's record names the cause either way
        with pytest.raises((ProtocolError, RemoteError, ConnectionError)):
            t.conn.request(TRAIN, big, meta, seq=0)
        deadline = time.monotonic() + 10
        while not any("exceeds max_frame_bytes" in e for e in srv.listener.errors):
            assert time.monotonic() < deadline, srv.listener.errors
            time.sleep(0.02)
        assert spy.decoded == 0 and s.step == 0
        t.close()
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ fail fast

def test_server_side_cause_reaches_the_edge(tmp_path, ds):
    """The edge restarts from its checkpoint, but the server (without --checkpoint-dir) cannot roll back: the
    edge is told that cause at once, not a LinkLost after minutes of retries."""
    srv = _server()
    try:
        cfg = small_cfg()
        t = make_trainer(cfg, ds, *srv.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=4)
        t.train(steps=6)
        t.close()
        t2 = make_trainer(cfg, ds, *srv.address, checkpoint_dir=tmp_path / "edge", checkpoint_every=4)
        t0 = time.monotonic()
        with pytest.raises(CloudError, match="cannot roll back to step 4: the server runs without --checkpoint-dir"):
            t2.train()
        assert time.monotonic() - t0 < 5
    finally:
        srv.shutdown()


def _closed_port() -> int:
    """A loopback port nothing listens on."""
    s = socket.create_server(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_wrong_port_fails_at_once(ds):
    port = _closed_port()  # nothing ever listened there
    t = make_trainer(small_cfg(), ds, "127.0.0.1", port)
    t0 = time.monotonic()
    with pytest.raises(LinkRefused, match=f"cannot connect to 127.0.0.1:{port}: nothing listens there"):
        t.train()
    assert time.monotonic() - t0 < 3


def test_not_an_sft_server_fails_at_once(ds):
    """A peer that is not an sft server (an HTTP server on the port): no retries, the cause named."""
    srv = socket.create_server(("127.0.0.1", 0))

    def http():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            c.recv(4096)
            c.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n" + b" " * 64)
            c.close()

    threading.Thread(target=http, daemon=True).start()
    try:
        t = make_trainer(small_cfg(), ds, *srv.getsockname())
        t0 = time.monotonic()
        with pytest.raises(LinkRefused, match="not an sft server"):
            t.train()
        assert time.monotonic() - t0 < 3
    finally:
        srv.close()


# ------------------------------------------------------------------------------------------ bytes

def test_wire_byte_counts_cover_every_connection(ds):
    """A reply is lost and the edge reconnects: the edge's wire counts still equal the bytes a counting
    proxy forwarded each way, over both connections, handshakes included."""
    srv = _server()
    proxy = ReplyDroppingProxy(srv.address, drop_at=3)
    try:
        cfg = small_cfg(total_steps=5)
        t = make_trainer(cfg, ds, *proxy.address, backoff_s=0.05)
        summary = t.train()
        t.finish()
        up, down = t.wire_bytes()
        t.close()
        time.sleep(0.3)  # let the proxy's pipe threads account for the last bytes
        assert summary.reconnects == 1
        assert (up, down) == (proxy.up, proxy.down)
        assert summary.wire_up > summary.payload_up and summary.wire_down > summary.payload_down
    finally:
        proxy.close()
        srv.shutdown()


def test_training_frames_within_ten_percent_of_payload_on_sst2():
    """The default step (SST-2, batch 32, rank 4, int8 both ways): framing costs under 10% each way."""
    spec, train = load_task("SST-2", "train", limit=96)
    srv = _server()
    try:
        cfg = small_cfg(task="SST-2", batch_size=32, max_length=128, total_steps=3)
        t = make_trainer(cfg, train, *srv.address)
        summary = t.train()
        t.close()
        for up, down, n, wire_up, wire_down in summary.step_bytes:
            assert wire_up <= 1.10 * up, (wire_up, up)
            assert wire_down <= 1.10 * down, (wire_down, down)
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ limits and stores

@pytest.mark.parametrize("field,value,valid", [
    ("max_sessions", 0, ">= 1"), ("max_sessions_per_client", 0, ">= 1"),
    ("session_timeout", 0.0, "seconds > 0"), ("session_timeout", float("inf"), "finite"),
    ("max_tokens", 0, "1 .. 2\\*\\*24"), ("max_seq_len", 1, "2 .. 8192")])
def test_session_limits_refuse_bad_values(field, value, valid):
    with pytest.raises(ValueError, match=f"SessionLimits.{field} must be .*{valid}"):
        SessionLimits(**{field: value})


@pytest.mark.parametrize("flag,value,msg", [("--max-tokens", "0", "--max-tokens must be an integer >= 1"),
                                            ("--max-connections", "-1", "--max-connections must be an integer >= 1"),
                                            ("--session-timeout", "0", "--session-timeout must be a finite number")])
def test_serve_limit_flags_refuse_bad_values(flag, value, msg, capsys):
    from sft_kernels.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--tokens", "/dev/null", flag, value])
    assert msg in capsys.readouterr().err


def test_idle_checkpoints_never_push_out_a_regular_one(tmp_path):
    """The store keeps the newest 3 regular checkpoints, only the newest idle one, and none older than the
    newest regular one, so an eviction can never cost the step an edge resumes from."""
    from sft_kernels.runtime.checkpoint import CheckpointStore

    store = CheckpointStore(tmp_path)
    for step, idle in [(0, False), (3, False), (4, True), (5, True), (6, False), (9, False), (11, True)]:
        store.save(step, {"step": step}, idle=idle)
    assert store.regular_steps() == [3, 6, 9]
    assert store.steps() == [3, 6, 9, 11]
    assert store.load(11)["step"] == 11 and not store.path(5, idle=True).exists()
    store.save(12, {"step": 12})  # a newer regular one makes the idle one obsolete
    assert store.steps() == [6, 9, 12]
    with pytest.raises(Exception):  # a write that fails half-way (here: state that cannot be serialised)
        store.save(13, {"step": lambda: 13})
    assert store.steps() == [6, 9, 12] and not list(tmp_path.glob("*.tmp"))


def test_sft_train_wrong_port_says_why_without_a_traceback(tmp_path):
    import os
    import subprocess
    import sys

    port = _closed_port()
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "sft_kernels", "train", "--connect", f"127.0.0.1:{port}", "--task",
                          "synthetic", "--max-train", "8", "--max-eval", "8", "--batch-size", "4", "--quiet"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "SFT_TOKEN": "x"})
    assert out.returncode != 0
    assert f"sft train: LinkRefused: cannot connect to 127.0.0.1:{port}: nothing listens there" in out.stderr
    assert "Traceback" not in out.stderr
    assert time.monotonic() - t0 < 60  # start-up (model loading) included; no retries
