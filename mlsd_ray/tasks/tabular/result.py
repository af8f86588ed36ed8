"""What the tabular task's training stage returns: the run beside the baseline, and the names
of the scores it shows (no sklearn or torch here: the task's face imports it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mlsd_ray.tasks.base import TrainedModel

__all__ = ["SCORE_KEYS", "TabularTrainResult", "VAL_SCORE"]


VAL_SCORE = "val_score"  # the validation value of the score that ranks runs (SCORE_NAMES)

# The scores a result shows, by the score that ranks runs.
SCORE_KEYS = {"pr_auc": ["pr_auc", "roc_auc", "precision", "recall", "f1"],
              "macro_f1": ["accuracy", "macro_f1"], "r2": ["mse", "mae", "r2"]}


@dataclass(kw_only=True)
class TabularTrainResult(TrainedModel):
    """What the tabular task's training produced: besides the run and its best checkpoint, the
    kind of table (binary, multiclass, regression), the score runs are ranked by and its
    validation value, the test metrics beside the baseline's, the decision threshold (binary)
    and the evaluation's files (report, report_md, pr_curve)."""

    task: str
    score_name: str
    val_score: float
    test: dict[str, Any]
    baseline: dict[str, Any] | None = None
    decision: dict[str, Any] | None = None
    evaluation: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "task": self.task, "score_name": self.score_name,
                VAL_SCORE: self.val_score, "test": self.test, "baseline": self.baseline,
                "decision": self.decision, "evaluation": self.evaluation}

    def test_line(self) -> str:
        return f"test {self.score_name} {self.test[self.score_name]:.4f}"

    def describe(self) -> str:
        """The MLP beside the baseline, the decision, where the evaluation went."""
        keys = SCORE_KEYS[self.score_name]
        lines = [f"run {self.run_name}: best epoch {self.best_epoch} of {self.epochs_run}, "
                 f"val {self.score_name} {self.val_score:.4f}, {self.wall_seconds:.1f} s",
                 "test:      " + "  ".join(f"{k} {self.test[k]:.4f}" for k in keys)]
        if self.baseline:
            lines.append("baseline:  " + "  ".join(f"{k} {self.baseline[k]:.4f}" for k in keys)
                         + f"  ({self.baseline['model']})")
        if self.decision:
            d = self.decision
            lines.append(f"threshold {d['threshold']:.4f} ({d['objective']} {d.get('target')}, "
                         f"{'met' if d['met'] else 'not met'} on val)")
        lines += [f"{name}: {path}" for name, path in self.evaluation.items()]
        if self.registered:
            lines.append(f"registered: {self.registered.uri}")
        return "\n".join(lines)
