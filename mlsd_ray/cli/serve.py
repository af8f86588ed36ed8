"""`mlsd serve [status|stop]`, `mlsd deploy` and `mlsd predict`: the serving commands.

Registered on the main app by mlsd_ray/cli/app.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlsd_ray.cli.support import (
    ChosenTask,
    ConfigOption,
    ExampleOption,
    HomeOption,
    JsonOption,
    SetOption,
    SourceOption,
    TaskOption,
    VerboseOption,
    config_from,
    run,
    task_of_app,
    with_flags,
)
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.tasks.base import OfflinePrediction, OnlinePrediction

AppOption = Annotated[str, typer.Option("--app", help="Serve application name.")]

serve_app = typer.Typer(help="Serve a registered model over HTTP with Ray Serve.",
                        invoke_without_command=True, rich_markup_mode="markdown")


@serve_app.callback()
def serve(ctx: typer.Context, config: ConfigOption = None, set_: SetOption = None,
          home: HomeOption = None, as_json: JsonOption = False, verbose: VerboseOption = False,
          example: ExampleOption = None, task: TaskOption = None,
          model: Annotated[str | None, typer.Option(
              "--model", help="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint "
                              "directory (default serve.model: the production alias of the "
                              "model that training the config registers, e.g. "
                              "models:/digits-cnn@production).")] = None,
          port: Annotated[int | None, typer.Option("--port", help="HTTP port (serve.port).")
                          ] = None,
          host: Annotated[str | None, typer.Option("--host", help="HTTP host (serve.host).")
                          ] = None,
          router: Annotated[str | None, typer.Option(
              "--router", help="pow2 | round_robin | least_connections | consistent_hash.")
          ] = None,
          min_replicas: Annotated[int | None, typer.Option(
              "--min-replicas", help="serve.autoscaling.min_replicas (0 = scale to zero).")
          ] = None,
          max_replicas: Annotated[int | None, typer.Option(
              "--max-replicas", help="serve.autoscaling.max_replicas")] = None,
          detach: Annotated[bool, typer.Option(
              "--detach", help="Return once healthy and leave the app running (stop it with "
                               "`mlsd serve stop`).")] = False) -> None:
    """Serve a model with the app of the task that trained it (its checkpoint says which).

    Images: POST /v1/predict, GET /v1/health, GET /v1/model, OpenAPI at /docs. Tables: POST
    /v1/fraud/score (a decision per record: threshold and rules), GET /v1/fraud/health,
    GET /v1/fraud/model, the policy and rules, OpenAPI at /v1/fraud/docs.

    Runs until Ctrl-C, or with --detach returns once the app answers its health check. The alias is
    pinned to its version at start; move versions with `mlsd deploy`. Set MLSD_API_TOKEN to
    require `Authorization: Bearer <token>`, and MLSD_ADMIN_TOKEN to allow changing the fraud
    policy and rules over HTTP (off without it). Subcommands: `status`, `stop`.
    """
    workspace = Workspace.at(home)
    if ctx.invoked_subcommand is not None:
        return
    from mlsd_ray.serve import control

    flags = {"serve.model": model, "serve.port": port, "serve.host": host,
             "serve.router": router, "serve.autoscaling.min_replicas": min_replicas,
             "serve.autoscaling.max_replicas": max_replicas}
    overrides = with_flags(set_, flags)

    def work() -> control.RunningApp:
        app = control.start(config_from(config, overrides, None, example, task=task).serve,
                            workspace, detach, log_stderr)
        if not detach:
            control.serve_until_interrupted(app, log_stderr)
        return app

    def render(app: control.RunningApp) -> None:
        print(f"serving {app.model.name} version {app.model.version} at {app.url} (healthy "
              f"after {app.seconds_to_healthy} s)")
        print(f"try: curl {app.url}{app.model_path}    API docs: {app.docs}")
        if detach:
            print("running in the background: `mlsd serve status`, `mlsd serve stop`")

    run(as_json, work, render, verbose=verbose)


@serve_app.command("status")
def serve_status(home: HomeOption = None, app_name: AppOption = "mlsd",
                 as_json: JsonOption = False) -> None:
    """The running app: its state, replicas per deployment and the served model version."""
    workspace = Workspace.at(home)
    from mlsd_ray.serve import control

    def render(result: control.AppStatus) -> None:
        print(f"{result.app_name} at {result.url}: {result.status}, model version "
              f"{result.model_version} ({result.model})")
        for name, deployment in result.deployments.items():
            print(f"  {name}: {deployment['status']}, replicas {deployment['replicas']}")
        print(f"Prometheus metrics: {', '.join(result.metrics)}")

    run(as_json, lambda: control.status(workspace, app_name), render)


@serve_app.command("stop")
def serve_stop(home: HomeOption = None, app_name: AppOption = "mlsd",
               as_json: JsonOption = False) -> None:
    """Stop the app (and the local Ray head that `mlsd serve --detach` started, if any)."""
    workspace = Workspace.at(home)
    from mlsd_ray.serve import control

    def render(result: control.StoppedApp) -> None:
        extra = " and the Ray head it started" if result.stopped_ray_head else ""
        print(f"stopped {result.app_name}{extra}")

    run(as_json, lambda: control.stop(workspace, app_name), render)


def deploy(model: Annotated[str, typer.Option(
               "--model", help="models:/NAME/VERSION (or @ALIAS, or a checkpoint directory).")],
           home: HomeOption = None, app_name: AppOption = "mlsd",
           as_json: JsonOption = False) -> None:
    """Move the running app to another model version with a rolling update (no failed requests).

    Serve starts replicas of the new version and retires the old ones as the new become healthy;
    every answer carries the version that produced it.
    """
    workspace = Workspace.at(home)
    from mlsd_ray.serve import control

    def render(result: control.RollingUpdate) -> None:
        print(f"{result.app_name}: {result.before.uri} -> {result.after.uri} in "
              f"{result.seconds} s; now serving version {result.served_version}")

    run(as_json, lambda: control.deploy(model, workspace, app_name, log_stderr), render)


def predict(files: Annotated[list[Path] | None, typer.Argument(
                help="Files to send to --url: images, CSV rows for a table model, or "
                     "JSON/CSV/parquet instances for a task built from parts.")] = None,
            url: Annotated[str | None, typer.Option(
                "--url", help="A running app, e.g. http://127.0.0.1:8000.")] = None,
            model: Annotated[str | None, typer.Option(
                "--model", help="Offline: models:/NAME/VERSION|@ALIAS or a checkpoint (default "
                                "with --source: serve.model, the task's production model).")
            ] = None,
            source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
            out: Annotated[Path | None, typer.Option(
                "--out", help="Offline: parquet folder for the predictions (default "
                              "$MLSD_HOME/batch-predictions/TIME).")] = None,
            home: HomeOption = None, as_json: JsonOption = False,
            example: ExampleOption = None, task: TaskOption = None) -> None:
    """Predict offline over a dataset with Ray Data, or send files to a running app.

    Offline: `mlsd predict --model URI --source SPEC --out PATH` reads the source like the data
    stage (invalid rows are counted, not fatal), runs the model on an actor pool and writes
    parquet (row id, label if known, class or score, confidence); the model's checkpoint says
    its task. Online: `mlsd predict --url URL FILE...` sends images, or with --example fraud
    (or --task tabular) the rows of CSV files to the scoring app.
    """
    workspace = Workspace.at(home)
    from mlsd_ray.core.errors import InputError

    chosen = ChosenTask()

    def work() -> OfflinePrediction | OnlinePrediction:
        cfg = config_from(config, with_flags(set_, {}), None, example,
                          task=task_of_app(url, task, example, config))
        if url:
            if not files:
                raise InputError("--url needs FILEs to send")
            return chosen.of(cfg).predict_online(url, files)
        if not model and source is None:
            raise InputError("give --model or --source (offline), or --url with FILEs")
        from mlsd_ray import registry
        from mlsd_ray.tasks import model_task

        resolved = registry.pin(model or cfg.serve.model_ref(), workspace)
        chosen.task, cfg = model_task(resolved.path, cfg)
        chosen.task.set_source(cfg, source)
        return chosen.task.predict_offline(resolved, cfg, str(out) if out else None, workspace,
                                           log_stderr)

    run(as_json, work, lambda result: print(result.describe()))
