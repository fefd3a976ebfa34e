"""Calibrated runs through the runtime: the edge fits the code, the cloud's decoders cross once per session open.

* Over TCP a calibrated run equals the same run in one process bit for bit, and each session open
  carries exactly the cloud's fitted decoders (38,400 B for MiniLM at rank 4), a reconnect again.
* The server refuses a fit it cannot trust (names, dtype, shape, finiteness, hash, init) before it
  keeps the session or writes a checkpoint, and keeps serving.
* A restarted edge resumes from its checkpoint without fitting again; a restarted server restores
  its trained decoders from its own checkpoint, not from the fit the edge re-sends.
* Every family's cloud part, built unfitted on the server, becomes the edge's fitted one exactly.
* ``SimulatedSplit`` and ``RemoteSplit`` take ``init="calibrated"`` and equal the runtime's runs; a
  ``RemoteSplit`` checkpoint keeps the fit, so a restarted process re-sends it without refitting.
* ``sft train`` / ``sft serve``: ``--init``, ``--calibration-size``, and their refusals.

MiniLM where the numbers are MiniLM's; a tiny local BERT checkpoint (hidden 32) elsewhere, which
builds in a fraction of the time.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re

import pytest
import torch

from sft_kernels import RemoteSplit, SimulatedSplit, cli
from sft_kernels.channel import RemoteError, connect
from sft_kernels.data import load_task
from sft_kernels.runtime import CloudError, CloudServer, EdgeTrainer, RunConfig, StepBatches
from sft_kernels.runtime import config as runtime_config
from sft_kernels.runtime.cloud import CloudSession
from sft_kernels.runtime.config import fit_hash, fit_state
from sft_kernels.runtime.edge import first_batches
from sft_kernels.runtime.jobs import load_train_dev, resolve_task
from sft_kernels.runtime.parts import build_parts
from sft_kernels.split import UNFITTED, CalibrationOptions, load_classifier, surgery
from sft_kernels.step.messages import OPEN, StepRefused, payload_nbytes

from runtime_helpers import TOKEN, assert_same, params, simulated_run, small_cfg
from test_cli_data import assert_one_line_error, run_cli
from tiny_checkpoints import CORPUS, FAMILIES, LLAMA_STYLE, make_tiny_checkpoint

STEPS = 4
#: The cloud's fit of all-MiniLM-L6-v2 at rank 4 (post-LN, d 384, FFN 1536): 4 x (4 + 1) x (384 + 1536) bytes.
MINILM_FIT_BYTES = 38_400
#: The same for the tiny BERT (d 32, FFN 64).
TINY_FIT_BYTES = 4 * (4 + 1) * (32 + 64)
QUIET = CalibrationOptions(progress=False)


@pytest.fixture(scope="module")
def train_ds():
    return load_task("synthetic", "train", limit=96)[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny base BERT checkpoint (2 layers, hidden 32); the split is after layer 1."""
    return make_tiny_checkpoint("bert", tmp_path_factory.mktemp("ckpt") / "tiny-bert")


@functools.lru_cache(maxsize=None)
def _tokenizer(model_dir):
    """The tokenizer build_parts gives the edge for ``model_dir`` (None: the embedded MiniLM)."""
    return load_classifier(None if model_dir is None else str(model_dir), 2)[0]


def _edge(cfg: RunConfig, ds, model_dir=None, **kw) -> EdgeTrainer:
    """An EdgeTrainer on ``ds`` (in process unless ``host`` is given); a calibrated one fits on its first batches."""
    batches = StepBatches(_tokenizer(model_dir), ds, cfg.batch_size, cfg.max_length, cfg.seed)
    return EdgeTrainer(cfg, batches, model_dir=model_dir, progress=False, **kw)


def _tiny_cfg(**kw) -> RunConfig:
    return small_cfg(**{"model": "tiny-bert", "at": 1, "init": "calibrated", "calibration_size": 16,
                        "total_steps": STEPS, **kw})


def _serve(tmp_path, model_dir=None, **kw) -> CloudServer:
    return CloudServer({"edge": TOKEN.encode()}, model_dir=model_dir, checkpoint_dir=tmp_path / "cloud", **kw).start()


@pytest.fixture(scope="module")
def minilm_run(train_ds):
    """``(cfg, trainer, summary)``: a calibrated MiniLM run of STEPS steps, its cloud in process."""
    cfg = small_cfg(init="calibrated", calibration_size=16, total_steps=STEPS)
    t = _edge(cfg, train_ds)
    return cfg, t, t.train()


# ------------------------------------------------------------------------------------------ TCP = in process


def test_tcp_run_equals_in_process_run_and_sends_the_fit_at_each_open(tmp_path, train_ds, minilm_run):
    cfg, local, here = minilm_run
    server = _serve(tmp_path)
    try:
        t = _edge(cfg, train_ds, host=server.address[0], port=server.address[1], token=TOKEN)
        assert payload_nbytes(t.fit) == MINILM_FIT_BYTES and local.handshake_bytes == MINILM_FIT_BYTES
        assert t.handshake_bytes == 0  # nothing opened yet
        summary = t.train()
        assert t.handshake_bytes == MINILM_FIT_BYTES
        assert summary.losses == here.losses
        assert (summary.payload_up, summary.payload_down) == (here.payload_up, here.payload_down)  # not step traffic
        session = server.sessions[("edge", "t")]
        assert_same(params(t.model), params(local.model), tol=0)
        assert_same(params(session.model), params(local.link.worker.model), tol=0)
        assert session.init_hashes["fit"] == t.init_hashes["fit"] == fit_hash(t.fit)
        trained = params(session.model)
        t.close()
        t.open()  # a reconnect sends the decoders again; the session keeps its trained ones
        assert t.handshake_bytes == 2 * MINILM_FIT_BYTES
        assert t.wire_bytes()[0] > 2 * MINILM_FIT_BYTES + summary.wire_up
        assert_same(params(session.model), trained, tol=0)
        t.finish()
        t.close()
    finally:
        server.shutdown()


def test_simulated_split_calibrated_equals_the_runtime_run(train_ds, minilm_run):
    cfg, local, here = minilm_run
    losses, sim = simulated_run(cfg, train_ds, STEPS)  # fitted on the same first batches as the trainer
    assert sorted(fit_state(sim.cloud)) == sorted(local.fit)
    # the runtime's fused step and SimulatedSplit's general path: the same arithmetic, as for svd runs
    assert losses == pytest.approx(here.losses, abs=1e-6)
    assert_same(params(sim.edge), params(local.model))
    assert_same(params(sim.cloud), params(local.link.worker.model))


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture(scope="module")
def tiny_open(tiny_dir):
    """``(cfg, hashes, tensors)`` of a correct calibrated OPEN for the tiny BERT (the fit: ``fit.*``)."""
    cfg = _tiny_cfg()
    parts = build_parts(cfg, tiny_dir, calibration=list(CORPUS))
    assert payload_nbytes(parts.fit) == TINY_FIT_BYTES
    return cfg, parts.hashes(), {f"fit.{k}": v for k, v in parts.fit.items()}


def _with(tensors: dict, name: str, value: torch.Tensor) -> dict:
    return {**tensors, f"fit.{name}": value}


def _rehashed(cfg: RunConfig, hashes: dict, tensors: dict) -> tuple[RunConfig, dict, dict]:
    """The OPEN of a tampered fit that still matches its declared hash (the hash is not what is refused)."""
    return cfg, dict(hashes, fit=fit_hash({k.removeprefix("fit."): v for k, v in tensors.items()})), tensors


def _wrong_shape(cfg, hashes, tensors, svd_hashes):
    return _rehashed(cfg, hashes, _with(tensors, "decoder.weight", tensors["fit.decoder.weight"][:, :3].contiguous()))


def _wrong_dtype(cfg, hashes, tensors, svd_hashes):
    return _rehashed(cfg, hashes, _with(tensors, "factor.weight", tensors["fit.factor.weight"].double()))


def _non_finite(cfg, hashes, tensors, svd_hashes):
    bias = tensors["fit.decoder.bias"].clone()
    bias[3] = float("inf")
    return _rehashed(cfg, hashes, _with(tensors, "decoder.bias", bias))


def _hash_mismatch(cfg, hashes, tensors, svd_hashes):
    return cfg, hashes, _with(tensors, "decoder.bias", tensors["fit.decoder.bias"] + 1e-3)


def _missing(cfg, hashes, tensors, svd_hashes):
    return cfg, hashes, {k: v for k, v in tensors.items() if k != "fit.factor.bias"}


def _extra(cfg, hashes, tensors, svd_hashes):
    return cfg, hashes, {**tensors, "fit.edge.factor.weight": torch.zeros(4, 32)}


def _unprefixed(cfg, hashes, tensors, svd_hashes):
    return cfg, hashes, {k.removeprefix("fit."): v for k, v in tensors.items()}


def _on_svd_run(cfg, hashes, tensors, svd_hashes):
    return dataclasses.replace(cfg, init="svd"), svd_hashes, tensors


def _fit_hash_missing(cfg, hashes, tensors, svd_hashes):
    return cfg, {k: v for k, v in hashes.items() if k != "fit"}, tensors


#: case -> (the tampered OPEN: (cfg, hashes, tensors, svd run's hashes) -> (cfg, hashes, tensors), the reason given)
REFUSALS = {
    "wrong-shape": (_wrong_shape, r"decoder 'fit\.decoder\.weight' is torch\.float32 \(32, 3\); this server's model "
                                  r"needs torch\.float32 \(32, 4\)"),
    "wrong-dtype": (_wrong_dtype, r"decoder 'fit\.factor\.weight' is torch\.float64"),
    "non-finite": (_non_finite, r"decoder 'fit\.decoder\.bias' has 1 non-finite value"),
    "hash-mismatch": (_hash_mismatch, "do not hash to the declared 'fit' hash"),
    "missing-tensor": (_missing, "must carry the calibrated decoders"),
    "extra-tensor": (_extra, "must carry the calibrated decoders"),
    "unprefixed-names": (_unprefixed, "must carry the calibrated decoders"),
    "tensors-on-svd-run": (_on_svd_run, "only an init='calibrated' run sends any"),
    "fit-hash-missing": (_fit_hash_missing,
                         r"'hashes' must map exactly \['cloud', 'edge', 'fit'\] .*init='calibrated'"),
}


def _open(conn, cfg: RunConfig, hashes: dict, tensors: dict):
    return conn.request(OPEN, tensors, {"config": cfg.to_dict(), "hashes": hashes, "step": 0, "ckpts": []})


@pytest.mark.parametrize("case", list(REFUSALS))
def test_untrusted_fit_is_refused_and_the_server_keeps_serving(case, tmp_path, tiny_dir, tiny_open):
    cfg, hashes, tensors = tiny_open
    make, match = REFUSALS[case]
    svd_hashes = build_parts(dataclasses.replace(cfg, init="svd"), tiny_dir).hashes() if case.endswith("svd-run") \
        else None
    server = _serve(tmp_path, tiny_dir)
    try:
        conn = connect(*server.address, "edge", TOKEN)
        try:
            with pytest.raises(RemoteError, match=match):
                _open(conn, *make(cfg, hashes, tensors, svd_hashes))
            assert not server.sessions  # not kept, and no checkpoint a restarted server would resume
            assert not list((tmp_path / "cloud").glob("edge/t/step-*"))
            # the same connection opens the run properly now: the decoders sent are the session's
            assert _open(conn, cfg, hashes, tensors).meta["step"] == 0
            session = server.sessions[("edge", "t")]
            got = fit_state(session.model)
            assert all(torch.equal(got[k], tensors[f"fit.{k}"]) for k in got) and len(got) == len(tensors)
            assert session.init_hashes == hashes
        finally:
            conn.close()
    finally:
        server.shutdown()


def test_trainer_without_its_fit_in_open_gets_the_clouds_reason(tmp_path, train_ds, tiny_dir, monkeypatch):
    server = _serve(tmp_path, tiny_dir)
    try:
        t = _edge(_tiny_cfg(), train_ds, tiny_dir, host=server.address[0], port=server.address[1], token=TOKEN)
        monkeypatch.setattr(t.link, "open_tensors", dict)  # an edge that does not send its decoders
        with pytest.raises(CloudError, match="refused the session.*must carry the calibrated decoders"):
            t.train(steps=1)
        assert not server.sessions and t.handshake_bytes == 0
        monkeypatch.undo()
        t.train(steps=1)
        assert server.sessions[("edge", "t")].step == 1 and t.handshake_bytes == TINY_FIT_BYTES
        t.close()
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ resume


class _MustNotBeRead:
    """A calibration that fails if iterated: a resumed edge must not fit again."""

    def __iter__(self):
        raise AssertionError("the resumed edge iterated its calibration: it fitted again")


def test_restarted_edge_and_server_resume_without_fitting_again(tmp_path, train_ds, tiny_dir, monkeypatch):
    cfg = _tiny_cfg(total_steps=6)
    ref = _edge(cfg, train_ds, tiny_dir)
    ref_summary = ref.train()
    edge_dir, cloud_ckpt = tmp_path / "edge", tmp_path / "cloud" / "edge" / "t"
    server = _serve(tmp_path, tiny_dir)
    try:
        first = _edge(cfg, train_ds, tiny_dir, host=server.address[0], port=server.address[1], token=TOKEN,
                      checkpoint_dir=edge_dir, checkpoint_every=2)
        first.train(steps=3)  # both sides checkpoint steps 0 and 2; step 3 dies with both processes
        first.close()
    finally:
        server.shutdown()

    def no_fit(*args, **kwargs):
        raise AssertionError("split_model fitted a calibration")

    monkeypatch.setattr(surgery, "_calibrate", no_fit)
    server = _serve(tmp_path, tiny_dir)  # a restarted server: the run comes back from its checkpoint
    try:
        second = _edge(cfg, train_ds, tiny_dir, host=server.address[0], port=server.address[1], token=TOKEN,
                       checkpoint_dir=edge_dir, checkpoint_every=2, calibration=_MustNotBeRead())
        assert second.step == 2
        assert second.fit.keys() == first.fit.keys()
        assert all(torch.equal(second.fit[k], first.fit[k]) for k in first.fit)
        second.open()
        session = server.sessions[("edge", "t")]
        assert session.step == 2 and second.handshake_bytes == TINY_FIT_BYTES  # the original fit, re-sent
        # the cloud's decoders are its step-2 checkpoint's (trained), not the fit the edge re-sent
        saved = torch.load(cloud_ckpt / "step-00000002.pt", weights_only=True)["model"]
        restored = fit_state(session.model)
        assert all(torch.equal(restored[k], saved[k]) for k in restored)
        assert not torch.equal(restored["decoder.weight"], first.fit["decoder.weight"])
        assert session.init_hashes["fit"] == second.init_hashes["fit"] == fit_hash(first.fit)
        summary = second.train()
        second.finish()
        second.close()
    finally:
        server.shutdown()
    assert summary.losses == ref_summary.losses
    assert_same(params(second.model), params(ref.model), tol=0)
    assert_same(params(session.model), params(ref.link.worker.model), tol=0)


# ------------------------------------------------------------------------------------------ every family


@pytest.mark.parametrize("family", FAMILIES + LLAMA_STYLE)
def test_unfitted_cloud_part_adopts_the_edges_fit_exactly(family, tmp_path):
    path = make_tiny_checkpoint(family, tmp_path / family)
    cfg = RunConfig(model=family, num_labels=2, at=1, rank=4, init="calibrated", batch_size=4, max_length=16,
                    total_steps=2, run_id=family)
    edge = build_parts(cfg, path, calibration=list(CORPUS))  # the edge fits on a few strings
    session = CloudSession("edge", cfg, model_dir=path)  # the server builds unfitted
    unfitted = fit_state(session.model)
    assert unfitted.keys() == edge.fit.keys() and all(not v.any() for v in unfitted.values())
    assert all(v.any() for v in edge.fit.values())
    sent = {f"fit.{k}": v for k, v in edge.fit.items()}
    narrow = _with(sent, "decoder.weight", sent["fit.decoder.weight"][:, 1:].contiguous())
    with pytest.raises(StepRefused, match=r"'fit\.decoder\.weight' is torch\.float32 \(32, 3\).* needs "
                                          r"torch\.float32 \(32, 4\)"):
        session.adopt_fit(narrow, fit_hash({k[4:]: v for k, v in narrow.items()}))
    assert all(not v.any() for v in fit_state(session.model).values())  # nothing loaded
    session.adopt_fit(sent, fit_hash(edge.fit))
    want, got = edge.cloud.state_dict(), session.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert session.init_hashes == edge.hashes()  # the handshake passes


# ------------------------------------------------------------------------------------------ RemoteSplit


def _inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}


def _steps(model, data, opt, start: int, stop: int) -> list[float]:
    """Optimizer steps ``start .. stop - 1`` of a user's loop, two micro-batches each; the micro-batch losses."""
    losses = []
    for step in range(start, stop):
        for i in (2 * step, 2 * step + 1):
            batch = data(i)
            out = model(**_inputs(batch), labels=batch["labels"])
            (out.loss / 2).backward()
            losses.append(float(out.loss.detach()))
        opt.step()
        opt.zero_grad()
    return losses


def test_remote_split_calibrated_equals_simulated_and_resumes_with_its_saved_fit(tmp_path, train_ds, tiny_dir):
    tok = _tokenizer(tiny_dir)
    data = StepBatches(tok, train_ds, 4, 32, 0)
    calibration = list(train_ds["text_a"][:24])
    split = dict(at=1, mode="bottleneck", rank=4, seed=0, init="calibrated", calibration_options=QUIET)

    def model():
        return load_classifier(str(tiny_dir), 2, seed=0)[1]

    sim = SimulatedSplit(model(), calibration=calibration, tokenizer=tok, **split)
    want = _steps(sim, data, torch.optim.AdamW(sim.parameters(), lr=1e-3), 0, STEPS)
    server = _serve(tmp_path, tiny_dir)
    link = dict(connect=f"{server.address[0]}:{server.address[1]}", client_id="edge", token=TOKEN, run_id="remote",
                max_length=32, max_batch_size=4)
    try:
        first = RemoteSplit(model(), calibration=calibration, tokenizer=tok, **link, **split)
        opt = torch.optim.AdamW(first.parameters(), lr=1e-3)
        got = _steps(first, data, opt, 0, 2)
        assert first.handshake_bytes == TINY_FIT_BYTES
        first.save_checkpoint(tmp_path / "edge.pt", opt)
        first.link.close()  # the process ends
        second = RemoteSplit(model(), calibration=UNFITTED, **link, **split)  # fits nothing, connects at load
        assert second.link.conn is None and second.handshake_bytes == 0
        batch = data(4)
        with pytest.raises(ValueError, match=r"calibration=UNFITTED: call load_checkpoint\(path\) first"):
            second(**_inputs(batch), labels=batch["labels"])
        opt = torch.optim.AdamW(second.parameters(), lr=1e-3)
        assert second.load_checkpoint(tmp_path / "edge.pt", opt) == 2
        assert second.handshake_bytes == TINY_FIT_BYTES  # the saved fit, sent again
        assert all(torch.equal(second.fit[k], first.fit[k]) for k in first.fit)
        got += _steps(second, data, opt, 2, STEPS)
        session = server.sessions[("edge", "remote")]
        assert got == want and session.step == STEPS
        assert_same(params(second.edge), params(sim.edge), tol=0)
        assert_same(params(session.model), params(sim.cloud), tol=0)
        second.close()
    finally:
        server.shutdown()


# ------------------------------------------------------------------------------------------ CLI


@pytest.mark.parametrize("argv,needles", [
    (["train", "--connect", "127.0.0.1:1", "--init", "calibrated", "--mode", "layer"],
     ("--init calibrated needs --mode bottleneck", "--mode layer")),
    (["serve", "--tokens", "tokens", "--init", "calibrated", "--mode", "layer"],
     ("--init calibrated needs --mode bottleneck", "--mode layer")),
    (["train", "--connect", "127.0.0.1:1", "--init", "calibrated", "--keep-links"],
     ("--init calibrated does not go with --keep-links", "--init svd")),
    (["train", "--connect", "127.0.0.1:1", "--calibration-size", "64"],
     ("--calibration-size applies to --init calibrated only", "--init svd")),
    (["train", "--connect", "127.0.0.1:1", "--calibration-fit", "svd"],
     ("--calibration-fit applies to --init calibrated only", "--init svd")),
])
def test_cli_names_the_flags_that_do_not_go_with_init(argv, needles, capsys, monkeypatch):
    monkeypatch.setenv("SFT_TOKEN", "unused")
    rc, err = run_cli(argv, capsys)
    assert_one_line_error(rc, err, argv[0], *needles)


def test_train_help_tells_what_a_calibrated_run_sends(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--init {svd,calibrated}" in out and "--calibration-size N" in out
    text = " ".join(out.split())
    assert "once per session open" in text and "38,400 B" in text
    assert "sft serve --tokens tokens.txt --port 7000 --init calibrated" in out
    assert cli.INITS == runtime_config.INITS and cli._CALIBRATION_SIZE == RunConfig().calibration_size
    assert cli.FIT_METHODS == runtime_config.FIT_METHODS and cli.DEFAULT_FIT == RunConfig().calibration_fit


def test_sft_train_init_calibrated_against_a_server_that_pins_it(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv("SFT_TOKEN", TOKEN)
    split = dict(at=1, mode="bottleneck", rank=4, eliminate_links=True, init="calibrated")
    server = CloudServer({"edge": TOKEN.encode()}, split, model_dir=tiny_dir).start()
    argv = ["train", "--connect", f"{server.address[0]}:{server.address[1]}", "--model", str(tiny_dir), "--at", "1",
            "--task", "synthetic", "--max-train", "24", "--max-eval", "8", "--batch-size", "8", "--max-length", "32",
            "--steps", "2", "--quiet", "--json"]
    try:
        with pytest.raises(SystemExit) as refused:  # the server pins init: an svd edge is told which flag to give
            cli.main(argv + ["--run-id", "svd"])
        assert "init: edge asks 'svd', server serves 'calibrated'" in str(refused.value.code)
        assert "--init" in str(refused.value.code).split("give sft train the server's split flags")[1]
        capsys.readouterr()
        assert cli.main(argv + ["--init", "calibrated", "--calibration-size", "16", "--run-id", "cal"]) == 0
        assert json.loads(capsys.readouterr().out)["steps"] == 2
        session = server.sessions[("edge", "cal")]
        assert (session.cfg.init, session.cfg.calibration_size) == ("calibrated", 16)
    finally:
        server.shutdown()
    # the fit the server got is the one of the first 16 training examples in the run's order
    _, train, _ = load_train_dev(resolve_task("synthetic", None), None, 24, 8)
    cfg = session.cfg
    want = build_parts(cfg, tiny_dir, calibration=lambda tok: first_batches(
        cfg, StepBatches(tok, train, cfg.batch_size, cfg.max_length, cfg.seed))).fit
    assert session.init_hashes["fit"] == fit_hash(want)


@pytest.mark.parametrize("field,value,valid", [
    ("calibration_fit", "lsq", "one of ('pca', 'svd', 'weighted')"),
    ("calibration_size", 0, "1 .. 1e6"),
])
def test_runconfig_names_a_bad_calibration_field(field, value, valid):
    with pytest.raises(ValueError, match=re.escape(f"RunConfig.{field} must be {valid}, got {value!r}")):
        RunConfig(init="calibrated", **{field: value})


def test_calibration_fit_reaches_the_edges_fit():
    cfg = RunConfig(init="calibrated", calibration_fit="svd", calibration_size=64, batch_size=32, max_length=16)
    parts = build_parts(cfg, calibration=lambda tok: [dict(tok(["a short sentence"] * 4 + ["another one here"] * 4,
                                                               padding=True, return_tensors="pt"))])
    assert parts.cloud.calibration.fit == "svd"
