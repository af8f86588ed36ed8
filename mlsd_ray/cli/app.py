"""The `mlsd` command line: one command per stage, plus `pipeline`.

Exit codes: 0 success, 1 the work failed, 2 bad usage or bad input. With `--json` a stage prints
exactly one JSON object on stdout; everything else (progress, logs) goes to stderr.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from mlsd_ray import __version__
from mlsd_ray.cli.monitor import monitor, retrain, simulate_traffic
from mlsd_ray.cli.serve import deploy, predict, serve_app
from mlsd_ray.cli.support import (
    ChosenTask,
    ConfigOption,
    ExampleOption,
    ForceOption,
    HomeOption,
    JsonOption,
    LabelOption,
    LoopOption,
    RunNameOption,
    SetOption,
    SourceOption,
    TaskOption,
    TuneFirstOption,
    VerboseOption,
    config_from,
    exit_promptly,
    plain_flags,
    run,
    with_flags,
)
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.explain import ExplanationResult
    from mlsd_ray.export import ExportResult
    from mlsd_ray.tasks.base import DataSummary, Evaluation, TrainedModel
    from mlsd_ray.tuning.report import TuneSummary
    from mlsd_ray.workflows.stages import PipelineResult

app = typer.Typer(
    help="mlsd-ray: data preparation, distributed training and serving on Ray.\n\n"
         "Every stage writes under $MLSD_HOME (default ./mlsd-home) and prints where.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    rich_markup_mode="markdown")


def _version(value: bool) -> None:
    if value:
        print(f"mlsd-ray {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", help="Show the version and exit.", callback=_version,
        is_eager=True)] = False) -> None:
    """mlsd-ray command line."""


@app.command()
def data(source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
         home: HomeOption = None, force: ForceOption = False, as_json: JsonOption = False,
         verbose: VerboseOption = False, example: ExampleOption = None,
         label: LabelOption = None,
         task: TaskOption = None) -> None:
    """Prepare a dataset with Ray Data: validate, quarantine, de-duplicate, resize, split.

    Writes parquet splits, manifest.json, quality.json/quality.md and quarantine/ under
    $MLSD_HOME/datasets/NAME/FINGERPRINT/. Identical inputs and config reuse the earlier
    output unless --force. With --example fraud: a table, checked, split and with its Ray Data
    preprocessors (imputation, scaling, encoding) fitted on the train split.
    """
    workspace = Workspace.at(home)
    chosen = ChosenTask()

    def work() -> DataSummary:
        cfg = config_from(config, set_, source, example, label, task)
        return chosen.of(cfg).prepare(cfg, workspace, log_stderr, force=force).summary()

    run(as_json, work, lambda summary: chosen.task.render_data(summary), verbose=verbose)


@app.command()
def train(source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
          home: HomeOption = None, as_json: JsonOption = False, verbose: VerboseOption = False,
          num_workers: Annotated[int | None, typer.Option(
              "--num-workers", help="Data-parallel Ray Train workers (train.num_workers); 0 "
              "trains in this process, without Ray Train's start-up (one machine, small "
              "models).")] = None,
          use_gpu: Annotated[bool, typer.Option(
              "--use-gpu", help="One GPU per worker; NCCL (train.use_gpu).")] = False,
          cpus_per_worker: Annotated[float | None, typer.Option(
              "--cpus-per-worker", help="train.cpus_per_worker")] = None,
          epochs: Annotated[int | None, typer.Option("--epochs", help="train.epochs")] = None,
          run_name: RunNameOption = None,
          example: ExampleOption = None, label: LabelOption = None,
          task: TaskOption = None) -> None:
    """Train data-parallel with Ray Train on the prepared dataset: the CNN, or with --example
    fraud the MLP beside its baseline.

    Runs the data stage first when its output is missing. Checkpoints every
    train.checkpoint_every epochs, at each new best and at the end, under
    $MLSD_HOME/runs/RUN_NAME/; keeps the best by the task's val score, survives worker
    failures, and reports the best checkpoint's scores on the test split.
    """
    workspace = Workspace.at(home)
    flags = {"train.num_workers": num_workers, "train.cpus_per_worker": cpus_per_worker,
             "train.epochs": epochs, "train.use_gpu": True if use_gpu else None}
    overrides = with_flags(set_, flags)

    chosen = ChosenTask()

    def work() -> TrainedModel:
        cfg = config_from(config, overrides, source, example, label, task)
        return chosen.of(cfg).train(cfg, workspace, log_stderr, run_name=run_name)

    run(as_json, work, lambda trained: print(trained.describe()), verbose=verbose)


@app.command()
def evaluate(model: Annotated[str, typer.Option(
                 "--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint "
                                 "directory.")],
             split: Annotated[str, typer.Option("--split", help="train | val | test")] = "test",
             dataset: Annotated[str | None, typer.Option(
                 "--dataset", help="Prepared dataset folder (default: the model's own).")] = None,
             home: HomeOption = None, as_json: JsonOption = False,
             verbose: VerboseOption = False) -> None:
    """Report a trained model's metrics on a split of its dataset, beside a reference model.

    The model's checkpoint says which task trained it. Images: accuracy, macro
    precision/recall/F1, a per-class table, confusion_matrix.png and learning_curves.png, with an
    SVC on flattened pixels as the reference. Tables: the MLP at its threshold (PR-AUC, ROC-AUC,
    precision, recall, F1; macro F1; or MSE, MAE, R²) beside the HistGradientBoosting baseline,
    on the test split. Writes report.json and report.md under $MLSD_HOME/reports/RUN_NAME/SPLIT/.
    """
    workspace = Workspace.at(home)

    def work() -> Evaluation:
        from mlsd_ray.registry import log_evaluation, resolve, show
        from mlsd_ray.tasks import task_of_checkpoint

        path = resolve(model, workspace)
        # the task that trained it: no flag needed
        evaluation = task_of_checkpoint(path).evaluate(path, split, workspace, dataset)
        if model.startswith("models:/"):  # its report and plots join the version's run
            log_evaluation(show(model, workspace).run_id, evaluation.report, split, workspace)
        return evaluation

    run(as_json, work, lambda evaluation: print(evaluation.describe()), verbose=verbose)


@app.command()
def explain(model: Annotated[str, typer.Option(
                "--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint "
                                "directory.")],
            source: Annotated[str | None, typer.Option(
                "--source", help="Inputs to explain (a --source SPEC, as `mlsd data` takes); "
                                 "default: the model's own test split.")] = None,
            label: Annotated[str | None, typer.Option(
                "--label", help="Only inputs of this class (e.g. 7).")] = None,
            count: Annotated[int, typer.Option("--n", help="How many inputs.")] = 8,
            out: Annotated[str | None, typer.Option(
                "--out", help="Folder (default $MLSD_HOME/explanations/RUN/TIME).")] = None,
            home: HomeOption = None, as_json: JsonOption = False,
            verbose: VerboseOption = False) -> None:
    """Show why the model answered what it did, and check that the explanation is sound.

    Images: Integrated Gradients and Grad-CAM (on the last rectified feature maps) for the
    predicted class, drawn over each input (overlays/*.png). Two sanity checks, with a figure
    each: the maps of a copy of the model with random weights must differ from the trained
    model's (rank correlation < 0.5), and deleting the most-attributed pixels first must
    lower the predicted class's probability faster than deleting pixels in a random order.
    Tables: permutation importance on the test split (importance.png) and, per record,
    Integrated Gradients summed per column (records/*.png). A task built from parts
    (docs/tasks.md): Integrated Gradients per input position (rows/*.png), permutation
    importance per input column, and the randomised-model check. explanations.json has every
    figure's numbers.
    """
    workspace = Workspace.at(home)

    def work() -> ExplanationResult:
        from mlsd_ray.core.errors import InputError
        from mlsd_ray.registry import resolve
        from mlsd_ray.tasks import task_of_checkpoint

        if count < 1:
            raise InputError(f"--n must be at least 1, got {count}")
        path = resolve(model, workspace)
        return task_of_checkpoint(path).explain(path, source, label, count, out, workspace)

    run(as_json, work, lambda result: print(result.describe()), verbose=verbose)


@app.command()
def export(model: Annotated[str, typer.Option(
               "--model", help="models:/NAME/VERSION, models:/NAME@ALIAS or a checkpoint "
                               "directory.")],
           out: Annotated[Path, typer.Option(
               "--out", help="Folder for the model file and metadata.json.")],
           fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript")] = "onnx",
           quantize: Annotated[str | None, typer.Option(
               "--quantize", help="int8: ONNX Runtime's static quantisation, calibrated on "
                                  "training images (ONNX, image models only).")] = None,
           home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Write a model for places without Python's training stack: ONNX or TorchScript.

    The file holds the served computation (images: uint8 N×H×W×C at the trained size in,
    class probabilities out; scaling, normalisation and softmax inside. Tables: the prepared
    feature matrix in, probabilities or predictions out). metadata.json beside it says what
    goes in and out and what to do outside the model (images: resize; tables: one recipe per
    feature, numbers only, that builds the matrix from records). The export is checked on the
    test split against PyTorch: fp32 must agree on every top-1 answer, int8 may lose at most
    0.5 points of accuracy; otherwise nothing is written. A models:/ URI gets
    the folder logged beside its version in MLflow (export/FORMAT) and a tag naming it.
    """
    workspace = Workspace.at(home)

    def work() -> ExportResult:
        from mlsd_ray.registry import resolve
        from mlsd_ray.tasks import task_of_checkpoint

        path = resolve(model, workspace)
        return task_of_checkpoint(path).export(path, fmt, quantize, str(out), model, workspace)

    run(as_json, work, lambda result: print(result.describe()))


@app.command()
def tune(source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
         home: HomeOption = None, as_json: JsonOption = False, verbose: VerboseOption = False,
         search: Annotated[str | None, typer.Option(
             "--search", help="grid | random (tune.search).")] = None,
         param: Annotated[list[str] | None, typer.Option(
             "--param", "-p", help="A searched key, replacing tune.space when given: "
                                   "KEY=V1,V2 (values) or KEY=loguniform|uniform|randint:LOW:HIGH; "
                                   "repeatable, e.g. -p train.lr=loguniform:1e-4:1e-2.")] = None,
         num_samples: Annotated[int | None, typer.Option(
             "--num-samples", help="random: trials (default 8); grid: repeats (default 1).")
         ] = None,
         scheduler: Annotated[str | None, typer.Option(
             "--scheduler", help="asha | median | none | auto (asha, or none with --cv).")
         ] = None,
         cv: Annotated[int | None, typer.Option(
             "--cv", help="K-fold cross-validation per configuration (tune.cv).")] = None,
         max_concurrent: Annotated[int | None, typer.Option(
             "--max-concurrent", help="Trials at once (default: what the cluster fits).")] = None,
         max_epochs: Annotated[int | None, typer.Option(
             "--max-epochs", help="Epochs per trial (default train.epochs).")] = None,
         grace_period: Annotated[int | None, typer.Option(
             "--grace-period", help="Epochs before a trial may be stopped.")] = None,
         reduction_factor: Annotated[float | None, typer.Option(
             "--reduction-factor", help="ASHA keeps 1/this at each rung.")] = None,
         name: Annotated[str | None, typer.Option(
             "--name", help="Name of the search (default DATASET-tune-TIME).")] = None,
         resume: Annotated[str | None, typer.Option(
             "--resume", help="Continue an interrupted search by name, with its own config.")
         ] = None, example: ExampleOption = None, label: LabelOption = None,
         task: TaskOption = None) -> None:
    """Search hyperparameters with Ray Tune; every trial runs the training stage's trainer.

    Grid or random search over a space from tune.space or --param, with ASHA or median early
    stopping or K-fold cross-validation. Writes results.csv, curves.png, best.yaml (train it with
    `mlsd train --config best.yaml`) and summary.json under $MLSD_HOME/tune/NAME/, logs a parent
    MLflow run with a child per trial, and registers the best trial's model.
    """
    workspace = Workspace.at(home)
    from mlsd_ray.tuning.search import run_tune
    from mlsd_ray.tuning.space import parse_param

    flags = {"tune.search": search, "tune.num_samples": num_samples, "tune.scheduler": scheduler,
             "tune.cv": cv, "tune.max_concurrent": max_concurrent,
             "tune.max_epochs": max_epochs, "tune.grace_period": grace_period,
             "tune.reduction_factor": reduction_factor}
    overrides = with_flags(set_, flags)

    def work() -> TuneSummary:
        # Trials' worker logs stay in Ray's files (unless --verbose); we print a line per
        # trial and summarise any errors.
        cfg = config_from(config, overrides, source, example, label, task)
        if param:
            cfg.tune.space = dict(parse_param(p) for p in param)
        return run_tune(cfg, workspace=workspace, log=log_stderr, name=name, resume=resume)

    run(as_json, work, _render_tune, verbose=verbose)


def _render_tune(summary: TuneSummary) -> None:
    from rich.console import Console
    from rich.table import Table

    cv = summary.cv > 1
    table = Table(title=f"tune {summary.name}: {summary.search} search, scheduler "
                        f"{summary.scheduler}")
    metric = summary.metric
    for column in ("trial", "parameters", "epochs", "stopped early",
                   f"{metric.replace('_', ' ')} (mean ± std)" if cv
                   else f"best {metric.replace('_', ' ')}"):
        table.add_column(column)
    for line in summary.configurations:
        score = "failed" if line["status"] != "ok" else (
            f"{line['cv_mean']:.4f} ± {line['cv_std']:.4f}" if cv
            else f"{line[metric]:.4f}")
        table.add_row(line["trial"], line["params"], str(line["epochs_run"]),
                      "yes" if line["stopped_early"] else "", score)
    console = Console()
    console.print(table)
    console.print(f"{summary.trials} trials, {summary.stopped_early} stopped early, "
                  f"{summary.failed} failed, {summary.trial_epochs} trial-epochs in "
                  f"{summary.wall_seconds} s")
    if summary.registered:
        console.print(f"best: trial {summary.best.trial}, {summary.best_test}, "
                      f"registered {summary.registered.uri}", soft_wrap=True)
    for label, path in (("results", summary.results), ("curves", summary.curves),
                        ("best config", summary.best_config)):
        console.print(f"{label}: {path}", soft_wrap=True)


@app.command()
def pipeline(source: SourceOption = None, config: ConfigOption = None, set_: SetOption = None,
             home: HomeOption = None, force: ForceOption = False,
             as_json: JsonOption = False, verbose: VerboseOption = False,
             tune: TuneFirstOption = False,
             serve: Annotated[bool, typer.Option(
                 "--serve/--no-serve", help="End with a serving check: start the Serve app, "
                                            "classify test images over HTTP, stop.")] = True,
             keep_serving: Annotated[bool, typer.Option(
                 "--keep-serving", help="Leave the app serving (on serve.port) until Ctrl-C.")
             ] = False,
             loop: LoopOption = True, example: ExampleOption = None, label: LabelOption = None,
             task: TaskOption = None) -> None:
    """Run every stage end to end on the configured source (default: the embedded digits).

    data -> [tune] -> train -> register -> evaluate -> promote the first version to production
    -> serve (HTTP predictions on test images) -> the monitoring loop: unshifted traffic ->
    monitor (no drift) -> rotated traffic -> monitor (drift) -> retrain on it -> promote if
    better -> rolling update under load -> stop the app.

    With --example fraud: a transaction table -> Ray Data preprocessors -> the MLP with Ray
    Train and a HistGradientBoosting reference -> threshold for the target precision ->
    register -> serve /v1/fraud/score with the rules engine, score test transactions -> stop.
    """
    workspace = Workspace.at(home)
    chosen = ChosenTask()

    def work() -> PipelineResult:
        from mlsd_ray.serve.control import prepare_ingress
        from mlsd_ray.workflows.pipeline import run_pipeline

        cfg = config_from(config, set_, source, example, label, task)
        prepare_ingress(cfg.serve)  # its Ray starts at the data stage, long before serving
        return run_pipeline(chosen.of(cfg), cfg, workspace, log_stderr, force=force, tune=tune,
                            serve_check=serve or keep_serving, keep_serving=keep_serving,
                            monitor_loop=loop)

    run(as_json, work, lambda result: chosen.task.render_pipeline(result), verbose=verbose)


models_app = typer.Typer(help="The model registry (MLflow): list, show, promote.",
                         no_args_is_help=True, rich_markup_mode="markdown")
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Registered models, their versions (newest first), metrics and aliases."""
    workspace = Workspace.at(home)
    from mlsd_ray.registry import RegisteredModel, list_models

    def render(result: dict[str, list[RegisteredModel]]) -> None:
        if not result["models"]:
            print("no registered models yet: run `mlsd train`")
        for model in result["models"]:
            print(model.name)
            for v in model.versions:
                aliases = f"  @{', @'.join(v.aliases)}" if v.aliases else ""
                print(f"  v{v.version}: {v.describe_scores()}, data {v.data_fingerprint}"
                      f"{aliases}")

    run(as_json, lambda: {"models": list_models(workspace)}, render)


@models_app.command("show")
def models_show(ref: Annotated[str, typer.Argument(help="NAME, NAME/VERSION or NAME@ALIAS")],
                home: HomeOption = None, as_json: JsonOption = False) -> None:
    """One registered version with its tags (metrics, data fingerprint, git commit, schema)."""
    workspace = Workspace.at(home)
    from mlsd_ray.registry import show

    run(as_json, lambda: show(ref, workspace), lambda r: print(json.dumps(r.to_dict(), indent=2)))


@models_app.command("promote")
def models_promote(name: Annotated[str, typer.Argument(help="Registered model name")],
                   version: Annotated[int, typer.Argument(help="Version to point the alias at")],
                   alias: Annotated[str, typer.Option("--alias")] = "production",
                   home: HomeOption = None, as_json: JsonOption = False) -> None:
    """Move an alias (default `production`) to a version."""
    workspace = Workspace.at(home)
    from mlsd_ray.registry import promote

    run(as_json, lambda: promote(name, version, alias, workspace),
         lambda r: print(f"{r.name}@{alias} -> version {r.version}"))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def submit(ctx: typer.Context,
           stage: Annotated[str, typer.Argument(
               help="pipeline | data | train | tune | retrain | deploy")],
           address: Annotated[str | None, typer.Option(
               "--address", help="The cluster's dashboard, http://HEAD:8265 (default "
                                 "$RAY_ADDRESS).")] = None,
           config: ConfigOption = None, set_: SetOption = None, home: HomeOption = None,
           smoke: Annotated[bool, typer.Option(
               "--smoke", help="A tiny fast run of the stage, to check a cluster.")] = False,
           runtime_env: Annotated[Path | None, typer.Option(
               "--runtime-env", help="Runtime env YAML (jobs/runtime-env/KIND.yaml).",
               dir_okay=False)] = None,
           wait: Annotated[bool, typer.Option(
               "--wait", help="Stream the job's log and exit with its outcome (0 succeeded, "
                              "1 failed).")] = False,
           as_json: JsonOption = False) -> None:
    """Run a stage as a Ray job on a cluster: jobs/STAGE.py, with this project as working dir.

    The config (--config, --set) is validated here and sent with the job; --home (or
    $MLSD_HOME) and $MLFLOW_TRACKING_URI are passed on. Arguments after `--` go to the job
    script (e.g. `-- --source folder:/shared/new` for retrain). Without --wait it prints the job
    id and returns.
    """
    from mlsd_ray.cli.submit import check_stage
    from mlsd_ray.cli.submit import submit as submit_job

    # The --set values go along as the job's own --set too: it layers the sent config, then
    # --smoke, then --set, so a user's value wins over the smoke run's, as it does here.
    sets = [arg for override in set_ or [] for arg in ("--set", override)]

    def work() -> dict:
        check_stage(stage)
        return submit_job(stage, address, config_from(config, set_, None),
                          [*sets, *ctx.args], runtime_env, home, smoke, wait, log_stderr)

    def render(summary: dict) -> None:
        print(f"job {summary['job_id']}: {summary['status']}"
              + (f" in {summary['seconds']} s" if summary.get("seconds") else ""))
        if summary.get("result"):
            print(f"result: {json.dumps(summary['result'], default=str)[:2000]}")

    run(as_json, work, render)


# The serving commands live beside the Serve app (mlsd_ray/cli/serve.py).
app.add_typer(serve_app, name="serve")
app.command()(deploy)
app.command()(predict)
# Monitoring and retraining (mlsd_ray/cli/monitor.py).
app.command()(monitor)
app.command(name="simulate-traffic")(simulate_traffic)
app.command()(retrain)


def main() -> None:
    """Console-script entry point."""
    command = typer.main.get_command(app)
    plain_flags(command)
    exit_promptly(command)


if __name__ == "__main__":
    main()
