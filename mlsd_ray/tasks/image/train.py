"""Data-parallel CNN training with Ray Train: `train_loop_per_worker`, `build_trainer`, `run_train`.

Each worker trains a DDP replica on its shard of the prepared train split (gloo on CPU, NCCL on
GPU), evaluates on its shard of val, and the epoch's metrics are summed across workers: the
shared loop of training/loop.py, with `ImageEpochs` for what is the CNN's own. The splits come
from the workers' memory when they fit, else from Ray Data (ingest.py). Rank 0 writes a
checkpoint every `checkpoint_every` epochs, at each new best and at the end; Ray keeps the best
`keep_checkpoints` by val accuracy plus the latest, restarts failed workers from the latest
one, and resumes a run of the same name.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from mlsd_ray.core import storage
from mlsd_ray.core.config import TrainConfig
from mlsd_ray.core.contracts import CheckpointMetadata, DatasetRef
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.core.workspace import Workspace, fresh_name
from mlsd_ray.tasks.base import TrainedModel
from mlsd_ray.tasks.image.checkpoint import load_model
from mlsd_ray.tasks.image.config import AugmentConfig, ImageConfig
from mlsd_ray.tasks.image.data.prepare import PreparedDataset, prepare_dataset
from mlsd_ray.tasks.image.data.transforms import Augmenter, Preprocessor
from mlsd_ray.tasks.image.engine import PassResult, Step, evaluate, train_one_epoch
from mlsd_ray.tasks.image.models import build_model
from mlsd_ray.training.checkpoint import load_train_state
from mlsd_ray.training.ingest import fits_in_memory, memory_plan, plan_ingest
from mlsd_ray.training.loop import EpochScores, EpochTask, all_reduce_sums, run_epochs
from mlsd_ray.training.progress import EpochRelay
from mlsd_ray.training.trainer import (
    check_resources,
    fit_best,
    materialize_splits,
    torch_trainer,
    where_it_trains,
)

if TYPE_CHECKING:
    from mlsd_ray.registry import RegisteredVersion

VAL_METRIC = "val_accuracy"


def _autocast_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or cfg.amp == "off":
        return None
    if cfg.amp == "fp16" or (cfg.amp == "auto" and not torch.cuda.is_bf16_supported()):
        return torch.float16
    return torch.bfloat16


class ImageEpochs(EpochTask):
    """The CNN inside `run_epochs`: augmented uint8 images in, label-smoothed cross-entropy,
    AMP on CUDA; scored by accuracy, and rank 0's validation confidences are what the
    checkpoint keeps for a later drift check."""

    val_metric = VAL_METRIC
    throughput_metric = "images_per_second"
    nan_advice = "or use train.amp=off"

    def __init__(self, config: dict):
        super().__init__(config)
        self.preprocessor = Preprocessor.from_dict(config["preprocessing"])

    def build_model(self) -> torch.nn.Module:
        return build_model(**self.config["model"])

    def start(self, host, cfg: TrainConfig) -> None:
        autocast = _autocast_dtype(cfg, host.device)
        self.scaler = torch.amp.GradScaler("cuda") if autocast == torch.float16 else None
        self.label_smoothing = cfg.label_smoothing
        augmenter = Augmenter(AugmentConfig(**self.config["augment"]),
                              self.preprocessor.image_size)
        self.step = Step(self.preprocessor, host.device, augmenter,
                         channels_last=host.device.type == "cuda" and cfg.channels_last,
                         autocast_dtype=autocast)

    def train_epoch(self, model, batches, optimizer, scheduler) -> PassResult:
        return train_one_epoch(model, batches, optimizer, self.step, scheduler,
                               self.label_smoothing, self.scaler)

    def validate(self, model, batches, rank: int) -> PassResult:
        # Rank 0 keeps its validation confidences: the reference a drift check compares with.
        return evaluate(model, batches, self.step, keep_predictions=rank == 0)

    def scores(self, trained: PassResult, validated: PassResult,
               device: torch.device) -> EpochScores:
        train_loss, train_acc, samples = _global(trained, device)
        val_loss, val_acc, _ = _global(validated, device)
        return EpochScores(train_loss, val_loss, val_acc, samples,
                           extra={"train_accuracy": train_acc},
                           outputs=validated.confidences)

    def checkpoint_contents(self, scores: EpochScores) -> tuple[dict, dict[str, dict]]:
        return {"confidence": [round(c, 5) for c in scores.outputs]}, {}


def _global(result: PassResult, device: torch.device) -> tuple[float, float, float]:
    """Mean loss and accuracy over every worker's shard, and how many samples that is."""
    loss_sum, correct, seen = all_reduce_sums(
        [result.loss * result.samples, result.accuracy * result.samples, result.samples], device)
    return loss_sum / max(seen, 1), correct / max(seen, 1), seen


def train_loop_per_worker(config: dict) -> None:
    """The Ray Train loop of the CNN (training/loop.py's `run_epochs`): one DDP replica per
    worker; in a one-worker Tune trial, the trial's own process (training/host.py)."""
    run_epochs(config, ImageEpochs(config))


def epoch_line(metrics: dict, epochs: int) -> str:
    """One line of progress per epoch."""
    return (f"epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f} "
            f"acc {metrics['train_accuracy']:.4f} | val loss {metrics['val_loss']:.4f} "
            f"acc {metrics[VAL_METRIC]:.4f} | {metrics['images_per_second']:.0f} img/s")


@dataclass(kw_only=True)
class TrainResult(TrainedModel):
    """What the image task's training produced: besides the run and its best checkpoint, the
    best epoch's metrics, the test-split accuracy and the nodes each worker ran on."""

    metrics: dict[str, float]
    test_accuracy: float
    worker_nodes: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {**super().to_dict(), "val_accuracy": self.metrics[VAL_METRIC],
                "test_accuracy": self.test_accuracy, "worker_nodes": self.worker_nodes}

    def test_line(self) -> str:
        return f"test accuracy {self.test_accuracy:.4f}"

    def describe(self) -> str:
        lines = [f"run {self.run_name}: best epoch {self.best_epoch} of {self.epochs_run}, val "
                 f"accuracy {self.metrics[VAL_METRIC]:.4f}, test accuracy "
                 f"{self.test_accuracy:.4f}, {self.wall_seconds:.1f} s",
                 f"checkpoint: {self.checkpoint}",
                 "workers: " + ", ".join(f"rank {n['rank']} on node {n['node_id'][:8]} "
                                         f"({n['ip']})" for n in self.worker_nodes)]
        if self.registered:
            lines.append(f"registered: {self.registered.uri}")
        return "\n".join(lines)


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


def loop_config(cfg: ImageConfig, dataset: PreparedDataset, run_name: str,
                init_from: str | None = None,
                reference: PreparedDataset | None = None) -> dict:
    """Everything a worker needs, as plain data (it travels to every worker).

    The drift reference profiles `reference` (default: the training data itself)."""
    pre = dataset.manifest["preprocessing"]
    manifest = dataset.manifest
    metadata = CheckpointMetadata(run_name, DatasetRef(dataset.path, manifest["name"],
                                                       manifest["fingerprint"]),
                                  cfg.to_dict()).to_dict()
    return {"metadata": metadata, "train": cfg.train.model_dump(),
            "augment": cfg.data.augment.model_dump(),
            "preprocessing": pre, "reference": _reference(reference or dataset, cfg.train.seed),
            "init_from": init_from,
            "model": {"name": cfg.model.name, "in_channels": pre["channels"],
                      "image_size": pre["image_size"], "num_classes": len(pre["class_names"]),
                      "dropout": cfg.model.dropout}}


def build_trainer(cfg: ImageConfig, dataset: PreparedDataset, run_name: str, storage_path: str,
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
    return predict_images(loaded, *dataset.load_split(split))


def predict_images(loaded, images: np.ndarray, labels: np.ndarray) -> PassResult:
    """A loaded checkpoint's predictions on labelled uint8 images, on the CPU."""
    batches = [{"image": images[i:i + 512], "label": labels[i:i + 512]}
               for i in range(0, len(images), 512)]
    return evaluate(loaded.model, batches, Step(loaded.preprocessor, torch.device("cpu")),
                    keep_predictions=True)


def train_and_register(cfg: ImageConfig, workspace: Workspace,
                       log: Callable[[str], None] = log_stderr,
                       run_name: str | None = None, dataset: PreparedDataset | None = None,
                       init_from: str | None = None,
                       reference: PreparedDataset | None = None) -> TrainResult:
    """`mlsd train`: train, then log the run and register the best checkpoint (if configured).

    `dataset` replaces preparing `cfg.data.source` (retraining passes a combined dataset);
    `init_from`, a checkpoint folder, starts from its weights (fine-tuning); `reference` is
    the data the drift reference describes (default: the training data)."""
    from mlsd_ray.registry.tracking import LiveRun

    dataset = dataset or prepare_dataset(cfg, workspace=workspace, log=log)
    run_name = run_name or default_run_name(cfg, dataset)
    manifest = dataset.manifest
    with LiveRun(workspace, run_name, run_params(cfg, dataset), dataset.path,
                 manifest["fingerprint"], manifest["name"],
                 enabled=cfg.registry.auto_register) as tracked:
        result = run_train(cfg, workspace=workspace, log=log, run_name=run_name, dataset=dataset,
                           init_from=init_from, reference=reference, observe=tracked.log_epoch)
        if cfg.registry.auto_register:
            name = cfg.registry.model_name or f"{manifest['name']}-cnn"
            result.registered = log_and_register(result, cfg, dataset, name, workspace, live=True)
            log(f"registered {result.registered.uri}")
    return result


EXAMPLE_IMAGES = 2  # test-split images stored with the model as its input example


def image_signature(dataset: PreparedDataset):
    """uint8 (-1, H, W, C) in, float32 class probabilities (-1, K) out: the trained size,
    which is also what the model's input example has (other sizes are resized)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    shape = dataset.manifest["schema"]["image"]["shape"]
    classes = len(dataset.manifest["class_names"])
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, classes))]))


def run_params(cfg: ImageConfig, dataset: PreparedDataset) -> dict:
    """The params of an image training run: the model, the training settings, the data."""
    from mlsd_ray.registry import flat_params

    return {**flat_params("model", cfg.model.model_dump()),
            **flat_params("train", cfg.train.model_dump()),
            "data.source": cfg.data.source, "data.fingerprint": dataset.manifest["fingerprint"]}


def log_and_register(result: TrainResult, cfg: ImageConfig, dataset: PreparedDataset,
                     model_name: str, workspace: Workspace, nested: bool = False,
                     live: bool = False) -> RegisteredVersion:
    """Register the run's best checkpoint as the next version of `model_name`: uint8 images
    in, class probabilities out (registry/tracking.py's `register_trained` says `live` and
    `nested`)."""
    from mlsd_ray.registry.tracking import Registration, register_trained

    manifest = dataset.manifest
    schema = {"input": {"image": manifest["schema"]["image"], "accepts": "uint8 H×W×C or "
                        "encoded PNG/JPEG; resized and normalised as in preprocessing.json"},
              "output": {"class_index": "int", "class_name": manifest["class_names"],
                         "probabilities": f"float[{len(manifest['class_names'])}]"}}
    return register_trained(Registration(
        task="image", model_name=model_name, run_name=result.run_name,
        checkpoint=result.checkpoint, params=run_params(cfg, dataset), score_name="accuracy",
        val_score=result.metrics["val_accuracy"], test_score=result.test_accuracy,
        best_epoch=result.best_epoch, architecture=cfg.model.name, dataset=dataset.path,
        fingerprint=manifest["fingerprint"], schema=schema, signature=image_signature(dataset),
        input_example=dataset.load_split("test")[0][:EXAMPLE_IMAGES],
        metrics={"test_accuracy": result.test_accuracy,
                 "best_val_accuracy": result.metrics["val_accuracy"]},
        description=f"{cfg.model.name} on {manifest['name']} (mlsd-ray)"),
        workspace, live, nested)


def default_run_name(cfg: ImageConfig, dataset: PreparedDataset) -> str:
    """`train.run_name`, else a new <dataset>-<model>-<time>-<hex>."""
    return cfg.train.run_name or fresh_name(f"{dataset.manifest['name']}-{cfg.model.name}")


def run_train(cfg: ImageConfig, workspace: Workspace, log: Callable[[str], None] = log_stderr,
              run_name: str | None = None, dataset: PreparedDataset | None = None,
              init_from: str | None = None, reference: PreparedDataset | None = None,
              observe: Callable[[dict], None] | None = None) -> TrainResult:
    """Prepare the data if needed, train, pick the best checkpoint, score it on test.
    `observe` gets each epoch's metrics on the driver as they arrive (live tracking)."""
    started = time.perf_counter()
    dataset = dataset or prepare_dataset(cfg, workspace=workspace, log=log)
    ensure_ray(workspace)
    check_resources(cfg.train)
    name = run_name or default_run_name(cfg, dataset)
    runs = workspace.runs
    log(f"training {cfg.model.name} on {dataset.manifest['counts']['splits']['train']} images "
        f"{where_it_trains(cfg.train)}, {cfg.train.epochs} epochs; run {name} "
        f"under {runs}")
    relay = EpochRelay(lambda metrics: epoch_line(metrics, cfg.train.epochs), log, observe)
    best = fit_best(build_trainer(cfg, dataset, name, runs, callbacks=[relay.callback()],
                                  init_from=init_from, reference=reference, log=log), relay)
    with best.checkpoint.as_directory() as directory:
        test_accuracy = predict_split(load_model(directory), dataset, "test").accuracy
        nodes = load_train_state(directory).get("worker_nodes", [])
    return TrainResult(run_name=name, run_path=storage.join(runs, name),
                       checkpoint=best.path, best_epoch=best.epoch,
                       epochs_run=best.epochs_run, dataset=dataset.path,
                       wall_seconds=time.perf_counter() - started, metrics=best.metrics,
                       test_accuracy=test_accuracy, worker_nodes=nodes)
