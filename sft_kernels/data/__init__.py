"""Datasets: GLUE TSV files from ../shared/data/glue (read locally, never downloaded), the synthetic
offline task, deterministic batching and the official GLUE metrics.

Must not import split/, channel/, runtime/ or cli.
"""
from .batching import SUBSAMPLE_SEED, batch_order, batches, num_batches, subsample
from .glue import GLUE_TASKS, SPLITS, TASKS, TaskSpec, default_glue_dir, load_glue, load_task, read_sentences
from .metrics import compute_metrics, glue_score, majority_baseline
from .synthetic import synthetic_sentiment

__all__ = ["TaskSpec", "TASKS", "GLUE_TASKS", "SPLITS", "default_glue_dir", "load_glue", "load_task",
           "read_sentences", "synthetic_sentiment", "compute_metrics", "glue_score", "majority_baseline",
           "batches", "batch_order", "num_batches", "subsample", "SUBSAMPLE_SEED"]
