"""Datasets: GLUE TSV files from ../shared/data/glue (read locally, never downloaded).

Must not import split/, channel/ or runtime/.
"""
from .glue import default_glue_dir, read_sentences

__all__ = ["default_glue_dir", "read_sentences"]
