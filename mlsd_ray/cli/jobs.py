"""Ray Job entrypoints: `python jobs/STAGE.py [--config FILE] [--set K=V] [--home H] [--smoke]`.

The scripts in jobs/ only call `main(STAGE)`. Each job is a command built from the `mlsd` CLI's
own options (cli/support.py) and config resolution (`config_from`), so a flag means the same in
`mlsd train` and in `jobs/train.py`. A job's driver runs on the cluster's head node with
RAY_ADDRESS set by Ray's job supervisor, so each stage joins that cluster instead of starting a
local Ray. Progress goes to the job's log; the last stdout line is `MLSD_RESULT {json}` (what
`mlsd submit --wait` reads back); the exit code is the CLI's: 0 done, 1 the work failed, 2 bad
input.

Outputs go to --home, else $MLSD_HOME, else ~/mlsd-home on the node running the driver: never
the job's working directory, which Ray deletes with the job. On a cluster of several machines
this must be shared storage (mlsd_ray/core/cluster.py says so at start).
"""

from __future__ import annotations

import json
import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, cast

import typer
from typer.core import TyperGroup

from mlsd_ray.cli.support import (
    DryRunOption,
    ExampleOption,
    LabelOption,
    LoopOption,
    ModelOption,
    RunNameOption,
    SetOption,
    SourceOption,
    TaskOption,
    TuneFirstOption,
    config_from,
    json_ready,
    plain_flags,
)
from mlsd_ray.core.errors import InputError, MlsdError
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.tuning.report import TuneSummary
    from mlsd_ray.workflows.retrain import RetrainDecision

STAGES = ("pipeline", "data", "train", "tune", "retrain", "deploy")
RESULT_PREFIX = "MLSD_RESULT "
CONFIG_ENV = "MLSD_CONFIG_YAML"  # the resolved config that `mlsd submit` sends with a job
DEFAULT_JOB_HOME = "~/mlsd-home"

# --smoke: a tiny, fast run of each stage that still goes through every part (Ray Data, Train,
# MLflow, Serve): 8x8 digits, 2 epochs, 2 workers of half a CPU.
SMOKE_COMMON = ["data.source=digits", "data.image_size=8", "data.augment.random_shift=1",
                "train.epochs=2", "train.num_workers=2", "train.cpus_per_worker=0.5"]
SMOKE = {
    "pipeline": SMOKE_COMMON,
    "data": SMOKE_COMMON,
    "train": SMOKE_COMMON,
    "tune": [*SMOKE_COMMON, "tune.max_epochs=2", "tune.scheduler=none", "tune.num_samples=1"],
    "retrain": ["retrain.epochs=1"],
    "deploy": ["serve.autoscaling.min_replicas=1", "serve.autoscaling.max_replicas=1"],
}
SMOKE_TUNE_SPACE = {"train.lr": [1e-3, 3e-3]}

JobHomeOption = Annotated[str | None, typer.Option(
    "--home", help=f"Where outputs go (default $MLSD_HOME, else {DEFAULT_JOB_HOME} on the "
                   "driver's node; never the job's working directory, which Ray deletes).")]
SmokeOption = Annotated[bool, typer.Option(
    "--smoke", help="A tiny fast run of the stage, to check a cluster.")]
JobConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config file (default: $MLSD_CONFIG_YAML from `mlsd submit`, "
                           "else the defaults).", dir_okay=False)]
# (config, workspace, log) -> the summary: a dict or a typed result (cli.support.json_ready)
Work = Callable[[object, Workspace, Callable[[str], None]], Any]

jobs = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                   rich_markup_mode="markdown")


def job_workspace(home: str | None) -> Workspace:
    """The job's workspace: --home, else $MLSD_HOME, else ~/mlsd-home on the driver's node."""
    return Workspace.at(home or os.environ.get("MLSD_HOME")
                        or os.path.expanduser(DEFAULT_JOB_HOME))


def job_config(stage: str, smoke: bool, config: Path | None, overrides: list[str] | None,
               source: str | None = None, example: str | None = None,
               label: str | None = None, task: str | None = None):
    """The config file (or the one `mlsd submit` sent), then --smoke, then --set, then --source,
    resolved as the CLI resolves it."""
    layered = [*(SMOKE[stage] if smoke else []), *(overrides or [])]
    if config is None and os.environ.get(CONFIG_ENV):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as sent:
            sent.write(os.environ[CONFIG_ENV])
            sent.flush()
            cfg = config_from(Path(sent.name), layered, source, example, label, task)
    else:
        cfg = config_from(config, layered, source, example, label, task)
    if smoke and stage == "tune":
        cfg.tune.space = dict(SMOKE_TUNE_SPACE)
    return cfg


def run_job(stage: str, smoke: bool, home: str | None, config_of: Callable[[], object],
            work: Work) -> None:
    """Run a stage on the cluster this driver belongs to: progress to the job's log, then
    `MLSD_RESULT {json}` and the CLI's exit code (0 done, 1 the work failed, 2 bad input)."""
    from mlsd_ray.core.runtime import configure, log_stderr

    configure()  # the job's log, like the console, shows our lines (no download bars)
    try:
        cfg, where = config_of(), job_workspace(home)
        log_stderr(f"job {stage}{' (smoke)' if smoke else ''}: outputs under {where.root}")
        result, code = work(cfg, where, log_stderr), 0
    except MlsdError as exc:
        result, code = {"error": {"code": exc.exit_code, "message": str(exc)}}, exc.exit_code
        log_stderr(f"error: {exc}")
    except Exception as exc:  # the job log is for operators: keep the trace
        traceback.print_exc()
        result, code = {"error": {"code": 1, "message": f"{type(exc).__name__}: {exc}"}}, 1
    print(RESULT_PREFIX + json.dumps(json_ready(result), default=str), flush=True)
    raise SystemExit(code)


def _task(cfg):
    from mlsd_ray.tasks import get_task

    return get_task(cfg.task)


@jobs.command("data")
def data_job(config: JobConfigOption = None, set_: SetOption = None,
             home: JobHomeOption = None, smoke: SmokeOption = False,
             source: SourceOption = None, example: ExampleOption = None,
             label: LabelOption = None, task: TaskOption = None) -> None:
    """Prepare the configured source with Ray Data."""
    run_job("data", smoke, home,
            lambda: job_config("data", smoke, config, set_, source, example, label, task),
            lambda cfg, where, log: _task(cfg).prepare(cfg, where, log).summary())


@jobs.command("train")
def train_job(config: JobConfigOption = None, set_: SetOption = None,
              home: JobHomeOption = None, smoke: SmokeOption = False,
              source: SourceOption = None, run_name: RunNameOption = None,
              example: ExampleOption = None, label: LabelOption = None,
              task: TaskOption = None) -> None:
    """Train data-parallel with Ray Train and register the model."""
    run_job("train", smoke, home,
            lambda: job_config("train", smoke, config, set_, source, example, label, task),
            lambda cfg, where, log: _task(cfg).train(cfg, where, log, run_name=run_name))


@jobs.command("tune")
def tune_job(config: JobConfigOption = None, set_: SetOption = None,
             home: JobHomeOption = None, smoke: SmokeOption = False,
             source: SourceOption = None, example: ExampleOption = None,
             label: LabelOption = None, task: TaskOption = None) -> None:
    """Search hyperparameters with Ray Tune and register the best model."""
    def work(cfg, where, log) -> TuneSummary:
        from mlsd_ray.tuning.search import run_tune

        return run_tune(cfg, workspace=where, log=log)

    run_job("tune", smoke, home,
            lambda: job_config("tune", smoke, config, set_, source, example, label, task), work)


@jobs.command("pipeline")
def pipeline_job(config: JobConfigOption = None, set_: SetOption = None,
                 home: JobHomeOption = None, smoke: SmokeOption = False,
                 source: SourceOption = None, tune: TuneFirstOption = False,
                 loop: LoopOption = True, example: ExampleOption = None,
                 label: LabelOption = None, task: TaskOption = None) -> None:
    """data -> train -> register -> evaluate -> promote -> serve check (-> the monitoring
    loop, unless --smoke or --no-loop)."""
    def work(cfg, where, log):
        from mlsd_ray.workflows.pipeline import run_pipeline

        return run_pipeline(_task(cfg), cfg, where, log, tune=tune,
                            monitor_loop=loop and not smoke)

    run_job("pipeline", smoke, home,
            lambda: job_config("pipeline", smoke, config, set_, source, example, label, task),
            work)


@jobs.command("retrain")
def retrain_job(config: JobConfigOption = None, set_: SetOption = None,
                home: JobHomeOption = None, smoke: SmokeOption = False,
                source: Annotated[str | None, typer.Option(
                    "--source", help="The new labelled data: a source SPEC (with --smoke, the "
                                     "task's own shifted sample).")] = None,
                model: ModelOption = None, dry_run: DryRunOption = False,
                example: ExampleOption = None, task: TaskOption = None) -> None:
    """Train a challenger on new labelled data (--source) and promote it if better."""
    def work(cfg, where, log) -> RetrainDecision:
        from mlsd_ray.workflows.retrain import retrain

        new_data = source or (_task(cfg).smoke_retrain_source(where, log) if smoke else None)
        if new_data is None:
            raise InputError("retrain needs --source SPEC: the new labelled data (e.g. "
                             "folder:/shared/incoming/rotated)")
        return retrain(cfg, new_data, where, model, dry_run or smoke, log)

    run_job("retrain", smoke, home,
            lambda: job_config("retrain", smoke, config, set_, None, example, None, task), work)


@jobs.command("deploy")
def deploy_job(config: JobConfigOption = None, set_: SetOption = None,
               home: JobHomeOption = None, smoke: SmokeOption = False,
               model: ModelOption = None, example: ExampleOption = None,
               task: TaskOption = None) -> None:
    """Serve a model on the cluster (a rolling update when the app already runs)."""
    def work(cfg, where, log):
        from mlsd_ray.workflows.deploy import deploy

        return deploy(_task(cfg), cfg, model, smoke, where, log)

    run_job("deploy", smoke, home,
            lambda: job_config("deploy", smoke, config, set_, None, example, None, task),
            work)


def main(stage: str, argv: list[str] | None = None) -> None:
    """Entry point of jobs/STAGE.py: parse the stage's options, run it, exit with its code."""
    group = cast(TyperGroup, typer.main.get_command(jobs))  # an app of several commands
    command = group.commands[stage]
    plain_flags(command)
    command.main(args=argv, prog_name=f"jobs/{stage}.py")
