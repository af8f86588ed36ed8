"""The model registry, on MLflow: runs with params, per-epoch metrics and the model as
artifacts; registered versions with their metrics, data fingerprint, git commit and schema;
aliases (`production`, `staging`) that move in one call. Every version is an MLflow Model
(pyfunc.py) that carries our checkpoint, so plain MLflow loads it and our loaders read the
same artifact. Every task registers through `tracking.register_trained`, given its typed
`Registration`.

The store is `sqlite:///$MLSD_HOME/mlflow.db` with artifacts in `$MLSD_HOME/mlflow-artifacts`
unless `MLFLOW_TRACKING_URI` names a server (what a multi-node cluster needs).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mlsd_ray.core.crash_points import crash_point
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import USER_TRACKING_URI, Workspace

__all__ = ["ARTIFACT_DIR", "CHECKPOINT", "checkpoint_in", "client", "EXPERIMENT", "flat_params",
           "git_commit", "list_models", "log_checkpoint_model", "log_evaluation", "ModelVersion",
           "new_version", "parse_model_ref", "pin", "PinnedModel", "promote", "promote_first",
           "Promotion", "RegisteredModel", "RegisteredVersion", "resolve", "SERVER_SCHEMES",
           "show", "task_package", "version_tags"]

EXPERIMENT = "mlsd"
ARTIFACT_DIR = "checkpoint"  # the run's artifact folder that a version is registered from
CHECKPOINT = "checkpoint"  # the MLflow Model's artifact key for our checkpoint folder
SERVER_SCHEMES = ("http://", "https://", "databricks")  # MLflow servers, not databases


@dataclass(frozen=True)
class PinnedModel:
    """A model reference pinned to one version (`pin`) before it is deployed or used (an alias may
    move later): its URI (`models:/NAME/VERSION`, or a checkpoint folder), name, version
    number ("local" for a folder), the registry's metrics, and `path`, the checkpoint on the
    machine that pinned it."""

    uri: str
    name: str
    version: str
    path: str
    metrics: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def checkpoint_here(self, workspace: Workspace) -> str:
        """The checkpoint on this machine: `path` when this machine sees it (the one that
        pinned it, or a shared MLSD_HOME), else the registry's copy, downloaded here.

        Reading `path` needs no MLflow: importing it and querying the store was about
        2.5 s of every Serve replica's start on 2 cores (docs/performance.md)."""
        if os.path.isfile(os.path.join(self.path, "checksums.json")):
            return self.path
        return resolve(self.uri, workspace)


def client(workspace: Workspace):
    """An MlflowClient on our store, with the `mlsd` experiment (artifacts in the workspace)."""
    import logging

    import mlflow

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # schema migrations log at INFO
    store = workspace.tracking_uri
    mlflow.set_tracking_uri(store)
    if USER_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # see USER_TRACKING_URI
    mlflow_client, experiment = _once_the_store_is_set_up()
    if experiment is None:
        # A server decides where its artifacts go. A database has no place for them, and
        # MLflow's default would be ./mlruns in the directory of whichever process created
        # the experiment: they go to the workspace, which every node of a cluster shares.
        artifacts = None if store.startswith(SERVER_SCHEMES) else workspace.mlflow_artifacts
        _unless_another_made_it(lambda: mlflow_client.create_experiment(
            EXPERIMENT, artifact_location=artifacts))
    mlflow.set_experiment(EXPERIMENT)
    return mlflow_client


def _once_the_store_is_set_up(attempts: int = 6):
    """An MlflowClient on the tracking URI set, and the `mlsd` experiment (or None). The first
    client on an empty database creates MLflow's tables, and processes that start together on
    a new PostgreSQL database race to do it: all but one fail (duplicate key
    "alembic_version"). They try again, up to 6 times over about 10 s, and by then find the
    tables the winner made."""
    from mlflow import MlflowClient
    from sqlalchemy.exc import DBAPIError

    def connect():
        mlflow_client = MlflowClient()
        return mlflow_client, mlflow_client.get_experiment_by_name(EXPERIMENT)

    for attempt in range(1, attempts):
        try:
            return connect()
        except DBAPIError:
            time.sleep(0.5 * attempt)
    return connect()  # the last try raises what it meets


def _unless_another_made_it(create: Callable[[], object]) -> None:
    """Create an experiment or a registered model, unless another process just did: several
    drivers on one store (PostgreSQL, a server) may create the same name at once."""
    from mlflow.exceptions import MlflowException

    try:
        create()
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def git_commit() -> str:
    """The commit of the code that trained, when run from a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flat_params(prefix: str, values: dict) -> dict:
    """A config section as run params: `{"train.lr": 0.003, ...}`, nested sections left out."""
    return {f"{prefix}.{k}": v for k, v in values.items() if not isinstance(v, dict)}


def log_checkpoint_model(checkpoint_dir: str, signature, input_example) -> None:
    """Log a checkpoint as an MLflow Model into the active run's ARTIFACT_DIR: MLmodel, the
    model's code (registry/pyfunc.py, "models from code") and the checkpoint itself in
    artifacts/checkpoint, with the task's `signature` and an `input_example`, so plain MLflow
    loads and serves every registered version."""
    import mlflow

    from mlsd_ray import __version__

    requirements, code_paths = task_package(checkpoint_dir)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = os.path.join(scratch, ARTIFACT_DIR)
        # Requirements are given: inferring them runs the model in a subprocess (seconds).
        mlflow.pyfunc.save_model(model_dir, python_model=str(Path(__file__).with_name(
            "pyfunc.py")), artifacts={CHECKPOINT: checkpoint_dir}, signature=signature,
            input_example=input_example, code_paths=code_paths or None,
            pip_requirements=[f"mlsd-ray=={__version__}", *requirements])
        mlflow.log_artifacts(model_dir, artifact_path=ARTIFACT_DIR)


def task_package(checkpoint_dir: str) -> tuple[list[str], list[str]]:
    """What a fresh environment needs, beside mlsd-ray, to load the task that trained the
    checkpoint: the installed distribution that holds the task's module, pinned to its
    version (`churn-tasks==1.2.0`), or, for a module that no installed distribution holds (a
    folder or a file on PYTHONPATH), its code, which MLflow ships with the model
    (`code_paths`). A built-in task needs neither."""
    from importlib.metadata import packages_distributions, version

    from mlsd_ray.core.runtime import unpackaged_code
    from mlsd_ray.tasks import task_of_checkpoint

    module = type(task_of_checkpoint(checkpoint_dir)).__module__
    if module.startswith("mlsd_ray."):
        return [], []
    code = unpackaged_code(module)
    if code:
        return [], [code]
    distributions = packages_distributions().get(module.partition(".")[0], [])
    if distributions:
        return [f"{distributions[0]}=={version(distributions[0])}"], []
    return [], []


def log_evaluation(run_id: str, report_file: str, split: str, workspace: Workspace) -> None:
    """Attach an evaluation (every file of `report_file`'s folder: report, plots) to the
    MLflow run of the version it evaluated, under evaluation/<split>."""
    client(workspace).log_artifacts(run_id, os.path.dirname(report_file), f"evaluation/{split}")


def checkpoint_in(version_dir: str | Path) -> Path:
    """The checkpoint inside a downloaded version: the artifact its MLmodel names (under
    artifacts/), or the folder itself for versions registered before they were MLflow
    Models."""
    import yaml

    version_dir = Path(version_dir)
    if not (version_dir / "MLmodel").is_file():
        return version_dir
    flavor = yaml.safe_load((version_dir / "MLmodel").read_text())["flavors"]["python_function"]
    return version_dir / flavor["artifacts"][CHECKPOINT]["path"]


@dataclass(frozen=True)
class RegisteredVersion:
    """A version the registry just created: the model's name, the version number and the MLflow
    run it was registered from (its metrics, params and evaluation live there)."""

    name: str
    version: int
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "run_id": self.run_id,
                "uri": self.uri}


def version_tags(*, task: str, run_name: str, score_name: str, val_score: float,
                 test_score: float, best_epoch: int, model: str, dataset: str, fingerprint: str,
                 schema: dict) -> dict[str, str]:
    """The tags every registered version carries, whatever its task: the task's name, the
    score that ranks its runs (`score_name`, e.g. accuracy, pr_auc, r2) on val and test, the
    run, the data it trained on, the code's commit and the input/output schema. A task adds
    its own beside them; `ModelVersion` reads these back."""
    return {"task": task, "run_name": run_name, "score_name": score_name,
            "val_score": f"{val_score:.6f}", "test_score": f"{test_score:.6f}",
            "best_epoch": str(best_epoch), "model": model, "dataset": dataset,
            "data_fingerprint": fingerprint, "git_commit": git_commit(),
            "schema": json.dumps(schema)[:5000]}


def new_version(mlflow_client, model_name: str, run_id: str, tags: dict,
                description: str) -> RegisteredVersion:
    """Register the run's checkpoint artifact as the next version (creating the model)."""
    try:
        mlflow_client.get_registered_model(model_name)
    except Exception:  # MlflowException RESOURCE_DOES_NOT_EXIST
        _unless_another_made_it(lambda: mlflow_client.create_registered_model(
            model_name, description=description))
    crash_point("register.artifacts_logged")  # the run is whole; no version points at it yet
    version = mlflow_client.create_model_version(
        model_name, source=f"runs:/{run_id}/{ARTIFACT_DIR}", run_id=run_id, tags=tags)
    return RegisteredVersion(model_name, int(version.version), run_id)


@dataclass(frozen=True)
class ModelVersion:
    """One registered version as the registry reports it (`show`, `promote`, `list_models`):
    its number and aliases, the task that trained it, the metrics and provenance tagged on it
    at registration, the MLflow run it came from and where its artifact lives."""

    name: str
    version: int
    aliases: list[str]
    task: str
    score_name: str | None  # the score the task ranks its runs by: accuracy, pr_auc, r2, ...
    val_score: float | None
    test_score: float | None
    data_fingerprint: str | None
    git_commit: str | None
    run_id: str
    created: int
    source: str
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def metrics(self) -> dict[str, str | float | None]:
        """The task's score tagged at registration, on val and test, and its name."""
        return {"score_name": self.score_name, "val_score": self.val_score,
                "test_score": self.test_score}

    def describe_scores(self) -> str:
        """`val accuracy 0.9926, test accuracy 0.9888`, in the task's own metric."""
        name = self.score_name or "score"
        return f"val {name} {self.val_score}, test {name} {self.test_score}"

    def listed(self) -> dict:
        """A version in `mlsd models list --json`: without the name, tags and URI."""
        return {"version": self.version, "aliases": self.aliases, **self.metrics,
                "task": self.task, "data_fingerprint": self.data_fingerprint,
                "git_commit": self.git_commit, "run_id": self.run_id, "created": self.created,
                "source": self.source}

    def to_dict(self) -> dict:
        """`mlsd models show --json`."""
        return {**self.listed(), "name": self.name, "tags": self.tags, "uri": self.uri}


@dataclass(frozen=True)
class RegisteredModel:
    """A registered model: its aliases ({alias: version}) and versions, newest first."""

    name: str
    aliases: dict[str, str]
    versions: list[ModelVersion]

    def to_dict(self) -> dict:
        return {"name": self.name, "aliases": self.aliases,
                "versions": [v.listed() for v in self.versions]}


@dataclass(frozen=True)
class Promotion:
    """What a pipeline's promotion did: the version now at `production`, or why none moved."""

    promoted: ModelVersion | None = None
    skipped: str | None = None

    def to_dict(self) -> dict:
        return self.promoted.to_dict() if self.promoted else {"skipped": self.skipped}

    def describe(self) -> str:
        if self.promoted is None:
            return str(self.skipped)
        return f"production: models:/{self.promoted.name}@production (version " \
               f"{self.promoted.version})"


def promote_first(registered: RegisteredVersion, workspace: Workspace, log) -> Promotion:
    """A pipeline's promotion: version 1 of a new model becomes `production`; with earlier
    versions the alias stays where the user put it."""
    name = registered.name
    if not show(name, workspace).aliases and registered.version == 1:
        promoted = promote(name, 1, "production", workspace)
        log(f"promoted {name} version 1 to production (the first version)")
        return Promotion(promoted=promoted)
    return Promotion(skipped=f"{name} already has versions; promote one with "
                             "`mlsd models promote`")


def _version(name: str, version, aliases: dict) -> ModelVersion:
    """An MLflow ModelVersion as ours."""
    tags = dict(version.tags)
    return ModelVersion(
        name=name, version=int(version.version),
        aliases=sorted(a for a, v in aliases.items() if int(v) == int(version.version)),
        task=tags.get("task", "image"),
        # versions registered before score_name: images tagged val_accuracy and test_accuracy
        score_name=tags.get("score_name") or ("accuracy" if "val_accuracy" in tags else None),
        val_score=_number(tags.get("val_score", tags.get("val_accuracy"))),
        test_score=_number(tags.get("test_score", tags.get("test_accuracy"))),
        data_fingerprint=tags.get("data_fingerprint"), git_commit=tags.get("git_commit"),
        run_id=version.run_id, created=version.creation_timestamp, source=version.source,
        tags=tags)


def _number(text):
    return float(text) if text not in (None, "") else None


def list_models(workspace: Workspace) -> list[RegisteredModel]:
    """Every registered model with its versions (newest first) and aliases."""
    mlflow_client = client(workspace)
    models = []
    for model in mlflow_client.search_registered_models():
        aliases = dict(model.aliases or {})
        versions = mlflow_client.search_model_versions(f"name='{model.name}'")
        models.append(RegisteredModel(model.name, aliases, sorted(
            (_version(model.name, v, aliases) for v in versions), key=lambda v: -v.version)))
    return models


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """`NAME`, `NAME/VERSION`, `NAME@ALIAS` or the same behind `models:/`."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, None, alias
    name, _, version = ref.partition("/")
    return name, version or None, None


def show(ref: str, workspace: Workspace) -> ModelVersion:
    """One version (by number or alias; the newest when neither is given), with its tags."""
    mlflow_client = client(workspace)
    name, version, alias = parse_model_ref(ref)
    try:
        model = mlflow_client.get_registered_model(name)
        if alias:
            found = mlflow_client.get_model_version_by_alias(name, alias)
        elif version:
            found = mlflow_client.get_model_version(name, version)
        else:
            found = max(mlflow_client.search_model_versions(f"name='{name}'"),
                        key=lambda v: int(v.version))
    except Exception as exc:  # MlflowException: no such model, version or alias
        raise InputError(f"no registered model version {ref!r} in "
                         f"{workspace.tracking_uri}") from exc
    return _version(name, found, dict(model.aliases or {}))


def promote(name: str, version: int, alias: str, workspace: Workspace) -> ModelVersion:
    """Point `alias` at `version` (one atomic update in the store)."""
    mlflow_client = client(workspace)
    show(f"{name}/{version}", workspace)  # a clear error for a missing model or version
    mlflow_client.set_registered_model_alias(name, alias, str(version))
    return show(f"{name}@{alias}", workspace)


def pin(ref: str, workspace: Workspace) -> PinnedModel:
    """Pin a model reference (`models:/NAME[/VERSION|@ALIAS]` or a checkpoint folder) to one
    version before deploying or using it (an alias may move later); its checkpoint is
    downloaded and checked now, so a broken artifact fails here. InputError (exit 2) when the
    reference does not resolve."""
    from mlsd_ray.training.checkpoint import verify

    if ref.startswith("models:/"):
        info = show(ref, workspace)
        return PinnedModel(info.uri, info.name, str(info.version), _local_copy(info, workspace),
                           info.metrics)
    path = os.path.abspath(ref)
    if not os.path.isdir(path):
        raise InputError(f"model {ref!r} is neither models:/NAME[/VERSION|@ALIAS] nor a "
                         "checkpoint directory")
    verify(path)
    return PinnedModel(path, os.path.basename(path), "local", path)


def resolve(ref: str, workspace: Workspace) -> str:
    """A local checkpoint directory for a path or a `models:/NAME/VERSION|@ALIAS` URI.

    Registry artifacts are downloaded once into $MLSD_HOME/registry-cache/NAME/VERSION and
    verified against their checksums on every load (checkpoint.load_model).
    """
    if not ref.startswith("models:/"):
        if not Path(ref).is_dir():
            raise InputError(f"no checkpoint at {ref}")
        return ref
    return _local_copy(show(ref, workspace), workspace)


def _local_copy(info: ModelVersion, workspace: Workspace) -> str:
    """The registry-cache folder of the version `info` (a `show` result), downloaded once."""
    import mlflow

    target = workspace.registry_cache / info.name / str(info.version)
    if (checkpoint_in(target) / "checksums.json").is_file():
        return str(checkpoint_in(target))
    # Download beside the target and rename into place: several Serve replicas may resolve
    # the same version at once, and none may see a half-written folder.
    staging = Path(tempfile.mkdtemp(prefix=f"{info.version}.", dir=_made(target.parent)))
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=info.source, dst_path=str(staging))
        downloaded = staging / ARTIFACT_DIR  # download keeps the artifact folder's name
        os.rename(downloaded if downloaded.is_dir() else staging, target)
    except OSError:
        if not (checkpoint_in(target) / "checksums.json").is_file():  # a real failure
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(checkpoint_in(target))


def _made(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    return directory
