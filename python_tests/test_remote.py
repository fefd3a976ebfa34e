"""``RemoteSplit``: a user's own loop (and ``Trainer``) over a real TCP link equals ``SimulatedSplit``.

One server (a thread, real sockets) serves every test; each test uses its own run id.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sft_kernels import RemoteSplit, RemoteSplitCallback, SimulatedSplit
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudError, CloudServer, StepBatches
from sft_kernels.split import minilm_classifier

from runtime_helpers import TOKEN, assert_same, params

SPLIT = dict(at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr", seed=0)
ACCUMULATE = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = CloudServer({"edge": TOKEN.encode()}, checkpoint_dir=tmp_path_factory.mktemp("cloud")).start()
    yield srv
    srv.shutdown()


@pytest.fixture(scope="module")
def data():
    ds = load_task("synthetic", "train", limit=64)[1]
    tok, _ = minilm_classifier(2)
    return StepBatches(tok, ds, 4, 32, 0)


def _remote(server, run_id, **kw):
    _, model = minilm_classifier(2, seed=0)
    host, port = server.address
    return RemoteSplit(model, f"{host}:{port}", "edge", TOKEN, run_id=run_id, max_length=32, max_batch_size=4,
                       **{**SPLIT, **kw})


def _simulated(**kw):
    _, model = minilm_classifier(2, seed=0)
    return SimulatedSplit(model, **{**SPLIT, **kw})


def _inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


def _optimizer(model, lr=1e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))


def _micro_batch(model, data, i, opt, sched, loss_of, losses):
    """One micro-batch of a user's loop: loss divided by ``ACCUMULATE``, a step every ``ACCUMULATE``."""
    batch = data(i)
    out = model(**_inputs(batch), labels=batch["labels"])
    loss = loss_of(out, batch["labels"]) / ACCUMULATE
    loss.backward()
    losses.append(float(loss.detach()))
    if (i + 1) % ACCUMULATE == 0:
        opt.step()
        sched.step()
        opt.zero_grad()


def _loop(model, data, micro_batches, loss_of):
    """A user's loop with gradient accumulation; returns the per-micro-batch losses."""
    opt, sched = _optimizer(model)
    losses = []
    for i in range(micro_batches):
        _micro_batch(model, data, i, opt, sched, loss_of, losses)
    return losses


def _own_loss(out, labels):
    return out.loss


def _custom_loss(out, labels):
    """A loss built from the logits, not the model's: label smoothing plus a logit penalty."""
    return F.cross_entropy(out.logits, labels, label_smoothing=0.1) + 0.01 * out.logits.pow(2).mean()


@pytest.mark.parametrize("loss_of", [_own_loss, _custom_loss], ids=["model-loss", "custom-loss-from-logits"])
def test_accumulation_over_tcp_equals_simulated(server, data, loss_of):
    run = f"acc-{loss_of.__name__}"
    remote = _remote(server, run)
    sim = _simulated()
    try:
        got = _loop(remote, data, 2 * ACCUMULATE, loss_of)
        want = _loop(sim, data, 2 * ACCUMULATE, loss_of)
        assert got == want
        session = server.sessions[("edge", run)]
        assert session.step == 2 and int(remote.optimizer_steps) == 2  # one cloud step per edge step, not per batch
        assert_same(params(remote.edge), params(sim.edge), tol=0)
        assert_same(params(session.model), params(sim.cloud), tol=0)
    finally:
        remote.close()
    assert server.sessions[("edge", run)].finished


def _scaler():
    """A GradScaler whose first step overflows (the scaled loss x 64 passes fp32's range: skipped), then a
    power-of-two scale (2**10) that does not."""
    return torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, backoff_factor=2.0 ** -117, growth_interval=1000)


def test_grad_scaler_unscales_and_skips_on_both_halves(server, data):
    got, want, halves = [], [], []
    for make in (lambda: _remote(server, "amp"), _simulated):
        model = make()
        scaler = _scaler()
        if isinstance(model, RemoteSplit):
            model.grad_scaler = None  # rebuilt below with the scaler attached
            model.close()
            _, base = minilm_classifier(2, seed=0)
            host, port = server.address
            model = RemoteSplit(base, f"{host}:{port}", "edge", TOKEN, run_id="amp2", max_length=32, max_batch_size=4,
                                grad_scaler=scaler, **SPLIT)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses = got if isinstance(model, RemoteSplit) else want
        for step in range(3):
            for i in range(2):
                batch = data(2 * step + i)
                loss = model(**_inputs(batch), labels=batch["labels"]).loss / 2
                scaler.scale(loss * 64).backward()
                losses.append(float(loss.detach()))
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
        halves.append(model)
    remote, sim = halves
    try:
        assert got == want
        session = server.sessions[("edge", "amp2")]
        assert session.step == int(remote.optimizer_steps) == 2  # the first step overflowed and was skipped
        assert_same(params(remote.edge), params(sim.edge), tol=0)
        assert_same(params(session.model), params(sim.cloud), tol=0)
    finally:
        remote.close()


def test_eval_mode_sends_forward_only(server, data):
    remote = _remote(server, "eval")
    sim = _simulated()
    try:
        batch = data(0)
        remote.eval()
        sim.eval()
        with torch.no_grad():
            got = remote(**_inputs(batch), labels=batch["labels"])
            want = sim(**_inputs(batch), labels=batch["labels"])
        torch.testing.assert_close(got.logits, want.logits, atol=0, rtol=0)
        assert float(got.loss) == float(want.loss)
        session = server.sessions[("edge", "eval")]
        assert not session.worker.pending and session.step == 0  # nothing kept, nothing stepped
        remote.train()
        with torch.no_grad():  # a train-mode forward without gradients keeps no graph on the cloud either
            remote(**_inputs(batch), labels=batch["labels"])
        assert not session.worker.pending
    finally:
        remote.close()


def test_trainer_over_remote_split_trains(server, data, tmp_path):
    from transformers import Trainer, TrainingArguments

    remote = _remote(server, "trainer", max_grad_norm=1.0)
    enc = data.tokenizer(list(data.ds["text_a"][:16]), padding="max_length", max_length=32, truncation=True,
                         return_tensors="pt")
    rows = [{**{k: v[j] for k, v in enc.items()}, "labels": torch.tensor(data.ds["label"][j])} for j in range(16)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, learning_rate=1e-3, use_cpu=True, report_to=[],
                             save_strategy="steps", save_steps=2, logging_steps=1, seed=0,
                             remove_unused_columns=False)

    def collate(items):
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}

    try:
        trainer = Trainer(model=remote, args=args, train_dataset=rows, data_collator=collate,
                          callbacks=[RemoteSplitCallback(remote)])
        result = trainer.train()
        session = server.sessions[("edge", "trainer")]
        assert trainer.state.global_step == 3 and session.step == 3 and int(remote.optimizer_steps) == 3
        assert math.isfinite(result.training_loss) and result.training_loss > 0
        assert 2 in session.checkpoint_steps()  # the cloud checkpointed where Trainer saved
    finally:
        remote.close()


def test_save_and_load_checkpoint_resume_equals_uninterrupted(server, data, tmp_path):
    steps = 4
    ref = _remote(server, "ref")
    try:
        want = _loop(ref, data, steps * ACCUMULATE, _own_loss)
    finally:
        ref.close()
    first = _remote(server, "resumed")
    opt, sched = _optimizer(first)
    got = []
    for i in range(2 * ACCUMULATE):
        _micro_batch(first, data, i, opt, sched, _own_loss, got)
    first.save_checkpoint(tmp_path / "edge.pt", opt, sched)
    _micro_batch(first, data, 2 * ACCUMULATE, opt, sched, _own_loss, [])  # work lost with this process
    first.link.close()
    second = _remote(server, "resumed")
    opt, sched = _optimizer(second)
    try:
        assert second.load_checkpoint(tmp_path / "edge.pt", opt, sched) == 2
        for i in range(2 * ACCUMULATE, steps * ACCUMULATE):
            _micro_batch(second, data, i, opt, sched, _own_loss, got)
        assert got == want
        assert server.sessions[("edge", "resumed")].step == steps
    finally:
        second.close()


# ------------------------------------------------------------------------------------------ bad input

def test_optimizer_over_parameters_it_does_not_own_is_refused(server, data):
    _, model = minilm_classifier(2, seed=0)
    host, port = server.address
    remote = RemoteSplit(model, f"{host}:{port}", "edge", TOKEN, run_id="foreign", max_length=32, max_batch_size=4,
                         **SPLIT)
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # the original model: the cloud's layers too
        batch = data(0)
        remote(**_inputs(batch), labels=batch["labels"]).loss.backward()
        with pytest.raises(ValueError, match="holds .* parameter\\(s\\) of the cloud part.*remote_split.parameters"):
            opt.step()
        assert server.sessions[("edge", "foreign")].step == 0
    finally:
        remote.close()


def test_optimizer_other_than_adamw_is_refused(server, data):
    remote = _remote(server, "sgd")
    try:
        opt = torch.optim.SGD(remote.parameters(), lr=1e-3)
        batch = data(0)
        remote(**_inputs(batch), labels=batch["labels"]).loss.backward()
        with pytest.raises(ValueError, match="trains with AdamW.*SGD"):
            opt.step()
    finally:
        remote.close()


def test_model_other_than_the_servers_is_refused(server):
    _, model = minilm_classifier(2, seed=1)  # another seed: another head than the server builds
    host, port = server.address
    with pytest.raises(CloudError, match="model differs from the server's"):
        RemoteSplit(model, f"{host}:{port}", "edge", TOKEN, run_id="other", max_length=32, max_batch_size=4,
                    **{**SPLIT, "seed": 0})


def test_label_outside_the_heads_range_is_refused(server, data):
    remote = _remote(server, "labels")
    try:
        batch = data(0)
        sent = remote.bytes_sent
        # refused on the edge before anything is sent (a class id the wire's int8 cannot hold must not wrap);
        # the cloud's own refusal of out-of-range labels is test_runtime's bad-request test
        with pytest.raises(ValueError, match=r"labels must be class ids in 0\.\.1, got values \[0, 5\]"):
            remote(**_inputs(batch), labels=torch.tensor([5, 0, 0, 5]))
        assert remote.bytes_sent == sent
        remote(**_inputs(batch), labels=batch["labels"]).loss.backward()  # the session keeps serving
    finally:
        remote.close()


@pytest.mark.parametrize("kw,match", [
    (dict(connect="no-port"), "connect must be 'HOST:PORT'"),
    (dict(token=None), "exactly one of token and token_file"),
    (dict(token_file="/nonexistent/token"), "token_file '/nonexistent/token' does not exist"),
    (dict(max_grad_norm=0.0), "max_grad_norm must be a positive finite number"),
])
def test_bad_arguments_are_refused(server, kw, match):
    _, model = minilm_classifier(2, seed=0)
    host, port = server.address
    args = dict(connect=f"{host}:{port}", client_id="edge", token=TOKEN, run_id="bad", **SPLIT)
    if "token_file" in kw:
        args["token"] = None
    args.update(kw)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        RemoteSplit(model, **args)


def test_readme_remote_split_example_runs():
    """The README's "Your training script over a real link" example, run as written (a real server process)."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Your training script over a real link", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert int(model.optimizer_steps) == 2 and model.bytes_sent > 0 and model.bytes_received > 0
