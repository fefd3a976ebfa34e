"""The audit's cells, run resumably: every (setting, task, attack, attacker text, seed) is one cell.

A finished cell's rows are appended to the results CSV at once (flushed and fsynced), and a
cell whose key is already in the file is skipped on a rerun, so an interrupted ``sft audit``
continues where it stopped.  Trained inverters are cached next to the CSV (``<out>.models/``,
safetensors + JSON), so the second task's cell of a setting reuses the first's inverter (one
inverter per setting shared across the two tasks; per task for calibrated settings, whose edge
is fitted to each task's own text).

Attacks (``--attacks``):

* ``frequent``, ``positional``: the baselines (:mod:`.metrics`), fitted on the attacker's text.
* ``lookup``: nearest-neighbour lookup (:func:`.attacks.lookup`; centroids from at most ``lookup_tokens``
  tokens of the attacker's text).
* ``inversion``: the learned inverter; its cell also writes ``rerank`` rows (the inverter's top-k
  re-ranked with the step-0 edge) on the first ``rerank_sentences`` sentences, with the
  inverter's own score on those same sentences for comparison.
* ``optimisation``: :func:`.attacks.optimise` on ``opt_sentences`` sentences.
* ``labels``: U-split label recovery (U-split settings only).
* ``price``: a defence's accuracy price (defence settings and the undefended reference).

Rows per cell: one per number of views (1, and ``views``: the attacker links a sentence's
dropout-noised views across epochs and averages them).

Knows the audit's modules and files of results; not the CLI's flags.
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from . import attacks as atk
from .inverter import InverterConfig, load_inverter, predict, save_inverter, train_inverter
from .metrics import frequent_guess, positional_guess, recovery
from .settings import (CORE_SETTINGS, DEFENCE_SETTINGS, SETTINGS, USPLIT_SETTINGS, Observer, Setting,
                       get_setting)
from .text import (ATTACKER_DATA, VICTIM_TASKS, Corpus, check_data_dir, in_domain_corpus, public_corpus,
                   victim_corpus)

__all__ = ["AuditConfig", "ATTACKS", "COLUMNS", "Cell", "plan", "run_audit", "read_results", "machine",
           "DEFAULT_BUDGET_TOKENS"]

ATTACKS = ("frequent", "positional", "lookup", "inversion", "optimisation", "labels", "price")
#: The issue's cap on the attacker's text per inverter.
DEFAULT_BUDGET_TOKENS = 200_000
COLUMNS = ("setting", "task", "attack", "attacker", "seed", "views", "token", "content", "exact", "label_acc",
           "dev_acc", "sentences", "tokens", "content_tokens", "attacker_tokens", "attacker_sentences", "fit_s",
           "attack_s", "bytes_per_example", "note")
#: Settings the in-domain attacker (trained on the victim's test.tsv) also attacks by default.
IN_DOMAIN_SETTINGS = ("layer-int8", "r4-svd-int8", "r4-cal-int8")
#: Settings the optimisation attack runs on by default (minutes per 32 sentences each).
OPTIMISATION_SETTINGS = ("layer-int8", "r4-svd-int8", "r16-svd-int8", "r4-cal-int8")
#: The undefended reference of the defences' accuracy price.
PRICE_REFERENCE = "r4-svd-int8"


@dataclass
class AuditConfig:
    """Everything a run of the audit needs (the CLI's flags, with the defaults of ``make audit``)."""

    settings: Sequence[str] = tuple(SETTINGS)
    tasks: Sequence[str] = VICTIM_TASKS
    attacks: Sequence[str] = ATTACKS
    attackers: Sequence[str] = ATTACKER_DATA
    seeds: Sequence[int] = (0,)
    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    views: int = 3
    data_dir: Optional[str] = None
    out: str = "results/audit.csv"
    max_victim: Optional[int] = None
    lookup_tokens: int = 50_000
    rerank_sentences: int = 32
    rerank_k: int = 8
    opt_sentences: int = 32
    opt_steps: int = 200
    label_steps: int = 60
    price_steps: int = 128
    inverter: InverterConfig = field(default_factory=InverterConfig)
    progress: bool = True

    def __post_init__(self) -> None:
        for what, given, valid in (("setting", self.settings, tuple(SETTINGS)), ("task", self.tasks, VICTIM_TASKS),
                                   ("attack", self.attacks, ATTACKS), ("attacker text", self.attackers, ATTACKER_DATA)):
            bad = [x for x in given if x not in valid]
            if bad:
                raise ValueError(f"unknown {what}(s) {', '.join(map(repr, bad))}; valid: {', '.join(valid)}")
        if isinstance(self.budget_tokens, bool) or not isinstance(self.budget_tokens, int) or self.budget_tokens < 1:
            raise ValueError(f"budget_tokens must be an int >= 1 (attacker tokens per inverter; the issue's cap is "
                             f"{DEFAULT_BUDGET_TOKENS}), got {self.budget_tokens!r}")
        if not 1 <= self.views <= 10:
            raise ValueError(f"views must be in [1, 10] (dropout-noised views per sentence), got {self.views}")
        if not self.seeds:
            raise ValueError("seeds must hold at least one attacker seed")


@dataclass(frozen=True)
class Cell:
    """One unit of work and of resumption."""

    setting: str
    task: str
    attack: str
    attacker: str
    seed: int

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        """How the results file names it (as the CSV holds it: strings)."""
        return (self.setting, self.task, self.attack, self.attacker, str(self.seed))


def _applies(s: Setting, attack: str, attacker: str) -> bool:
    if s.u_split:
        return attack == "labels" and attacker == "public"
    if attack == "labels":
        return False
    if attack == "price":
        return attacker == "public" and (s.defence or s.name == PRICE_REFERENCE)
    if attacker == "in-domain":
        return attack in ("frequent", "positional", "inversion") and s.name in IN_DOMAIN_SETTINGS
    if attack == "optimisation":
        return s.name in OPTIMISATION_SETTINGS or s.name == "r4-svd-int8-rot"
    return True


def plan(cfg: AuditConfig) -> list[Cell]:
    """Every cell of ``cfg`` that applies, cheap ones first within a setting; price cells on SST-2 only."""
    order = {a: i for i, a in enumerate(ATTACKS)}
    cells = []
    for name in cfg.settings:
        s = SETTINGS[name]
        for attack in sorted(cfg.attacks, key=order.__getitem__):
            for attacker in cfg.attackers:
                if not _applies(s, attack, attacker):
                    continue
                for task in cfg.tasks:
                    if attack == "price" and task != "SST-2":
                        continue
                    for seed in cfg.seeds:
                        cells.append(Cell(name, task, attack, attacker, seed))
    return cells


def read_results(path: str) -> list[dict[str, str]]:
    """The rows of a results CSV (empty if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _append(path: str, rows: list[dict[str, Any]]) -> None:
    new = not os.path.exists(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
        f.flush()
        os.fsync(f.fileno())


def machine() -> dict[str, str]:
    """CPU model (lscpu), cores, torch version, its BLAS and threads: for the report."""
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), cpu)
    except (OSError, subprocess.SubprocessError):
        pass
    found = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    blas = found.group(1) if found else "unknown"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "torch": torch.__version__, "blas": blas,
            "threads": str(torch.get_num_threads())}


class _Context:
    """What cells share within one run: the model, corpora, observers, inverters (built lazily)."""

    def __init__(self, cfg: AuditConfig) -> None:
        from ..split import load_minilm

        self.cfg = cfg
        self.tok, self.encoder = load_minilm()
        self._cache: dict[Any, Any] = {}
        self.models_dir = Path(cfg.out).with_suffix(".models")

    def memo(self, key: Any, make: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def victim(self, task: str) -> Corpus:
        return self.memo(("victim", task),
                         lambda: victim_corpus(self.tok, task, self.cfg.data_dir, self.cfg.max_victim))

    def attacker_text(self, attacker: str, task: str, seed: int) -> Corpus:
        if attacker == "public":
            return self.memo(("public", seed), lambda: public_corpus(self.tok, self.cfg.budget_tokens, seed,
                                                                     self.cfg.data_dir))
        return self.memo(("in-domain", task, seed), lambda: in_domain_corpus(self.tok, task, self.cfg.budget_tokens,
                                                                             seed, self.cfg.data_dir))

    def observer(self, s: Setting, task: str) -> Observer:
        key = ("observer", s.name, task if s.calibrated else None)
        return self.memo(key, lambda: Observer(s, self.tok, self.encoder, task, self.cfg.data_dir,
                                               self.attacker_text("public", task, 0) if s.noise else None))

    def victim_views(self, s: Setting, task: str) -> tuple[list[list[torch.Tensor]], float]:
        """The cloud's ``cfg.views`` views of the victim text (victim seeds, independent of attacker seeds)."""
        def make():
            obs = self.observer(s, task)
            views, nbytes = [], 0.0
            for v in range(self.cfg.views):
                codes, nbytes = obs.observe(self.victim(task), seed=1_000_000 + v, private=True)
                views.append(codes)
            return views, nbytes
        return self.memo(("views", s.name, task), make)

    def unrotate(self, s: Setting, task: str, seed: int, views: list[list[torch.Tensor]]
                 ) -> tuple[list[list[torch.Tensor]], str]:
        """The adaptive attacker's view of a rotated setting: estimate the rotation, undo it."""
        if not s.rotate:
            return views, ""
        obs = self.observer(s, task)
        ref, _ = obs.observe(self.attacker_text("public", task, seed).head(512), seed=seed + 5, private=False)
        r_hat = atk.estimate_rotation(torch.cat(ref), torch.cat([c for v in views for c in v]))
        err = float(torch.linalg.matrix_norm(r_hat.float() - obs.rotation))
        fixed = [[c @ r_hat.float() for c in v] for v in views]
        return fixed, f"rotation estimated from code statistics, |R_hat - R|_F = {err:.3f}"

    def inverter(self, s: Setting, attacker: str, task: str, seed: int, bar: Any) -> tuple[Any, dict]:
        key = s.attacker_key(task) + (f"-{task}" if attacker == "in-domain" and not s.calibrated else "")
        path = self.models_dir / f"{key}-{attacker}-s{seed}.safetensors"

        def make():
            obs = self.observer(s, task)
            got = load_inverter(path, obs.table)
            if got is not None:
                return got
            text = self.attacker_text(attacker, task, seed)
            model, info = train_inverter(obs, text, seed=seed, config=self.cfg.inverter,
                                         progress=(lambda n: bar.set_postfix_str(f"inverter {n} tok")) if bar else None)
            save_inverter(model, info, path)
            return model, info
        return self.memo(("inverter", str(path)), make)


def _row(cell: Cell, views: int, **kw: Any) -> dict[str, Any]:
    r = {c: "" for c in COLUMNS}
    r.update(setting=cell.setting, task=cell.task, attack=cell.attack, attacker=cell.attacker, seed=cell.seed,
             views=views)
    r.update(kw)
    return r


def _scores(ctx: _Context, truth: Corpus, guess: Sequence[Sequence[int]]) -> dict[str, Any]:
    rec = recovery(ctx.tok, truth.ids, [list(map(int, g)) for g in guess])
    return dict(token=rec.token, content=rec.content, exact=rec.exact, sentences=rec.sentences, tokens=rec.tokens,
                content_tokens=rec.content_tokens)


def _run_cell(ctx: _Context, cell: Cell, bar: Any) -> list[dict[str, Any]]:
    cfg, s = ctx.cfg, get_setting(cell.setting)
    t0 = time.perf_counter()
    if cell.attack == "labels":
        ds = _load_split(cell.task, "train", cfg.data_dir)
        r = atk.label_leakage(ctx.tok, ctx.encoder, ds, steps=cfg.label_steps, rank=s.rank, codec=s.codec,
                              seed=cell.seed)
        note = (f"known step-0 head: {r['known_head']:.3f} (step 0: {r['known_head_step0']:.3f}); "
                f"tracked sign: {r['sign']:.3f} (step 0: {r['sign_step0']:.3f}); {r['examples']} training examples "
                f"over {r['steps']} steps")
        return [_row(cell, 1, label_acc=max(r["known_head"], r["sign"]), sentences=r["examples"], attack_s=r["seconds"],
                     note=note)]
    if cell.attack == "price":
        obs = ctx.observer(s, cell.task)
        r = atk.accuracy_price(s, ctx.tok, ctx.encoder, _load_split(cell.task, "train", cfg.data_dir),
                               _load_split(cell.task, "dev", cfg.data_dir), noise_rms=obs.noise_rms,
                               steps=cfg.price_steps, seed=cell.seed)
        return [_row(cell, 1, dev_acc=r["dev_acc"], attack_s=r["seconds"],
                     note=f"{r['steps']} fine-tuning steps of batch 32, lr 3e-4, then {cell.task} dev accuracy")]
    victim = ctx.victim(cell.task)
    views, nbytes = ctx.victim_views(s, cell.task)
    text = ctx.attacker_text(cell.attacker, cell.task, cell.seed)
    base = dict(attacker_tokens=text.num_tokens, attacker_sentences=len(text), bytes_per_example=nbytes)
    if cell.attack in ("frequent", "positional"):
        fn = frequent_guess if cell.attack == "frequent" else positional_guess
        guess = fn(ctx.tok, text, victim)  # sees no code: the same for any number of views
        return [_row(cell, 1, **_scores(ctx, victim, guess), attack_s=time.perf_counter() - t0, **base)]
    seen, note = ctx.unrotate(s, cell.task, cell.seed, views)
    obs = ctx.observer(s, cell.task)
    rows = []
    if cell.attack == "lookup":
        text = _capped_head(text, cfg.lookup_tokens)
        base.update(attacker_tokens=text.num_tokens, attacker_sentences=len(text))
        keys, ids = atk.code_centroids(obs, text, cell.seed)
        fit = time.perf_counter() - t0
        for v in sorted({1, cfg.views}):
            t1 = time.perf_counter()
            guess = atk.lookup(atk.mean_views(seen[:v]), keys, ids)
            rows.append(_row(cell, v, **_scores(ctx, victim, guess), fit_s=fit, attack_s=time.perf_counter() - t1,
                             note=note, **base))
        return rows
    if cell.attack == "inversion":
        model, info = ctx.inverter(s, cell.attacker, cell.task, cell.seed, bar)
        base.update(attacker_tokens=info["tokens"], attacker_sentences=info["sentences"], fit_s=info["seconds"])
        variants = [(seen, note)]
        if s.rotate:  # what an attacker that does not estimate the rotation gets: the defence's fake score
            variants.append((views, "no rotation estimate (the naive attacker)"))
        for vv, vnote in variants:
            t1 = time.perf_counter()
            got = predict(model, vv, counts=[1, cfg.views])
            for v, (top, _) in got.items():
                rows.append(_row(cell, v, **_scores(ctx, victim, [t[:, 0] for t in top]),
                                 attack_s=(time.perf_counter() - t1) / len(got), note=vnote, **base))
        # re-ranking with the edge's forward at step 0, on the first rerank_sentences sentences
        n = min(cfg.rerank_sentences, len(victim))
        if n and obs.edge is not None:
            sub = victim.subset(range(n))
            part = [[c for c in view[:n]] for view in seen[:cfg.views]]
            t1 = time.perf_counter()
            top, p = predict(model, part, k=cfg.rerank_k)[len(part)]
            plain = _scores(ctx, sub, [t[:, 0] for t in top])
            guess = atk.rerank(obs, atk.mean_views(part), top, p)
            rr = Cell(cell.setting, cell.task, "rerank", cell.attacker, cell.seed)
            rows.append(_row(rr, cfg.views, **_scores(ctx, sub, guess), attack_s=time.perf_counter() - t1,
                             note=f"{note + '; ' if note else ''}top-{cfg.rerank_k} of the inverter re-ranked on "
                                  f"{n} sentences; inverter alone on them: token {plain['token']:.3f}, content "
                                  f"{plain['content']:.3f}, exact {plain['exact']:.3f}", **base))
        return rows
    if cell.attack == "optimisation":
        n = min(cfg.opt_sentences, len(victim))
        sub = victim.subset(range(n))
        part = atk.mean_views([view[:n] for view in seen[:cfg.views]])
        guess, info = atk.optimise(obs, part, steps=cfg.opt_steps, seed=cell.seed)
        base.update(attacker_tokens=0, attacker_sentences=0)
        return [_row(cell, cfg.views, **_scores(ctx, sub, guess), attack_s=info["seconds"],
                     note=f"{note + '; ' if note else ''}{n} sentences, {info['steps']} Adam steps, final code "
                          f"loss {info['loss']:.3g}", **base)]
    raise AssertionError(cell.attack)


def _capped_head(text: Corpus, tokens: int) -> Corpus:
    """The first sentences of ``text`` (already in a random order) holding at most ``tokens`` tokens."""
    n, used = 0, 0
    while n < len(text) and used + len(text.ids[n]) <= tokens:
        used += len(text.ids[n])
        n += 1
    return text.head(n)


def _load_split(task: str, split: str, data_dir: Optional[str]) -> tuple:
    """``(text_a, text_b or None, labels)`` of a GLUE task's split."""
    from ..data import load_glue

    ds = load_glue(task, split, data_dir=data_dir)
    b = ds["text_b"] if "text_b" in ds.column_names else None
    return list(ds["text_a"]), (list(b) if b is not None and any(x is not None for x in b) else None), list(ds["label"])


def _add_wall_time(cfg: AuditConfig, since: float, host: dict[str, str]) -> float:
    """Add the seconds since ``since`` to the results' meta file (with ``host``, :func:`machine`); returns now."""
    now = time.perf_counter()
    meta_path = Path(cfg.out).with_suffix(".meta.json")
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"wall_s": 0.0}
    meta["wall_s"] = float(meta.get("wall_s", 0.0)) + now - since
    meta.update(machine=host, budget_tokens=cfg.budget_tokens, views=cfg.views)
    tmp = meta_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_path)
    return now


def run_audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run every cell of ``cfg`` not yet in ``cfg.out``; returns ``{"done", "skipped", "seconds", "out"}``.

    ``FileNotFoundError`` (naming the directory) when the GLUE files are missing.
    """
    from tqdm.auto import tqdm

    check_data_dir(cfg.data_dir)
    t0 = time.perf_counter()
    have = {(r["setting"], r["task"], r["attack"], r["attacker"], r["seed"]) for r in read_results(cfg.out)}
    cells = plan(cfg)
    todo = [c for c in cells if c.key not in have]
    ctx = _Context(cfg)
    bar = tqdm(todo, desc="audit", unit="cell", disable=not cfg.progress)
    mark, host = t0, machine()  # lscpu once per run, not per cell
    for cell in bar:
        bar.set_description(f"{cell.setting} {cell.task} {cell.attack} ({cell.attacker}, seed {cell.seed})")
        rows = _run_cell(ctx, cell, bar)
        _append(cfg.out, rows)
        mark = _add_wall_time(cfg, mark, host)  # after every cell: an interrupted run keeps its time and its machine
    bar.close()
    _add_wall_time(cfg, mark, host)
    return {"done": len(todo), "skipped": len(cells) - len(todo), "seconds": time.perf_counter() - t0,
            "out": cfg.out}


CORE = tuple(s.name for s in CORE_SETTINGS)
DEFENCES = tuple(s.name for s in DEFENCE_SETTINGS)
USPLIT = tuple(s.name for s in USPLIT_SETTINGS)
