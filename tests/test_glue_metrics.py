"""`compute_glue_metrics` against values worked out by hand (the arithmetic is in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hf_gradtools.glue_metrics import GLUE_METRICS, GlueMetric, compute_glue_metrics, glue_metric_names


def test_every_glue_task_has_its_metric():
    assert GLUE_METRICS == {
        "cola": ("matthews_correlation",),
        "sst2": ("accuracy",),
        "mrpc": ("accuracy", "f1"),
        "qqp": ("accuracy", "f1"),
        "stsb": ("pearson", "spearmanr"),
        "mnli": ("accuracy",),
        "mnli_matched": ("accuracy",),
        "mnli_mismatched": ("accuracy",),
        "qnli": ("accuracy",),
        "rte": ("accuracy",),
        "wnli": ("accuracy",),
    }


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_accuracy(task):
    # 3 of 5 right.
    assert compute_glue_metrics(task, [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == {"accuracy": 0.6}


@pytest.mark.parametrize("task", ["mnli", "mnli_matched", "mnli_mismatched"])
def test_three_class_accuracy(task):
    # Right at positions 0, 2, 5: 3 of 6.
    assert compute_glue_metrics(task, [0, 1, 2, 2, 0, 1], [0, 2, 2, 1, 1, 1]) == {"accuracy": 0.5}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task):
    # TP = 3 (0, 1, 4), FP = 2 (2, 6), FN = 1 (3), TN = 1 (5): precision 3/5, recall 3/4,
    # F1 = 2PR / (P + R) = 2 * 0.45 / 1.35 = 2/3; accuracy (3 + 1) / 7.
    predictions = [1, 1, 1, 0, 1, 0, 1]
    references = [1, 1, 0, 1, 1, 0, 0]
    result = compute_glue_metrics(task, predictions, references)
    assert list(result) == ["accuracy", "f1"]
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["f1"] == pytest.approx(2 / 3)


def test_f1_without_a_positive_prediction_is_zero():
    assert compute_glue_metrics("mrpc", [0, 0, 0], [1, 0, 1]) == {"accuracy": 1 / 3, "f1": 0.0}


def test_matthews_correlation():
    # TP = 2 (0, 4), FP = 1 (1), TN = 2 (2, 3), FN = 1 (5):
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3.
    result = compute_glue_metrics("cola", [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1])
    assert list(result) == ["matthews_correlation"]
    assert result["matthews_correlation"] == pytest.approx(1 / 3)


def test_matthews_correlation_perfect_inverse_and_constant():
    assert compute_glue_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(1.0)
    assert compute_glue_metrics("cola", [0, 1, 0, 1], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(-1.0)
    # A constant prediction has a zero denominator; scikit-learn (and GLUE) define it as 0.
    assert compute_glue_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0])["matthews_correlation"] == 0.0


def test_pearson_and_spearman():
    # x = 1 2 3 4 (mean 2.5), y = 2 9 5 4 (mean 5): dx = -1.5 -.5 .5 1.5, dy = -3 4 0 -1,
    # sum dx*dy = 4.5 - 2 + 0 - 1.5 = 1, sum dx^2 = 5, sum dy^2 = 26: Pearson = 1 / sqrt(130).
    # Ranks of y: 1 4 3 2, d = 0 -2 0 2, sum d^2 = 8: Spearman = 1 - 6 * 8 / (4 * (16 - 1)) = 0.2.
    result = compute_glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 9.0, 5.0, 4.0])
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(1 / math.sqrt(130))
    assert result["spearmanr"] == pytest.approx(0.2)


def test_pearson_of_a_linear_map_is_one_and_spearman_of_a_monotone_map_is_one():
    x = np.array([0.3, 1.1, 2.5, 4.0, 4.2])
    assert compute_glue_metrics("stsb", x, 2 * x + 1)["pearson"] == pytest.approx(1.0)
    assert compute_glue_metrics("stsb", x, np.exp(x))["spearmanr"] == pytest.approx(1.0)


def test_regression_accepts_a_column_of_logits():
    # A regression head returns shape (n, 1).
    result = compute_glue_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 9.0, 5.0, 4.0])
    assert result["pearson"] == pytest.approx(1 / math.sqrt(130))


def test_results_are_python_floats():
    for value in compute_glue_metrics("mrpc", np.array([1, 0]), np.array([1, 1])).values():
        assert type(value) is float


def test_evaluate_style_interface():
    metric = GlueMetric("mrpc")
    assert metric.compute(predictions=[1, 1, 1, 0, 1, 0, 1], references=[1, 1, 0, 1, 1, 0, 0]) == pytest.approx(
        {"accuracy": 4 / 7, "f1": 2 / 3}
    )


def test_unknown_task_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"`task_name` must be one of .*'cola'.*'wnli'.*got 'sst-2'"):
        compute_glue_metrics("sst-2", [1], [1])
    with pytest.raises(ValueError, match="got 'imdb'"):
        GlueMetric("imdb")
    assert glue_metric_names("stsb") == ("pearson", "spearmanr")


def test_bad_inputs():
    with pytest.raises(ValueError, match="`predictions` has 2 values but `references` has 3"):
        compute_glue_metrics("sst2", [1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match=r"1-D\) \(take the argmax of the logits\), got an array of shape \(2, 2\)"):
        compute_glue_metrics("sst2", [[0.2, 0.8], [0.9, 0.1]], [1, 0])
    with pytest.raises(ValueError, match="`predictions` for 'cola' must be integer class ids, got non-integer"):
        compute_glue_metrics("cola", [0.7, 0.2], [1, 0])
    with pytest.raises(ValueError, match="empty"):
        compute_glue_metrics("stsb", [], [])
