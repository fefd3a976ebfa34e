"""Reading GLUE TSV files from a local directory.

The data directory defaults to ``$SFT_GLUE_DIR`` or ``../shared/data/glue``
beside the repository.  Files are split on tabs with quoting off, as the GLUE
README asks (the text contains ``"`` characters).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

#: Single-sentence tasks: (has header, sentence column).
_SINGLE_SENTENCE = {"SST-2": (True, 0), "CoLA": (False, 3)}


def default_glue_dir() -> Path:
    """``$SFT_GLUE_DIR`` if set, else ``<repo>/../shared/data/glue``."""
    env = os.environ.get("SFT_GLUE_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "glue"


def read_sentences(
    task: str = "SST-2", split: str = "dev", limit: Optional[int] = None, data_dir: Union[str, Path, None] = None
) -> list[str]:
    """Sentences of a single-sentence GLUE task (``SST-2`` or ``CoLA``), in file order.

    Raises ``ValueError`` for an unknown task or split and ``FileNotFoundError``
    naming the path when the data is missing.
    """
    if task not in _SINGLE_SENTENCE:
        raise ValueError(f"task must be one of {sorted(_SINGLE_SENTENCE)}, got '{task}'")
    if split not in ("train", "dev", "test"):
        raise ValueError(f"split must be 'train', 'dev' or 'test', got '{split}'")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    path = Path(data_dir or default_glue_dir()) / task / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path} (set --data-dir or $SFT_GLUE_DIR)")
    header, col = _SINGLE_SENTENCE[task]
    if split == "test" and task == "SST-2":
        col = 1  # test.tsv is "index<TAB>sentence"
    out: list[str] = []
    with open(path, encoding="utf-8-sig") as f:
        for i, line in enumerate(f):
            if header and i == 0:
                continue
            parts = line.rstrip("\n").split("\t")
            if split == "test" and task == "CoLA":
                col = 1
            out.append(parts[col].strip())
            if limit is not None and len(out) >= limit:
                break
    return out
