"""The driver side of training, shared by every task: the TorchTrainer (scaling, placement,
checkpoints kept by RANK_METRIC, failures survived, the splits in the workers' memory or
streamed), the checks that fail fast instead of waiting on resources, and the line of a
training error that says what went wrong."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, TrainConfig
from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.training.ingest import STREAMING, IngestPlan

__all__ = ["BestCheckpoint", "check_resources", "failure_message", "fit_best", "fit_to_free_cpus",
           "materialize_splits", "torch_trainer", "where_it_trains"]


def check_resources(cfg: TrainConfig) -> None:
    """Fail in seconds, not hang on pending resources, when the cluster cannot fit the workers."""
    import ray

    total = ray.cluster_resources()
    if cfg.use_gpu and total.get("GPU", 0) < cfg.num_workers:
        raise InputError(f"--use-gpu asks for {cfg.num_workers} GPU(s); the Ray cluster has "
                         f"{total.get('GPU', 0):g}")
    need = cfg.num_workers * cfg.cpus_per_worker
    if total.get("CPU", 0) < need:
        raise InputError(f"{cfg.num_workers} workers × {cfg.cpus_per_worker:g} CPU need {need:g} "
                         f"CPUs; the Ray cluster has {total.get('CPU', 0):g}. Lower "
                         "--num-workers or --cpus-per-worker")


def fit_to_free_cpus(cfg: TrainConfig, log: Callable[[str], None] = log_stderr) -> None:
    """Shrink `cpus_per_worker` (in quarter CPUs) so the workers fit the CPUs that other work,
    such as a running Serve app, leaves free; retraining beside serving on a laptop needs it.
    Without this, Ray Train waits 60 s per attempt for CPUs that never come."""
    import ray

    free = ray.available_resources().get("CPU", 0.0)
    if cfg.use_gpu or free >= cfg.num_workers * cfg.cpus_per_worker:
        return
    share = math.floor(4 * free / cfg.num_workers) / 4
    if share < 0.25:
        raise InputError(f"only {free:g} CPUs are free on the Ray cluster: too few for "
                         f"{cfg.num_workers} training workers; stop other work or lower "
                         "train.num_workers")
    log(f"{free:g} CPUs are free (other work holds the rest): {cfg.num_workers} workers "
        f"× {share:g} CPU")
    cfg.cpus_per_worker = share


def materialize_splits(dataset, splits=("train", "val"),
                       then: Callable | None = None) -> dict:
    """The prepared splits as materialised Ray Datasets, read once (no per-epoch bars);
    `then(ray_dataset)` may add steps (map_batches) before materialising."""
    import ray.data
    from ray.data import DataContext

    context = DataContext.get_current()
    bars, context.enable_progress_bars = context.enable_progress_bars, False
    order, context.execution_options.preserve_order = context.execution_options.preserve_order, True
    try:  # a dataset keeps the context it was made with: no per-epoch bars from the workers
        return {split: (then or (lambda d: d))(
                    ray.data.read_parquet(dataset.split_path(split))).materialize()
                for split in splits}
    finally:
        context.enable_progress_bars = bars
        context.execution_options.preserve_order = order


def torch_trainer(loop: Callable[[dict], None], config: dict, cfg: Config, run_name: str,
                  storage_path: str, plan: IngestPlan, datasets: dict, callbacks: list,
                  log: Callable[[str], None] | None = None):
    """The TorchTrainer every model shares: scaling, placement, checkpoints kept by
    RANK_METRIC, failures survived, and the splits in the workers' memory or streamed from
    `datasets` (as `plan` says; the plan is told to `log`). `train.num_workers: 0` gives the
    InProcessTrainer instead, which runs `loop` in this process (training/local.py)."""
    from ray.data import ExecutionOptions
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from mlsd_ray.training import ray_train_fixes

    # Blocks in a fixed order, dealt to the workers in a fixed way (Ray Data's splitter drops
    # its locality-first dispatch when order is preserved): the same config and seed train the
    # same model, so a tune trial's best.yaml reproduces the trial's accuracy.
    ordered = ExecutionOptions(preserve_order=True)
    config["train_rows"], config["ingest"] = plan.train_rows, plan
    if log:
        log(plan.describe())
    if cfg.train.num_workers == 0:
        from mlsd_ray.training.local import InProcessTrainer

        return InProcessTrainer(loop, config, storage.join(storage_path, run_name),
                                cfg.train.keep_checkpoints, cfg.train.max_failures,
                                datasets if plan.mode == STREAMING else {}, cfg.train.use_gpu,
                                callbacks)
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": 1} if cfg.train.use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources,
                                     placement_strategy=cfg.train.placement_strategy),
        run_config=RunConfig(
            name=run_name, storage_path=storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute=RANK_METRIC,
                                               checkpoint_score_order="max"),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Ray Train v2's RunConfig (mypy sees v1's, which ray.train replaces at import)
            logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
            callbacks=callbacks),
        datasets=datasets if plan.mode == STREAMING else {},
        dataset_config=DataConfig(execution_options=ordered))
    ray_train_fixes.adjust(trainer)
    return trainer


def where_it_trains(cfg: TrainConfig) -> str:
    """How the run is laid out, for its first console line."""
    if cfg.num_workers == 0:
        return "in this process (train.num_workers=0)"
    return f"with {cfg.num_workers} worker(s)"


def failure_message(error: BaseException) -> str:
    """The line of a (Ray-wrapped) training error that says what went wrong."""
    text = str(error)
    for line in text.splitlines():
        if "NonFiniteLossError:" in line:
            return line.split("NonFiniteLossError:", 1)[-1].strip()
    return text.splitlines()[-1] if text else type(error).__name__


@dataclass(frozen=True)
class BestCheckpoint:
    """A finished fit's best checkpoint (by RANK_METRIC: the task's validation score; a
    ray.train.Checkpoint, whose `as_directory` also reads one in remote storage), the metrics
    of the epoch that wrote it, and how many epochs ran."""

    checkpoint: Any
    metrics: dict[str, Any]
    epochs_run: int

    @property
    def path(self) -> str:
        return self.checkpoint.path

    @property
    def epoch(self) -> int:
        return int(self.metrics["epoch"])


def fit_best(trainer, relay) -> BestCheckpoint:
    """Fit `trainer` while `relay` (training/progress.py's EpochRelay, whose callback the
    trainer has) prints and records each epoch; its best checkpoint. A failed training is a
    WorkError that names the failure, not Ray's traceback."""
    from ray.train import TrainingFailedError

    try:
        with relay:
            result = trainer.fit()
    except TrainingFailedError as exc:
        raise WorkError(f"training failed: {failure_message(exc)}") from exc
    checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1][RANK_METRIC])
    return BestCheckpoint(checkpoint, dict(metrics), int(result.metrics["epoch"]))
