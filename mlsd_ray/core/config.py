"""Typed configuration: one pydantic model per stage, YAML file first, then `--set a.b=c` overrides.

Unknown keys are errors that name the key (`data.bogus`), so a typo never silently falls back to
a default. The resolved config is written beside every output by the stage that produced it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mlsd_ray.core.errors import InputError


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are rejected, assignments re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AugmentConfig(StrictModel):
    """Training-time augmentation, drawn per sample by `transforms.Augmenter` (not at data prep)."""

    random_shift: int = Field(2, ge=0, description="Pad by N pixels, then random-crop back "
                              "(2 on the 16×16 digits = 1 pixel of the 8×8 originals).")
    hflip: bool = Field(False, description="Random horizontal flip; keep off for digits and text.")
    rotation_deg: float = Field(0.0, ge=0, le=180, description="Random rotation in [-deg, deg].")
    brightness: float = Field(0.0, ge=0, description="Colour jitter: brightness factor spread.")
    contrast: float = Field(0.0, ge=0, description="Colour jitter: contrast factor spread.")


class SyntheticConfig(StrictModel):
    """Shape of the `synthetic[:N]` source: class-specific patterns plus noise (learnable)."""

    num_classes: int = Field(10, ge=2)
    image_size: int = Field(32, ge=4)
    channels: Literal[1, 3] = 3
    noise: float = Field(0.25, ge=0, le=1)


class DataConfig(StrictModel):
    """The data stage: where images come from and how they are validated, resized and split."""

    source: str = Field("digits", description="digits | folder:PATH | parquet:PATH | "
                        "torchvision:NAME[:ROOT] | synthetic[:N]")
    name: str | None = Field(None, description="Dataset name under $MLSD_HOME/datasets/ "
                             "(default: derived from the source).")
    image_size: int | None = Field(None, ge=2, le=4096, description="Output side in pixels "
                                   "(default: the source's natural size; 32 for folder/parquet).")
    channels: Literal[1, 3] | None = Field(None, description="1 (grayscale) or 3 (RGB); "
                                           "default: the source's.")
    val_fraction: float = Field(0.15, ge=0, lt=1)
    test_fraction: float = Field(0.15, ge=0, lt=1)
    seed: int = 0
    class_names: list[str] | None = Field(None, description="Known classes; labels outside "
                                          "them are quarantined as unknown_label.")
    image_column: str = Field("image", description="parquet: column with encoded bytes or arrays.")
    label_column: str = Field("label", description="parquet: column with the label.")
    pixel_range: Literal["auto", "unit", "byte"] = Field(
        "auto", description="Float arrays: unit=[0,1], byte=[0,255], auto=decide per image.")
    min_side: int = Field(2, ge=1, description="Images with a side below this are quarantined.")
    rows_per_task: int = Field(1024, ge=1, description="Files or rows per Ray Data task.")
    torchvision_split: Literal["train", "test"] = "train"
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self) -> DataConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must be below 0.9")
        return self


class ModelConfig(StrictModel):
    """Which network to train (see mlsd_ray.tasks.image.models)."""

    name: str = Field("seed_cnn", description="seed_cnn | resnet18 (small-image stem) | "
                      "resnet18_imagenet (the standard stem, for images of 64 px and up)")
    dropout: float = Field(0.0, ge=0, lt=1)


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
                          "val accuracy; 0 = never.")
    keep_checkpoints: int = Field(2, ge=1, description="Best checkpoints kept, by val accuracy.")
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
    model_name: str | None = Field(None, description="Registered name (default: "
                                   "<dataset>-cnn, e.g. digits-cnn).")


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
    cv: int = Field(1, ge=1, le=20, description="K>1: K stratified folds of train+val per "
                    "configuration, ranked by the mean val accuracy.")
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
    """What each model replica records per request, for `mlsd monitor` (see monitor/predlog.py)."""

    enabled: bool = True
    uri: str | None = Field(None, description="Folder or URI for the parquet files (default "
                            "$MLSD_HOME/predictions).")
    flush_rows: int = Field(256, ge=1, description="Write a file once this many rows wait.")
    flush_seconds: float = Field(5.0, gt=0, description="... or once the oldest waited this long.")
    max_buffered_rows: int = Field(20000, ge=1, description="Rows beyond this are dropped (and "
                                   "counted), so logging can never exhaust a replica's memory.")


class ServeConfig(StrictModel):
    """Serving with Ray Serve: the HTTP app, batching, autoscaling and request routing."""

    model: str = Field("models:/digits-cnn@production", description="models:/NAME@ALIAS, "
                       "models:/NAME/VERSION or a checkpoint directory.")
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
        "pow2", description="How a request finds a model replica (Serve's proxy picks it in "
        "the single topology, the ingress in the split one).")
    ingress: Literal["proxy", "haproxy"] = Field(
        "proxy", description="What takes HTTP requests. proxy: Serve's Python proxy, which "
        "routes each request with `router`. haproxy: HAProxy (the binary ray[serve] installs) "
        "forwards straight to each replica's own HTTP server, about 6x the requests/s of the "
        "proxy on 2 cores (docs/benchmarks.md); it balances by least connections itself, so "
        "`router` stays pow2, and the replicas' ports listen on all interfaces. Applies to a "
        "Ray that mlsd starts; a cluster needs RAY_SERVE_ENABLE_HA_PROXY=1 where it starts.")
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

    @model_validator(mode="after")
    def _haproxy_balances_itself(self) -> ServeConfig:
        if self.ingress == "haproxy" and self.router != "pow2":
            raise ValueError(f"serve.router={self.router} needs serve.ingress=proxy: with "
                             "serve.ingress=haproxy, HAProxy picks the replica itself (least "
                             "connections)")
        return self


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


class ColumnRule(StrictModel):
    """How one table column is prepared; unset keys take the defaults for its kind."""

    kind: Literal["numeric", "categorical"] | None = Field(None, description="Default: by "
                                                           "dtype (numbers are numeric).")
    impute: Literal["mean", "median", "most_frequent", "constant", "iterative", "none"] | None \
        = None
    fill_value: float | str | None = Field(None, description="impute: constant.")
    scale: Literal["standard", "minmax", "robust", "log", "none"] | None = None
    encode: Literal["onehot", "ordinal"] | None = None


class ThresholdConfig(StrictModel):
    """How the decision threshold on a binary model's score is chosen (on the val split)."""

    objective: Literal["target_precision", "target_recall", "min_cost", "fixed"] = Field(
        "target_precision", description="target_precision: the highest recall whose precision "
        "reaches `target`; target_recall: the highest precision whose recall reaches it; "
        "min_cost: the lowest expected cost; fixed: `value`.")
    target: float = Field(0.8, gt=0, le=1, description="The precision or recall to reach.")
    cost_false_negative: float = Field(50.0, ge=0, description="min_cost: a missed fraud.")
    cost_false_positive: float = Field(1.0, ge=0, description="min_cost: a false alarm.")
    value: float = Field(0.5, ge=0, le=1, description="fixed: the threshold itself.")


class TabularConfig(StrictModel):
    """Tables (the fraud example): source, per-column preparation, the MLP, the decision."""

    source: str = Field("fraud-synth", description="fraud-synth[:N] | breast-cancer | "
                        "diabetes | csv:PATH | parquet:PATH")
    label: str | None = Field(None, description="Label column (default: the source's own; "
                              "required for csv/parquet).")
    task: Literal["auto", "binary", "multiclass", "regression"] = Field(
        "auto", description="auto: regression for a float label with many values, else "
        "binary or multiclass by the number of classes.")
    drop_columns: list[str] = Field(default_factory=list, description="Columns never used "
                                    "as features (ids, timestamps).")
    numeric_impute: Literal["mean", "median", "most_frequent", "constant", "iterative",
                            "none"] = "median"
    numeric_scale: Literal["standard", "minmax", "robust", "log", "none"] = "standard"
    categorical_impute: Literal["most_frequent", "constant", "none"] = "constant"
    categorical_encode: Literal["onehot", "ordinal"] = "onehot"
    columns: dict[str, ColumnRule] = Field(default_factory=dict, description="Per-column "
                                           "rules over the defaults above.")
    hidden: list[int] = Field(default_factory=lambda: [64, 32], description="MLP layer widths.")
    dropout: float = Field(0.1, ge=0, lt=1)
    class_weight: Literal["balanced", "none"] = Field("balanced", description="balanced: "
                                                      "each class weighs n / (k × its count).")
    baseline: bool = Field(True, description="Also fit scikit-learn's HistGradientBoosting on "
                           "the same split, as a reference row.")
    threshold: ThresholdConfig = Field(default_factory=ThresholdConfig)
    rules: str | None = Field(None, description="Rules YAML for the fraud endpoint (default: "
                              "the example's mlsd_ray/examples/fraud-rules.yaml).")
    on_missing_column: Literal["impute", "reject"] = Field(
        "impute", description="A served record without a feature column.")
    on_extra_column: Literal["ignore", "reject"] = "ignore"
    on_unseen_category: Literal["ignore", "reject"] = Field(
        "ignore", description="ignore: a category never seen in training encodes as none.")
    on_nan: Literal["impute", "reject"] = Field("impute", description="A null or NaN value.")
    decline_above: float | None = Field(None, gt=0, le=1, description="Scores at or above "
                                        "this are declined, from the threshold up to it "
                                        "reviewed (default: halfway from the threshold to 1).")


class Config(StrictModel):
    """The whole configuration; later stages add their sections here."""

    task: str = Field("image", description="The kind of model: image (the CNN on the data "
                      "section), tabular (the MLP on the tabular one), a task an installed "
                      "package registers (entry point group mlsd.tasks), or "
                      "package.module:Class (docs/tasks.md).")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    tabular: TabularConfig = Field(default_factory=TabularConfig)

    @field_validator("task")
    @classmethod
    def _task_loads(cls, name: str) -> str:
        """A task that cannot be found or does not implement the interface fails here, with
        the registry's sentence (exit 2), rather than in the middle of a stage."""
        from mlsd_ray.tasks.registry import check_task_name

        try:
            return check_task_name(name)
        except InputError as exc:
            raise ValueError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                example: str | None = None) -> Config:
    """Read YAML (if given), apply `--set` overrides in order, validate; InputError if bad.

    `example` (fraud) starts from that worked example's config (mlsd_ray/examples/), under
    the file and the overrides."""
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
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        raise InputError(describe_errors(exc)) from exc


def dump_yaml(config: Config) -> str:
    """The resolved config as YAML, ready for `--config`."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
