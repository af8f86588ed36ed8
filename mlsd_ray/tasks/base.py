"""The task interface: the stage-level operations that differ between kinds of model.

The commands (cli.py), the Ray jobs (jobs.py) and the search (tune.py) hold a `Task` and call
it; none of them asks which task it has. A task prepares its data, builds the Ray Train
trainer a training run or a Tune trial fits, runs the training stage (train, evaluate,
register), runs its pipeline, and prints its own summaries. Operations a task does not offer
raise `InputError` naming the task, so a command fails with exit 2 and a sentence, not a
traceback.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config
from mlsd_ray.core.contracts import MANIFEST
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.explain import ExplanationResult
    from mlsd_ray.export import ExportResult
    from mlsd_ray.monitor.traffic import TrafficReport
    from mlsd_ray.registry import PinnedModel, RegisteredVersion
    from mlsd_ray.serve.control import RunningApp
    from mlsd_ray.workflows.loop import LoopSteps
    from mlsd_ray.workflows.stages import PipelineResult

__all__ = ["DataSummary", "Evaluation", "Log", "OfflinePrediction", "OnlinePrediction",
           "PreparedData", "PreparedFolder", "ServeCheck", "ServedApp", "SmokePrediction", "Task",
           "TrafficRequest", "TrainedModel"]

Log = Callable[[str], None]


@dataclass(frozen=True)
class ServedApp:
    """A task's Ray Serve application and where its routes are, below `route_prefix`.

    `health_path` answers 200 with the served `model_version` once a replica holds the model;
    `model_path` describes the served model (its `uri` and `model_version`); `endpoints` name
    the routes clients call, e.g. {"predict_url": "/v1/predict"}.
    """

    application: Any  # ray.serve.Application
    route_prefix: str
    health_path: str
    model_path: str
    endpoints: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True)
class TrainedModel:
    """What a task's training stage produced, whatever the task: the run, its best checkpoint
    and epoch, the prepared dataset it trained on, and the registered version (with
    registry.auto_register). A task's own result adds its scores to these."""

    run_name: str
    run_path: str
    checkpoint: str
    best_epoch: int
    epochs_run: int
    dataset: str
    wall_seconds: float = 0.0
    registered: RegisteredVersion | None = None

    def model_uri(self) -> str:
        """What to serve or evaluate: the registered version, else the checkpoint folder."""
        return self.registered.uri if self.registered else self.checkpoint

    def test_line(self) -> str:
        """The test-split score in a few words ("test accuracy 0.9926"); a task's result
        knows its metric."""
        return "no test score"

    def describe(self) -> str:
        """The result for a person (`mlsd train` prints it); a task's result adds its scores."""
        lines = [f"run {self.run_name}: best epoch {self.best_epoch} of {self.epochs_run}, "
                 f"{self.wall_seconds:.1f} s", f"checkpoint: {self.checkpoint}"]
        if self.registered:
            lines.append(f"registered: {self.registered.uri}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = {
            "run_name": self.run_name, "run_path": self.run_path, "checkpoint": self.checkpoint,
            "best_epoch": self.best_epoch, "epochs_run": self.epochs_run,
            "wall_seconds": round(self.wall_seconds, 1), "dataset": self.dataset}
        if self.registered:
            plain["registered"] = self.registered.to_dict()
        return plain


@dataclass(frozen=True)
class SmokePrediction:
    """One prediction over HTTP from an app just started: what was sent (`sent`: what it
    is, for a person), what came back, and from which model version."""

    sent: Any
    answer: Any
    model_version: str


@dataclass(kw_only=True)
class OfflinePrediction:
    """What `mlsd predict --model URI --source SPEC` did: where the predictions table went
    (parquet, a `status` per row), how many rows were predicted and how many refused (by
    reason, where the task checks its inputs), the classes predicted, and the model's scores on
    the rows that came with a label (e.g. accuracy, pr_auc or r2)."""

    out: str
    rows: int
    predicted: int
    seconds: float
    labelled: int
    rejected: dict[str, int] | None = None
    predicted_classes: dict[str, int] | None = None
    scores: dict[str, float] = field(default_factory=dict)

    @property
    def rows_per_second(self) -> float | None:
        return round(self.rows / self.seconds, 1) if self.seconds else None

    def to_dict(self) -> dict[str, Any]:
        """`--json`: the counts, then the scores as top-level keys."""
        plain: dict[str, Any] = {"out": self.out, "rows": self.rows,
                                 "predicted": self.predicted}
        if self.rejected is not None:
            plain["rejected"] = self.rejected
        plain.update(labelled=self.labelled, seconds=round(self.seconds, 2),
                     rows_per_second=self.rows_per_second)
        if self.predicted_classes is not None:
            plain["predicted_classes"] = self.predicted_classes
        return {**plain, **self.scores}

    def describe(self) -> str:
        refused = f", refused {self.rejected}" if self.rejected else ""
        scored = f"; on {self.labelled} labelled rows: {self.scores}" if self.scores else ""
        return (f"{self.predicted} of {self.rows} rows predicted in {self.seconds:.2f} s"
                f"{refused} -> {self.out}{scored}")


class OnlinePrediction(ABC):
    """What `mlsd predict --url URL FILE...` got back from the running app: `to_dict()` is
    what `--json` prints (the app's answers as they came, with the URL and the files) and
    `describe()` what a person reads."""

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The answers for `--json`."""

    @abstractmethod
    def describe(self) -> str:
        """One line per file (or input), then the model version that answered."""


@dataclass(kw_only=True)
class ServeCheck(ABC):
    """The pipeline's serve check: the app started on the new model answered test inputs over
    HTTP. Each task adds what it compared; `describe()` is its line in the pipeline's output."""

    url: str
    model_version: str
    seconds_to_healthy: float

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "model_version": self.model_version,
                "seconds_to_healthy": self.seconds_to_healthy}

    @abstractmethod
    def describe(self) -> str: ...


class DataSummary(Protocol):
    """What a task's data stage prepared, as `mlsd data` reports it: `path`, the prepared
    data's folder; `to_dict()` for `--json` (the task's `render_data` prints it for a
    person)."""

    @property
    def path(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class PreparedData(Protocol):
    """What a task's data stage prepared (`Task.prepare`, `Task.open_prepared`), as the shared
    stages use it: where it is (`path`), its `name` and `fingerprint`, each split as parquet
    that Ray Data reads (`split_path`: "train", "val", "test"), and its `summary()` for
    `mlsd data`. A task's own prepared data adds what its trainer reads."""

    @property
    def path(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str: ...

    def split_path(self, split: str) -> str: ...

    def summary(self) -> DataSummary: ...


@dataclass
class PreparedFolder:
    """Prepared data in a folder (or at a URI) that its manifest.json describes: a base for a
    task's own prepared data, with `PreparedData`'s name and fingerprint read from the
    manifest (a versioned record: core/contracts.py `MANIFEST`)."""

    path: str
    manifest: dict
    reused: bool = False

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @classmethod
    def read(cls, path: str, missing: str):
        """The prepared data written earlier at `path` (`reused`); InputError `missing` when
        it holds no manifest.json, or one of a newer format."""
        manifest = storage.join(path, "manifest.json")
        if not storage.exists(manifest):
            raise InputError(missing)
        return cls(path, MANIFEST.read(manifest), reused=True)


class Evaluation(Protocol):
    """What a task's `evaluate` returns: a split's scores and where its report went.
    `mlsd evaluate` prints `describe()`, or `to_dict()` with --json."""

    @property
    def split(self) -> str: ...

    @property
    def report(self) -> str:
        """The report a person opens (report.md)."""
        ...

    def to_dict(self) -> dict[str, Any]: ...

    def describe(self) -> str: ...


@dataclass(frozen=True)
class TrafficRequest:
    """`mlsd simulate-traffic`: what to send, with which shift, and where.

    `shift`, `amount` and `column` mean what the task's traffic module says (images: rotate,
    noise, ...; tables: a shift of one column); `count` 0 sends the whole split; `save` also
    writes the sent inputs with their labels as new labelled data.
    """

    url: str | None
    shift: str = "none"
    amount: float | None = None
    column: str | None = None
    count: int = 200
    split: str = "test"
    seed: int = 0
    batch: int = 8
    concurrency: int = 4
    save: str | None = None


class Task(ABC):
    """One kind of model. Subclass it, set `name` and `metric`, implement the abstract methods.

    `metric` is the validation score (higher is better) that a search ranks trials by and
    that early stopping watches. `cross_validation` says whether `mlsd tune --cv K` applies
    (the task's `cv_folds` builds the folds);
    `registers_best_trial` whether a search registers its best trial's model.
    """

    name: ClassVar[str]
    metric: ClassVar[str]
    # The whole config of a run of this task: the shared sections (core/config.py) plus the
    # task's own, as fields of a subclass of Config. `load_config` validates with it.
    config_class: ClassVar[type[Config]]
    # The task's own config keys a search may vary beside train.* (prefixes, e.g. "model.").
    searchable: ClassVar[tuple[str, ...]] = ()
    cross_validation: ClassVar[bool] = False
    registers_best_trial: ClassVar[bool] = False
    # The pipeline's headings (workflows/pipeline.py): its training stage's name, and whether
    # evaluating on the test split is a stage of its own (False: `train` evaluates already).
    train_stage: ClassVar[str] = "train and register"
    evaluate_stage: ClassVar[bool] = True

    # ------------------------------------------------------------------ configuration

    @abstractmethod
    def set_source(self, cfg, source: str | None, label: str | None = None) -> None:
        """Put `--source SPEC` and `--label COLUMN` where this task keeps them in `cfg`
        (None leaves that one as it is)."""

    def model_name(self, cfg) -> str:
        """The name a training of `cfg` registers its model under: `registry.model_name`, else
        one the task makes from its data (override it to say which; the default is the task's
        name). `serve.model` defaults to this name's production alias."""
        return cfg.registry.model_name or self.name

    # ------------------------------------------------------------------ stages

    @abstractmethod
    def prepare(self, cfg, workspace: Workspace, log: Log,
                force: bool = False) -> PreparedData:
        """The data stage: validate, quarantine, split; returns the prepared data
        (`PreparedData`, plus the attributes the task's trainer reads)."""

    @abstractmethod
    def trainer(self, cfg, prepared, run_name: str, storage_path: str,
                datasets: dict | None = None, callbacks: list | None = None,
                log: Log | None = None):
        """A Ray Train trainer over `prepared` (or Tune's materialised `datasets`)."""

    @abstractmethod
    def search_datasets(self, prepared) -> dict:
        """The splits a search materialises once and hands to every trial's `trainer`."""

    def cv_folds(self, cfg, prepared, k: int) -> list[dict]:
        """`mlsd tune --cv K` (when `cross_validation`): K folds of train+val, each
        {"train": ..., "val": ...} as materialised Ray Datasets for the task's trainer."""
        raise self.not_offered("cross-validation")

    @abstractmethod
    def open_prepared(self, path: str) -> PreparedData:
        """The data stage's output at `path` (a `TrainedModel.dataset`), as `prepare`
        returns it."""

    @abstractmethod
    def train(self, cfg, workspace: Workspace, log: Log, run_name: str | None = None,
              prepared: Any = None) -> TrainedModel:
        """The training stage: train on `prepared` (None: prepare `cfg`'s data first),
        evaluate, register (as configured). Returns a `TrainedModel`, or the task's own
        subclass of it with its scores."""

    def serve_check(self, cfg, trained: TrainedModel, workspace: Workspace,
                    keep_serving: bool, log: Log,
                    then: Callable[[str, str], LoopSteps] | None = None
                    ) -> tuple[ServeCheck, LoopSteps | None]:
        """The pipeline's serve stage: start the app on `trained.model_uri()` (on a free port
        unless `keep_serving`: see serve/control.py `app_for_a_check`), check its answers over
        HTTP; `then(url, served_uri)` (the monitoring loop) runs while it is up, and its
        result is returned beside the check."""
        raise self.not_offered("serve check")

    def serve_application(self, settings, model: PinnedModel, workspace: Workspace) -> ServedApp:
        """The Serve application for `model`, pinned to one version (`model.path`: its
        checkpoint on this machine; replicas load it with `model.checkpoint_here(workspace)`);
        `settings` is the `serve` config section, with `settings.model` = `model.uri`."""
        raise self.not_offered("serve")

    def predictor(self, checkpoint_dir: str) -> Callable[[Any], Any]:
        """What the registered MLflow Model runs (mlsd_ray/registry/pyfunc.py): the model in
        `checkpoint_dir` loaded once, as a function from a batch in the form of the version's
        signature to the answers the task's Serve app gives for it."""
        raise self.not_offered("MLflow model")

    def evaluate(self, checkpoint_dir: str, split: str, workspace: Workspace,
                 dataset_path: str | None = None) -> Evaluation:
        """Score the model in `checkpoint_dir` on a split of the dataset it was trained on
        (or of `dataset_path`); write the report in the workspace (`Workspace.report`)."""
        raise self.not_offered("evaluate")

    def explain(self, checkpoint_dir: str, source: str | None, label: str | None, count: int,
                out: str | None, workspace: Workspace) -> ExplanationResult:
        """`mlsd explain`: attributions for `count` inputs (the model's test split, or
        `source`; with `label`, of that class only), drawn and checked for sanity
        (mlsd_ray/explain), written into `out`."""
        raise self.not_offered("explain")

    def export(self, checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
               model_uri: str, workspace: Workspace) -> ExportResult:
        """`mlsd export`: the served computation of the model in `checkpoint_dir` as `fmt`
        (mlsd_ray/export: onnx or torchscript; `quantize` int8) with a metadata JSON in
        `out`, checked against PyTorch on the test split, registered beside `model_uri`."""
        raise self.not_offered("export")

    def predict_offline(self, model: PinnedModel, cfg, out: str | None, workspace: Workspace,
                        log: Log) -> OfflinePrediction:
        """`mlsd predict --model URI --source SPEC`: every input of the task's source in `cfg`
        predicted by `model` (pinned to one version), written as parquet under `out` with the
        prediction-log columns and a `status` per row."""
        raise self.not_offered("predict")

    def predict_online(self, url: str, files: list) -> OnlinePrediction:
        """`mlsd predict --url URL FILE...`: the files' inputs sent to the running app."""
        raise self.not_offered("predict --url")

    def simulate_traffic(self, prepared, request: TrafficRequest) -> TrafficReport:
        """Send (or save) held-out inputs of `prepared` to a running app, with a shift
        (sending through `monitor.traffic.deliver`)."""
        raise self.not_offered("simulate-traffic")

    # A retrain (retrain.py owns the gate) asks the champion's task for these three.

    def retrain_data(self, cfg, champion_dir: str, source: str, workspace: Workspace, log: Log):
        """The new data `source` prepared in the champion's form (InputError when its labels
        differ), and the champion's data plus the new: a `retrain.RetrainData`."""
        raise self.not_offered("retrain")

    def train_challenger(self, cfg, data, init_from: str | None, workspace: Workspace,
                         log: Log) -> TrainedModel:
        """Train on `data.combined` (from the weights in `init_from`, when given) and register
        it: the result's `registered` is the challenger."""
        raise self.not_offered("retrain")

    def holdout_scores(self, checkpoint_dir: str, parts: dict) -> dict:
        """The score (higher is better) of the model in `checkpoint_dir` on the test split of
        each of `parts` (name: prepared data), and on all of them pooled under "holdout": a
        `retrain.HoldoutScore` naming its metric for each. Load the model and predict each
        split once."""
        raise self.not_offered("retrain")

    def register_best_trial(self, run, best: dict, best_cfg, workspace: Workspace,
                            log: Log) -> TrainedModel:
        """Register a search's best trial (`best`: its row, with its `checkpoint`; `run`: the
        search, with its `dataset`) as a version, logged as a child of the active MLflow run:
        the trial's `TrainedModel`, scored on test, with its `registered` version. Called when
        `registers_best_trial`."""
        raise self.not_offered("tune registration")

    def drift_drill(self, prepared, incoming: str):
        """What the pipeline's monitoring loop sends to show drift: a `workflows.loop.DriftDrill`
        with the shifted traffic from `prepared` (saved, labelled, under the folder `incoming`)
        and the source spec that retraining reads it from."""
        raise self.not_offered("monitoring loop")

    def smoke_retrain_source(self, workspace: Workspace, log: Log) -> str:
        """`retrain --smoke`'s new labelled data: written in the workspace, returned as a source."""
        raise self.not_offered("retrain")

    def smoke_prediction(self, served: RunningApp) -> SmokePrediction:
        """One prediction from the app `control.start` just started (`served`: where it
        answers, and its endpoints); what was sent and what came back."""
        raise self.not_offered("deploy --smoke")

    # ------------------------------------------------------------------ the console

    @abstractmethod
    def render_data(self, summary: DataSummary) -> None:
        """Print the data stage's summary for a person."""

    @abstractmethod
    def render_pipeline(self, result: PipelineResult) -> None:
        """Print what the pipeline did, stage by stage, for a person."""

    # ------------------------------------------------------------------ helpers

    @classmethod
    def missing_parts(cls) -> list[str]:
        """What the class still lacks beyond the abstract methods, each as "part: what it is
        for" (a task built from parts names its missing parts); [] when it is complete."""
        return []

    def not_offered(self, operation: str) -> InputError:
        """The error for an operation this task does not have (exit 2 on the CLI)."""
        return InputError(f"the {self.name} task has no {operation} stage yet")
