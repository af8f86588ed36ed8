"""Scores of a tabular model: the decision threshold, classification and regression metrics,
and the precision-recall curve as a PNG."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn import metrics as skm

from mlsd_ray.explain import figure_png
from mlsd_ray.tasks.tabular.config import ThresholdConfig


def choose_threshold(scores: np.ndarray, labels: np.ndarray, cfg: ThresholdConfig) -> dict:
    """The threshold on the positive-class score that meets `cfg`, with how it was chosen.

    target_precision: the lowest threshold (so the highest recall) whose precision reaches the
    target; when none does, the one with the best precision. target_recall: the highest
    threshold whose recall reaches the target. min_cost: the lowest
    cost_false_negative · FN + cost_false_positive · FP over every distinct score.
    """
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    if cfg.objective == "fixed" or labels.sum() == 0 or labels.sum() == len(labels):
        return {"threshold": cfg.value, "objective": cfg.objective, "met": cfg.objective == "fixed"}
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    chosen: dict[str, Any] = {"objective": cfg.objective}
    if cfg.objective == "target_precision":
        ok = np.flatnonzero(precision >= cfg.target)
        index = ok[0] if len(ok) else int(np.argmax(precision))
        chosen.update(met=bool(len(ok)), target=cfg.target)
    elif cfg.objective == "target_recall":
        ok = np.flatnonzero(recall >= cfg.target)
        index = ok[-1] if len(ok) else 0
        chosen.update(met=bool(len(ok)), target=cfg.target)
    else:
        positives = labels.sum()
        true_pos = recall * positives
        false_pos = true_pos / np.maximum(precision, 1e-12) - true_pos
        cost = (cfg.cost_false_negative * (positives - true_pos)
                + cfg.cost_false_positive * false_pos)
        index = int(np.argmin(cost))
        chosen.update(met=True, expected_cost=round(float(cost[index]), 3),
                      cost_per_row=round(float(cost[index]) / len(labels), 5))
    chosen.update(threshold=float(thresholds[index]), val_precision=float(precision[index]),
                  val_recall=float(recall[index]))
    return chosen


def binary_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Precision, recall, F1 and the confusion matrix at `threshold`; PR-AUC and ROC-AUC."""
    scores, labels = np.asarray(scores, dtype=float), np.asarray(labels, dtype=int)
    predicted = (scores >= threshold).astype(int)
    both = len(np.unique(labels)) == 2
    matrix = skm.confusion_matrix(labels, predicted, labels=[0, 1])
    return {"threshold": round(float(threshold), 6),
            "precision": float(skm.precision_score(labels, predicted, zero_division=0)),
            "recall": float(skm.recall_score(labels, predicted, zero_division=0)),
            "f1": float(skm.f1_score(labels, predicted, zero_division=0)),
            "pr_auc": float(skm.average_precision_score(labels, scores)) if both else None,
            "roc_auc": float(skm.roc_auc_score(labels, scores)) if both else None,
            "accuracy": float(np.mean(predicted == labels)),
            "confusion": {"tn": int(matrix[0, 0]), "fp": int(matrix[0, 1]),
                          "fn": int(matrix[1, 0]), "tp": int(matrix[1, 1])},
            "positives": int(labels.sum()), "rows": int(len(labels))}


def recall_at_precision(scores: np.ndarray, labels: np.ndarray, precision_target: float) -> float:
    """The best recall among thresholds whose precision reaches the target (0 if none)."""
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    reached = recall[precision >= precision_target]
    return float(reached.max()) if len(reached) else 0.0


def multiclass_metrics(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    predicted = np.asarray(probabilities).argmax(axis=1)
    return {"accuracy": float(np.mean(predicted == labels)),
            "macro_f1": float(skm.f1_score(labels, predicted, average="macro", zero_division=0)),
            "confusion": skm.confusion_matrix(labels, predicted).tolist()}


def regression_metrics(predictions: np.ndarray, targets: np.ndarray) -> dict:
    return {"mse": float(skm.mean_squared_error(targets, predictions)),
            "mae": float(skm.mean_absolute_error(targets, predictions)),
            "r2": float(skm.r2_score(targets, predictions)), "rows": int(len(targets))}


def primary_score(task: str, outputs: np.ndarray, labels: np.ndarray) -> float:
    """The number a checkpoint or a trial is ranked by: PR-AUC (binary), macro F1
    (multiclass), R² (regression)."""
    if task == "binary":
        if len(np.unique(labels)) < 2:
            return 0.0
        return float(skm.average_precision_score(labels, outputs[:, 1]))
    if task == "multiclass":
        return multiclass_metrics(outputs, labels)["macro_f1"]
    return float(skm.r2_score(labels, outputs.reshape(-1)))


SCORE_NAMES = {"binary": "pr_auc", "multiclass": "macro_f1", "regression": "r2"}


def pr_curve_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], chosen: dict | None) -> bytes:
    """Precision against recall for each named model's (scores, labels); the chosen
    threshold's point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=110)
    for name, (scores, labels) in curves.items():
        precision, recall, _ = skm.precision_recall_curve(labels, scores)
        ap = skm.average_precision_score(labels, scores)
        ax.plot(recall, precision, label=f"{name} (PR-AUC {ap:.3f})")
    if chosen:
        ax.scatter([chosen["recall"]], [chosen["precision"]], color="black", zorder=3,
                   label=f"threshold {chosen['threshold']:.3f}")
    base = float(np.mean(next(iter(curves.values()))[1]))
    ax.axhline(base, color="grey", linestyle=":", label=f"chance ({base:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title("Precision-recall on the test split")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return figure_png(fig, dpi=100)



def evaluate_outputs(task: str, outputs: np.ndarray, labels: np.ndarray,
                     threshold: float | None) -> dict:
    """The task's metrics on one split (outputs: probabilities, or predictions)."""
    if task == "binary":
        if threshold is None:
            raise ValueError("binary metrics need the decision threshold")
        return binary_metrics(outputs[:, 1], labels, threshold)
    if task == "multiclass":
        return multiclass_metrics(outputs, labels)
    return regression_metrics(outputs, labels)
