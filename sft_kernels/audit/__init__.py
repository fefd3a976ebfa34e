"""The privacy audit: what an honest-but-curious cloud can learn from what crosses the link.

``sft audit`` (:mod:`sft_kernels.cli`) runs :func:`run_audit`; PRIVACY.md holds its tables and
their reading.  The attacker knows the model family, the edge's step-0 weights, the split
settings and the codecs, and receives every step's decoded codes, the lengths and (outside the
U-split) the labels, with a new dropout-noised view of every sentence each epoch.  Its own text
is public (other tasks' training text) or in-domain (the victim task's unlabelled test.tsv).

Modules: :mod:`.text` (corpora, token classes), :mod:`.stopwords`, :mod:`.metrics` (recovery,
baselines), :mod:`.settings` (boundary settings, :class:`Observer`), :mod:`.inverter` (the learned
inversion), :mod:`.attacks` (lookup, re-ranking, optimisation, rotation estimate, label leakage,
accuracy price), :mod:`.runner` (resumable cells), :mod:`.report` (the Markdown tables).

Imports split/, codecs and data/ (and torch, transformers); nothing below the CLI imports it.
It must not know sockets, the runtime or the CLI's flags.
"""
from .attacks import estimate_rotation, lookup
from .inverter import Inverter, InverterConfig, predict, train_inverter
from .metrics import Recovery, frequent_guess, positional_guess, recovery
from .report import render, write_report
from .runner import ATTACKS, DEFAULT_BUDGET_TOKENS, AuditConfig, Cell, plan, read_results, run_audit
from .settings import SETTINGS, Observer, Setting, get_setting
from .text import ATTACKER_DATA, VICTIM_TASKS, Corpus, check_data_dir, content_mask

__all__ = ["ATTACKS", "ATTACKER_DATA", "AuditConfig", "Cell", "Corpus", "DEFAULT_BUDGET_TOKENS", "Inverter",
           "InverterConfig", "Observer", "Recovery", "SETTINGS", "Setting", "VICTIM_TASKS", "check_data_dir",
           "content_mask", "estimate_rotation", "frequent_guess", "get_setting", "lookup", "plan", "positional_guess",
           "predict", "read_results", "recovery", "render", "run_audit", "train_inverter", "write_report"]
