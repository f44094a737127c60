"""GLUE metrics against values computed by hand, the Trainer factory, and GlueMetric without the Hub."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
from sklearn import metrics as sk_metrics
from transformers import EvalPrediction

from goat_hf.tasks.glue_metrics import GlueMetric, glue_metric, make_compute_metrics

# TP at 0, 2; FP at 1, 5; FN at 3; TN at 4.
PRED = [1, 1, 1, 0, 0, 1]
REF = [1, 0, 1, 1, 0, 0]
ACCURACY = 3 / 6
PRECISION, RECALL = 2 / 4, 2 / 3
F1 = 2 * PRECISION * RECALL / (PRECISION + RECALL)  # = 4/7

# TP at 0, 1, 6; TN at 2, 5; FP at 4, 7; FN at 3.
MCC_PRED = [1, 1, 0, 0, 1, 0, 1, 1]
MCC_REF = [1, 1, 0, 1, 0, 0, 1, 0]
MCC = (3 * 2 - 2 * 1) / math.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))

# Deviations from the means (2.5 and 5): x - 2.5 = [-1.5, -0.5, 0.5, 1.5], y - 5 = [-3, -1, 0, 4].
X = [1.0, 2.0, 3.0, 4.0]
Y = [2.0, 4.0, 5.0, 9.0]
PEARSON = (4.5 + 0.5 + 0.0 + 6.0) / math.sqrt((2.25 + 0.25 + 0.25 + 2.25) * (9 + 1 + 0 + 16))

EVALUATE_GLUE_KEYS = {
    "cola": {"matthews_correlation"},
    "stsb": {"pearson", "spearmanr"},
    "mrpc": {"accuracy", "f1"},
    "qqp": {"accuracy", "f1"},
    **{task: {"accuracy"} for task in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli")},
}


def test_accuracy_and_f1_by_hand():
    assert glue_metric("mrpc")(PRED, REF) == pytest.approx({"accuracy": ACCURACY, "f1": F1})
    assert glue_metric("sst2")(np.array(PRED), np.array(REF)) == pytest.approx({"accuracy": ACCURACY})


@pytest.mark.parametrize("seed", range(5))
def test_classification_metrics_match_scikit_learn_the_reference_of_evaluates_glue(seed):
    """evaluate's "glue" computes these with scikit-learn: random labels catch any slip of the counting formulas."""
    rng = np.random.default_rng(seed)
    binary = rng.integers(0, 2, size=(2, 50))
    multiclass = rng.integers(0, 3, size=(2, 50))
    mrpc = glue_metric("mrpc")(*binary)
    assert mrpc["accuracy"] == pytest.approx(sk_metrics.accuracy_score(binary[1], binary[0]))
    assert mrpc["f1"] == pytest.approx(sk_metrics.f1_score(binary[1], binary[0]))
    for predictions, references in (binary, multiclass):
        expected = sk_metrics.matthews_corrcoef(references, predictions)
        assert glue_metric("cola")(predictions, references)["matthews_correlation"] == pytest.approx(expected)


def test_f1_without_any_positive_is_zero():
    assert glue_metric("qqp")([0, 0], [0, 0]) == {"accuracy": 1.0, "f1": 0.0}


def test_matthews_correlation_by_hand():
    assert glue_metric("cola")(MCC_PRED, MCC_REF) == pytest.approx({"matthews_correlation": MCC})


def test_matthews_correlation_of_a_constant_prediction_is_zero():
    assert glue_metric("cola")([1, 1, 1], [0, 1, 1]) == {"matthews_correlation": 0.0}


def test_matthews_correlation_multiclass_by_hand():
    # Confusion [true, pred]: [[2,0,0],[1,0,1],[0,1,1]]; correct c=3, n=6, true counts [2,2,2], pred counts [3,1,2].
    expected = (3 * 6 - (2 * 3 + 2 * 1 + 2 * 2)) / math.sqrt((36 - (9 + 1 + 4)) * (36 - (4 + 4 + 4)))
    result = glue_metric("cola")([0, 2, 1, 0, 0, 2], [0, 1, 2, 0, 1, 2])
    assert result == pytest.approx({"matthews_correlation": expected})


def test_pearson_and_spearman_by_hand():
    # Y is increasing in X, so the ranks agree exactly.
    assert glue_metric("stsb")(X, Y) == pytest.approx({"pearson": PEARSON, "spearmanr": 1.0})


def test_spearman_uses_average_ranks_for_ties():
    # Ranks: x [1, 2.5, 2.5, 4], y [1, 3, 2, 4]; deviations from 2.5: [-1.5, 0, 0, 1.5] and [-1.5, .5, -.5, 1.5].
    expected = (2.25 + 0 + 0 + 2.25) / math.sqrt((2.25 + 0 + 0 + 2.25) * (2.25 + 0.25 + 0.25 + 2.25))
    assert glue_metric("stsb")([1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])["spearmanr"] == pytest.approx(expected)


@pytest.mark.parametrize("task", sorted(EVALUATE_GLUE_KEYS))
def test_keys_are_evaluates(task):
    predictions, references = (X, Y) if task == "stsb" else (PRED, REF)
    assert set(glue_metric(task)(predictions, references)) == EVALUATE_GLUE_KEYS[task]


def test_unknown_task_names_the_tasks():
    with pytest.raises(KeyError, match="'sst3' is not a GLUE task; choose one of cola, stsb, mrpc"):
        glue_metric("sst3")


def test_compute_metrics_takes_logits_and_adds_the_combined_score():
    logits = np.array([[0.0, 1.0] if p else [1.0, 0.0] for p in PRED])  # argmax = PRED
    metrics = make_compute_metrics("mrpc")(EvalPrediction(predictions=logits, label_ids=np.array(REF)))
    assert metrics == pytest.approx({"accuracy": ACCURACY, "f1": F1, "combined_score": (ACCURACY + F1) / 2})


def test_compute_metrics_for_regression_squeezes_the_outputs():
    outputs = (np.array(X)[:, None], np.zeros((4, 3)))  # a tuple: the first element holds the predictions
    metrics = make_compute_metrics("stsb")(EvalPrediction(predictions=outputs, label_ids=np.array(Y)))
    assert metrics == pytest.approx({"pearson": PEARSON, "spearmanr": 1.0, "combined_score": (PEARSON + 1) / 2})


def test_compute_metrics_without_a_task():
    logits = np.array([[0.0, 1.0] if p else [1.0, 0.0] for p in PRED])
    classification = make_compute_metrics()(EvalPrediction(predictions=logits, label_ids=np.array(REF)))
    assert classification == pytest.approx({"accuracy": ACCURACY})
    outputs = np.array(X)[:, None]
    regression = make_compute_metrics(is_regression=True)(EvalPrediction(predictions=outputs, label_ids=np.array(Y)))
    assert regression == pytest.approx({"mse": (1 + 4 + 4 + 25) / 4})


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails, so a test passing with it never touched the Hub."""

    def refuse(*args, **kwargs):
        raise OSError("network access in a test that must run offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.mark.parametrize(
    ("task", "predictions", "references"),
    [("mrpc", PRED, REF), ("cola", MCC_PRED, MCC_REF), ("stsb", X, Y), ("sst2", PRED, REF)],
)
def test_glue_metric_module_offline_gives_the_same_numbers(no_network, tmp_path, task, predictions, references):
    metric = GlueMetric(task, cache_dir=str(tmp_path))
    assert metric.compute(predictions=predictions, references=references) == pytest.approx(
        glue_metric(task)(predictions, references)
    )
    metric.add_batch(predictions=predictions[:3], references=references[:3])
    metric.add_batch(predictions=predictions[3:], references=references[3:])
    assert metric.compute() == pytest.approx(glue_metric(task)(predictions, references))


def test_glue_metric_module_rejects_unknown_tasks(no_network, tmp_path):
    with pytest.raises(KeyError, match="not a GLUE task"):
        GlueMetric("sst3", cache_dir=str(tmp_path))
