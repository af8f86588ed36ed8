"""The pipeline's serve check for a parts task, and `mlsd deploy --smoke`'s one prediction:
the app started on the new model answers test rows over HTTP, compared with the same model
offline."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mlsd_ray.core.config import Config
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.data import PreparedRows
from mlsd_ray.stages.serve import PREFIX
from mlsd_ray.stages.traffic import instances
from mlsd_ray.tasks.base import ServeCheck, SmokePrediction, TrainedModel

if TYPE_CHECKING:
    from mlsd_ray.serve.control import RunningApp
    from mlsd_ray.workflows.loop import LoopSteps

__all__ = ["PartsServeCheck", "serve_check", "smoke_prediction"]

SERVE_CHECK_ROWS = 64


@dataclass(kw_only=True)
class PartsServeCheck(ServeCheck):
    """Test rows answered over HTTP: how many, the share answered as offline, and the model
    part's scores of the served answers."""

    rows: int
    agreement: float
    scores: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "rows": self.rows, "agreement": self.agreement,
                "scores": self.scores}

    def describe(self) -> str:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in self.scores.items())
        return (f"serve check at {self.url}: {self.rows} test rows, version "
                f"{self.model_version}, {self.agreement:.0%} answered as offline; {scores}")


def serve_check(task, cfg: Config, trained: TrainedModel, workspace: Workspace,
                keep_serving: bool, log: Callable[[str], None],
                then: Callable[[str, str], LoopSteps] | None = None
                ) -> tuple[PartsServeCheck, LoopSteps | None]:
    """Start the app on the trained model, send test rows, compare with the offline
    predictions; `then(url, served_uri)` (the monitoring loop) runs while it is up."""
    from mlsd_ray import registry
    from mlsd_ray.serve import control
    from mlsd_ray.serve.client import post_json

    settings = cfg.serve.model_copy(update={"model": trained.model_uri()})
    parts = task.parts
    with control.app_for_a_check(settings, workspace, keep_serving, log) as app:
        rows = PreparedRows.open(trained.dataset).load_split("test").head(SERVE_CHECK_ROWS)
        url = app.endpoint("predict_url")
        answer = post_json(url, {"instances": instances(rows, parts.data.inputs)})
        served = np.asarray([a["prediction"] for a in answer["predictions"]])
        offline = task.load(registry.resolve(app.model.uri, workspace)).predict(rows)
        alike = (served == offline) if parts.codec.outcome(offline[0]) is not None else \
            np.isclose(served.astype(float), np.asarray(offline, float), rtol=1e-4, atol=1e-5)
        check = PartsServeCheck(url=url, model_version=str(answer["model_version"]),
                                seconds_to_healthy=app.seconds_to_healthy, rows=len(rows),
                                agreement=float(alike.mean()),
                                scores={k: round(float(v), 4) for k, v in parts.model.scores(
                                    served, rows[parts.data.target].to_numpy()).items()})
        log(f"served version {check.model_version}: {len(rows)} test rows over HTTP, "
            f"{check.agreement:.0%} as offline")
        return check, then(app.url, app.model.uri) if then is not None else None


def smoke_prediction(served: RunningApp) -> SmokePrediction:
    """One instance built from the served model's input columns (zeros; empty text)."""
    from mlsd_ray.serve.client import post_json
    from mlsd_ray.serve.control import get_json

    columns = get_json(f"{served.url}{PREFIX}/model", timeout=30)["inputs"]
    instance = {c["name"]: [0.0] * c["length"] if c["kind"] == "vector" else
                (0.0 if c["kind"] == "number" else "") for c in columns}
    answer = post_json(served.endpoint("predict_url"), {"instances": [instance]})
    return SmokePrediction(sent=instance, answer=answer["predictions"][0],
                           model_version=str(answer["model_version"]))
