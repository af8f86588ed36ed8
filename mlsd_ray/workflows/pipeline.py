"""`mlsd pipeline`: every stage in order, for any task, each reading the previous stage's
output by path.

data -> [tune (Ray Tune), with --tune] -> train (Ray Train) and register (MLflow) -> [evaluate
on test, where the task's training does not already] -> promote the first version to
`production` -> serve (Ray Serve: start the app on the new model, the task's check over HTTP)
-> the monitoring loop on the live app (loop.py: unshifted and shifted traffic, monitor,
retrain, gated promotion, rolling update under load) -> stop the app (with `keep_serving` it
stays up until Ctrl-C).

What differs between tasks comes from the task (tasks/base.py): its data stage, training,
evaluation, serve check and the drift drill of the loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlsd_ray.core.config import Config
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.workflows.stages import PipelineResult, StageHeadings, search_first

if TYPE_CHECKING:
    from mlsd_ray.tasks.base import Task, TrainedModel
    from mlsd_ray.workflows.loop import LoopSteps

__all__ = ["LOOP", "run_pipeline"]

LOOP = "monitor -> retrain -> rolling update"


def run_pipeline(task: Task, cfg: Config, workspace: Workspace, log: Callable[[str], None], *,
                 force: bool = False, tune: bool = False, serve_check: bool = True,
                 keep_serving: bool = False, monitor_loop: bool = True) -> PipelineResult:
    """Run `task`'s stages end to end; returns what each stage did.

    With `tune`, a search (cfg.tune) runs first and the final training uses its best
    parameters on top of `cfg` (so with the pipeline's own workers and epochs)."""
    from mlsd_ray.registry import log_evaluation, promote_first

    registers = cfg.registry.auto_register
    heading = StageHeadings("data", tune and "tune", task.train_stage,
                            task.evaluate_stage and "evaluate", registers and "promote",
                            serve_check and "serve",
                            serve_check and monitor_loop and registers and LOOP)
    log(heading("data"))
    prepared = task.prepare(cfg, workspace, log, force=force)
    if serve_check:  # on the Ray the data stage joined: refuse a clash before training
        from mlsd_ray.serve.control import check_the_serve_check_fits

        check_the_serve_check_fits(cfg.serve, workspace, keep_serving)
    searched = None
    if tune:
        log(heading("tune"))
        cfg, searched = search_first(cfg, workspace, log)
    log(heading(task.train_stage))
    # after a search the best config may prepare other data: training prepares from it
    trained = task.train(cfg, workspace, log, prepared=None if tune else prepared)
    result = PipelineResult(task=task.name, data=prepared.summary(), tune=searched, train=trained)
    registered = trained.registered
    if task.evaluate_stage:
        log(heading("evaluate"))
        result.evaluation = task.evaluate(trained.checkpoint, "test", workspace)
        if registered:  # the report and plots join the registered version's run
            log_evaluation(registered.run_id, result.evaluation.report, "test", workspace)
    if registered:
        log(heading("promote"))
        result.promoted = promote_first(registered, workspace, log)
    if serve_check:
        log(heading("serve"))
        loop = None
        if monitor_loop and registered:  # retraining moves a registry alias: needs a version
            loop = functools.partial(_monitoring_loop, task, cfg, trained, workspace, log,
                                     heading(LOOP))
        result.serve, result.loop = task.serve_check(cfg, trained, workspace, keep_serving,
                                                     log, then=loop)
    return result


def _monitoring_loop(task: Task, cfg: Config, trained: TrainedModel, workspace: Workspace,
                     log: Callable[[str], None], heading: str, url: str,
                     served_uri: str) -> LoopSteps:
    """The loop on the app that serves `served_uri` at `url`, on the data it was trained on."""
    from mlsd_ray.workflows.loop import monitoring_loop

    log(heading)
    return monitoring_loop(task, cfg, url, served_uri, task.open_prepared(trained.dataset),
                           workspace, log)
