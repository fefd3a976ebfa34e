"""The ``sft`` command (also ``python -m sft_kernels``).  Parses flags and calls the runtime; nothing else.

Subcommands:

* ``sft demo``   -- the main job: a cloud server and an edge trainer as two processes on loopback
  fine-tune MiniLM with the bottleneck split, then a table of metric and traffic;
* ``sft serve``  -- run a cloud server;
* ``sft train``  -- run an edge trainer against a server (``--connect HOST:PORT``);
* ``sft codecs`` -- every codec on real MiniLM boundary activations (bytes, error);
* ``sft audit``  -- the privacy audit: inversion and label-leakage attacks on every boundary setting
  (:mod:`sft_kernels.audit`), resumable per cell, tables into PRIVACY.md.

Model and data, as transformers' ``run_classification.py`` takes them:

* ``--model PATH`` (``serve`` and ``train``): a local checkpoint directory of a supported family, or
  ``all-MiniLM-L6-v2`` (the default: the embedded model).  Checked before anything starts (the
  directory exists, has a ``config.json`` of a family the split supports, and more layers than
  ``--at``), so a bad one is a one-line error.  ``--model-dir`` is a deprecated alias.  The run config records the
  directory's name; the handshake compares the two sides' parameters by hash.
* ``sft train --task NAME`` (a GLUE task or ``synthetic``) or ``--train-file F [--validation-file
  G] [--text-column A [--text-column B]] [--label-column L]`` (CSV, TSV, JSON, JSON lines: see
  :mod:`sft_kernels.data.files` for the rules).  The label names -> ids mapping (``label2id``) is
  printed, is in ``--json``, and with ``--checkpoint-dir`` is written to ``labels.json`` /
  ``run.json`` there.

Split flags (``--at``, ``--mode``, ``--rank``, ``--keep-links``, ``--u-split``, ``--init``, the codecs) are
pinned by ``sft serve`` and sent by ``sft train``.  ``--init calibrated``: the edge fits the bottleneck's
code to ``--calibration-size`` of its training examples (text only) and sends the cloud's decoders in
the session handshake, once per open.

Bad input (a missing or unsupported ``--model``, unreadable data or tokens, a busy port, flags that
do not go together, a value out of range) exits with status 2 and one line ``sft CMD: ...`` naming
the flag; a run that fails later (the link refused, the cloud refused the session) exits with
status 1 and one line saying what to do next.  ``--debug`` shows the traceback instead.

``sft train``'s default ``--run-id`` is derived from the run's config and its training data
(:func:`sft_kernels.runtime.jobs.default_run_id`): the same command again resumes the same run,
a different run gets its own id.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import os
import re
import sys
import textwrap
from typing import NoReturn, Optional, Sequence

DEFAULTS = dict(at=3, mode="bottleneck", rank=4, fwd_codec="int8", bwd_codec="int8,sr")
#: ``--init`` choices (:data:`sft_kernels.runtime.config.INITS`; spelled out so ``--help`` needs no torch import).
INITS = ("svd", "calibrated")
#: ``--calibration-size``'s default (``RunConfig.calibration_size``'s).
_CALIBRATION_SIZE = 512
#: ``--calibration-fit`` choices and default (:data:`sft_kernels.split.calibrate.FIT_METHODS`, ``DEFAULT_FIT``).
FIT_METHODS = ("pca", "svd", "weighted")
DEFAULT_FIT = "pca"

#: The worked examples at the end of ``sft serve --help`` and ``sft train --help``.
EXAMPLES = """\
worked examples (one server, one edge; the server's tokens file holds the line "edge SECRET",
the edge's edge.token holds SECRET):

  1. A GLUE task by name (TSVs from --data-dir or $SFT_GLUE_DIR), the embedded all-MiniLM-L6-v2:
       sft serve --tokens tokens.txt --port 7000
       sft train --connect 127.0.0.1:7000 --token-file edge.token --task SST-2

  2. Your own CSV, header "sentence,label", labels such as pos/neg (ids in sorted order: neg=0,
     pos=1; the mapping is printed, in --json, and in <checkpoint-dir>/labels.json and run.json):
       sft serve --tokens tokens.txt --port 7000
       sft train --connect 127.0.0.1:7000 --token-file edge.token --train-file train.csv \\
           --validation-file dev.csv --text-column sentence --label-column label \\
           --checkpoint-dir run1 --json

  3. A local checkpoint directory (BERT, RoBERTa, DistilBERT, GPT-2, Llama, Qwen2, Mistral, saved
     with save_pretrained; both sides hold the same files), split after layer 6 at rank 8:
       sft serve --tokens tokens.txt --port 7000 --model ./bert-base-uncased --at 6 --rank 8
       sft train --connect 127.0.0.1:7000 --token-file edge.token --model ./bert-base-uncased \\
           --at 6 --rank 8 --train-file train.csv --validation-file dev.csv

  4. A calibrated bottleneck: the edge fits the code to the first 512 examples of its training data
     (text only) before step 0 and sends the cloud's fitted decoders once per session open
     (all-MiniLM-L6-v2 at rank 4: 38,400 B):
       sft serve --tokens tokens.txt --port 7000 --init calibrated
       sft train --connect 127.0.0.1:7000 --token-file edge.token --task SST-2 --init calibrated
"""


class _BadInput(Exception):
    """A flag's value cannot be used; :func:`main` prints ``sft CMD: message`` and exits with status 2."""


class _Failed(Exception):
    """The run failed after it started (link, cloud); :func:`main` exits with ``sft CMD: message``, status 1."""


class _Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line naming the flag, not the whole usage."""

    def error(self, message: str) -> NoReturn:
        # argparse's own error() prints every flag of the command first: dozens of lines for sft train
        what = "commands" if self.prog == "sft" else "flags"
        self.exit(2, f"{self.prog}: {message} ({self.prog} --help lists the {what})\n")


class _DeprecatedAlias(argparse.Action):
    """Stores into the new flag's ``dest`` and warns on stderr that ``option_string`` is deprecated."""

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kw) -> None:
        super().__init__(option_strings, dest, **kw)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _number(name: str, cast, lo, what: str):
    """An argparse type: ``cast(s)`` that must be finite and >= ``lo``; the error names the flag and the range."""
    def parse(s: str):
        try:
            v = cast(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {s!r}") from None
        if not lo <= v < float("inf"):
            raise argparse.ArgumentTypeError(f"{name} must be {what}, got {v}")
        return v
    return parse


def _positive_int(name: str):
    return _number(name, int, 1, "an integer >= 1")


def _nonneg_int(name: str):
    return _number(name, int, 0, "an integer >= 0")


def _nonneg_float(name: str):
    return _number(name, float, 0.0, "a finite number >= 0")


def _positive_float(name: str):
    return _number(name, float, 1e-3, "a finite number >= 0.001")


def _add_split(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("split (must match between serve and train)")
    g.add_argument("--at", type=_positive_int("--at"), default=DEFAULTS["at"],
                   help="split after this many encoder layers (default 3 of MiniLM's 6)")
    g.add_argument("--mode", choices=("layer", "bottleneck"), default=DEFAULTS["mode"],
                   help="'bottleneck': low-rank factorised FFN at the split (the paper's method); "
                        "'layer': send the hidden states (default bottleneck)")
    g.add_argument("--rank", type=_positive_int("--rank"), default=DEFAULTS["rank"],
                   help="bottleneck rank (default 4; ignored with --mode layer)")
    g.add_argument("--keep-links", action="store_true",
                   help="keep the residual link across the split (sends it too; the ablation)")
    g.add_argument("--init", choices=INITS, default="svd",
                   help="how the bottleneck's code starts. 'svd' (default): from the weights alone, the paper's "
                        "code; nothing extra crosses. 'calibrated': sft train fits the code and the cloud's "
                        "decoders (which rebuild what the eliminated residual link carried) to --calibration-size "
                        "of its training examples, text only, before step 0, and sends the decoders to the server "
                        "once per session open (again after a reconnect): 4 x (rank + 1) x (d + FFN width) bytes "
                        "for BERT, RoBERTa, DistilBERT (all-MiniLM-L6-v2 at rank 4: 38,400 B), 4 x (rank + 1) x d "
                        "for GPT-2, Llama, Qwen2, Mistral. Needs --mode bottleneck without --keep-links")
    g.add_argument("--fwd-codec", default=DEFAULTS["fwd_codec"],
                   help="codec of the activations edge->cloud: none|fp16|bf16|int8|int4|int2[,sr]|"
                        "lowrank:r=R[+int8] (default int8)")
    g.add_argument("--bwd-codec", default=DEFAULTS["bwd_codec"],
                   help="codec of the gradients cloud->edge (default int8,sr: int8 with stochastic rounding)")
    g.add_argument("--u-split", action="store_true",
                   help="the U-shaped split: the edge keeps the head and the loss too, so no labels cross the link")
    g.add_argument("--pooled-codec", default=None,
                   help="U-split: codec of the pooled rows cloud->edge (default: --fwd-codec); "
                        "lowrank:r=8+int8 sends about 170 instead of 460 B/example at batch 32 (bench/README.md)")
    g.add_argument("--pooled-grad-codec", default=None,
                   help="U-split: codec of the pooled rows' gradient edge->cloud (default: --bwd-codec)")


def _add_model(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (both sides must load the same files: the handshake compares parameter hashes)")
    g.add_argument("--model", default=None, metavar="PATH",
                   help="a local transformers checkpoint directory (config.json, weights, tokenizer) of a family the "
                        "split supports: BERT, RoBERTa, DistilBERT, GPT-2, Llama, Qwen2, Mistral; nothing is "
                        "downloaded (default: all-MiniLM-L6-v2, the embedded model)")
    g.add_argument("--model-dir", dest="model", action=_DeprecatedAlias, new="--model", help=argparse.SUPPRESS)


def _add_link(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("link and security")
    if server:
        g.add_argument("--tokens", required=True,
                       help="tokens file: one 'client_id secret' per line (chmod 600); each edge has its own")
    else:
        g.add_argument("--client-id", default="edge", help="this edge's id in the server's tokens file (default edge)")
        g.add_argument("--token-file", default=None,
                       help="file holding this edge's secret (default: $SFT_TOKEN)")
        g.add_argument("--server-hostname", default=None,
                       help="name expected in the server's TLS certificate (default: the host of --connect)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate chain of this side (server: required for TLS; "
                                                   "edge: for mutual TLS)")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=None, help="CA bundle verifying the peer (server: requires client certificates "
                                                 "= mutual TLS; edge: verifies the server and turns TLS on)")
    g.add_argument("--link-mbps", type=_nonneg_float("--link-mbps"), default=0.0,
                   help="emulate a link of this many megabit/s on the sending side (0 = unlimited)")
    g.add_argument("--link-latency-ms", type=_nonneg_float("--link-latency-ms"), default=0.0,
                   help="add this one-way latency per message in ms (default 0)")
    g.add_argument("--max-frame-mb", type=_positive_int("--max-frame-mb"), default=1024,
                   help="largest frame accepted, MiB (default 1024)")


def _add_run(p: argparse.ArgumentParser, server: bool) -> None:
    g = p.add_argument_group("run")
    if server:
        g.add_argument("--checkpoint-dir", default=None,
                       help="checkpoint each session here at the steps its edge asks for, and before evicting an "
                            "idle session (atomic write-then-rename); a restarted server resumes from it")
    else:
        g.add_argument("--checkpoint-dir", default=None,
                       help="checkpoint here every --checkpoint-every steps (atomic write-then-rename); the server "
                            "checkpoints the same steps; a restarted process resumes from it")
        g.add_argument("--checkpoint-every", type=_positive_int("--checkpoint-every"), default=50,
                       help="steps between checkpoints, on this edge and on the server (default 50)")
    g.add_argument("--quiet", action="store_true", help="no progress bars or logs, only results/errors")
    _add_debug(g)


def _add_debug(g) -> None:
    g.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")


def _add_server_limits(p: argparse.ArgumentParser) -> None:
    from .runtime.cloud import SessionLimits

    d = SessionLimits()
    g = p.add_argument_group("limits and fairness (docs/protocol.md, 'Limits and fairness')")
    g.add_argument("--max-connections", type=_positive_int("--max-connections"), default=64,
                   help="connection slots; when all are taken, the oldest connection still authenticating is "
                        "dropped for a new one (default 64)")
    g.add_argument("--handshake-timeout", type=_positive_float("--handshake-timeout"), default=5.0,
                   help="seconds a new connection has to finish TLS and authentication (default 5)")
    g.add_argument("--idle-timeout", type=_nonneg_float("--idle-timeout"), default=300.0,
                   help="seconds an authenticated connection may stay silent before it is closed (0 = never; "
                        "default 300)")
    g.add_argument("--max-sessions", type=_positive_int("--max-sessions"), default=d.max_sessions,
                   help=f"sessions held in memory at once (default {d.max_sessions})")
    g.add_argument("--max-sessions-per-client", type=_positive_int("--max-sessions-per-client"),
                   default=d.max_sessions_per_client,
                   help=f"sessions one client id may hold (default {d.max_sessions_per_client})")
    g.add_argument("--session-timeout", type=_positive_float("--session-timeout"), default=d.session_timeout,
                   help="seconds a session without a connection stays in memory before it may be checkpointed and "
                        "evicted; without --checkpoint-dir an evicted session is lost, so make it longer than any "
                        f"pause of an edge (default {d.session_timeout:.0f})")
    g.add_argument("--max-tokens", type=_positive_int("--max-tokens"), default=d.max_tokens,
                   help="padded tokens (batch x length) one training or eval request may carry; bounds the "
                        f"server's activation memory per request (default {d.max_tokens})")
    g.add_argument("--max-seq-len", type=_positive_int("--max-seq-len"), default=d.max_seq_len,
                   help=f"longest sequence a session may use (default {d.max_seq_len})")


def _add_train(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data: a task by name (--task), or your own files (--train-file ...)")
    d.add_argument("--task", default=None,
                   help="SST-2, CoLA, MRPC, STS-B, RTE, WNLI, or synthetic; 'auto' = SST-2 when the GLUE data "
                        "is found, else the built-in synthetic task (default auto, unless --train-file)")
    d.add_argument("--data-dir", default=None, help="GLUE TSV directory (default $SFT_GLUE_DIR or ../shared/data/glue)")
    d.add_argument("--train-file", default=None, metavar="FILE",
                   help="your labelled training data instead of --task: .csv, .tsv (header row), .json or .jsonl; "
                        "name labels become ids in sorted order, integer labels are class ids, decimal labels "
                        "make a regression")
    d.add_argument("--validation-file", default=None, metavar="FILE",
                   help="labelled data to evaluate on after training, same columns as --train-file (default: "
                        "no evaluation)")
    d.add_argument("--text-column", action="append", default=None, metavar="NAME",
                   help="the text column of --train-file; give it twice for a sentence pair (default: sentence1 + "
                        "sentence2, sentence, text, or the one or two columns that hold text)")
    d.add_argument("--label-column", default=None, metavar="NAME", help="the label column (default label)")
    g = p.add_argument_group("training")
    g.add_argument("--max-train", type=_positive_int("--max-train"), default=None,
                   help="use this many training examples (a fixed subsample; default all)")
    g.add_argument("--max-eval", type=_positive_int("--max-eval"), default=None,
                   help="evaluate on the first N dev examples (default: the full dev set)")
    g.add_argument("--steps", type=_positive_int("--steps"), default=None,
                   help="training steps (default: --epochs passes over the training set)")
    g.add_argument("--epochs", type=_nonneg_float("--epochs"), default=1.0, help="passes over the data (default 1)")
    g.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32, help="default 32")
    g.add_argument("--max-length", type=_positive_int("--max-length"), default=128,
                   help="truncate sequences to this many tokens (default 128)")
    g.add_argument("--lr", type=_number("--lr", float, 0.0, "a finite number in (0, 1)"), default=1e-4,
                   help="AdamW learning rate (default 1e-4)")
    g.add_argument("--warmup-ratio", type=_nonneg_float("--warmup-ratio"), default=0.1,
                   help="fraction of steps of linear warmup (default 0.1)")
    g.add_argument("--calibration-size", type=_positive_int("--calibration-size"), default=None, metavar="N",
                   help=f"--init calibrated: fit the code on the first N examples of the training data in the "
                        f"run's order (their labels are not used; default {_CALIBRATION_SIZE}); a run resumed "
                        f"from --checkpoint-dir reuses the fit it saved")
    g.add_argument("--calibration-fit", choices=FIT_METHODS, default=None,
                   help=f"--init calibrated: how the edge fits the code (default {DEFAULT_FIT}; see "
                        f"sft_kernels.split.calibrate and RESULTS.md for what each costs and trains to)")
    g.add_argument("--seed", type=int, default=0, help="seeds head init, factors, data order, dropout (default 0)")
    g.add_argument("--run-id", default=None,
                   help="names this run on the server (with the client id); the same id resumes the run there. "
                        "Default: run-<hash of the run's config and training data>, so the same command resumes "
                        "and a different run gets its own id")
    g.add_argument("--retries", type=_nonneg_int("--retries"), default=8,
                   help="the retry bound: reconnect attempts per dropped link, link drops per step, and retryable "
                        "server errors (e.g. server full) in a row (default 8)")
    g.add_argument("--json", action="store_true", help="print the results as JSON")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sft", description="Split fine-tuning between an edge device and a cloud "
                "server: only compressed boundary tensors, aux data and labels cross the link.")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="cloud + edge on loopback: fine-tune MiniLM (bottleneck r=4, int8), print traffic",
                       description="Start a cloud server process and an edge trainer on 127.0.0.1, fine-tune "
                       "all-MiniLM-L6-v2 with the bottleneck split (rank 4, int8 both ways), evaluate, then run a few "
                       "steps of the uncompressed layer split and print bytes per example against it.")
    d.add_argument("--steps", type=_positive_int("--steps"), default=60, help="training steps (default 60)")
    d.add_argument("--baseline-steps", type=_positive_int("--baseline-steps"), default=3,
                   help="steps of the uncompressed layer split measured for the comparison (default 3)")
    d.add_argument("--task", default="auto", help="as for train (default auto)")
    d.add_argument("--data-dir", default=None, help="GLUE TSV directory")
    d.add_argument("--max-eval", type=_positive_int("--max-eval"), default=None, help="dev examples (default all)")
    d.add_argument("--batch-size", type=_positive_int("--batch-size"), default=32, help="default 32")
    d.add_argument("--seed", type=int, default=0, help="default 0")
    d.add_argument("--quiet", action="store_true",
                   help="no progress bars or logs: only the result table (or --json) and errors")
    d.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_debug(d)

    s = sub.add_parser("serve", help="run the cloud server", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill("Serve split fine-tuning sessions to authenticated edges. Binds "
                                                 "127.0.0.1 unless --host says otherwise. Each (client id, run id) "
                                                 "gets its own cloud part.", 79))
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 = all)")
    s.add_argument("--port", type=int, default=7000, help="TCP port (default 7000; 0 = any free port)")
    s.add_argument("--port-file", default=None, help="write the bound port to this file once listening")
    s.add_argument("--any-split", action="store_true",
                   help="accept whatever split settings an edge proposes instead of the ones given here")
    _add_model(s)
    _add_split(s)
    _add_link(s, server=True)
    _add_server_limits(s)
    _add_run(s, server=True)

    t = sub.add_parser("train", help="run an edge trainer against a server", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description=textwrap.fill("Fine-tune the edge part locally; the cloud part runs on the server "
                                                 "at --connect. The data is a task by name (--task) or your own "
                                                 "files (--train-file).", 79))
    t.add_argument("--connect", required=True, metavar="HOST:PORT", help="the server's address")
    _add_model(t)
    _add_split(t)
    _add_link(t, server=False)
    _add_train(t)
    _add_run(t, server=False)

    c = sub.add_parser("codecs", help="encode/decode real MiniLM boundary activations with each codec",
                       description="Embed GLUE SST-2 dev sentences with the first LAYER layers of all-MiniLM-L6-v2, "
                       "then print bytes, reduction and relative error for every codec.")
    c.add_argument("--sentences", type=_positive_int("--sentences"), default=256, help="default 256")
    c.add_argument("--layer", type=int, default=3, help="split after this many encoder layers, 0..6 (default 3)")
    c.add_argument("--codecs", nargs="+", default=None, metavar="SPEC", help="codec specs (default: a set)")
    c.add_argument("--data-dir", default=None, help="GLUE directory")
    c.add_argument("--model-dir", default=None, help="local MiniLM directory")
    _add_debug(c)
    _add_audit(sub)
    return p


AUDIT_EPILOG = """\
settings (--settings; groups: core, defences, usplit, all):
{settings}

attacks (--attacks):
  frequent, positional  baselines: the attacker's most frequent token; the most frequent per (length, position)
  lookup                nearest neighbour: the embedding table (raw embeddings), else per-token code centroids
  inversion             a 2-layer bidirectional transformer trained through the real codec and train-mode
                        dropout on the attacker's text (one pass, at most --budget-tokens tokens), output tied
                        to the public embedding table; its cell also re-ranks the top-k with the step-0 edge
  optimisation          input embeddings optimised against the step-0 edge until their code matches, then
                        projected to the vocabulary ({opt} sentences)
  labels                U-split: label recovery from the gradient of the cloud's output
  price                 a defence's accuracy price: SST-2 dev accuracy after a short fine-tune

examples:
  sft audit                                     # everything (make audit: about 3 CPU-hours, resumable)
  sft audit --settings embeddings r4-svd-fp32 --tasks SST-2 --attacks lookup inversion --budget-tokens 20000
  sft audit --report-only                       # rebuild PRIVACY.md's tables from results/audit.csv
"""


def _add_audit(sub) -> None:
    """The ``sft audit`` subcommand (:mod:`sft_kernels.audit`)."""
    from .audit.runner import ATTACKS, DEFAULT_BUDGET_TOKENS
    from .audit.settings import SETTINGS
    from .audit.text import ATTACKER_DATA, VICTIM_TASKS

    listing = "\n".join(f"  {n:<22}{s.describe()}" for n, s in SETTINGS.items())
    a = sub.add_parser("audit", help="privacy audit: how much of the text the cloud can recover from what crosses",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=AUDIT_EPILOG.format(settings=listing, opt=32),
                       description=textwrap.fill(
                           "Attack what crosses the link, as an honest-but-curious cloud that knows the model family, "
                           "the edge's step-0 weights, the split settings and the codecs, and receives the decoded "
                           "codes, the lengths, the labels (outside the U-split) and a new dropout-noised view of "
                           "every sentence each epoch. Victims: SST-2 and RTE dev text, MiniLM split at layer 3. "
                           "Results go to --out cell by cell (a rerun skips finished cells); the tables go to "
                           "--report.", 79))
    a.add_argument("--settings", nargs="+", default=["all"], metavar="NAME",
                   help="settings or groups to attack (default all; listed below)")
    a.add_argument("--tasks", nargs="+", default=list(VICTIM_TASKS), choices=list(VICTIM_TASKS), metavar="TASK",
                   help=f"victim tasks (default: {' '.join(VICTIM_TASKS)})")
    a.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS), metavar="ATTACK",
                   help="attacks to run (default all; listed below)")
    a.add_argument("--attackers", nargs="+", default=list(ATTACKER_DATA), choices=list(ATTACKER_DATA),
                   metavar="TEXT", help="the attacker's text: public (other tasks' training text) and/or in-domain "
                                        "(the victim task's test.tsv) (default both)")
    a.add_argument("--budget-tokens", type=_positive_int("--budget-tokens"), default=DEFAULT_BUDGET_TOKENS,
                   help=f"attacker tokens per inverter, one pass (default {DEFAULT_BUDGET_TOKENS}, the issue's cap)")
    a.add_argument("--seeds", nargs="+", type=_nonneg_int("--seeds"), default=[0],
                   help="attacker seeds; more than one gives mean ± std (default 0)")
    a.add_argument("--views", type=_positive_int("--views"), default=3,
                   help="dropout-noised views of each victim sentence the cloud links and averages, 1..10 "
                        "(default 3: three epochs)")
    a.add_argument("--max-victim", type=_positive_int("--max-victim"), default=None,
                   help="attack only the first N dev sentences of each task (default all)")
    a.add_argument("--data-dir", default=None, help="GLUE TSV directory (default $SFT_GLUE_DIR or ../shared/data/glue)")
    a.add_argument("--out", default="results/audit.csv",
                   help="results CSV, appended cell by cell; inverters cached in <out>.models/ (default "
                        "results/audit.csv)")
    a.add_argument("--report", default="PRIVACY.md",
                   help="Markdown file whose audit block gets the tables ('' for none; default PRIVACY.md)")
    a.add_argument("--report-only", action="store_true", help="only rebuild --report from --out")
    a.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_debug(a)


def _audit_settings(names: Sequence[str]) -> list[str]:
    """``--settings`` with its groups expanded, in table order; an unknown name is a :class:`_BadInput`."""
    from .audit.settings import CORE_SETTINGS, DEFENCE_SETTINGS, SETTINGS, USPLIT_SETTINGS

    groups = {"core": CORE_SETTINGS, "defences": DEFENCE_SETTINGS, "usplit": USPLIT_SETTINGS,
              "all": tuple(SETTINGS.values())}
    want: set[str] = set()
    for n in names:
        if n in groups:
            want.update(s.name for s in groups[n])
        elif n in SETTINGS:
            want.add(n)
        else:
            raise _BadInput(f"--settings: unknown setting {n!r}; valid: {', '.join(groups)}, {', '.join(SETTINGS)}")
    return [n for n in SETTINGS if n in want]


def _audit(a: argparse.Namespace) -> int:
    from .audit import AuditConfig, check_data_dir, read_results, run_audit, write_report

    settings = _audit_settings(a.settings)
    try:
        check_data_dir(a.data_dir)
    except FileNotFoundError as exc:
        raise _BadInput(f"--data-dir: {exc}") from exc
    try:
        cfg = AuditConfig(settings=settings, tasks=a.tasks, attacks=a.attacks, attackers=a.attackers, seeds=a.seeds,
                          budget_tokens=a.budget_tokens, views=a.views, data_dir=a.data_dir, out=a.out,
                          max_victim=a.max_victim, progress=not a.quiet)
    except ValueError as exc:
        raise _BadInput(str(exc)) from exc
    if not a.report_only:
        done = run_audit(cfg)
        print(f"sft audit: {done['done']} cell(s) run, {done['skipped']} already in {done['out']}, "
              f"{done['seconds'] / 60:.1f} min")
    if a.report:
        command = (f"sft audit --settings {' '.join(a.settings)} --tasks {' '.join(a.tasks)} --attacks "
                   f"{' '.join(a.attacks)} --attackers {' '.join(a.attackers)} --budget-tokens {a.budget_tokens} "
                   f"--seeds {' '.join(map(str, a.seeds))} --views {a.views}"
                   + (f" --max-victim {a.max_victim}" if a.max_victim else ""))
        write_report(a.report, read_results(a.out), os.path.splitext(a.out)[0] + ".meta.json", command)
        print(f"sft audit: tables written to {a.report}")
    return 0


def _split_kwargs(a: argparse.Namespace) -> dict:
    """The split settings of the flags (:data:`~sft_kernels.runtime.config.SPLIT_FIELDS`); codecs checked."""
    from .codecs import from_spec

    for flag, spec in (("--fwd-codec", a.fwd_codec), ("--bwd-codec", a.bwd_codec), ("--pooled-codec", a.pooled_codec),
                       ("--pooled-grad-codec", a.pooled_grad_codec)):
        try:
            if spec is not None:
                from_spec(spec)
        except ValueError as exc:
            raise _BadInput(f"{flag}: {exc}") from exc
    if not a.u_split and (a.pooled_codec or a.pooled_grad_codec):
        raise _BadInput("--pooled-codec / --pooled-grad-codec apply to the U-split only: add --u-split")
    if a.init == "calibrated" and a.mode != "bottleneck":
        raise _BadInput(f"--init calibrated needs --mode bottleneck, got --mode {a.mode}: a layer split sends the "
                        f"hidden states whole and has no code to fit")
    if a.init == "calibrated" and a.keep_links:
        raise _BadInput("--init calibrated does not go with --keep-links: with the residual link kept, the "
                        "residual crosses exactly and the decoders have nothing to rebuild; use --init svd")
    return dict(at=a.at, mode=a.mode, rank=a.rank if a.mode == "bottleneck" else None,
                eliminate_links=not a.keep_links, u_split=a.u_split, init=a.init, fwd_codec=a.fwd_codec,
                bwd_codec=a.bwd_codec, pooled_codec=a.pooled_codec, pooled_grad_codec=a.pooled_grad_codec)


def _model(a: argparse.Namespace) -> tuple[Optional[str], str]:
    """``(what build_parts loads, the run config's label)`` of ``--model``, checked up front.

    None and the embedded model's name give ``(None, "all-MiniLM-L6-v2")``; a directory must exist
    and hold a ``config.json`` of a supported family (:func:`sft_kernels.split.pretrained.checkpoint_dir`).
    """
    from .split.pretrained import EMBEDDED_MODEL, checkpoint_dir

    if a.model is None or a.model == EMBEDDED_MODEL:
        model, name = None, EMBEDDED_MODEL
    else:
        try:
            path, _ = checkpoint_dir(a.model)
        except (FileNotFoundError, ValueError) as exc:
            msg = str(exc)
            raise _BadInput(f"--model {a.model}: {msg.removeprefix('model: ')}") from exc
        model, name = str(path), path.resolve().name
    if not getattr(a, "any_split", False):
        _check_at(a.at, model, name)
    return model, name


def _check_at(at: int, model: Optional[str], name: str) -> None:
    """``--at`` must leave a layer on each side: ``at < num_hidden_layers`` of the model's config."""
    from transformers import AutoConfig

    from .split.pretrained import minilm_path

    try:
        config = AutoConfig.from_pretrained(model or str(minilm_path()), local_files_only=True)
    except (OSError, ValueError):
        return  # unreadable here: building the model reports it
    layers = getattr(config, "num_hidden_layers", None)
    if isinstance(layers, int) and not at < layers:
        raise _BadInput(f"--at {at}: the model {name} has {layers} layers; split after 1..{layers - 1} of them")


#: Python names that error messages use (RunConfig and SessionLimits fields, load_files' and the jobs' arguments)
#: -> the flag that sets them, where that is not the name with dashes (:func:`_flags_of` adds those).
_FLAG_NAMES = {"text_columns=('a',) or ('a', 'b')": "--text-column A (twice for a pair: --text-column B)",
               "text_columns": "--text-column", "total_steps": "--steps", "warmup_steps": "--warmup-ratio",
               "eliminate_links": "--keep-links", "num_labels": "the number of classes in the data"}
#: What error messages call a field: ``RunConfig.lr``, ``SessionLimits.max_tokens``, or a bare ``train_file``.
_FIELD = re.compile(r"\b(?:RunConfig|SessionLimits)\.(\w+)|text_columns=\('a',\) or \('a', 'b'\)"
                    r"|\b[a-z]+(?:_[a-z]+)+\b")
#: Quoted text in a message (a path, a value): never rewritten.
_QUOTED = re.compile(r"('[^']*'|\"[^\"]*\")")


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{command: its parser}`` of :func:`_parser`'s subcommands."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(subs[0].choices)


def _flags_of(parser: argparse.ArgumentParser) -> dict[str, str]:
    """``{dest: flag}`` of every command's flags (``--model-dir``'s alias left out), then :data:`_FLAG_NAMES`."""
    flags: dict[str, str] = {}
    for sub in _commands(parser).values():
        for action in sub._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if longs and action.help is not argparse.SUPPRESS:
                flags.setdefault(action.dest, longs[0])
    return {**flags, **_FLAG_NAMES}


def _with_flags(message: str) -> str:
    """``message`` with the Python names of settings (``RunConfig.lr``, ``train_file``) written as their flags.

    One table for every message: the parser's own ``dest -> flag`` and :data:`_FLAG_NAMES`.  Quoted
    text (paths, values) is left as it is.
    """
    flags = _flags_of(_parser())

    def flag(m: re.Match) -> str:
        name = m.group(1) or m.group(0)
        return flags.get(name, m.group(0))

    return "".join(part if _QUOTED.fullmatch(part) else _FIELD.sub(flag, part) for part in _QUOTED.split(message))


def _data(a: argparse.Namespace):
    """``(spec, train, dev, identity)`` of the data flags (identity: :func:`~.runtime.jobs.data_identity`).

    Flags that do not go together, and data that cannot be read, are a :class:`_BadInput`.
    """
    from .runtime.jobs import data_identity, load_train_dev

    if a.train_file is None:
        for flag, value in (("--validation-file", a.validation_file), ("--text-column", a.text_column),
                            ("--label-column", a.label_column)):
            if value is not None:
                raise _BadInput(f"{flag} needs --train-file (it describes your own data; --task names a built-in "
                                "task)")
        task = _task(a.task or "auto", a.data_dir)
        try:
            spec, train, dev = load_train_dev(task, a.data_dir, a.max_train, a.max_eval)
        except (FileNotFoundError, ValueError) as exc:
            raise _BadInput(_with_flags(str(exc))) from exc
        return spec, train, dev, data_identity(task=task, data_dir=a.data_dir, max_train=a.max_train)
    if a.task is not None:
        raise _BadInput(f"--task {a.task} and --train-file are alternatives: give one of them")
    if a.data_dir is not None:
        raise _BadInput("--data-dir is where --task finds GLUE files; it does not go with --train-file")
    kw = dict(train_file=a.train_file, text_columns=a.text_column, label_column=a.label_column or "label")
    try:
        spec, train, dev = load_train_dev(None, None, a.max_train, a.max_eval, validation_file=a.validation_file,
                                          **kw)
    except (FileNotFoundError, ValueError) as exc:
        raise _BadInput(_with_flags(str(exc))) from exc
    return spec, train, dev, data_identity(max_train=a.max_train, **kw)


def _task(task: str, data_dir: Optional[str]) -> str:
    """:func:`~.runtime.jobs.resolve_task` of ``--task`` / ``--data-dir``; an unknown task or a missing
    ``--data-dir`` is a :class:`_BadInput` (never a quiet switch to the synthetic task)."""
    from .runtime.jobs import resolve_task

    try:
        return resolve_task(task, data_dir)
    except ValueError as exc:
        raise _BadInput(f"--task {task}: {_with_flags(str(exc))}") from exc
    except FileNotFoundError as exc:
        raise _BadInput(_with_flags(str(exc))) from exc


def _channel_kwargs(a: argparse.Namespace, server: bool) -> dict:
    from .channel import Limits, LinkLimiter, TLSConfig

    tls = None
    if a.tls_cert or a.tls_ca or a.tls_key:
        tls = TLSConfig(cert=a.tls_cert, key=a.tls_key, ca=a.tls_ca,
                        server_hostname=None if server else a.server_hostname)
    limits = Limits(max_frame_bytes=a.max_frame_mb << 20,
                    **(dict(handshake_timeout=a.handshake_timeout, idle_timeout=a.idle_timeout or None,
                            max_connections=a.max_connections) if server else {}))
    link = LinkLimiter(a.link_mbps or None, a.link_latency_ms) if (a.link_mbps or a.link_latency_ms) else None
    return dict(tls=tls, limits=limits, link=link)


def _serve(a: argparse.Namespace) -> int:
    from .channel import load_tokens
    from .runtime import CloudServer
    from .runtime.cloud import SessionLimits

    model, _ = _model(a)
    split = None if a.any_split else _split_kwargs(a)
    try:
        tokens = load_tokens(a.tokens)
    except (OSError, ValueError) as exc:
        raise _BadInput(f"--tokens: {exc}") from exc
    try:
        sessions = SessionLimits(max_sessions=a.max_sessions, max_sessions_per_client=a.max_sessions_per_client,
                                 session_timeout=a.session_timeout, max_tokens=a.max_tokens,
                                 max_seq_len=a.max_seq_len)
    except ValueError as exc:
        raise _BadInput(_with_flags(str(exc))) from exc
    try:
        server = CloudServer(tokens, split, a.host, a.port, model_dir=model, checkpoint_dir=a.checkpoint_dir,
                             sessions=sessions, **_channel_kwargs(a, server=True))
    except OSError as exc:  # binding: the port is taken, or not ours to take, or the host is not this machine's
        busy = "; another process listens there: stop it, or pick another --port (0 = any free port)" \
            if exc.errno == errno.EADDRINUSE else ""
        raise _BadInput(f"--host {a.host} --port {a.port}: cannot listen there: {exc.strerror or exc}{busy}") \
            from exc
    host, port = server.address
    if a.port_file:
        tmp = a.port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(port))
        os.replace(tmp, a.port_file)
    if not a.quiet:
        print(f"sft serve: listening on {host}:{port} (model {model or 'all-MiniLM-L6-v2'}, "
              f"TLS {'on' if a.tls_cert else 'off'}, checkpoints {a.checkpoint_dir or 'off'})", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return 0


def _token(a: argparse.Namespace) -> str:
    """The edge's secret: ``--token-file``'s content, else ``$SFT_TOKEN``."""
    if a.token_file:
        try:
            with open(a.token_file, encoding="utf-8") as f:
                tok = f.read().strip()
        except OSError as exc:
            raise _BadInput(f"--token-file {a.token_file}: cannot read it: {exc.strerror or exc}") from exc
        if not tok:
            raise _BadInput(f"--token-file {a.token_file} is empty: it must hold this edge's secret (the second "
                            f"field of its line in the server's tokens file)")
        return tok
    tok = os.environ.get("SFT_TOKEN", "")
    if not tok:
        raise _BadInput("no token: pass --token-file FILE or set $SFT_TOKEN")
    return tok


def _train(a: argparse.Namespace) -> int:
    from .runtime import RunConfig, train_and_evaluate
    from .runtime.jobs import OtherRun, default_run_id, dumps, print_run, steps_for

    host, _, port = a.connect.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _BadInput(f"--connect must be HOST:PORT with a port in 1..65535, got {a.connect!r}")
    split = _split_kwargs(a)
    for flag, value in (("--calibration-size", a.calibration_size), ("--calibration-fit", a.calibration_fit)):
        if value is not None and a.init != "calibrated":
            raise _BadInput(f"{flag} applies to --init calibrated only (this run has --init {a.init}, which fits "
                            f"nothing to data)")
    token = _token(a)  # before the model and the data load: a bad token file is found in a second
    model, model_name = _model(a)
    spec, train, dev, identity = _data(a)
    steps = a.steps or steps_for(len(train), a.batch_size, a.epochs)
    try:
        cfg = RunConfig(model=model_name, task=spec.name, num_labels=spec.num_labels, seed=a.seed, lr=a.lr,
                        total_steps=steps, warmup_steps=int(a.warmup_ratio * steps), batch_size=a.batch_size,
                        max_length=a.max_length, run_id=a.run_id or "run",
                        calibration_size=a.calibration_size or _CALIBRATION_SIZE,
                        calibration_fit=a.calibration_fit or DEFAULT_FIT, **split)
    except ValueError as exc:
        raise _BadInput(_with_flags(str(exc))) from exc
    if a.run_id is None:
        cfg = dataclasses.replace(cfg, run_id=default_run_id(cfg, identity, model))
    try:
        run = train_and_evaluate(cfg, train, dev, spec=spec, host=host, port=int(port), client_id=a.client_id,
                                 token=token, checkpoint_dir=a.checkpoint_dir, checkpoint_every=a.checkpoint_every,
                                 retries=a.retries, model_dir=model, progress=not a.quiet,
                                 **_channel_kwargs(a, server=False))
    except OtherRun as exc:
        raise _BadInput(_with_flags(str(exc))) from exc
    print(dumps(run.to_json()) if a.json else print_run(run))
    return 0


#: Advice for a run id that names another run, and for a run the edge cannot follow the server in.
_OTHER_RUN_ID = ("; the run id names another run: leave out --run-id (the default is derived from the config and "
                 "the data) or give this run its own --run-id")
_RESUME_OR_RESTART = ("; to resume this run give sft train the --checkpoint-dir it ran with, to start it over give it "
                      "another --run-id")
#: What to do about a refusal or failure of a started run: (a phrase of its message, the advice added to it).
_HINTS = (
    ("split settings differ", "; give sft train the server's split flags (--at, --mode, --rank, --keep-links, "
                              "--u-split, --init, --fwd-codec, --bwd-codec, --pooled-codec, --pooled-grad-codec) or "
                              "start the server with --any-split"),
    ("nothing listens", "; check --connect, and start sft serve there first"),
    ("with a different config", _OTHER_RUN_ID),  # the session is open with another config
    ("belongs to a different run config", _OTHER_RUN_ID),  # the server's checkpoints of that id hold another config
    ("no step to resume from", _RESUME_OR_RESTART),
    ("cannot roll back", _RESUME_OR_RESTART),
    ("exceeds the server's limit", "; lower --max-length or --batch-size, or start the server with larger "
                                   "--max-seq-len / --max-tokens"),
)


def _run_train(a: argparse.Namespace) -> int:
    """:func:`_train`; a permanent failure of the link or the cloud is a :class:`_Failed` with advice."""
    from .channel import AuthError, LinkRefused
    from .runtime import CloudError, LinkLost

    try:
        return _train(a)
    except (LinkRefused, AuthError, CloudError, LinkLost) as exc:
        hint = next((h for phrase, h in _HINTS if phrase in str(exc)), "")
        raise _Failed(f"{type(exc).__name__}: {exc}{hint}") from exc


def _demo(a: argparse.Namespace) -> int:
    from .runtime.jobs import demo_table, dumps, run_demo

    task = _task(a.task, a.data_dir)
    try:
        rows = run_demo(steps=a.steps, baseline_steps=a.baseline_steps, task=task, data_dir=a.data_dir,
                        max_eval=a.max_eval, batch_size=a.batch_size, seed=a.seed, progress=not (a.quiet or a.json))
    except FileNotFoundError as exc:  # the task's files (GLUE TSVs under --data-dir)
        raise _BadInput(_with_flags(str(exc))) from exc
    # --quiet drops the progress, never the result
    print(dumps(rows) if a.json else demo_table(rows))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sft`` command."""
    parser = _parser()
    a, extra = parser.parse_known_args(argv)
    if extra:  # said by the command's parser, so the message names the command (and its --help)
        _commands(parser)[a.command].error(f"unrecognized arguments: {' '.join(extra)}")
    quiet = getattr(a, "quiet", False)
    if quiet:  # "only results/errors": no weight-loading bars or load reports from transformers either
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run = {"serve": _serve, "train": _run_train, "demo": _demo, "audit": _audit}.get(a.command)
    if run is None:
        from .runtime.codec_report import run_demo as codec_demo

        codec_demo(a.sentences, a.layer, a.codecs, a.data_dir, a.model_dir)
        return 0
    try:
        return run(a)
    except _BadInput as exc:
        if a.debug:
            raise
        print(f"sft {a.command}: {exc}", file=sys.stderr)
        return 2
    except _Failed as exc:
        if a.debug:
            raise
        raise SystemExit(f"sft {a.command}: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
