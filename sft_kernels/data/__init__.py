"""Datasets: GLUE TSV files from ../shared/data/glue (read locally, never downloaded), the synthetic
offline task, a user's own labelled files, deterministic batching, the official GLUE metrics and
the recipe details every trainer of a task shares (:mod:`.recipe`).

Must not import split/, channel/, runtime/ or cli.
"""
from .batching import SUBSAMPLE_SEED, batch_order, batches, num_batches, subsample
from .files import FILE_EXTENSIONS, FileTaskSpec, load_files
from .glue import GLUE_TASKS, SPLITS, TASKS, TaskSpec, default_glue_dir, load_glue, load_task, read_sentences
from .metrics import compute_metrics, glue_score, majority_baseline
from .recipe import REGRESSION_TARGET_SCALE, label_mapping, regression_scale
from .synthetic import synthetic_sentiment

__all__ = ["TaskSpec", "TASKS", "GLUE_TASKS", "SPLITS", "default_glue_dir", "load_glue", "load_task",
           "read_sentences", "synthetic_sentiment", "compute_metrics", "glue_score", "majority_baseline",
           "batches", "batch_order", "num_batches", "subsample", "SUBSAMPLE_SEED", "FileTaskSpec", "FILE_EXTENSIONS",
           "load_files", "REGRESSION_TARGET_SCALE", "regression_scale", "label_mapping"]
