"""`mlsd deploy` and its Ray job: start the app with a model on the cluster, or roll the
running one over to it, and optionally check one prediction over HTTP."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from mlsd_ray.core.config import Config
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.serve import control
from mlsd_ray.tasks.base import Log, SmokePrediction, Task

__all__ = ["Deployment", "deploy"]


@dataclass(frozen=True)
class Deployment:
    """What `deploy` did: the app it started (or rolled over), and the smoke prediction if
    one was asked for (the app was removed after it)."""

    app: control.RunningApp
    smoke: SmokePrediction | None = None

    def to_dict(self) -> dict[str, Any]:
        """The app's record, plus `smoke_prediction`."""
        record = self.app.to_dict()
        if self.smoke is not None:
            record["smoke_prediction"] = asdict(self.smoke)
        return record


def deploy(task: Task, cfg: Config, model: str | None, smoke: bool, workspace: Workspace,
           log: Log) -> Deployment:
    """Start the app on the cluster with `model` (None: `serve.model`), or roll the running
    one over to it; `smoke` checks one prediction over HTTP (`Task.smoke_prediction`), then
    removes the app it started."""
    settings = cfg.serve.model_copy(update={"model": model or cfg.serve.model})
    app = control.start(settings, workspace, detach=True, log=log)
    if not smoke:
        return Deployment(app)
    checked = task.smoke_prediction(app)
    control.remove_app(settings.app_name)
    app.state_file.unlink(missing_ok=True)
    log(f"smoke: predicted over HTTP, then removed app {settings.app_name!r}")
    return Deployment(app, checked)
