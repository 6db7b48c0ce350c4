"""The GLUE metrics, computed offline with scikit-learn and SciPy.

`evaluate.load("glue", task)` fetches its code from the Hugging Face Hub; this module computes the same numbers
locally, under the same task names and result keys:

| task | keys |
|---|---|
| `cola` | `matthews_correlation` |
| `sst2`, `qnli`, `rte`, `wnli`, `mnli`, `mnli_matched`, `mnli_mismatched` | `accuracy` |
| `mrpc`, `qqp` | `accuracy`, `f1` (F1 of the positive class, label 1) |
| `stsb` | `pearson`, `spearmanr` |

scikit-learn and SciPy are imported only when a metric needs them (`pip install 'hf_gradtools[examples]'`).

Example:
    >>> compute_glue_metrics("mrpc", predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}
    >>> GlueMetric("cola").compute(predictions=[1, 0, 1, 0], references=[1, 0, 1, 0])
    {'matthews_correlation': 1.0}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

_ACCURACY = ("accuracy",)
_ACCURACY_F1 = ("accuracy", "f1")

#: Task name -> the keys of its result, in the order `evaluate`'s GLUE metric returns them.
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("matthews_correlation",),
    "sst2": _ACCURACY,
    "mrpc": _ACCURACY_F1,
    "qqp": _ACCURACY_F1,
    "stsb": ("pearson", "spearmanr"),
    "mnli": _ACCURACY,
    "mnli_matched": _ACCURACY,
    "mnli_mismatched": _ACCURACY,
    "qnli": _ACCURACY,
    "rte": _ACCURACY,
    "wnli": _ACCURACY,
}


def glue_metric_names(task_name: str) -> tuple[str, ...]:
    """The keys `compute_glue_metrics(task_name, ...)` returns, e.g. `("accuracy", "f1")` for `mrpc`."""
    if task_name not in GLUE_METRICS:
        raise ValueError(f"`task_name` must be one of {sorted(GLUE_METRICS)} for the GLUE metric, got {task_name!r}.")
    return GLUE_METRICS[task_name]


def _as_1d(values, field: str, task_name: str, integer: bool) -> np.ndarray:
    kind = "integer class ids" if integer else "numbers"
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"`{field}` for {task_name!r} must be {kind}, got {type(values).__name__}: {error}") from None
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        hint = " (take the argmax of the logits)" if integer else ""
        raise ValueError(
            f"`{field}` must hold one value per example (1-D){hint}, got an array of shape {array.shape}."
        )
    if integer:
        if not np.all(array == np.round(array)):
            raise ValueError(f"`{field}` for {task_name!r} must be {kind}, got non-integer values.")
        return array.astype(np.int64)
    return array


def compute_glue_metrics(
    task_name: str, predictions: Sequence | np.ndarray, references: Sequence | np.ndarray
) -> dict[str, float]:
    """Score `predictions` against `references` with the GLUE metric of `task_name`.

    Args:
        task_name: a key of `GLUE_METRICS` (`"sst2"`, `"mnli_mismatched"`, ...).
        predictions: class ids (an `argmax` over the logits), or for `stsb` one float score per example.
        references: the gold labels, same length.

    Returns:
        A dict of Python floats keyed as in the module docstring. A correlation of constant input is `nan`
        (Pearson, Spearman) or `0.0` (Matthews), as SciPy and scikit-learn define them.

    Example:
        >>> compute_glue_metrics("stsb", predictions=[0.1, 0.4, 0.2], references=[1.0, 3.0, 2.0])
        {'pearson': 0.9819805060619657, 'spearmanr': 1.0}
    """
    keys = glue_metric_names(task_name)
    regression = task_name == "stsb"
    preds = _as_1d(predictions, "predictions", task_name, integer=not regression)
    refs = _as_1d(references, "references", task_name, integer=not regression)
    if len(preds) != len(refs):
        raise ValueError(
            f"`predictions` has {len(preds)} values but `references` has {len(refs)}; they must be the same length."
        )
    if len(preds) == 0:
        raise ValueError(f"`predictions` and `references` are empty; {task_name!r} needs at least one example.")

    if regression:
        from scipy.stats import pearsonr, spearmanr

        if len(preds) < 2:
            return {"pearson": math.nan, "spearmanr": math.nan}
        pearson = float(pearsonr(preds, refs)[0])
        spearman = float(spearmanr(preds, refs)[0])
        return {"pearson": pearson, "spearmanr": spearman}

    results: dict[str, float] = {}
    if "matthews_correlation" in keys:
        from sklearn.metrics import matthews_corrcoef

        results["matthews_correlation"] = float(matthews_corrcoef(refs, preds))
    if "accuracy" in keys:
        results["accuracy"] = float((preds == refs).mean())
    if "f1" in keys:
        from sklearn.metrics import f1_score

        results["f1"] = float(f1_score(refs, preds, zero_division=0.0))
    return results


class GlueMetric:
    """`compute_glue_metrics` behind the interface of `evaluate.load("glue", task_name)`.

    Example:
        >>> metric = GlueMetric("sst2")
        >>> metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
        {'accuracy': 0.75}
    """

    def __init__(self, task_name: str):
        glue_metric_names(task_name)
        self.task_name = task_name

    def compute(self, *, predictions, references) -> dict[str, float]:
        return compute_glue_metrics(self.task_name, predictions, references)

    def __repr__(self) -> str:
        return f"GlueMetric({self.task_name!r})"
