"""The GLUE metrics as a local `evaluate` module: it loads without network, from this folder.

    >>> import evaluate
    >>> metric = evaluate.load("examples/metrics/glue", "mrpc")  # the folder, from the repository root
    >>> metric.compute(predictions=[1, 0, 1, 1], references=[1, 0, 0, 1])
    {'accuracy': 0.75, 'f1': 0.8}

`evaluate.load("glue", task)` fetches its script from the Hugging Face Hub; this one is read from disk, gives the
same task names (the config name) and result keys, and computes them with scikit-learn and SciPy:

| config name | keys |
|---|---|
| `cola` | `matthews_correlation` |
| `sst2`, `qnli`, `rte`, `wnli`, `mnli`, `mnli_matched`, `mnli_mismatched` | `accuracy` |
| `mrpc`, `qqp` | `accuracy`, `f1` (F1 of the positive class, label 1) |
| `stsb` | `pearson`, `spearmanr` |

Classification predictions are class ids (the argmax of the logits); `stsb` predictions are one float per example.
`compute_glue_metrics(task, predictions, references)` and `glue_metric_names(task)` are plain functions in this
file, for code that imports it by path instead of through `evaluate.load`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import datasets
import evaluate
import numpy as np

_ACCURACY = ("accuracy",)
_ACCURACY_F1 = ("accuracy", "f1")

#: Config (task) name -> the keys of its result, in the order they are returned.
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

_DESCRIPTION = """\
GLUE (General Language Understanding Evaluation) scores of one task: accuracy, F1 of class 1, Matthews
correlation, or Pearson and Spearman correlation, as the benchmark reports them. Computed locally."""

_INPUTS = """
Args:
    predictions: class ids, or for `stsb` one float score per example.
    references: the gold labels, as many as the predictions.
Returns:
    a dict of floats, keyed by the task's metric names (`accuracy`, `f1`, `matthews_correlation`, `pearson`,
    `spearmanr`). A correlation of constant input is nan (Pearson, Spearman) or 0.0 (Matthews).
Example:
    >>> glue = evaluate.load("examples/metrics/glue", "sst2")
    >>> glue.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    {'accuracy': 0.75}
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}"""


def glue_metric_names(task_name: str | None) -> tuple[str, ...]:
    """The keys the metric of `task_name` returns, e.g. `("accuracy", "f1")` for `mrpc`."""
    if task_name not in GLUE_METRICS:
        raise ValueError(
            f"The GLUE metric's config name (the task) must be one of {sorted(GLUE_METRICS)}, got {task_name!r}."
        )
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
        A dict of Python floats keyed as in the module docstring.

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
        return {"pearson": float(pearsonr(preds, refs)[0]), "spearmanr": float(spearmanr(preds, refs)[0])}

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


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Glue(evaluate.Metric):
    """`evaluate.load("examples/metrics/glue", task)`: the GLUE metric of `task` (the config name)."""

    def _info(self) -> evaluate.MetricInfo:
        glue_metric_names(self.config_name)  # an unknown task fails here, when the metric is loaded
        value = datasets.Value("float64" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": value, "references": value}),
            reference_urls=["https://gluebenchmark.com/"],
        )

    def _compute(self, predictions, references) -> dict[str, float]:
        return compute_glue_metrics(self.config_name, predictions, references)
