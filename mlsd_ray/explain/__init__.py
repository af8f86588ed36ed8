"""`mlsd explain`: why a model answered what it did, with checks that the explanation is
about the model and not about the input alone.

A task computes attributions (tasks/image/explain.py: Captum's Integrated Gradients and
Grad-CAM). This package holds what is shared: the typed result, permutation importance, the
bar chart of a score per name, the two sanity checks of Adebayo et al. (2018) and of the
deletion metric, and their thresholds.

- Model randomisation: the maps of the trained model and of the same architecture with
  random weights are compared by Spearman rank correlation (`rank_correlation`). An
  explanation that does not change (correlation near 1) shows the input, not the model.
- Deletion: the input's most-attributed pixels are set to the baseline a fraction at a time
  and the predicted class's probability is followed; it must fall faster (a smaller area under
  the curve) than when pixels are deleted in a random order.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mlsd_ray.core import storage

__all__ = ["bars_png", "deletion_curve", "deletion_order", "DELETION_STEPS", "ExplanationResult",
           "figure_png", "MAX_RANDOMISED_CORRELATION", "permutation_importance",
           "rank_correlation", "remaining_answer_curve", "SanityChecks", "write_output"]

MAX_RANDOMISED_CORRELATION = 0.5  # above: the maps barely depend on the weights
DELETION_STEPS = 11  # fractions 0, 0.1, ..., 1 of the pixels deleted


@dataclass(frozen=True)
class SanityChecks:
    """The two checks, per attribution method (e.g. "integrated_gradients", "grad_cam")."""

    randomised_correlation: dict[str, float]  # mean Spearman rho, trained vs random weights
    # the mean over the deletion curve of what is left of the answer: the predicted class's
    # probability (images), the share of the output's distance from the all-deleted one
    # (a task built from parts)
    deletion_auc: dict[str, float]
    random_deletion_auc: float  # the same, inputs deleted in a random order

    def passed(self) -> dict[str, bool]:
        return {method: rho < MAX_RANDOMISED_CORRELATION
                and self.deletion_auc[method] < self.random_deletion_auc
                for method, rho in self.randomised_correlation.items()}

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed(),
                "max_randomised_correlation": MAX_RANDOMISED_CORRELATION}

    def describe(self) -> list[str]:
        return [f"{method}: rank correlation with a randomised model {rho:.3f} (must be < "
                f"{MAX_RANDOMISED_CORRELATION}); deletion AUC {self.deletion_auc[method]:.3f} "
                f"against {self.random_deletion_auc:.3f} in random order: "
                f"{'passed' if self.passed()[method] else 'FAILED'}"
                for method, rho in self.randomised_correlation.items()]


@dataclass(frozen=True)
class ExplanationResult:
    """What `mlsd explain` wrote: one overlay per input, the sanity figures, and JSON."""

    out: str
    explained: int
    overlays: list[str]  # one picture per input: a map over an image, a record's bar chart
    figures: list[str]  # the sanity figures, or the importance chart
    json_file: str
    sanity: SanityChecks | None = None  # of the attributions (images, tasks built from parts)
    importance: dict[str, float] | None = None  # permutation importance per column

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "sanity": self.sanity.to_dict() if self.sanity else None}

    def describe(self) -> str:
        lines = [f"explained {self.explained} input(s) -> {self.out}",
                 f"per input: {self.overlays[0]}" + (f" ... ({len(self.overlays)})"
                                                     if len(self.overlays) > 1 else ""),
                 *[f"figure: {figure}" for figure in self.figures],
                 f"json: {self.json_file}"]
        if self.importance:
            lines.append("permutation importance: " + ", ".join(
                f"{column} {drop:.4f}" for column, drop in self.importance.items()))
        return "\n".join(lines + (self.sanity.describe() if self.sanity else []))


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over inputs of Spearman's rho between maps `a` and `b` (N × anything), signed,
    over the positions where either is non-zero: where both are exactly 0 (Integrated
    Gradients on a pixel equal to its baseline, whatever the weights) says nothing about the
    model. A constant map is uncorrelated with anything (rho 0)."""
    from scipy.stats import spearmanr

    values = []
    for x, y in zip(a, b):
        x, y = x.ravel(), y.ravel()
        kept = (x != 0) | (y != 0)
        x, y = x[kept], y[kept]
        constant = len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0
        values.append(0.0 if constant else float(spearmanr(x, y).statistic))
    return float(np.mean(values))


def deletion_order(attributions: np.ndarray) -> np.ndarray:
    """Pixel indices (over H×W) from most to least attributed, per input: N × H·W."""
    per_pixel = np.abs(attributions).sum(axis=1).reshape(len(attributions), -1)
    return np.argsort(-per_pixel, axis=1, kind="stable")


def remaining_answer_curve(answer, inputs: np.ndarray, orders: np.ndarray,
                           baseline: float = 0.0) -> np.ndarray:
    """What is left of each answer as input positions are deleted in `orders` (N × positions
    of the flattened input), at DELETION_STEPS fractions: N × steps, from 1 (nothing deleted)
    to 0 (all deleted). `answer(inputs) -> N` numbers (e.g. the predicted class's logit, or
    the forecast); what is left is |answer - answer with all deleted| over that at the start."""
    flat = inputs.reshape(len(inputs), -1)
    rows = np.arange(len(inputs))[:, None]
    answers = []
    for fraction in np.linspace(0, 1, DELETION_STEPS):
        deleted = flat.copy()
        deleted[rows, orders[:, :int(round(fraction * flat.shape[1]))]] = baseline
        answers.append(np.asarray(answer(deleted.reshape(inputs.shape)), dtype=float))
    curve = np.stack(answers, axis=1)
    spread = np.abs(curve[:, :1] - curve[:, -1:])
    return np.abs(curve - curve[:, -1:]) / np.where(spread > 0, spread, 1.0)


def deletion_curve(probability, inputs: np.ndarray, orders: np.ndarray, targets: np.ndarray,
                   baseline: float = 0.0) -> np.ndarray:
    """The target's probability as pixels are deleted in `orders` (N × H·W), at
    DELETION_STEPS fractions: N × steps. `probability(inputs N×C×H×W) -> N×K`."""
    count, channels, height, width = inputs.shape
    curves = np.zeros((count, DELETION_STEPS))
    for step, fraction in enumerate(np.linspace(0, 1, DELETION_STEPS)):
        deleted = inputs.copy().reshape(count, channels, height * width)
        cut = int(round(fraction * height * width))
        for row in range(count):
            deleted[row][:, orders[row, :cut]] = baseline
        answers = probability(deleted.reshape(inputs.shape))
        curves[:, step] = answers[np.arange(count), targets]
    return curves


def figure_png(figure, dpi: int = 110, tight: bool = False) -> bytes:
    """A matplotlib figure as PNG bytes (`tight`: cropped to what is drawn); the figure is
    closed. Every chart of the package is written through this."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
    plt.close(figure)
    return buffer.getvalue()


def permutation_importance(score: Callable[[Any], float], rows, columns, seed: int = 0,
                           digits: int = 5) -> dict[str, float]:
    """Per column of `rows` (a pandas frame), how much `score(rows)` drops when that column is
    shuffled across rows (one seeded permutation for all), largest drop first."""
    reference = score(rows)
    order = np.random.default_rng(seed).permutation(len(rows))
    drops = {}
    for column in columns:
        shuffled = rows.copy()
        shuffled[column] = list(rows[column].to_numpy()[order])
        drops[column] = round(reference - score(shuffled), digits)
    return dict(sorted(drops.items(), key=lambda item: -item[1]))


def bars_png(values: dict[str, float], xlabel: str, title: str, signed: bool = False) -> bytes:
    """A horizontal bar per name, the first at the top (`signed`: positive bars red,
    negative blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)[::-1]
    shown = [values[n] for n in names]
    figure, axis = plt.subplots(figsize=(5.5, 0.35 * len(names) + 1.2))
    axis.barh(names, shown, color=["#c0504d" if signed and v > 0 else "#4878a8" for v in shown])
    axis.set_xlabel(xlabel)
    axis.set_title(title, fontsize=9)
    figure.tight_layout()
    return figure_png(figure)


def write_output(out: str, name: str, data: bytes) -> str:
    """Write `data` as `name` (may hold folders) under `out`, a folder or URI; its path."""
    path = storage.join(out, name)
    if not storage.is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes(path, data)
    return path
