"""Typed configuration: one pydantic model per stage, YAML file first, then `--set a.b=c` overrides.

Unknown keys are errors that name the key (`data.bogus`), so a typo never silently falls back to
a default. The resolved config is written beside every output by the stage that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mlsd_ray.core.errors import InputError

__all__ = ["apply_override", "AutoscalingConfig", "Config", "config_tree", "describe_errors",
           "dump_yaml", "EXAMPLES", "EXAMPLES_DIR", "MonitorConfig", "parse_override",
           "PredictionLogConfig", "RegistryConfig", "RetrainConfig", "ServeConfig", "SplitConfig",
           "StrictModel", "TrainConfig", "TuneConfig", "validate_config"]


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SplitConfig(StrictModel):
    """How a task's data stage splits its examples: the shares held out for validation and
    test, and the seed; a task's data section extends it."""

    val_fraction: float = Field(0.15, ge=0, lt=1, description="Held out for validation "
                                "(early stopping, checkpoint ranking, a decision threshold).")
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = Field(0, description="Seeds the split (and generated sources).")

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> SplitConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9")
        return self


class TrainConfig(StrictModel):
    """Distributed training with Ray Train."""

    num_workers: int = Field(2, ge=0, description="Data-parallel workers (DDP replicas), each "
                             "a Ray Train worker; 0 trains in the calling process on all its "
                             "cores, without Ray Train's start-up (one machine, fastest for "
                             "small models).")
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Where the workers go on a multi-node cluster: PACK fills a node "
        "first (fast all-reduce), SPREAD puts them on different nodes (survives a node loss).")
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=1, description="Global batch, split across workers.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(3e-3, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD only.")
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["onecycle", "cosine", "none"] = "onecycle"
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    patience: int = Field(0, ge=0, description="Stop after this many epochs without a better "
                          "validation score (the task's metric); 0 = never.")
    keep_checkpoints: int = Field(2, ge=1, description="Best checkpoints kept, by the "
                                  "validation score.")
    checkpoint_every: int = Field(5, ge=0, description="Checkpoint every N epochs, plus at "
                                  "each new best and at the last epoch; 0 = only those. A "
                                  "failed worker restarts from the latest checkpoint.")
    in_memory_limit_mb: float = Field(1024, ge=0, description="Train and val splits up to "
                                      "this size (together) are loaded into every worker's "
                                      "memory once; larger ones stream through Ray Data each "
                                      "epoch. 0 always streams.")
    max_failures: int = Field(2, ge=0, description="Worker failures survived by restarting "
                              "from the last checkpoint.")
    amp: Literal["auto", "bf16", "fp16", "off"] = Field(
        "auto", description="Mixed precision on GPU (auto = bf16 where supported); off on CPU.")
    channels_last: bool = Field(True, description="GPU only.")
    compile: bool = Field(False, description="torch.compile the model (opt-in).")
    run_name: str | None = Field(None, description="Re-using a name resumes that run.")


class RegistryConfig(StrictModel):
    """Where trained models are registered (MLflow)."""

    auto_register: bool = Field(True, description="Register every `mlsd train` result.")
    model_name: str | None = Field(None, description="Registered name (default: one the task "
                                   "makes from its data, e.g. digits-cnn).")


def _default_space() -> dict[str, Any]:
    return {"train.lr": [0.001, 0.003, 0.01], "train.batch_size": [32, 64]}


class TuneConfig(StrictModel):
    """Hyperparameter search with Ray Tune; each trial runs the training stage's trainer."""

    search: Literal["grid", "random"] = Field("random", description="grid: every combination "
                                              "of the listed values; random: num_samples draws.")
    num_samples: int | None = Field(None, ge=1, description="random: trials (default 8); grid: "
                                    "repeats of the grid (default 1).")
    scheduler: Literal["auto", "asha", "median", "none"] = Field(
        "auto", description="Early stopping of weak trials; auto = asha, or none with cv.")
    grace_period: int = Field(3, ge=1, description="Epochs every trial runs before it can stop.")
    reduction_factor: float = Field(3.0, ge=2, description="ASHA keeps 1/reduction_factor "
                                    "of the trials at each rung.")
    max_epochs: int | None = Field(None, ge=1, description="Epochs per trial (default: "
                                   "train.epochs).")
    max_concurrent: int | None = Field(None, ge=1, description="Trials at once (default: as "
                                       "many as the cluster's CPUs/GPUs fit).")
    workers_per_trial: int = Field(1, ge=1, description="Ray Train workers in each trial.")
    cv: int = Field(1, ge=1, le=20, description="K>1: K folds of train+val per "
                    "configuration (stratified by class, or chained forward in time where the "
                    "task's rows are ordered), ranked by the mean validation score.")
    space: dict[str, Any] = Field(default_factory=_default_space, description="Dotted config "
                                  "key -> list of values, or {loguniform|uniform|randint: "
                                  "[low, high]}.")


class AutoscalingConfig(StrictModel):
    """Replica autoscaling of the model deployment (Serve's autoscaling_config)."""

    min_replicas: int = Field(1, ge=0, description="0 allows scale-to-zero (the first request "
                              "then waits for a cold start).")
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0, description="Requests in flight per "
                                           "replica that autoscaling aims for.")
    upscale_delay_s: float = Field(1.0, ge=0, description="Load must stay high this long "
                                   "before a replica is added (Serve's default is 30).")
    downscale_delay_s: float = Field(30.0, ge=0, description="Load must stay low this long "
                                     "before a replica is removed (Serve's default is 600).")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas and handles "
                                      "report their load (Serve's default is 10).")
    look_back_period_s: float = Field(3.0, gt=0, description="Window the load is averaged "
                                      "over; longer than metrics_interval_s (Serve's default "
                                      "is 30).")

    @model_validator(mode="after")
    def _bounds_in_order(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if self.look_back_period_s <= self.metrics_interval_s:
            raise ValueError("look_back_period_s must be longer than metrics_interval_s")
        return self


class PredictionLogConfig(StrictModel):
    """What each model replica records per request, for `mlsd monitor` (see serve/predlog.py)."""

    enabled: bool = True
    uri: str | None = Field(None, description="Folder or URI for the parquet files (default "
                            "$MLSD_HOME/predictions).")
    flush_rows: int = Field(256, ge=1, description="Write a file once this many rows wait.")
    flush_seconds: float = Field(5.0, gt=0, description="... or once the oldest waited this long.")
    max_buffered_rows: int = Field(20000, ge=1, description="Rows beyond this are dropped (and "
                                   "counted), so logging can never exhaust a replica's memory.")


class ServeConfig(StrictModel):
    """Serving with Ray Serve: the HTTP app, batching, autoscaling and request routing."""

    model: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or "
                              "a checkpoint directory (default: the production alias of the "
                              "model that training this config registers, e.g. "
                              "models:/digits-cnn@production).")
    app_name: str = "mlsd"
    host: str = Field("127.0.0.1", description="HTTP host (fixed when Serve first starts).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port (fixed when Serve first "
                      "starts).")
    max_batch_size: int = Field(32, ge=1, description="Dynamic batching: requests per forward.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to "
                                        "fill.")
    max_ongoing_requests: int = Field(64, ge=1, description="Per model replica; must be >= "
                                      "max_batch_size for batches to fill.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests that may wait for a model replica (all replicas at "
        "max_ongoing_requests) before Serve answers 503 with Retry-After; -1: no bound.")
    request_timeout_s: float | None = Field(
        30.0, gt=0, description="A request not answered after this long in a replica gets "
        "504 with a JSON error; null: no limit.")
    num_cpus: float = Field(0.5, ge=0, description="CPUs per model replica.")
    allow_unauthenticated_writes: bool = Field(
        False, description="Let anyone change the app's decisions over HTTP (PUT /v1/fraud/"
        "policy and /rules) when no MLSD_ADMIN_TOKEN is set; off, such changes are refused "
        "with 403. Only on a network where every client is trusted.")
    health_check_period_s: float = Field(
        2.0, gt=0, description="How often the Serve controller checks each replica; a "
        "replica that died is replaced after at most this long plus its start (Serve's own "
        "default is 10 s).")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per model replica.")
    proxy_location: Literal["EveryNode", "HeadOnly", "Disabled"] = Field(
        "EveryNode", description="Which nodes run an HTTP proxy on `port` (fixed when Serve "
        "first starts). HeadOnly when several Ray nodes share one machine.")
    topology: Literal["single", "split"] = Field(
        "single", description="single: each replica holds the routes and the model (one hop, "
        "the fast path). split: an ingress replica decodes requests and calls model replicas "
        "(one hop more; the model scales apart from decoding, e.g. on GPUs).")
    ingress_num_cpus: float = Field(0.25, ge=0, description="CPUs of the HTTP ingress replica "
                                    "(split topology).")
    router: Literal["pow2", "round_robin", "least_connections", "consistent_hash"] = Field(
        "pow2", description="How a request finds a model replica: Serve's proxy picks it in "
        "the single topology, the ingress in the split one, and with serve.ingress=haproxy "
        "HAProxy's `balance` (pow2: random(2), round_robin: roundrobin, least_connections: "
        "leastconn, consistent_hash: hdr(x-session-id)).")
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="What takes HTTP requests. proxy: Serve's Python proxy, which "
        "routes each request with `router`. haproxy: HAProxy (the binary ray[serve] installs) "
        "forwards straight to each replica's own HTTP server, about 6x the requests/s of the "
        "proxy on 2 cores (docs/benchmarks.md); it balances as `router` says, and the "
        "replicas' ports listen on all interfaces. Applies to a Ray that mlsd starts; a "
        "cluster needs RAY_SERVE_ENABLE_HA_PROXY=1 (and RAY_SERVE_HAPROXY_BALANCE_ALGORITHM) "
        "where it starts.")
    explain_per_second: float = Field(
        2.0, ge=0, description="POST /v1/explain (images: Integrated Gradients and Grad-CAM, "
        "about 35 forward passes per image) and /v1/fraud/explain (tables: Integrated "
        "Gradients per column) answer at most this many requests per second per replica; "
        "past it 429 with Retry-After. 0 turns the routes off (403).")
    runtime: Literal["torch", "onnxruntime"] = Field(
        "torch", description="What runs the network in a model replica: torch (eager), or "
        "onnxruntime: the replica exports the served computation to ONNX when it starts "
        "(as `mlsd export` does) and runs it with ONNX Runtime. Image models only.")
    gcs_redis: str | None = Field(
        None, pattern=r"^[^\s:]+:\d+$", description="host:port of a Redis server that keeps "
        "the Ray head's cluster state (Ray's GCS fault tolerance) for a head that `mlsd serve "
        "--detach` starts: its GCS can then restart while the app goes on answering. Its "
        "password, if any, comes from MLSD_REDIS_PASSWORD. A cluster sets this where it starts "
        "its head (cluster/).")
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)
    max_instances: int = Field(256, ge=1, description="Instances per request, at most.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request bodies above "
                                "this get 413.")
    top_k: int = Field(3, ge=1, description="Probabilities returned per instance.")
    prediction_log: PredictionLogConfig = Field(default_factory=PredictionLogConfig)
    access_log: bool = Field(True, description="Serve's access log line per request, in "
                             "Ray's log files (never on the console). Off saves CPU per "
                             "request; the proxy's setting is fixed when Serve first starts.")

    @model_validator(mode="after")
    def _batches_can_fill(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be >= max_batch_size, or batches "
                             "never fill")
        return self

    def model_ref(self) -> str:
        """`model`; load_config sets it from the task when a config leaves it out, so only a
        bare `serve` section (a `serve run` config) can lack it."""
        if self.model is None:
            raise InputError("serve.model is not set: name the model to serve, "
                             "e.g. model: models:/NAME@production")
        return self.model


class MonitorConfig(StrictModel):
    """`mlsd monitor`: drift and skew thresholds. A feature drifts when the effect is large
    (PSI) and unlikely to be chance (KS p-value); both, so big samples of a tiny shift and
    small samples of noise do not raise alarms."""

    psi_threshold: float = Field(0.2, gt=0, description="Population stability index above "
                                 "which a feature's shift counts as large (0.1 moderate, "
                                 "0.2 major by the usual rule of thumb).")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="Kolmogorov-Smirnov p-value below "
                            "which a feature's shift counts as real.")
    chi2_alpha: float = Field(0.01, gt=0, lt=1, description="Chi-squared p-value for the "
                              "predicted-class distribution against the training labels.")
    min_class_shift: float = Field(0.1, gt=0, le=1, description="... and the total variation "
                                   "distance between the two distributions must reach this.")
    confidence_drop: float = Field(0.05, gt=0, le=1, description="Mean confidence this much "
                                   "below the reference (with KS p < ks_alpha) is a shift.")
    missing_shift: float = Field(0.1, gt=0, le=1, description="Tables: a column's share of "
                                 "missing values this far from training's (with a binomial "
                                 "test p < ks_alpha) is a shift.")
    min_samples: int = Field(30, ge=1, description="Fewer logged predictions: verdict "
                             "'too few' rather than a test on noise.")
    bins: int = Field(10, ge=2, description="Quantile bins of the reference for PSI.")


class RetrainConfig(StrictModel):
    """`mlsd retrain`: how a challenger is trained and when it replaces the champion."""

    mode: Literal["finetune", "scratch"] = Field("finetune", description="finetune starts "
                                                 "from the champion's weights.")
    epochs: int | None = Field(10, ge=1, description="Epochs of the challenger (None: "
                               "train.epochs).")
    lr: float | None = Field(None, gt=0, description="Peak learning rate (None: train.lr "
                             "for scratch, train.lr / 3 for finetune).")
    keep_old_data: bool = Field(True, description="Train on the champion's training data "
                                "plus the new data (else the new data only).")
    margin: float = Field(0.005, ge=0, description="Promote only if the challenger's holdout "
                          "score (the task's: accuracy for images; PR-AUC, macro F1 or R² "
                          "for tables) beats the champion's by more than this.")
    alias: str = Field("production", description="Alias the challenger takes when promoted.")


class Config(StrictModel):
    """The sections every task shares. A task's own sections (the image task's `data` and
    `model`, the tabular task's `tabular`) are fields of the task's subclass of this one
    (`Task.config_class`), so a key of another task's section is an unknown key here."""

    task: str = Field(description="The kind of model: image (the CNN on the data section), "
                      "tabular (the MLP on the tabular one), a task an installed package "
                      "registers (entry point group mlsd.tasks), or package.module:Class "
                      "(docs/tasks.md).")
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_record(cls: type[_C], tree: dict[str, Any]) -> _C:
        """A config that mlsd wrote itself (beside a checkpoint, a dataset or a search), as
        this class (`validate_config` with `stored`)."""
        return validate_config(tree, cls, stored=True)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=c` -> (["a", "b"], value); the value is read as YAML (`1`, `true`, `[1, 2]`)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--set expects KEY=VALUE (e.g. data.seed=1), got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set `tree[path[0]]...[path[-1]] = value`, creating sections; validation comes later."""
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise InputError(f"config key {'.'.join(path)!r}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def describe_errors(error: ValidationError) -> str:
    """Pydantic's errors as one line per problem, each naming the dotted key."""
    lines = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "<root>"
        if item["type"] == "extra_forbidden":
            lines.append(f"unknown config key '{key}'")
        else:
            message = item["msg"].removeprefix("Value error, ")  # our validators' sentences
            lines.append(f"config key '{key}': {message}")
    return "; ".join(lines)


EXAMPLES_DIR = Path(__file__).parents[1] / "examples"  # mlsd_ray/examples
EXAMPLES = ("digits", "fraud")


def _read_tree(path: str | Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError as exc:
        raise InputError(f"config file not found: {path}") from exc
    except yaml.YAMLError as exc:
        raise InputError(f"config file {path} is not valid YAML: {exc}") from exc
    if loaded is not None and not isinstance(loaded, dict):
        raise InputError(f"config file {path} must hold a mapping of sections")
    return loaded or {}


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """`top` over `base`, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict)
                    and isinstance(out.get(key), dict) else value)
    return out


def config_tree(path: str | Path | None = None, overrides: list[str] | None = None,
                example: str | None = None) -> dict[str, Any]:
    """The config as a tree, not validated yet: `example`'s file (mlsd_ray/examples/; the
    digits example is the defaults), then the YAML at `path`, then the `--set` overrides in
    order. `mlsd_ray.tasks.load_config` validates it with the class of the task it names."""
    tree: dict[str, Any] = {}
    if example not in (None, "digits"):
        if example not in EXAMPLES:
            raise InputError(f"unknown example {example!r}; the examples are: "
                             + ", ".join(EXAMPLES))
        tree = _read_tree(EXAMPLES_DIR / f"{example}.yaml")
    if path is not None:
        tree = _merge(tree, _read_tree(path))
    for text in overrides or []:
        apply_override(tree, *parse_override(text))
    return tree


_C = TypeVar("_C", bound=Config)


def validate_config(tree: dict[str, Any], config_class: type[_C], stored: bool = False) -> _C:
    """`tree` as `config_class`; InputError naming each bad or unknown key. `stored`: a config
    that mlsd wrote itself (beside a checkpoint or a dataset), whose sections of other tasks,
    written by earlier versions, are left out rather than refused."""
    if stored:
        tree = {key: value for key, value in tree.items() if key in config_class.model_fields}
    try:
        return config_class.model_validate(tree)
    except ValidationError as exc:
        raise InputError(describe_errors(exc)) from exc


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML, ready for `--config`."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
