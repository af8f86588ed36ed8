"""`mlsd monitor`, `mlsd simulate-traffic` and `mlsd retrain`: watching and renewing a model.

Registered on the main app by mlsd_ray/cli/app.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from mlsd_ray.cli.support import (
    ChosenTask,
    ConfigOption,
    DryRunOption,
    ExampleOption,
    HomeOption,
    JsonOption,
    ModelOption,
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
from mlsd_ray.tasks.base import TrafficRequest

if TYPE_CHECKING:
    from mlsd_ray.monitor.run import MonitorReport
    from mlsd_ray.monitor.traffic import TrafficReport
    from mlsd_ray.workflows.retrain import RetrainDecision

DRIFT_EXIT_CODE = 3


def monitor(since: Annotated[str, typer.Option(
                "--since", help="Window start: a duration back from now (90s, 15m, 1h, 2d) or "
                                "an ISO time.")] = "1h",
            until: Annotated[str | None, typer.Option(
                "--until", help="Window end (same forms; default now).")] = None,
            inputs: Annotated[str | None, typer.Option(
                "--inputs", help="Test a set of inputs instead of the log: a source SPEC "
                                 "(folder:PATH, parquet:PATH, ...) predicted offline with "
                                 "--model.")] = None,
            model: ModelOption = None,
            fail_on_drift: Annotated[bool, typer.Option(
                "--fail-on-drift", help=f"Exit {DRIFT_EXIT_CODE} when drift is found "
                                        "(for cron jobs and CI).")] = False,
            config: ConfigOption = None, set_: SetOption = None, home: HomeOption = None,
            as_json: JsonOption = False, verbose: VerboseOption = False,
            example: ExampleOption = None, task: TaskOption = None) -> None:
    """Drift and skew of served traffic against the training data of the model that served it.

    Images: per input feature (brightness, contrast, edges, ink, orientation, centre), PSI and
    a Kolmogorov-Smirnov test; predicted classes against the training labels (chi-squared);
    confidence against validation. Tables: per column, PSI and KS for numbers, chi-squared for
    categories and a binomial test of the missing-value share; the model's scores against
    validation's. Writes report.json, report.md and histograms.png under
    $MLSD_HOME/monitor/ and prints the verdict. Thresholds: the `monitor` config section.
    """
    workspace = Workspace.at(home)
    verdicts: list[str] = []

    def work() -> MonitorReport:
        from mlsd_ray.monitor.run import monitor as run_monitor

        cfg = config_from(config, set_, None, example, task=task)
        frame = None
        if inputs:
            frame = _predict_inputs(cfg, inputs, model, workspace)
        report = run_monitor(cfg, workspace, None if inputs else since, until, frame)
        verdicts.append(report.verdict)
        return report

    def render(report: MonitorReport) -> None:
        print(f"verdict: {report.verdict} ({report.rows} predictions)")
        for uri, result in report.models.items():
            print(f"  {uri}: {result.summary}")
        if report.outputs:
            print(f"report: {report.outputs['report.md']}")
        elif report.summary:
            print(report.summary)

    run(as_json, work, render, verbose=verbose)
    if fail_on_drift and verdicts == ["drift"]:
        raise typer.Exit(DRIFT_EXIT_CODE)


def _predict_inputs(cfg, inputs: str, model: str | None, workspace: Workspace):
    """Offline predictions of a source, shaped like prediction-log rows (the model's task,
    from its checkpoint, predicts them)."""
    import pandas as pd

    from mlsd_ray import registry
    from mlsd_ray.tasks import model_task

    resolved = registry.pin(model or cfg.serve.model_ref(), workspace)
    task, cfg = model_task(resolved.path, cfg)
    task.set_source(cfg, inputs)
    summary = task.predict_offline(resolved, cfg, None, workspace, log_stderr)
    frame = pd.read_parquet(summary.out)
    return frame[frame["status"] == "ok"].reset_index(drop=True)


def simulate_traffic(
        url: Annotated[str | None, typer.Option(
            "--url", help="The running app, e.g. http://127.0.0.1:8000.")] = None,
        shift: Annotated[str, typer.Option(
            "--shift", help="Images: none | rotate | noise | invert | imbalance. Tables: none | "
                            "scale | missing | category (of --column).")] = "none",
        amount: Annotated[float | None, typer.Option(
            "--amount", help="Shift strength. Images: degrees (rotate, default 30), noise std "
                             "in grey levels (40), share of one class (imbalance, 0.7). Tables: "
                             "factor (scale, 3), share of rows (missing 0.5, category 0.8).")
        ] = None,
        column: Annotated[str | None, typer.Option(
            "--column", help="Tables: the column a shift changes.")] = None,
        count: Annotated[int, typer.Option(
            "--count", help="Inputs to send (0 = the whole split).")] = 200,
        split: Annotated[str, typer.Option(
            "--split", help="Split of the prepared dataset to sample.")] = "test",
        seed: Annotated[int, typer.Option("--seed", help="Sampling and noise seed.")] = 0,
        batch: Annotated[int, typer.Option("--batch", help="Inputs per request.")] = 8,
        concurrency: Annotated[int, typer.Option(
            "--concurrency", help="Requests in flight.")] = 4,
        save: Annotated[str | None, typer.Option(
            "--save", help="Also write what was sent with its labels: images as "
                           "DIR/<class>/<n>.png (a folder: source for `mlsd retrain`), rows as "
                           "a CSV file (a csv: source).")] = None,
        source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
        home: HomeOption = None, as_json: JsonOption = False, example: ExampleOption = None,
        task: TaskOption = None) -> None:
    """Send held-out inputs to a running app with a controlled shift (demo and tests of drift).

    Inputs come from a split of the prepared dataset (`--source`, default the task's source),
    so unshifted traffic looks like the training data and the shift is the only change. With
    --example fraud (or --task tabular) rows go to the scoring app and a shift changes one
    column.
    """
    workspace = Workspace.at(home)

    def work() -> TrafficReport:
        from mlsd_ray.core.errors import InputError

        cfg = config_from(config, set_, source, example,
                          task=task_of_app(url, task, example, config))
        if split not in ("train", "val", "test"):
            raise InputError(f"--split {split!r}: choose train, val or test")
        kind = ChosenTask().of(cfg)
        prepared = kind.prepare(cfg, workspace, log_stderr)
        return kind.simulate_traffic(prepared, TrafficRequest(
            url, shift, amount, column, count, split, seed, batch, concurrency, save))

    run(as_json, work, lambda report: print(report.describe()))


def retrain(source: Annotated[str, typer.Option(
                "--source", help="The new labelled data: a source SPEC (folder:PATH, ...).")],
            mode: Annotated[str | None, typer.Option(
                "--mode", help="finetune (from the champion's weights) | scratch "
                               "(retrain.mode).")] = None,
            epochs: Annotated[int | None, typer.Option(
                "--epochs", help="Challenger epochs (retrain.epochs).")] = None,
            margin: Annotated[float | None, typer.Option(
                "--margin", help="Required gain of the task's holdout score: accuracy for "
                                 "images, PR-AUC, macro F1 or R² for tables "
                                 "(retrain.margin).")] = None,
            dry_run: DryRunOption = False,
            model: ModelOption = None, config: ConfigOption = None, set_: SetOption = None,
            home: HomeOption = None, as_json: JsonOption = False,
            verbose: VerboseOption = False, example: ExampleOption = None,
            task: TaskOption = None) -> None:
    """Train a challenger on new data and promote it only if it beats the champion.

    The champion's checkpoint says its task (--example fraud picks the fraud model and its
    settings). Both are scored on the same holdout (the champion's test split plus the new
    data's) by the task's score: accuracy for images, PR-AUC, macro F1 or R² for tables. A
    promoted challenger takes the alias and a running `mlsd serve` app rolls over to it with no
    dropped requests. Writes decision.json / decision.md under $MLSD_HOME/retrain/.
    """
    workspace = Workspace.at(home)

    def work() -> RetrainDecision:
        from mlsd_ray.workflows.retrain import retrain as run_retrain

        cfg = config_from(config, with_flags(set_, {"retrain.mode": mode,
                                                    "retrain.epochs": epochs,
                                                    "retrain.margin": margin}), None,
                          example, task=task)
        return run_retrain(cfg, source, workspace, model, dry_run, log_stderr)

    def render(decision: RetrainDecision) -> None:
        for who, uri in (("champion", decision.champion), ("challenger", decision.challenger)):
            score = decision.scores_of(who)
            print(f"{who:10s} {uri}: holdout {decision.metric} {score.holdout.score:.4f} "
                  f"(old test {score.old_test.score:.4f}, new {score.new_test.score:.4f})")
        would = decision.dry_run and decision.gain > decision.margin
        print(("PROMOTED: " if decision.promote else "dry run, would promote: " if would
               else "kept the champion: ") + decision.reason)
        if decision.rollout is not None:
            update = decision.rollout
            print(f"rolled out: app {update.app_name!r} {update.before.uri} -> "
                  f"{update.after.uri} in {update.seconds} s, now serving version "
                  f"{update.served_version}")
        elif decision.rollout_skipped:
            print(f"not rolled out: {decision.rollout_skipped}")
        print(f"decision: {decision.outputs['markdown']}")

    run(as_json, work, render, verbose=verbose)
