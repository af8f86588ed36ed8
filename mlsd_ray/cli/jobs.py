"""Ray Job entrypoints: `python jobs/STAGE.py [--config FILE] [--set K=V] [--home H] [--smoke]`.

The scripts in jobs/ only call `main(STAGE)`. A job's driver runs on the cluster's head node with
RAY_ADDRESS set by Ray's job supervisor, so each stage joins that cluster instead of starting a
local Ray. Progress goes to the job's log; the last stdout line is `MLSD_RESULT {json}` (what
`mlsd submit --wait` reads back); the exit code is the CLI's: 0 done, 1 the work failed, 2 bad
input.

Outputs go to --home, else $MLSD_HOME, else ~/mlsd-home on the node running the driver: never
the job's working directory, which Ray deletes with the job. On a cluster of several machines
this must be shared storage (mlsd_ray/core/cluster.py says so at start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback

from mlsd_ray.core.errors import InputError, MlsdError

STAGES = ("pipeline", "data", "train", "tune", "retrain", "deploy")
RESULT_PREFIX = "MLSD_RESULT "
CONFIG_ENV = "MLSD_CONFIG_YAML"  # the resolved config that `mlsd submit` sends with a job
DEFAULT_JOB_HOME = "~/mlsd-home"

DESCRIPTIONS = {
    "pipeline": "data -> train -> register -> evaluate -> promote -> serve check (-> the "
                "monitoring loop, unless --smoke or --no-loop)",
    "data": "prepare the configured source with Ray Data",
    "train": "train data-parallel with Ray Train and register the model",
    "tune": "search hyperparameters with Ray Tune and register the best model",
    "retrain": "train a challenger on new labelled data (--source) and promote it if better",
    "deploy": "serve a model on the cluster (a rolling update when the app already runs)",
}

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


def parser(stage: str) -> argparse.ArgumentParser:
    """The job's arguments: the same config flags as the CLI, plus the stage's own."""
    p = argparse.ArgumentParser(prog=f"jobs/{stage}.py", description=DESCRIPTIONS[stage])
    p.add_argument("--config", help="YAML config file (default: $MLSD_CONFIG_YAML from "
                                    "`mlsd submit`, else the defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--home", help=f"where outputs go (default $MLSD_HOME, else "
                                  f"{DEFAULT_JOB_HOME} on the driver's node)")
    p.add_argument("--smoke", action="store_true", help="a tiny fast run, to check a cluster")
    p.add_argument("--source", help="data source SPEC (retrain: the new labelled data)")
    if stage in ("retrain", "deploy"):
        p.add_argument("--model", help="the model (default: serve.model)")
    if stage == "train":
        p.add_argument("--run-name", help="name of the run; an existing name resumes it")
    if stage == "retrain":
        p.add_argument("--dry-run", action="store_true", help="decide, promote nothing")
    if stage == "pipeline":
        p.add_argument("--no-loop", action="store_true", help="skip the monitoring loop")
        p.add_argument("--tune", action="store_true", help="search before the final training")
    return p


def job_home(args: argparse.Namespace) -> str:
    from mlsd_ray.core import storage

    return storage.home(args.home or os.environ.get("MLSD_HOME")
                        or os.path.expanduser(DEFAULT_JOB_HOME))


def job_config(stage: str, args: argparse.Namespace):
    """The config file (or the one `mlsd submit` sent), then --smoke, then --set, then --source."""
    from mlsd_ray.core.config import load_config

    overrides = [*(SMOKE[stage] if args.smoke else []), *args.overrides]
    if args.config:
        cfg = load_config(args.config, overrides)
    elif os.environ.get(CONFIG_ENV):
        with tempfile.NamedTemporaryFile("w", suffix=".yaml") as sent:
            sent.write(os.environ[CONFIG_ENV])
            sent.flush()
            cfg = load_config(sent.name, overrides)
    else:
        cfg = load_config(None, overrides)
    if args.source and stage != "retrain":
        from mlsd_ray.tasks import get_task

        get_task(cfg.task).set_source(cfg, args.source)
    if args.smoke and stage == "tune":
        cfg.tune.space = dict(SMOKE_TUNE_SPACE)
    return cfg


def run_stage(stage: str, args: argparse.Namespace, log) -> dict:
    """Run one stage on the cluster this driver belongs to; returns its summary."""
    from mlsd_ray.tasks import get_task

    cfg, home = job_config(stage, args), job_home(args)
    task = get_task(cfg.task)
    log(f"job {stage}{' (smoke)' if args.smoke else ''}: outputs under {home}")
    if stage == "data":
        return task.prepare(cfg, home, log).summary()
    if stage == "train":
        return task.train(cfg, home, log, run_name=args.run_name)
    if stage == "tune":
        from mlsd_ray.tuning.search import run_tune

        return run_tune(cfg, home=home, log=log)
    if stage == "pipeline":
        return task.pipeline(cfg, home, log, tune=args.tune,
                             monitor_loop=not (args.smoke or args.no_loop))
    if stage == "retrain":
        source = args.source or (task.smoke_retrain_source(home, log) if args.smoke else None)
        if source is None:
            raise InputError("retrain needs --source SPEC: the new labelled data (e.g. "
                             "folder:/shared/incoming/rotated)")
        from mlsd_ray.workflows.retrain import retrain

        return retrain(cfg, source, home, args.model, args.dry_run or args.smoke, log)
    return task.deploy(cfg, args.model, args.smoke, home, log)


def main(stage: str, argv: list[str] | None = None) -> None:
    """Entry point of jobs/STAGE.py: run the stage, print MLSD_RESULT, exit with its code."""
    from mlsd_ray.core.runtime import configure, log_stderr

    args = parser(stage).parse_args(argv)
    configure()  # the job's log, like the console, shows our lines (no download bars)
    try:
        result, code = run_stage(stage, args, log_stderr), 0
    except MlsdError as exc:
        result, code = {"error": {"code": exc.exit_code, "message": str(exc)}}, exc.exit_code
        log_stderr(f"error: {exc}")
    except Exception as exc:  # the job log is for operators: keep the trace
        traceback.print_exc()
        result, code = {"error": {"code": 1, "message": f"{type(exc).__name__}: {exc}"}}, 1
    print(RESULT_PREFIX + json.dumps(result, default=str), flush=True)
    sys.exit(code)
