"""Data-parallel CNN training with Ray Train: `train_loop_per_worker`, `build_trainer`, `run_train`.

Each worker trains a DDP replica on its shard of the prepared train split (gloo on CPU, NCCL on
GPU), evaluates on its shard of val, and the epoch's metrics are summed across workers. The
splits come from the workers' memory when they fit, else from Ray Data (ingest.py). Rank 0
writes a checkpoint every `checkpoint_every` epochs, at each new best and at the end (see
checkpoint.py); Ray keeps the best `keep_checkpoints` by val accuracy plus the latest,
restarts failed workers from the latest one, and resumes a run of the same name.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mlsd_ray.core import storage
from mlsd_ray.core.config import AugmentConfig, Config, TrainConfig
from mlsd_ray.core.errors import WorkError
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.tasks.image.checkpoint import load_model
from mlsd_ray.tasks.image.data.prepare import PreparedDataset, prepare_dataset
from mlsd_ray.tasks.image.data.transforms import Augmenter, Preprocessor
from mlsd_ray.tasks.image.engine import (
    NonFiniteLossError,
    PassResult,
    Step,
    evaluate,
    train_one_epoch,
)
from mlsd_ray.tasks.image.models import build_model
from mlsd_ray.training.checkpoint import RANK_METRIC, load_train_state, save_checkpoint
from mlsd_ray.training.host import current
from mlsd_ray.training.ingest import (
    WorkerData,
    fits_in_memory,
    memory_plan,
    plan_ingest,
)
from mlsd_ray.training.loop import (
    all_reduce_sums,
    distributed,
    fast_forward,
    optimizer_for,
    quiet_train_reports,
    restore,
    scheduler_for,
    should_stop,
    worker_nodes,
)
from mlsd_ray.training.progress import EpochRelay
from mlsd_ray.training.trainer import (
    check_resources,
    failure_message,
    materialize_splits,
    torch_trainer,
)

VAL_METRIC = "val_accuracy"


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


def _replicas_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
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


def _global(result: PassResult, device: torch.device) -> tuple[float, float]:
    """Mean loss and accuracy over every worker's shard."""
    loss_sum, correct, seen = all_reduce_sums(
        [result.loss * result.samples, result.accuracy * result.samples, result.samples], device)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _replica(config: dict, cfg: TrainConfig, host) -> torch.nn.Module:
    """This worker's model: same seed on every worker (identical start), on device, in DDP."""
    torch.manual_seed(cfg.seed)
    model = build_model(**config["model"])
    if config.get("init_from"):  # fine-tuning: start from these weights (a checkpoint folder)
        state = torch.load(f"{config['init_from']}/model.pt", map_location="cpu",
                           weights_only=True)
        model.load_state_dict(state)
    if host.device.type == "cuda" and cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model = host.prepare(model)
    return torch.compile(model) if cfg.compile else model


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train loop: one DDP replica per worker (see the module docstring); in a
    one-worker Tune trial, the trial's own process (training/host.py)."""
    cfg = TrainConfig(**config["train"])
    quiet_train_reports()
    host = current()
    rank, world, device = host.rank, host.world, host.device
    preprocessor = Preprocessor.from_dict(config["preprocessing"])
    model = _replica(config, cfg, host)
    nodes = worker_nodes(rank)
    per_worker_batch = max(1, cfg.batch_size // world)
    steps = math.ceil(config["train_rows"] / world / per_worker_batch)
    optimizer = optimizer_for(model, cfg)
    scheduler = scheduler_for(optimizer, cfg, steps)
    autocast = _autocast_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
    start_epoch, history = restore(host.latest_checkpoint(), model, optimizer)
    fast_forward(scheduler, start_epoch * steps)
    torch.manual_seed(cfg.seed * 1000 + rank + start_epoch)  # different augmentation per worker
    augmenter = Augmenter(AugmentConfig(**config["augment"]), preprocessor.image_size)
    step = Step(preprocessor, device, augmenter,
                channels_last=device.type == "cuda" and cfg.channels_last, autocast_dtype=autocast)
    data = WorkerData(config["ingest"], rank, world, host.dataset_shard)

    for epoch in range(start_epoch, cfg.epochs):
        clock = EpochClock()
        batches = data.batches("train", per_worker_batch, shuffle_seed=cfg.seed + epoch)
        try:
            trained = train_one_epoch(model, batches, optimizer, step, scheduler,
                                      cfg.label_smoothing, scaler)
        except NonFiniteLossError as exc:
            raise NonFiniteLossError(f"{exc} in epoch {epoch + 1}: lower train.lr "
                                     f"(now {cfg.lr:g}) or use train.amp=off") from None
        clock.lap("train")
        # Rank 0 keeps its validation confidences: the reference a drift check compares with.
        validated = evaluate(model, data.batches("val", per_worker_batch), step,
                             keep_predictions=rank == 0)
        train_loss, train_acc = _global(trained, device)
        val_loss, val_acc = _global(validated, device)
        clock.lap("validate")
        metrics = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                   "val_loss": val_loss, VAL_METRIC: val_acc,
                   RANK_METRIC: val_acc - 1e-4 * val_loss,
                   "images_per_second": trained.samples * world / clock.laps["train"]}
        stop = should_stop([*history, metrics], cfg.patience, VAL_METRIC)
        save = checkpoint_due(history, metrics, cfg, stop)
        if save:  # the weights a checkpoint keeps are every replica's: checked where it matters
            metrics["replicas_in_sync"] = float(_replicas_in_sync(model, device))
        history.append(metrics)
        clock.lap("sync_check")
        _report(history, model, optimizer, config, host, validated.confidences, nodes, save,
                clock)
        if stop:
            break


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


def epoch_line(metrics: dict, epochs: int) -> str:
    """One line of progress per epoch."""
    return (f"epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics[VAL_METRIC]:.4f} | {metrics['images_per_second']:.0f} img/s")


def _report(history, model, optimizer, config, host, confidences: list[float],
            nodes: list[dict], save: bool, clock: EpochClock) -> None:
    """Every worker reports (a barrier); rank 0 attaches a checkpoint when `save`."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if host.rank == 0 and save:
            state = {"epoch": history[-1]["epoch"], "optimizer": optimizer.state_dict(),
                     "history": history, "worker_nodes": nodes}
            reference = {**config["reference"],
                         "confidence": [round(c, 5) for c in confidences]}
            save_checkpoint(directory, model, config["model"], config["preprocessing"],
                            reference, config["metadata"], state)
            checkpoint = directory
        clock.lap("checkpoint")
        host.report({**history[-1], **clock.metrics()}, checkpoint)


@dataclass
class TrainResult:
    """What `mlsd train` produced: the run, its best checkpoint and the test-split score."""

    run_name: str
    run_path: str
    checkpoint_path: str
    best_epoch: int
    epochs_run: int
    metrics: dict
    test_accuracy: float
    wall_seconds: float
    dataset_path: str
    worker_nodes: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {"run_name": self.run_name, "run_path": self.run_path,
                "checkpoint": self.checkpoint_path, "best_epoch": self.best_epoch,
                "epochs_run": self.epochs_run, "val_accuracy": self.metrics[VAL_METRIC],
                "test_accuracy": self.test_accuracy, "wall_seconds": round(self.wall_seconds, 1),
                "dataset": self.dataset_path, "worker_nodes": self.worker_nodes}


def _reference(dataset: PreparedDataset, seed: int = 0) -> dict:
    """Training-input statistics a later drift check compares served traffic against: the
    summary features and label counts of the train split (monitor/features.py), pixel moments.
    The validation confidences are added per checkpoint (they depend on the weights)."""
    from mlsd_ray.tasks.image.features import reference_profile

    images, labels = dataset.load_split("train")
    pixels = images.reshape(-1, images.shape[-1]) / 255.0
    return {**reference_profile(images, labels, dataset.manifest["class_names"], seed),
            "class_names": dataset.manifest["class_names"],
            "pixel_mean": pixels.mean(axis=0).round(5).tolist(),
            "pixel_std": pixels.std(axis=0).round(5).tolist(),
            "image_shape": dataset.manifest["schema"]["image"]["shape"]}


def loop_config(cfg: Config, dataset: PreparedDataset, run_name: str,
                init_from: str | None = None,
                reference: PreparedDataset | None = None) -> dict:
    """Everything a worker needs, as plain data (it travels to every worker).

    The drift reference profiles `reference` (default: the training data itself)."""
    pre = dataset.manifest["preprocessing"]
    manifest = dataset.manifest
    metadata = {"run_name": run_name, "config": cfg.to_dict(),
                "dataset": {"path": dataset.path, "name": manifest["name"],
                            "fingerprint": manifest["fingerprint"]}}
    return {"metadata": metadata, "train": cfg.train.model_dump(),
            "augment": cfg.data.augment.model_dump(),
            "preprocessing": pre, "reference": _reference(reference or dataset, cfg.train.seed),
            "init_from": init_from,
            "model": {"name": cfg.model.name, "in_channels": pre["channels"],
                      "image_size": pre["image_size"], "num_classes": len(pre["class_names"]),
                      "dropout": cfg.model.dropout}}


def build_trainer(cfg: Config, dataset: PreparedDataset, run_name: str, storage_path: str,
                  datasets: dict | None = None, callbacks: list | None = None,
                  init_from: str | None = None, reference: PreparedDataset | None = None,
                  log: Callable[[str], None] | None = None):
    """A TorchTrainer over materialised splits (the prepared ones unless `datasets` is given).

    Materialised first because on a small machine, Ray Data tasks still to run while the
    training workers hold every CPU deadlock. Tune passes its own `datasets`
    (read once for every trial, or cross-validation folds) and `callbacks`; `log` hears
    whether the workers read the splits from memory or stream them (ingest.py).
    """
    limit = cfg.train.in_memory_limit_mb
    if datasets is None and fits_in_memory([dataset.split_path(s) for s in ("train", "val")],
                                           limit):
        plan = memory_plan({split: _split_columns(dataset, split) for split in ("train", "val")},
                           limit)
    else:
        datasets = datasets or materialize_splits(dataset)
        plan = plan_ingest(datasets, limit)
    config = loop_config(cfg, dataset, run_name, init_from, reference)
    return torch_trainer(train_loop_per_worker, config, cfg, run_name, storage_path, plan,
                         datasets or {}, callbacks or [], log)


def _split_columns(dataset: PreparedDataset, split: str) -> dict:
    images, labels = dataset.load_split(split)
    return {"image": images, "label": labels}


def predict_split(loaded, dataset: PreparedDataset, split: str) -> PassResult:
    """A loaded checkpoint's predictions on one split of a prepared dataset, on the CPU."""
    images, labels = dataset.load_split(split)
    batches = [{"image": images[i:i + 512], "label": labels[i:i + 512]}
               for i in range(0, len(images), 512)]
    return evaluate(loaded.model, batches, Step(loaded.preprocessor, torch.device("cpu")),
                    keep_predictions=True)


def train_and_register(cfg: Config, home: str | None = None,
                       log: Callable[[str], None] = log_stderr,
                       run_name: str | None = None, dataset: PreparedDataset | None = None,
                       init_from: str | None = None,
                       reference: PreparedDataset | None = None) -> dict:
    """`mlsd train`: train, then log the run and register the best checkpoint (if configured).

    `dataset` replaces preparing `cfg.data.source` (retraining passes a combined dataset);
    `init_from`, a checkpoint folder, starts from its weights (fine-tuning); `reference` is
    the data the drift reference describes (default: the training data)."""
    from mlsd_ray.registry import log_and_register

    result = run_train(cfg, home=home, log=log, run_name=run_name, dataset=dataset,
                       init_from=init_from, reference=reference)
    summary = result.summary()
    if cfg.registry.auto_register:
        dataset = PreparedDataset.open(result.dataset_path)
        name = cfg.registry.model_name or f"{dataset.manifest['name']}-cnn"
        summary["registered"] = log_and_register(result, cfg, dataset, name, home)
        log(f"registered {summary['registered']['uri']}")
    return summary


def run_train(cfg: Config, home: str | None = None, log: Callable[[str], None] = log_stderr,
              run_name: str | None = None, dataset: PreparedDataset | None = None,
              init_from: str | None = None,
              reference: PreparedDataset | None = None) -> TrainResult:
    """Prepare the data if needed, train, pick the best checkpoint, score it on test."""
    from ray.train import TrainingFailedError

    started = time.perf_counter()
    dataset = dataset or prepare_dataset(cfg, home=home, log=log)
    ensure_ray(home)
    check_resources(cfg.train)
    name = run_name or cfg.train.run_name or (
        f"{dataset.manifest['name']}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = storage.join(storage.home(home), "runs")
    log(f"training {cfg.model.name} on {dataset.manifest['counts']['splits']['train']} images "
        f"with {cfg.train.num_workers} worker(s), {cfg.train.epochs} epochs; run {name} "
        f"under {runs}")
    relay = EpochRelay(lambda metrics: epoch_line(metrics, cfg.train.epochs), log)
    trainer = build_trainer(cfg, dataset, name, runs, callbacks=[relay.callback()],
                            init_from=init_from, reference=reference, log=log)
    try:
        with relay:
            result = trainer.fit()
    except TrainingFailedError as exc:
        raise WorkError(f"training failed: {failure_message(exc)}") from exc
    checkpoint, metrics = max(result.best_checkpoints, key=lambda cm: cm[1][RANK_METRIC])
    with checkpoint.as_directory() as directory:
        test_accuracy = predict_split(load_model(directory), dataset, "test").accuracy
        nodes = load_train_state(directory).get("worker_nodes", [])
    return TrainResult(name, storage.join(runs, name), checkpoint.path, int(metrics["epoch"]),
                       int(result.metrics["epoch"]), metrics, test_accuracy,
                       time.perf_counter() - started, dataset.path, nodes)
