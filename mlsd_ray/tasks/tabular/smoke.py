"""The pipeline's serve check for tables (`TabularTask.serve_check`): the app started on the
new model scores test rows over HTTP, compared with the same model offline; for a binary task
also its decisions and a transaction built to trip the example rules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import ServeCheck
from mlsd_ray.tasks.tabular.config import TabularTaskConfig

if TYPE_CHECKING:
    from mlsd_ray.workflows.loop import LoopSteps

SERVE_CHECK_ROWS = 64


@dataclass(frozen=True)
class RuleExample:
    """A transaction built to trip the example rules, and what the app decided for it."""

    record: dict[str, Any]
    decision: str
    score: float
    rules: list[str]


@dataclass(kw_only=True)
class DecisionCheck:
    """A binary task's served decisions on the test rows: how many of each, how many of the
    positives were flagged (reviewed or declined), at which threshold."""

    decisions: dict[str, int]
    frauds: int
    frauds_flagged: int
    threshold: float


@dataclass(kw_only=True)
class TabularServeCheck(ServeCheck):
    """Test rows scored over HTTP against the same model offline (the largest difference);
    for a binary task also the decisions and, where the columns allow, a rule example."""

    records: int
    max_abs_difference: float
    decided: DecisionCheck | None = None
    example: RuleExample | None = None

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = {"url": self.url, "model_version": self.model_version,
                                 "records": self.records,
                                 "seconds_to_healthy": self.seconds_to_healthy}
        if self.decided is not None:
            plain.update(decisions=self.decided.decisions, frauds=self.decided.frauds,
                         frauds_flagged=self.decided.frauds_flagged)
        plain["max_abs_difference"] = self.max_abs_difference
        if self.decided is not None:
            plain["threshold"] = self.decided.threshold
        if self.example is not None:
            plain["example"] = asdict(self.example)
        return plain

    def describe(self) -> str:
        line = f"serve check at {self.url}: {self.records} rows, version {self.model_version}"
        if self.decided is not None:
            line += (f", decisions {self.decided.decisions}, {self.decided.frauds_flagged}/"
                     f"{self.decided.frauds} positives flagged")
        line += f"; max |HTTP - offline| {self.max_abs_difference:.2e}"
        if self.example is not None:
            e = self.example
            line += (f"\na large foreign transaction: {e.decision} (score {e.score:.4f}, "
                     f"rules {e.rules})")
        return line


def serve_check_fraud(cfg: TabularTaskConfig, model: str, table, workspace: Workspace,
                      log: Callable[[str], None], keep_serving: bool = False,
                      then: Callable[[str, str], LoopSteps] | None = None
                      ) -> tuple[TabularServeCheck, LoopSteps | None]:
    """Start the fraud app on `model`, score test rows over HTTP (and, for a binary task, a
    transaction the example rules catch), compare with the offline scores, then stop the app
    (`keep_serving`: on serve.port, until Ctrl-C). `then(url, served_uri)` runs while the app
    is up (the monitoring loop); its result is returned beside the check."""
    from mlsd_ray import registry
    from mlsd_ray.serve import control
    from mlsd_ray.serve.client import post_json
    from mlsd_ray.tasks.tabular.train import load_tabular

    settings = cfg.serve.model_copy(update={"model": model})
    # the checkpoint's task: the fraud app
    with control.app_for_a_check(settings, workspace, keep_serving, log) as app:
        test = table.load_split("test")
        rows = _check_rows(test, table.label, table.manifest["task"])
        records = [_record(row) for row in rows.drop(columns=[table.label]).to_dict("records")]
        url = app.endpoint("score_url")
        answer = post_json(url, {"records": records})
        check = TabularServeCheck(url=url, model_version=str(answer["model_version"]),
                                  seconds_to_healthy=app.seconds_to_healthy,
                                  records=len(records), max_abs_difference=0.0)
        offline = load_tabular(registry.resolve(app.model.uri, workspace)).predict(rows)
        if table.manifest["task"] == "binary":
            check.decided, check.max_abs_difference = _binary_check(
                answer, offline, rows[table.label].to_numpy())
            log(f"served version {answer['model_version']}: decisions "
                f"{check.decided.decisions} for {len(records)} test rows "
                f"({check.decided.frauds} positive)")
            if {"amount", "country"} <= set(records[0]):
                check.example = e = _rule_example(url, records[-1], post_json)
                log(f"a large foreign transaction: {e.decision}, score {e.score:.4f}, "
                    f"rules {e.rules}")
        else:
            served = np.array([r.get("prediction", np.nan) for r in answer["results"]])
            check.max_abs_difference = float(np.nanmax(np.abs(served - offline.reshape(-1))))
            log(f"served version {answer['model_version']}: {len(records)} rows scored over HTTP")
        return check, then(app.url, app.model.uri) if then is not None else None


def _check_rows(test, label: str, task: str):
    """Up to SERVE_CHECK_ROWS test rows, every positive first (frauds are rare)."""
    if task != "binary":
        return test.head(SERVE_CHECK_ROWS)
    positives = test[test[label] == 1].head(SERVE_CHECK_ROWS // 4)
    negatives = test[test[label] == 0].head(SERVE_CHECK_ROWS - len(positives))
    return pd.concat([positives, negatives], ignore_index=True)


def _record(row: dict) -> dict:
    """A JSON-ready record: NaN becomes null (sent as missing, imputed by the server)."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}


def _binary_check(answer: dict, offline: np.ndarray, labels: np.ndarray
                  ) -> tuple[DecisionCheck, float]:
    """The served decisions, and the largest |served score - offline score|."""
    scores = np.array([r["score"] for r in answer["results"]])
    decisions = [r["decision"] for r in answer["results"]]
    flagged = np.array([d != "approve" for d in decisions])
    decided = DecisionCheck(
        decisions={d: decisions.count(d) for d in ("approve", "review", "decline")},
        frauds=int(labels.sum()), frauds_flagged=int((flagged & (labels == 1)).sum()),
        threshold=answer["threshold"])
    return decided, float(np.max(np.abs(scores - offline[:, 1])))


def _rule_example(url: str, record: dict, post_json) -> RuleExample:
    """One transaction that the example rules review: a large amount from abroad."""
    example = {**record, "amount": 12000.0, "country": "NG", "velocity_1h": 1.0}
    answer = post_json(url, {"records": [example]})["results"][0]
    return RuleExample(example, answer["decision"], answer["score"],
                       [r["name"] for r in answer.get("rules_fired", [])])
