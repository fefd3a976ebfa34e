"""Recipe details of a task that every trainer of it must share: the regression target scale, the label names.

* **Regression target scale.** STS-B's scores (0..5) are trained as ``label / 5``
  (:data:`REGRESSION_TARGET_SCALE`): an output scale near a fresh head's lets a short run learn
  (bench/glue.py measured STS-B, config a, 512 rows: GLUE score 15.5 with the scaling, 0.6
  without).  :func:`regression_scale` gives the divisor of a task: 5.0 for GLUE's STS-B, 1.0 for
  everything else -- a user's own regression file is trained on its labels as written, as
  transformers' ``run_classification.py`` does, since its range is unknown here.  Predictions are
  *not* scaled back before the metrics: Pearson and Spearman correlations do not depend on the
  scale (bench/glue.py compares them the same way).
* **Label names.** :func:`label_mapping` is the names -> ids mapping a run records: a file task's own
  (:class:`~.files.FileTaskSpec`), the names the GLUE datasets give their classes (RTE and QNLI
  are read with them, see :mod:`.glue`), or ``{}`` for a regression.

Must not know models, tokenizers, splits, channels or the runtime.
"""
from __future__ import annotations

from typing import Any

from .glue import TASKS

__all__ = ["REGRESSION_TARGET_SCALE", "regression_scale", "label_mapping", "GLUE_LABEL_NAMES", "LEARNING_RATES",
           "learning_rate"]

#: STS-B's targets are divided by this for training (see the module docstring).
REGRESSION_TARGET_SCALE = 5.0

#: Class names of the package's classification tasks, by id (the names of the GLUE datasets).
GLUE_LABEL_NAMES: dict[str, tuple[str, ...]] = {
    "SST-2": ("negative", "positive"),
    "CoLA": ("unacceptable", "acceptable"),
    "MRPC": ("not_equivalent", "equivalent"),
    "RTE": ("entailment", "not_entailment"),
    "WNLI": ("not_entailment", "entailment"),
    "QNLI": ("entailment", "not_entailment"),
    "synthetic": ("negative", "positive"),
}

_SCALES = {"STS-B": REGRESSION_TARGET_SCALE}

#: Learning rate per GLUE task for the real budget (3 epochs, batch 32, AdamW, 10% warmup then linear decay),
#: picked once on the unsplit model by ``python bench/glue.py --lr-sweep ...`` on a held-out slice of each
#: task's *training* set (never its dev set; results/lr_sweep.csv) and then held fixed for every split config.
#: Sweep (3 epochs on 1000 training rows, held-out 500 other training rows, seed 0, lr in {3e-5, 1e-4, 3e-4}):
#: SST-2 accuracy 83.6 / 85.6 / 83.4, CoLA MCC 0.0 / 13.3 / 0.0, MRPC mean(F1, accuracy) 74.2 / 75.5 / 71.9,
#: STS-B mean(Pearson, Spearman) 60.3 / 77.3 / 79.7 (and 21.2 at 1e-3), RTE accuracy 51.2 / 52.6 / 51.2 (near chance
#: at every rate on 1000 rows: 1e-4, the middle, is kept).
LEARNING_RATES: dict[str, float] = {"SST-2": 1e-4, "CoLA": 1e-4, "MRPC": 1e-4, "STS-B": 3e-4, "RTE": 1e-4}


def learning_rate(task: str) -> float:
    """The recipe's learning rate of a GLUE ``task`` (:data:`LEARNING_RATES`); ``ValueError`` naming the tasks
    that have one."""
    if task not in LEARNING_RATES:
        raise ValueError(f"no recipe learning rate for task {task!r} (have {sorted(LEARNING_RATES)}); pass one "
                         f"explicitly (--lr)")
    return LEARNING_RATES[task]


def _is_builtin(spec: Any) -> bool:
    """True for one of the package's own :data:`~.glue.TASKS` specs (a file task named ``STS-B`` is not)."""
    return TASKS.get(getattr(spec, "name", None)) == spec


def regression_scale(spec: Any) -> float:
    """The divisor a task's training targets get: 5.0 for GLUE STS-B, 1.0 for any other task.

    ``spec``: a :class:`~.glue.TaskSpec` (or spec-like object with ``name`` and ``is_regression``).
    """
    if getattr(spec, "is_regression", False) and _is_builtin(spec):
        return _SCALES.get(spec.name, 1.0)
    return 1.0


def label_mapping(spec: Any) -> dict[str, int]:
    """``{label name: class id}`` of a task; ``{}`` for a regression.

    A spec with its own ``label2id`` (a :class:`~.files.FileTaskSpec`) gives that; a GLUE task (or
    ``synthetic``) its dataset's class names; any other classification the ids as names.
    """
    if getattr(spec, "is_regression", False):
        return {}
    own = getattr(spec, "label2id", None)
    if own is not None:
        return dict(own)
    names = GLUE_LABEL_NAMES.get(spec.name) if _is_builtin(spec) else None
    return {name: i for i, name in enumerate(names or (str(i) for i in range(spec.num_labels)))}
