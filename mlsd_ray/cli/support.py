"""What every `mlsd` command shares: the common options and the run contract.

`run` gives a command its exit codes (0 / 1 work failed / 2 bad input / 130 interrupted), one
JSON object on stdout with --json, and errors without tracebacks. Kept apart from cli.py so that
command modules (mlsd_ray.cli.serve) can use it without importing the CLI itself.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from mlsd_ray.core.errors import MlsdError
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.tasks import load_config

if TYPE_CHECKING:
    from mlsd_ray.tasks.base import Task

Result = TypeVar("Result")

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config file (sections: data, ...).", dir_okay=False)]
SetOption = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override one config key, KEY=VALUE (e.g. data.image_size=16); "
                        "repeatable, applied after --config.")]
SourceOption = Annotated[str | None, typer.Option(
    "--source", help="digits | folder:PATH | parquet:PATH | torchvision:NAME[:ROOT] | "
                     "synthetic[:N]  (same as --set data.source=...); with --example fraud: "
                     "fraud-synth[:N] | breast-cancer | diabetes | csv:PATH | parquet:PATH")]
ExampleOption = Annotated[str | None, typer.Option(
    "--example", help="Start from a worked example's config: digits (the default) or fraud "
                      "(tabular fraud detection; mlsd_ray/examples/fraud.yaml). --config and "
                      "--set go on top.")]
LabelOption = Annotated[str | None, typer.Option(
    "--label", help="Tabular: the label column of a csv:/parquet: source (tabular.label).")]
TaskOption = Annotated[str | None, typer.Option(
    "--task", help="The kind of model: image (the default), tabular, a task an installed "
                   "package registers (entry point group mlsd.tasks), or "
                   "`package.module:Class` for your own (docs/tasks.md).")]
HomeOption = Annotated[str | None, typer.Option(
    "--home", help="Where outputs go; overrides $MLSD_HOME (default ./mlsd-home). Path or URI.")]
ForceOption = Annotated[bool, typer.Option(
    "--force", help="Rebuild even when an identical earlier output exists.")]
JsonOption = Annotated[bool, typer.Option(
    "--json", help="Print one JSON object with the outputs on stdout; logs go to stderr.")]


ModelOption = Annotated[str | None, typer.Option(
    "--model", help="models:/NAME@ALIAS or models:/NAME/VERSION (default serve.model).")]
RunNameOption = Annotated[str | None, typer.Option(
    "--run-name", help="Name of the run; an existing name resumes it.")]
DryRunOption = Annotated[bool, typer.Option(
    "--dry-run", help="Train and decide, but promote nothing.")]
TuneFirstOption = Annotated[bool, typer.Option(
    "--tune", help="Search hyperparameters (the tune section) before the final training, which "
                   "then uses the best ones.")]
LoopOption = Annotated[bool, typer.Option(
    "--loop/--no-loop", help="After the serve check, run the monitoring loop on the live app: "
                             "traffic, drift, retrain, rollout.")]

VerboseOption = Annotated[bool, typer.Option(
    "--verbose", "-v", help="Also print what Ray's processes log (Ray Data's plans, Serve's "
                            "access logs, worker output) and MLflow's download bars; by "
                            "default they stay in Ray's log files, named once.")]


def json_ready(result: Any) -> Any:
    """A stage's result as plain data for `--json` and a job's MLSD_RESULT line: typed
    results (at any depth of a dict or list) become their `to_dict()`."""
    if hasattr(result, "to_dict"):
        return json_ready(result.to_dict())
    if isinstance(result, dict):
        return {key: json_ready(value) for key, value in result.items()}
    if isinstance(result, (list, tuple)):
        return [json_ready(value) for value in result]
    return result


def run(as_json: bool, work: Callable[[], Result], render: Callable[[Result], None],
        verbose: bool = False) -> None:
    """Run a stage with the CLI's contract: exit codes, JSON on stdout, no tracebacks for users.
    `work` returns the stage's result (a dict, or a typed result); `render` prints it for a
    person, or with `as_json` it is printed as JSON (`json_ready`)."""
    from mlsd_ray.core import runtime

    runtime.configure(quiet=as_json, verbose=verbose)
    console = sys.stderr if as_json else sys.stdout  # with --json, stdout is the result's
    stdout = console if verbose else runtime.RayEchoFilter(console)
    try:
        with redirect_stdout(stdout):
            result = work()
            if as_json:  # Ray's background threads print (e.g. raylet warnings) until shutdown
                _disconnect_ray()
    except MlsdError as exc:
        fail(as_json, exc.exit_code, str(exc))
    except KeyboardInterrupt:
        fail(as_json, 130, "interrupted")
    except Exception as exc:  # a failure of the work itself: say what, keep the trace for --debug
        if os.environ.get("MLSD_DEBUG"):
            traceback.print_exc()
        fail(as_json, 1, f"the work failed: {type(exc).__name__}: {exc}",
              "(set MLSD_DEBUG=1 for the full traceback)")
    if as_json:
        print(json.dumps(json_ready(result), default=str))
    else:
        render(result)


ERROR_CODES = {1: "failed", 2: "bad_input", 130: "interrupted"}


def _disconnect_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def exit_promptly(command: Callable[[], object]) -> None:
    """Run a click `command` (it ends with SystemExit), then exit as Python would, minus its
    final teardown.

    After a stage, Python's own finalisation (freeing every module: torch, Ray, MLflow)
    took 1.2 s of each command's wall time (docs/performance.md). Everything that teardown
    would still do for us happens first: other threads are joined, the atexit handlers run
    (they shut Ray down and flush the log handlers) and stdout and stderr are flushed.
    """
    import atexit
    import threading

    try:
        command()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    # What Python's finalisation does first: stop thread pools (concurrent.futures registers
    # that with threading) and join the threads that are not daemons.
    getattr(threading, "_shutdown", lambda: None)()
    atexit._run_exitfuncs()
    if code is not None and not isinstance(code, int):  # sys.exit("message"), as Python does
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def fail(as_json: bool, exit_code: int, message: str, hint: str = "") -> None:
    """Report an error on stderr (and as the one JSON object with --json), then exit."""
    log_stderr(f"error: {message}" + (f"\n{hint}" if hint else ""))
    if as_json:
        print(json.dumps({"error": {"code": ERROR_CODES[exit_code], "message": message}}))
    raise typer.Exit(exit_code)


def with_flags(overrides: list[str] | None, flags: dict) -> list[str]:
    """`--set` overrides followed by the command's own flags that were given, as KEY=VALUE."""
    return list(overrides or []) + [f"{k}={v}" for k, v in flags.items() if v is not None]



def config_from(config: Path | None, overrides: list[str] | None, source: str | None,
                example: str | None = None, label: str | None = None,
                task: str | None = None):
    """The resolved config; --task picks the task, and --source and --label go where it
    keeps them (`Task.set_source`)."""
    from mlsd_ray.tasks import get_task

    cfg = load_config(config, [*(overrides or []), *([f"task={task}"] if task else [])], example)
    if source is not None or label is not None:  # taken as typed: YAML would eat '#', ': '
        get_task(cfg.task).set_source(cfg, source, label)
    return cfg


def task_of_app(url: str | None, task: str | None, example: str | None,
                config: Path | None) -> str | None:
    """The task to talk to the app at `url` with: `--task` when given; else, when neither
    --example nor --config picks one, the task the app says it serves (GET /v1/model's
    `task_spec`: an app of a task built from parts); else None (the config's task)."""
    if task is not None or url is None or example is not None or config is not None:
        return task
    from mlsd_ray.serve.control import get_json

    try:
        return get_json(f"{url.rstrip('/')}/v1/model", timeout=10).get("task_spec")
    except Exception:  # not such an app, or not reachable: the command says so itself
        return None


class ChosenTask:
    """The task a command's `work` resolved from its config, for its `render` to use."""

    task: Task  # set by `work` (through `of`); `run` renders only after `work` returned

    def of(self, cfg) -> Task:
        """The task `cfg` names (and remember it)."""
        from mlsd_ray.tasks import get_task

        self.task = get_task(cfg.task)
        return self.task


def plain_flags(command) -> None:
    """Render on/off flags as flags in --help (`--force`, not `--force <bool>`): typer shows a
    type for every option, flags and the help option included, unless the option has a
    metavar."""
    import click

    options = [*command.params, command.get_help_option(click.Context(command))]
    for option in options:
        if getattr(option, "is_flag", False) and option.metavar is None:
            option.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        plain_flags(sub)
