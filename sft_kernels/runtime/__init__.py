"""Runtime: joins data, split, codecs (and later the channel) into jobs.

For now it holds the codec demo that ``sft demo`` / ``make demo`` runs.
"""
from .demo import DEFAULT_CODECS, CodecReport, codec_report

__all__ = ["DEFAULT_CODECS", "CodecReport", "codec_report"]
