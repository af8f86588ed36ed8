"""The training loop every task runs inside each Ray Train worker (or a one-worker Tune
trial's process): `run_epochs`.

It owns what does not depend on the kind of model: the replica (seed, fine-tuning weights,
memory format, DDP, compile), the optimizer and per-step schedule, resuming from Ray's latest
checkpoint, the shuffled per-worker batches, early stopping, when to checkpoint, the check
that every replica holds the same weights, the per-phase timers, and the reports. A task
supplies an `EpochTask` (the CNN's in tasks/image/train.py, the MLP's in
tasks/tabular/train.py): its model, one pass of training and of validation, and how the
epoch is scored and what its checkpoint keeps.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, cast

import torch

from mlsd_ray.core.config import TrainConfig
from mlsd_ray.core.memory import reuse_freed_memory
from mlsd_ray.training.checkpoint import (
    RANK_METRIC,
    load_train_state,
    save_checkpoint,
    unwrap,
)
from mlsd_ray.training.host import current
from mlsd_ray.training.ingest import WorkerData

__all__ = ["all_reduce_sums", "checkpoint_due", "distributed", "EpochClock", "EpochScores",
           "EpochTask", "fast_forward", "NonFiniteLossError", "optimizer_for",
           "quiet_train_reports", "replicas_in_sync", "restore", "run_epochs", "scheduler_for",
           "should_stop", "train_pass", "worker_nodes"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf: training cannot continue from here."""


@dataclass
class EpochScores:
    """One epoch's results over every worker, as the task scores them.

    `score` is the task's validation metric (higher is better: it ranks checkpoints and
    drives early stopping); `samples` the training samples all workers saw; `extra` more
    metrics for the epoch's report (e.g. train_accuracy); `outputs` what this epoch's
    checkpoint keeps from validation (for a later drift check)."""

    train_loss: float
    val_loss: float
    score: float
    samples: float
    extra: dict[str, float] = field(default_factory=dict)
    outputs: Any = None


class EpochTask(ABC):
    """What one kind of model does inside a training worker; `run_epochs` does the rest.

    Built in the worker from the loop's `config` (plain data from the driver). `val_metric`
    names `EpochScores.score` in the reports, `throughput_metric` the samples per second,
    `nan_advice` what to change when the loss stops being finite, besides the learning rate.
    """

    val_metric: ClassVar[str]
    throughput_metric: ClassVar[str]
    nan_advice: ClassVar[str] = ""

    def __init__(self, config: dict):
        self.config = config

    @abstractmethod
    def build_model(self) -> torch.nn.Module:
        """The network, on the CPU, with freshly seeded weights."""

    def start(self, host, cfg: TrainConfig) -> None:
        """Set-up after the per-worker seed, before the first epoch (devices, augmentation)."""

    def val_batch_size(self, train_batch_size: int) -> int:
        return train_batch_size

    @abstractmethod
    def train_epoch(self, model: torch.nn.Module, batches: Iterable[dict],
                    optimizer: torch.optim.Optimizer, scheduler) -> Any:
        """One pass over this worker's training batches (the scheduler steps per batch);
        raises NonFiniteLossError when the loss is NaN or inf."""

    @abstractmethod
    def validate(self, model: torch.nn.Module, batches: Iterable[dict], rank: int) -> Any:
        """One pass over this worker's validation batches, without gradients."""

    @abstractmethod
    def scores(self, trained: Any, validated: Any, device: torch.device) -> EpochScores:
        """The epoch's results over every worker (a collective: every worker calls it)."""

    @abstractmethod
    def checkpoint_contents(self, scores: EpochScores) -> tuple[dict, dict[str, dict]]:
        """On rank 0, for a checkpoint of this epoch: what to add to the drift reference,
        and extra JSON files ({file name: content})."""


def train_pass(model: torch.nn.Module, batches: Iterable[dict], optimizer: torch.optim.Optimizer,
               scheduler, loss_of) -> tuple[float, int]:
    """One plain pass of training (no mixed precision): for each batch `loss_of(model, batch)`
    gives the mean loss and the batch's size; a backward step, the optimizer and the per-step
    schedule follow. The loss total and the samples seen; NonFiniteLossError when the loss is
    NaN or inf."""
    model.train()
    total, seen = 0.0, 0
    for batch in batches:
        loss, size = loss_of(model, batch)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"the training loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        total, seen = total + loss.item() * size, seen + size
    return total, seen


def optimizer_for(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)


def scheduler_for(optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Per-step schedules, so a resumed run continues the same curve."""
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    return None


def quiet_train_reports() -> None:
    """Ray Train logs every report at INFO under a logger named by its file path, which
    LoggingConfig's level does not reach; our own per-epoch line says the same, shorter."""
    import ray.train.v2._internal.execution.context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_sums(values: list[float], device: torch.device) -> list[float]:
    """Sum per-worker totals across the DDP group (a no-op with one worker).

    Tensors live on the training device: NCCL only reduces CUDA tensors, gloo CPU ones.
    """
    if not distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(tensor)
    return tensor.cpu().tolist()


def worker_nodes(rank: int) -> list[dict]:
    """Where each rank runs ({"rank", "node_id", "ip"}), gathered from every worker: kept in the
    checkpoint and the run summary, so a multi-node run shows where its replicas were."""
    import ray

    here = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "ip": ray.util.get_node_ip_address()}
    if not distributed():
        return [here]
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, here)
    return gathered


def should_stop(history: list[dict], patience: int, metric: str) -> bool:
    """Early stopping: no better `metric` (the task's val score) for `patience` epochs."""
    if not patience or len(history) <= patience:
        return False
    best_before = max(h[metric] for h in history[:-patience])
    return all(h[metric] <= best_before for h in history[-patience:])


def fast_forward(scheduler, steps_done: int) -> None:
    """Put a fresh schedule at the step a resumed run had reached.

    Rebuilt rather than restored, so that resuming with more epochs stretches the schedule to
    the new length instead of running past its saved end.
    """
    if scheduler is None or not steps_done:
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()"
        for _ in range(steps_done):
            scheduler.step()


def restore(checkpoint, model, optimizer) -> tuple[int, list[dict]]:
    """Continue from Ray's latest checkpoint (after a failure, or a re-run of the same name)."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as directory:
        state = load_train_state(directory)
        weights = torch.load(f"{directory}/model.pt", map_location="cpu", weights_only=True)
    unwrap(model).load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]), list(state["history"])


def replicas_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Do all DDP replicas hold bit-identical weights? (Gathers one number per worker.)"""
    if not distributed():
        return True
    with torch.no_grad():
        weights = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        positions = torch.arange(1, len(weights) + 1, dtype=torch.float64, device=weights.device)
        digest = (weights * positions).sum().to(device)
    gathered = [torch.zeros((), dtype=torch.float64, device=device)
                for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, digest)
    return all(bool(g == gathered[0]) for g in gathered)


def checkpoint_due(history: list[dict], metrics: dict, cfg: TrainConfig, stop: bool) -> bool:
    """Checkpoint this epoch? Every `checkpoint_every` epochs, at a new best rank score (so
    the best epoch is always kept), and at the last epoch (so resuming continues after it)."""
    last = stop or metrics["epoch"] == cfg.epochs
    periodic = cfg.checkpoint_every and metrics["epoch"] % cfg.checkpoint_every == 0
    best = all(metrics[RANK_METRIC] > h[RANK_METRIC] for h in history)
    return bool(last or periodic or best)


class EpochClock:
    """Wall time of an epoch's phases, reported with its metrics (`time_<phase>_s`), so a slow
    epoch shows where its time went (docs/performance.md)."""

    def __init__(self):
        self.started = self.mark = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.laps[phase] = now - self.mark
        self.mark = now

    def metrics(self) -> dict[str, float]:
        return {**{f"time_{phase}_s": round(s, 4) for phase, s in self.laps.items()},
                "epoch_seconds": time.perf_counter() - self.started}


def _replica(task: EpochTask, config: dict, cfg: TrainConfig, host) -> torch.nn.Module:
    """This worker's model: same seed on every worker (identical start), on device, in DDP."""
    torch.manual_seed(cfg.seed)
    model = task.build_model()
    if config.get("init_from"):  # fine-tuning: start from these weights (a checkpoint folder)
        model.load_state_dict(torch.load(f"{config['init_from']}/model.pt", map_location="cpu",
                                         weights_only=True))
    if host.device.type == "cuda" and cfg.channels_last:  # converts 4-D weights only
        model = model.to(memory_format=torch.channels_last)
    model = host.prepare(model)
    return cast(torch.nn.Module, torch.compile(model)) if cfg.compile else model


def run_epochs(config: dict, task: EpochTask) -> None:
    """Train `task`'s model for `config["train"].epochs` (or until early stopping): one DDP
    replica per worker, resumed from Ray's latest checkpoint; each epoch every worker reports
    its metrics (a barrier), and rank 0 attaches a checkpoint when `checkpoint_due`."""
    cfg = TrainConfig(**config["train"])
    quiet_train_reports()
    reuse_freed_memory()  # else every step maps and faults in its activations (core/memory.py)
    host = current()
    rank, world, device = host.rank, host.world, host.device
    model = _replica(task, config, cfg, host)
    nodes = worker_nodes(rank)
    per_worker_batch = max(1, cfg.batch_size // world)
    steps = math.ceil(config["train_rows"] / world / per_worker_batch)
    optimizer = optimizer_for(model, cfg)
    scheduler = scheduler_for(optimizer, cfg, steps)
    start_epoch, history = restore(host.latest_checkpoint(), model, optimizer)
    fast_forward(scheduler, start_epoch * steps)
    torch.manual_seed(cfg.seed * 1000 + rank + start_epoch)  # other augmentation per worker
    task.start(host, cfg)
    data = WorkerData(config["ingest"], rank, world, host.dataset_shard)
    for epoch in range(start_epoch, cfg.epochs):
        clock = EpochClock()
        batches = data.batches("train", per_worker_batch, shuffle_seed=cfg.seed + epoch)
        try:
            trained = task.train_epoch(model, batches, optimizer, scheduler)
        except NonFiniteLossError as exc:
            advice = f" {task.nan_advice}" if task.nan_advice else ""
            raise NonFiniteLossError(f"{exc} in epoch {epoch + 1}: lower train.lr "
                                     f"(now {cfg.lr:g}){advice}") from None
        clock.lap("train")
        validated = task.validate(model, data.batches(
            "val", task.val_batch_size(per_worker_batch)), rank)
        scores = task.scores(trained, validated, device)
        clock.lap("validate")
        metrics = {"epoch": epoch + 1, "train_loss": scores.train_loss, **scores.extra,
                   "val_loss": scores.val_loss, task.val_metric: scores.score,
                   RANK_METRIC: scores.score - 1e-4 * scores.val_loss,
                   task.throughput_metric: scores.samples / clock.laps["train"]}
        stop = should_stop([*history, metrics], cfg.patience, task.val_metric)
        save = checkpoint_due(history, metrics, cfg, stop)
        if save:  # the weights a checkpoint keeps are every replica's: checked where it matters
            metrics["replicas_in_sync"] = float(replicas_in_sync(model, device))
        history.append(metrics)
        clock.lap("sync_check")
        _report(task, scores, history, model, optimizer, host, nodes, save, clock)
        if stop:
            break


def _report(task: EpochTask, scores: EpochScores, history: list[dict], model, optimizer, host,
            nodes: list[dict], save: bool, clock: EpochClock) -> None:
    """Every worker reports (a barrier); rank 0 attaches a checkpoint when `save`."""
    config = task.config
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if host.rank == 0 and save:
            state = {"epoch": history[-1]["epoch"], "optimizer": optimizer.state_dict(),
                     "history": history, "worker_nodes": nodes}
            reference, extra = task.checkpoint_contents(scores)
            save_checkpoint(directory, model, config["model"], config["preprocessing"],
                            {**config["reference"], **reference}, config["metadata"], state,
                            extra=extra)
            checkpoint = directory
        clock.lap("checkpoint")
        host.report({**history[-1], **clock.metrics()}, checkpoint)
