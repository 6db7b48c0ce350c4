"""The GLUE metric module of the example (`examples/metrics/glue/glue.py`) against values worked out by hand (the
arithmetic is in the comments), both through `evaluate.load` (offline, from the folder) and as plain functions."""

from __future__ import annotations

import importlib.util
import math
import os
import socket

import evaluate
import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
METRIC_DIR = os.path.join(ROOT, "examples", "metrics", "glue")


def _load_module():
    spec = importlib.util.spec_from_file_location("glue_metric_module", os.path.join(METRIC_DIR, "glue.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


glue = _load_module()
GLUE_METRICS, compute_glue_metrics, glue_metric_names = (
    glue.GLUE_METRICS,
    glue.compute_glue_metrics,
    glue.glue_metric_names,
)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every test here runs without network: a connection attempt fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the GLUE metric tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _through_evaluate(task, predictions, references):
    return evaluate.load(METRIC_DIR, task, keep_in_memory=True).compute(predictions=predictions, references=references)


@pytest.fixture(params=["evaluate.load", "function"])
def score(request):
    """`score(task, predictions, references)`: through `evaluate.load(...).compute`, or the plain function."""
    return _through_evaluate if request.param == "evaluate.load" else compute_glue_metrics


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
def test_accuracy(task, score):
    # 3 of 5 right.
    assert score(task, [0, 1, 1, 0, 1], [0, 1, 0, 0, 0]) == {"accuracy": 0.6}


@pytest.mark.parametrize("task", ["mnli", "mnli_matched", "mnli_mismatched"])
def test_three_class_accuracy(task, score):
    # Right at positions 0, 2, 5: 3 of 6.
    assert score(task, [0, 1, 2, 2, 0, 1], [0, 2, 2, 1, 1, 1]) == {"accuracy": 0.5}


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1(task, score):
    # TP = 3 (0, 1, 4), FP = 2 (2, 6), FN = 1 (3), TN = 1 (5): precision 3/5, recall 3/4,
    # F1 = 2PR / (P + R) = 2 * 0.45 / 1.35 = 2/3; accuracy (3 + 1) / 7.
    predictions = [1, 1, 1, 0, 1, 0, 1]
    references = [1, 1, 0, 1, 1, 0, 0]
    result = score(task, predictions, references)
    assert list(result) == ["accuracy", "f1"]
    assert result["accuracy"] == pytest.approx(4 / 7)
    assert result["f1"] == pytest.approx(2 / 3)


def test_f1_without_a_positive_prediction_is_zero(score):
    assert score("mrpc", [0, 0, 0], [1, 0, 1]) == {"accuracy": 1 / 3, "f1": 0.0}


def test_matthews_correlation(score):
    # TP = 2 (0, 4), FP = 1 (1), TN = 2 (2, 3), FN = 1 (5):
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (4 - 1) / sqrt(3*3*3*3) = 1/3.
    result = score("cola", [1, 1, 0, 0, 1, 0], [1, 0, 0, 0, 1, 1])
    assert list(result) == ["matthews_correlation"]
    assert result["matthews_correlation"] == pytest.approx(1 / 3)


def test_matthews_correlation_perfect_inverse_and_constant():
    assert compute_glue_metrics("cola", [1, 0, 1, 0], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(1.0)
    assert compute_glue_metrics("cola", [0, 1, 0, 1], [1, 0, 1, 0])["matthews_correlation"] == pytest.approx(-1.0)
    # A constant prediction has a zero denominator; scikit-learn (and GLUE) define it as 0.
    assert compute_glue_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0])["matthews_correlation"] == 0.0


def test_pearson_and_spearman(score):
    # x = 1 2 3 4 (mean 2.5), y = 2 9 5 4 (mean 5): dx = -1.5 -.5 .5 1.5, dy = -3 4 0 -1,
    # sum dx*dy = 4.5 - 2 + 0 - 1.5 = 1, sum dx^2 = 5, sum dy^2 = 26: Pearson = 1 / sqrt(130).
    # Ranks of y: 1 4 3 2, d = 0 -2 0 2, sum d^2 = 8: Spearman = 1 - 6 * 8 / (4 * (16 - 1)) = 0.2.
    result = score("stsb", [1.0, 2.0, 3.0, 4.0], [2.0, 9.0, 5.0, 4.0])
    assert list(result) == ["pearson", "spearmanr"]
    assert result["pearson"] == pytest.approx(1 / math.sqrt(130))
    assert result["spearmanr"] == pytest.approx(0.2)


def test_pearson_of_a_linear_map_is_one_and_spearman_of_a_monotone_map_is_one(score):
    x = np.array([0.3, 1.1, 2.5, 4.0, 4.2])
    assert score("stsb", x, 2 * x + 1)["pearson"] == pytest.approx(1.0)
    assert score("stsb", x, np.exp(x))["spearmanr"] == pytest.approx(1.0)


def test_regression_accepts_a_column_of_logits():
    # A regression head returns shape (n, 1).
    result = compute_glue_metrics("stsb", np.array([[1.0], [2.0], [3.0], [4.0]]), [2.0, 9.0, 5.0, 4.0])
    assert result["pearson"] == pytest.approx(1 / math.sqrt(130))


def test_results_are_python_floats(score):
    for value in score("mrpc", np.array([1, 0]), np.array([1, 1])).values():
        assert type(value) is float


def test_loads_offline_from_the_repository_root_as_the_docs_say(monkeypatch):
    monkeypatch.chdir(ROOT)
    metric = evaluate.load("examples/metrics/glue", "mrpc")
    assert metric.compute(predictions=[1, 1, 1, 0, 1, 0, 1], references=[1, 1, 0, 1, 1, 0, 0]) == pytest.approx(
        {"accuracy": 4 / 7, "f1": 2 / 3}
    )
    # Batches added one by one give the same numbers as one call.
    metric.add_batch(predictions=[1, 1, 1], references=[1, 1, 0])
    metric.add_batch(predictions=[0, 1, 0, 1], references=[1, 1, 0, 0])
    assert metric.compute() == pytest.approx({"accuracy": 4 / 7, "f1": 2 / 3})
    assert metric.config_name == "mrpc" and "GLUE" in metric.description


def test_unknown_task_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"must be one of .*'cola'.*'wnli'.*got 'sst-2'"):
        compute_glue_metrics("sst-2", [1], [1])
    with pytest.raises(ValueError, match="got 'imdb'"):
        evaluate.load(METRIC_DIR, "imdb")
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
