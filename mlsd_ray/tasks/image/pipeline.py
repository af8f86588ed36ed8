"""`mlsd pipeline`: every stage in order, each reading the previous stage's output by path.

data -> [tune (Ray Tune), with --tune] -> train (Ray Train) -> register (MLflow) -> evaluate on
test -> promote the first version to `production` -> serve (Ray Serve: start the app, classify
test digits over HTTP) -> the monitoring loop on the live app (workflows/loop.py: unshifted and
rotated traffic, monitor, retrain, gated promotion, rolling update under load) -> stop the app
(with `keep_serving` it stays up until Ctrl-C).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

from mlsd_ray.core.config import Config
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.image.data.prepare import prepare_dataset
from mlsd_ray.workflows.stages import PipelineResult, StageHeadings, search_first

if TYPE_CHECKING:
    from mlsd_ray.workflows.loop import LoopSteps

LOOP = "monitor -> retrain -> rolling update"


def run_pipeline(cfg: Config, workspace: Workspace, force: bool = False,
                 log: Callable[[str], None] = log_stderr, tune: bool = False,
                 serve_check: bool = True, keep_serving: bool = False,
                 monitor_loop: bool = True) -> PipelineResult:
    """Run the stages end to end; returns what each stage did.

    With `tune`, a search (cfg.tune) runs first and the final training uses its best
    parameters on top of `cfg` (so with the pipeline's own workers and epochs).
    """
    from mlsd_ray.registry import promote_first
    from mlsd_ray.tasks.image.evaluate import evaluate_checkpoint
    from mlsd_ray.tasks.image.train import train_and_register

    registers = cfg.registry.auto_register
    heading = StageHeadings("data", tune and "tune", "train and register", "evaluate",
                            registers and "promote", serve_check and "serve",
                            serve_check and monitor_loop and registers and LOOP)
    log(heading("data"))
    prepared = prepare_dataset(cfg, workspace=workspace, force=force, log=log)
    searched = None
    if tune:
        log(heading("tune"))
        cfg, searched = search_first(cfg, workspace, log)
    log(heading("train and register"))
    trained = train_and_register(cfg, workspace=workspace, log=log)
    result = PipelineResult(task="image", data=prepared.summary(), tune=searched, train=trained)
    log(heading("evaluate"))
    result.evaluation = evaluation = evaluate_checkpoint(trained.checkpoint, "test", workspace)
    registered = trained.registered
    if registered:
        from mlsd_ray.registry import log_evaluation

        # the report and plots join the registered version's run
        log_evaluation(registered.run_id, evaluation.report, "test", workspace)
        log(heading("promote"))
        result.promoted = promote_first(registered, workspace, log)
    if serve_check:
        from mlsd_ray.tasks.image.smoke import serve_smoke_check

        log(heading("serve"))
        model = trained.model_uri()
        loop = None
        if monitor_loop and registered:  # retraining moves a registry alias: needs a version
            loop = functools.partial(_loop, cfg, workspace=workspace, log=log,
                                     dataset_path=trained.dataset, heading=heading(LOOP))
        result.serve, result.loop = serve_smoke_check(cfg.serve, model, trained.dataset, workspace,
                                                      keep_serving, log, then=loop)
    return result


def _loop(cfg: Config, url: str, served_uri: str, workspace: Workspace,
          log: Callable[[str], None], dataset_path: str, heading: str) -> LoopSteps:
    from mlsd_ray.tasks import get_task
    from mlsd_ray.tasks.image.data.prepare import PreparedDataset
    from mlsd_ray.workflows.loop import monitoring_loop

    log(heading)
    return monitoring_loop(get_task(cfg.task), cfg, url, served_uri,
                           PreparedDataset.open(dataset_path), workspace, log)
