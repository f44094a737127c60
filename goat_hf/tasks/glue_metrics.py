"""GLUE metrics computed offline, with the keys and values of evaluate's "glue" metric (DESIGN §6).

`evaluate.load("glue", task)` fetches its script from the Hub and needs scikit-learn; these are the same
formulas in numpy and scipy. MNLI's matched and mismatched sets are two evaluations of "mnli" (accuracy).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import datasets
import evaluate
import numpy as np
from scipy import stats

Metric = Callable[[Any, Any], dict[str, float]]


def accuracy(predictions: Any, references: Any) -> float:
    return float((np.asarray(predictions) == np.asarray(references)).mean())


def binary_f1(predictions: Any, references: Any) -> float:
    """F1 of class 1 = 2·TP / (2·TP + FP + FN); 0.0 when there is no positive at all (as scikit-learn)."""
    predictions, references = np.asarray(predictions) == 1, np.asarray(references) == 1
    true_pos = np.sum(predictions & references)
    wrong = np.sum(predictions != references)  # FP + FN
    return float(2 * true_pos / (2 * true_pos + wrong)) if true_pos + wrong else 0.0


def matthews_correlation(predictions: Any, references: Any) -> float:
    """Matthews correlation from the confusion matrix (multiclass form); 0.0 when either side is constant."""
    predictions, references = np.asarray(predictions), np.asarray(references)
    classes, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    confusion = np.zeros((len(classes), len(classes)))  # [true, predicted]
    np.add.at(confusion, (codes[: len(references)], codes[len(references) :]), 1)
    true_sum, pred_sum = confusion.sum(1), confusion.sum(0)
    n = confusion.sum()
    cov_true_pred = np.trace(confusion) * n - true_sum @ pred_sum
    cov_pred_pred = n * n - pred_sum @ pred_sum
    cov_true_true = n * n - true_sum @ true_sum
    if cov_pred_pred * cov_true_true == 0:
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def pearson_and_spearman(predictions: Any, references: Any) -> dict[str, float]:
    predictions = np.asarray(predictions, dtype=np.float64)
    references = np.asarray(references, dtype=np.float64)
    return {
        "pearson": float(stats.pearsonr(predictions, references)[0]),
        "spearmanr": float(stats.spearmanr(predictions, references)[0]),
    }


def _accuracy_only(predictions: Any, references: Any) -> dict[str, float]:
    return {"accuracy": accuracy(predictions, references)}


def _accuracy_and_f1(predictions: Any, references: Any) -> dict[str, float]:
    return {"accuracy": accuracy(predictions, references), "f1": binary_f1(predictions, references)}


def _matthews(predictions: Any, references: Any) -> dict[str, float]:
    return {"matthews_correlation": matthews_correlation(predictions, references)}


GLUE_METRICS: dict[str, Metric] = {
    "cola": _matthews,
    "stsb": pearson_and_spearman,
    "mrpc": _accuracy_and_f1,
    "qqp": _accuracy_and_f1,
    **{
        task: _accuracy_only
        for task in ("sst2", "mnli", "mnli_matched", "mnli_mismatched", "qnli", "rte", "wnli", "hans")
    },
}


def glue_metric(task_name: str) -> Metric:
    """`(predictions, references) -> dict` for a GLUE task, e.g. mrpc -> {"accuracy", "f1"}."""
    if task_name not in GLUE_METRICS:
        raise KeyError(f"task_name={task_name!r} is not a GLUE task; choose one of {', '.join(GLUE_METRICS)}.")
    return GLUE_METRICS[task_name]


def make_compute_metrics(task_name: str | None = None, is_regression: bool = False) -> Callable[[Any], dict]:
    """`compute_metrics` for Trainer, as transformers' run_glue.py computes it.

    A GLUE task gets its GLUE metrics (plus "combined_score", their mean, when there are several); other data
    gets "accuracy", or "mse" for regression. Logits [N, C] become class ids; regression outputs [N, 1] are
    squeezed.
    """
    metric = glue_metric(task_name) if task_name is not None else None
    regression = is_regression or task_name == "stsb"

    def compute_metrics(prediction: Any) -> dict[str, float]:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predictions = np.squeeze(logits) if regression else np.argmax(logits, axis=1)
        references = prediction.label_ids
        if metric is None and regression:
            return {"mse": float(np.mean((predictions - references) ** 2))}
        if metric is None:
            return {"accuracy": accuracy(predictions, references)}
        result = metric(predictions, references)
        if len(result) > 1:
            result["combined_score"] = float(np.mean(list(result.values())))
        return result

    return compute_metrics


class GlueMetric(evaluate.Metric):
    """evaluate's "glue" metric without the Hub: `GlueMetric("mrpc").compute(predictions=..., references=...)`."""

    def _info(self) -> evaluate.MetricInfo:
        glue_metric(self.config_name)  # an unknown task fails here, with the list of tasks
        value = datasets.Value("float32" if self.config_name == "stsb" else "int64")
        return evaluate.MetricInfo(
            description="GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman), computed offline.",
            citation="Wang et al., GLUE: A Multi-Task Benchmark and Analysis Platform for NLU, ICLR 2019.",
            inputs_description="predictions and references: class ids, or floats for stsb.",
            features=datasets.Features({"predictions": value, "references": value}),
            format="numpy",
        )

    def _compute(self, predictions: Any, references: Any) -> dict[str, float]:
        return glue_metric(self.config_name)(predictions, references)
