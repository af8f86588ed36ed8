"""Live tracking: the MLflow run of a training is open while it trains.

It starts before the fit with the run's params and its dataset (an MLflow input whose digest
is the dataset's fingerprint), takes each epoch's metrics from the driver as the epoch lines
arrive (training/progress.py), and ends FAILED (an error) or KILLED (Ctrl-C) with what it had
when training does not finish. On success the training stage registers the model from it
(`register_trained`, with the task's `Registration`).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.registry import RegisteredVersion

__all__ = ["LiveRun", "LiveSearch", "register_trained", "Registration", "registration_run"]


class LiveRun:
    """`with LiveRun(workspace, run_name, params, dataset_path, fingerprint, dataset_name) as run:`
    ... fit with `observe=run.log_epoch`; the run is the active MLflow run inside the block.

    Disabled (`enabled=False`: a training that is not registered), it does nothing."""

    def __init__(self, workspace: Workspace, run_name: str, params: dict[str, Any],
                 dataset_path: str, fingerprint: str, dataset_name: str,
                 enabled: bool = True):
        self.workspace, self.run_name, self.params = workspace, run_name, params
        self.dataset = (dataset_path, fingerprint, dataset_name)
        self.enabled, self.run_id = enabled, None
        self._warned = False

    def __enter__(self) -> LiveRun:
        if not self.enabled:
            return self
        import mlflow

        from mlsd_ray.registry import client

        self.client = client(self.workspace)
        run = mlflow.start_run(run_name=self.run_name)
        self.run_id = run.info.run_id
        mlflow.log_params(self.params)
        mlflow.log_input(_dataset(*self.dataset), context="training")
        return self

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One report's numbers at step = its epoch. Called from the relay thread, so by run
        id (MLflow's active run is per thread); a store that refuses costs a warning, never
        the training."""
        if self.run_id is None:
            return
        step = int(metrics.get("epoch", 0))
        try:
            self.client.log_batch(self.run_id, metrics=_epoch_metrics(metrics))
        except Exception as exc:  # tracking is a record of the training, not a part of it
            if not self._warned:
                log_stderr(f"MLflow did not take epoch {step}'s metrics: {exc}")
                self._warned = True

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.run_id is None:
            return
        import mlflow

        mlflow.end_run(_status(exc_type))


def _epoch_metrics(report: dict[str, Any], skip: tuple[str, ...] = ()) -> list:
    """A report's numbers as MLflow metrics at step = its epoch (the epoch itself, booleans,
    text and keys starting with one of `skip` left out)."""
    from mlflow.entities import Metric

    stamp, step = int(time.time() * 1000), int(report.get("epoch", 0))
    return [Metric(key, float(value), stamp, step) for key, value in report.items()
            if key != "epoch" and not key.startswith(skip)
            and isinstance(value, (int, float)) and not isinstance(value, bool)]


def _status(exc_type) -> str:
    """How a tracked run ended: FINISHED, KILLED (Ctrl-C, an interrupted search) or FAILED."""
    from mlsd_ray.core.errors import Interrupted

    if exc_type is None:
        return "FINISHED"
    return "KILLED" if issubclass(exc_type, (KeyboardInterrupt, Interrupted)) else "FAILED"


def _dataset(path: str, fingerprint: str, name: str):
    """The prepared dataset as an MLflow input: where it is, and its fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    # MLflow registers its local-file source twice (for "" and "file://" paths) and warns
    # that a local path matches both; they are the same class, so the warning says nothing.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The specified dataset source can be "
                                                  "interpreted in multiple ways")
        source = resolve_dataset_source(path)
    return MetaDataset(source, name=name, digest=fingerprint[:36])


class LiveSearch:
    """The MLflow run of a Tune search, open while it searches, with a child run per trial
    that `trial_callback()` (a Tune callback, run in the driver) opens when the trial starts,
    feeds each reported epoch, and ends FINISHED or FAILED with the trial. `write_outputs`
    (tuning/report.py) adds the best trial's score and registers its model into it."""

    def __init__(self, workspace: Workspace, name: str, params: dict[str, Any]):
        self.workspace, self.name, self.params = workspace, name, params
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.trial_runs: dict[str, str] = {}  # Tune's trial id -> its MLflow run id
        self._client = None

    @property
    def client(self):
        """An MlflowClient on our store, made when first needed: Tune saves its callbacks
        with the search's state, and a client (a database engine) does not pickle."""
        if self._client is None:
            from mlsd_ray.registry import client

            self._client = client(self.workspace)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __enter__(self) -> LiveSearch:
        import mlflow

        from mlsd_ray.registry import EXPERIMENT

        self.experiment_id = self.client.get_experiment_by_name(EXPERIMENT).experiment_id
        run = mlflow.start_run(run_name=self.name, experiment_id=self.experiment_id)
        self.run_id = run.info.run_id
        mlflow.log_params(self.params)
        mlflow.set_tags({"mlsd.kind": "tune"})
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        import mlflow

        for run_id in self.trial_runs.values():  # trials an interrupt left running
            if self.client.get_run(run_id).info.status == "RUNNING":
                self.client.set_terminated(run_id, "KILLED")
        mlflow.end_run(_status(exc_type))

    def trial_callback(self, describe):
        """A Tune callback: `describe(config)` names a trial's parameters."""
        from mlflow.entities import Param
        from ray.tune import Callback

        search = self
        tunes_own = ("time_", "timestamp", "training_iteration", "pid",
                     "iterations_since_restore")  # Tune's bookkeeping, not the trial's

        class TrialRuns(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                run = search.client.create_run(
                    search.experiment_id, run_name=f"trial {describe(trial.config)}",
                    tags={"mlflow.parentRunId": search.run_id, "tune.trial_id": trial.trial_id})
                search.trial_runs[trial.trial_id] = run.info.run_id
                search.client.log_batch(run.info.run_id, params=[
                    Param(k, str(v)[:500]) for k, v in trial.config.items()])

            def on_trial_result(self, iteration, trials, trial, result, **info):
                run_id = search.trial_runs.get(trial.trial_id)
                if run_id is not None:
                    search.client.log_batch(run_id, metrics=_epoch_metrics(result, tunes_own))

            def on_trial_complete(self, iteration, trials, trial, **info):
                if trial.trial_id in search.trial_runs:
                    search.client.set_terminated(search.trial_runs[trial.trial_id], "FINISHED")

            def on_trial_error(self, iteration, trials, trial, **info):
                if trial.trial_id in search.trial_runs:
                    search.client.set_terminated(search.trial_runs[trial.trial_id], "FAILED")

        return TrialRuns()


@contextlib.contextmanager
def registration_run(run_name: str, params: dict[str, Any], checkpoint_dir: str, live: bool,
                     nested: bool = False) -> Iterator[Any]:
    """The MLflow run a trained model is registered from: the active run when it tracked the
    training live (`LiveRun`), else one opened here (a child of the active run when `nested`:
    a search's best trial) with the params and the training's history replayed into it."""
    import mlflow

    from mlsd_ray.training.checkpoint import load_train_state

    if live:
        yield mlflow.active_run()
        return
    with mlflow.start_run(run_name=run_name, nested=nested) as run:
        mlflow.log_params(params)
        for entry in load_train_state(checkpoint_dir)["history"]:
            mlflow.log_metrics({k: v for k, v in entry.items() if k != "epoch"},
                               step=int(entry["epoch"]))
        yield run


@dataclass(frozen=True)
class Registration:
    """What registering a trained model records, whatever its task: the run (`params`, the
    test `metrics`, report files under evaluation/), the MLflow Model (`signature`, an
    `input_example`), and the version's tags: the common ones of registry.version_tags
    (`score_name` on val and test, the data, the `schema`) and the task's own (`tags`)."""

    task: str
    model_name: str
    run_name: str
    checkpoint: str
    params: dict[str, Any]
    score_name: str
    val_score: float
    test_score: float
    best_epoch: int
    architecture: str
    dataset: str
    fingerprint: str
    schema: dict[str, Any]
    signature: Any
    input_example: Any
    metrics: dict[str, float]
    description: str
    tags: dict[str, str] = field(default_factory=dict)
    reports: tuple[str, ...] = ()


def register_trained(registration: Registration, workspace: Workspace, live: bool = False,
                     nested: bool = False) -> RegisteredVersion:
    """Log the trained model into its run and register its checkpoint as the next version of
    `registration.model_name`. `live`: the run is the active one (`LiveRun`, fed each epoch
    while it trained); else one is opened here (a child of the active run when `nested`: a
    search's best trial) with the params and the history replayed."""
    import mlflow

    from mlsd_ray.registry import client, log_checkpoint_model, new_version, version_tags

    r = registration
    mlflow_client = client(workspace)  # first: it points MLflow at the workspace's store
    tags = {**version_tags(task=r.task, run_name=r.run_name, score_name=r.score_name,
                           val_score=r.val_score, test_score=r.test_score,
                           best_epoch=r.best_epoch, model=r.architecture, dataset=r.dataset,
                           fingerprint=r.fingerprint, schema=r.schema), **r.tags}
    with registration_run(r.run_name, r.params, r.checkpoint, live, nested) as run:
        mlflow.log_metrics(r.metrics)
        mlflow.set_tags(tags)
        log_checkpoint_model(r.checkpoint, r.signature, r.input_example)
        for report in r.reports:
            mlflow.log_artifact(report, artifact_path="evaluation")
        run_id = run.info.run_id
    return new_version(mlflow_client, r.model_name, run_id, tags, r.description)
