"""The audit's tables, as Markdown, from the results CSV; written into PRIVACY.md between markers.

Numbers are percentages, mean ± standard deviation over attacker seeds where more than one seed
ran (else the single value).  Token recovery is shown for the views the run used, with the
single-view number in parentheses.  Only the text between ``<!-- audit:begin -->`` and
``<!-- audit:end -->`` is replaced; the hand-written rest of the file is kept.

Knows the results CSV's columns; not models or attacks.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional, Sequence

from .settings import SETTINGS

__all__ = ["render", "write_report", "BEGIN", "END"]

BEGIN, END = "<!-- audit:begin -->", "<!-- audit:end -->"
_ATTACK_ORDER = ("frequent", "positional", "lookup", "inversion", "rerank", "optimisation")


def _pct(values: Sequence[str]) -> str:
    xs = [float(v) * 100 for v in values if v not in ("", None)]
    if not xs:
        return "–"
    if len(xs) == 1:
        return f"{xs[0]:.1f}"
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _group(rows: list[dict], **match: str) -> list[dict]:
    return [r for r in rows if all(r[k] == v for k, v in match.items())]


def _recovery_table(rows: list[dict], attacker: str, tasks: Sequence[str], views: str) -> list[str]:
    head = "| setting | bytes / example | attack | " + " | ".join(
        f"{t} token | {t} content | {t} exact" for t in tasks) + " | attacker tokens | fit s |"
    out = [head, "|" + "---|" * (4 + 3 * len(tasks) + 1)]
    names = [n for n in SETTINGS if any(r["setting"] == n for r in rows)]
    for name in names:
        for attack in _ATTACK_ORDER:
            mine = _group(rows, setting=name, attack=attack, attacker=attacker)
            if not mine:
                continue
            notes = sorted({r["note"] for r in mine if r["note"] == "no rotation estimate (the naive attacker)"})
            for variant in [None, *notes]:
                sel = [r for r in mine if (r["note"] == variant) == (variant is not None)]
                if not sel:
                    continue
                cells = []
                for t in tasks:
                    many = [r for r in sel if r["task"] == t and r["views"] == views] or \
                        [r for r in sel if r["task"] == t]
                    one = [r for r in sel if r["task"] == t and r["views"] == "1"]
                    for col in ("token", "content", "exact"):
                        v = _pct([r[col] for r in many])
                        if col == "token" and one and many and one[0] is not many[0]:
                            v += f" ({_pct([r[col] for r in one])})"
                        cells.append(v)
                bpe = next((r["bytes_per_example"] for r in sel if r["bytes_per_example"]), "")
                toks = next((r["attacker_tokens"] for r in sel if r["attacker_tokens"]), "")
                fit = [float(r["fit_s"]) for r in sel if r["fit_s"]]
                label = attack + (" (naive: no rotation estimate)" if variant else "")
                if attack in ("rerank", "optimisation"):
                    label += f" ({sel[0]['sentences']} sent.)"
                bpe_s = f"{float(bpe):.0f}" if bpe else "–"
                fit_s = f"{max(fit):.0f}" if fit else "–"
                out.append(f"| {name} | {bpe_s} | {label} | {' | '.join(cells)} | {toks or '–'} | {fit_s} |")
    return out


def render(rows: list[dict], meta: Optional[dict] = None, command: str = "make audit") -> str:
    """The Markdown block for PRIVACY.md from the results CSV's ``rows`` and the run's ``meta`` JSON."""
    if not rows:
        return "pending: not yet run (no results file)"
    tasks = [t for t in ("SST-2", "RTE") if any(r["task"] == t for r in rows)]
    views = max((r["views"] for r in rows if r["views"]), key=int, default="1")
    m = (meta or {}).get("machine", {})
    out = [f"Command: `{command}`. Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; torch "
           f"{m.get('torch', '?')}, BLAS {m.get('blas', '?')}, {m.get('threads', '?')} thread(s). Wall time of the "
           f"cells: {float((meta or {}).get('wall_s', 0)) / 60:.1f} min (every invocation into this results file).", "",
           f"Token recovery (%) of real tokens ([CLS]/[SEP] excluded), of content-word tokens, and exact sentences, "
           f"from {views} dropout-noised views per sentence (in parentheses: from one view). "
           f"Public attacker (CoLA, MRPC, STS-B, WNLI training text):", ""]
    out += _recovery_table(rows, "public", tasks, views)
    if any(r["attacker"] == "in-domain" and r["token"] for r in rows):
        out += ["", "In-domain attacker (trained on the victim task's own unlabelled test.tsv):", ""]
        out += _recovery_table(rows, "in-domain", tasks, views)
    labels = [r for r in rows if r["attack"] == "labels"]
    if labels:
        out += ["", "U-split label recovery (%) from the gradient of the cloud's output:", "",
                "| setting | task | label recovery | how |", "|---|---|---|---|"]
        for r in labels:
            out.append(f"| {r['setting']} | {r['task']} | {_pct([r['label_acc']])} | {r['note']} |")
    price = [r for r in rows if r["attack"] == "price"]
    if price:
        out += ["", "Accuracy price of the defences (SST-2 dev accuracy %, short fine-tune):", "",
                "| setting | dev accuracy | how |", "|---|---|---|"]
        for name in SETTINGS:
            sel = [r for r in price if r["setting"] == name]
            if sel:
                out.append(f"| {name} | {_pct([r['dev_acc'] for r in sel])} | {sel[0]['note']} |")
    return "\n".join(out)


def write_report(path: str, rows: list[dict], meta_path: Optional[str] = None, command: str = "make audit") -> None:
    """Replace the block between :data:`BEGIN` and :data:`END` of ``path`` with :func:`render`'s table."""
    meta = json.loads(Path(meta_path).read_text()) if meta_path and Path(meta_path).exists() else None
    p = Path(path)
    text = p.read_text() if p.exists() else f"# Privacy audit\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    p.write_text(f"{head}{BEGIN}\n{render(rows, meta, command)}\n{END}{tail}")
