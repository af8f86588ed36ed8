"""The pipeline's parts (pipeline.py): its stage headings, numbered against the stages a run
will have, the search that may come first, and its typed result."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from collections.abc import Callable

    from mlsd_ray.core.config import Config
    from mlsd_ray.registry import Promotion
    from mlsd_ray.tasks.base import DataSummary, Evaluation, ServeCheck, TrainedModel
    from mlsd_ray.tuning.report import TuneSummary
    from mlsd_ray.workflows.loop import LoopSteps

__all__ = ["PipelineResult", "render_stages", "search_first", "StageHeadings"]


def search_first(cfg: Config, workspace: Workspace,
                 log: Callable[[str], None]) -> tuple[Config, TuneSummary]:
    """`mlsd pipeline --tune`: search `cfg.tune` (nothing registered), and the config the final
    training then uses: the best parameters on top of `cfg`; with the search's summary."""
    from mlsd_ray.tuning.search import run_tune, trial_config

    searched = run_tune(cfg, workspace=workspace, log=log, register=False)
    log(f"training with the best parameters: {searched.best.params}")
    return trial_config(cfg, searched.best.params), searched


@dataclass
class PipelineResult:
    """What `mlsd pipeline` did, stage by stage; None for a stage this run skipped. Every
    stage is typed, and `to_dict()` is `mlsd pipeline --json`."""

    task: str
    data: DataSummary
    train: TrainedModel
    tune: TuneSummary | None = None
    evaluation: Evaluation | None = None
    promoted: Promotion | None = None
    serve: ServeCheck | None = None
    loop: LoopSteps | None = None

    def to_dict(self) -> dict[str, Any]:
        """`--json`: {"task", "stages": {stage: summary}}, the stages in the order they ran."""
        stages: dict[str, Any] = {"data": self.data.to_dict()}
        if self.tune is not None:
            stages["tune"] = self.tune.to_dict()
        stages["train"] = self.train.to_dict()
        evaluation = self.evaluation.to_dict() if self.evaluation is not None else None
        promoted = self.promoted.to_dict() if self.promoted is not None else None
        serve = self.serve.to_dict() if self.serve is not None else None
        for name, summary in (("evaluate", evaluation), ("promote", promoted), ("serve", serve)):
            if summary is not None:
                stages[name] = summary
        if self.loop is not None:
            stages["loop"] = self.loop.to_dict()
        return {"task": self.task, "stages": stages}


class StageHeadings:
    """`== stage 2/6: train and register ==`: numbered against the stages this run will have
    (tune, promote, serve and the monitoring loop depend on the options: a stage this run
    skips is passed as False or None, e.g. `tune and "tune"`)."""

    def __init__(self, *names: str | Literal[False] | None):
        self.names = [name for name in names if name]

    def __call__(self, name: str) -> str:
        return f"== stage {self.names.index(name) + 1}/{len(self.names)}: {name} =="


def render_stages(result: PipelineResult, render_data: Callable[[Any], None]) -> None:
    """Every stage of a pipeline, one block each, for a person: the data (as the task's
    `render_data` prints it), the search, the training result, the first promotion, the serve
    check and the monitoring loop."""
    from mlsd_ray.workflows.loop import render_loop

    render_data(result.data)
    if result.tune is not None:
        print(f"\ntuned {result.tune.trials} trials: best {result.tune.best.params}")
    print(f"\n{result.train.describe()}")
    if result.promoted is not None and result.promoted.promoted is not None:
        print(result.promoted.describe())
    if result.serve is not None:
        print(f"\n{result.serve.describe()}")
    if result.loop is not None:
        render_loop(result.loop)
