"""Data-parallel MLP training on a prepared table, with the CNN's trainer machinery.

The same TorchTrainer (training/trainer.py: scaling, placement, checkpoints ranked by
RANK_METRIC, failures survived, resume by run name) and the same epoch loop
(training/loop.py: optimizers, schedules, early stopping, checkpoints every N epochs and at
each best, the replica check); `TabularEpochs` is what differs: the batch (a float32 feature
vector), the loss (class-weighted cross-entropy, or MSE on the standardised target), and the
validation score (PR-AUC for binary, macro F1 for multiclass, R² for regression), computed over
every worker's val rows gathered together. Each binary checkpoint carries its decision
threshold, chosen on val (metrics.choose_threshold), in decision.json.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlsd_ray.core.config import TrainConfig
from mlsd_ray.core.contracts import DRIFT_REFERENCE, CheckpointMetadata, DatasetRef
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.tabular.config import TabularTaskConfig, ThresholdConfig
from mlsd_ray.tasks.tabular.metrics import choose_threshold, primary_score
from mlsd_ray.tasks.tabular.monitoring import column_reference, output_reference
from mlsd_ray.tasks.tabular.prepare import PreparedTable
from mlsd_ray.tasks.tabular.preprocess import Featurizer
from mlsd_ray.tasks.tabular.result import VAL_SCORE
from mlsd_ray.training.ingest import plan_ingest
from mlsd_ray.training.loop import (
    EpochScores,
    EpochTask,
    all_reduce_sums,
    distributed,
    run_epochs,
    train_pass,
)
from mlsd_ray.training.trainer import materialize_splits, torch_trainer


class TabularMLP(nn.Module):
    """Linear → ReLU → dropout per hidden width, then a linear head."""

    def __init__(self, in_features: int, hidden: list[int], outputs: int, dropout: float = 0.0):
        super().__init__()
        layers, width = [], in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, outputs))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_mlp(name: str = "tabular_mlp", **kwargs) -> TabularMLP:
    """The model from model.json (`name` is recorded there for the reader)."""
    return TabularMLP(**kwargs)


def class_weights(counts: dict[str, int], classes: int, mode: str) -> list[float] | None:
    """balanced: n / (k · count) per class, so the rare class weighs as much in total."""
    if mode == "none":
        return None
    total = sum(counts.values())
    return [total / (classes * max(counts.get(str(c), 0), 1)) for c in range(classes)]


def _outputs(model: nn.Module, x: torch.Tensor, task: str) -> torch.Tensor:
    logits = model(x).float()
    return logits.reshape(-1) if task == "regression" else logits


def _loss(outputs: torch.Tensor, y: torch.Tensor, config: dict) -> torch.Tensor:
    if config["task"] == "regression":
        target = (y.float() - config["target_mean"]) / config["target_std"]
        return F.mse_loss(outputs, target)
    weight = config.get("class_weights")
    weight = torch.tensor(weight, device=outputs.device) if weight else None
    return F.cross_entropy(outputs, y.long(), weight=weight)


def _gather(values: np.ndarray) -> np.ndarray:
    """Every worker's rows of `values`, concatenated (small: the val split)."""
    if not distributed():
        return values
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, values)
    return np.concatenate(gathered)


def _epoch(model, batches, optimizer, scheduler, config, device) -> tuple[float, int]:
    def loss_of(model, batch) -> tuple[torch.Tensor, int]:
        x = torch.as_tensor(batch["features"], dtype=torch.float32, device=device)
        y = torch.as_tensor(batch["label"], device=device)
        return _loss(_outputs(model, x, config["task"]), y, config), len(y)

    return train_pass(model, batches, optimizer, scheduler, loss_of)


@torch.no_grad()
def predict(model: nn.Module, features: np.ndarray, config: dict) -> np.ndarray:
    """Class probabilities (N × classes), or predictions in the label's units (N)."""
    model.eval()
    outputs = _outputs(model, torch.as_tensor(features, dtype=torch.float32), config["task"])
    if config["task"] == "regression":
        return (outputs * config["target_std"] + config["target_mean"]).numpy()
    return torch.softmax(outputs, dim=1).numpy()


@dataclass
class ValPass:
    """One worker's validation pass: loss total, rows, outputs (probabilities, or
    predictions in the label's units) and labels."""

    total: float
    seen: int
    outputs: np.ndarray
    labels: np.ndarray


def _validate(model, batches, config, device) -> ValPass:
    model.eval()
    total, seen, outputs, labels = 0.0, 0, [], []
    with torch.no_grad():
        for batch in batches:
            x = torch.as_tensor(batch["features"], dtype=torch.float32, device=device)
            y = torch.as_tensor(batch["label"], device=device)
            out = _outputs(model, x, config["task"])
            total += _loss(out, y, config).item() * len(y)
            seen += len(y)
            if config["task"] == "regression":
                out = out * config["target_std"] + config["target_mean"]
            else:
                out = torch.softmax(out, dim=1)
            outputs.append(out.cpu().numpy())
            labels.append(batch["label"])
    if not outputs:
        return ValPass(total, seen, np.zeros((0,)), np.zeros((0,)))
    return ValPass(total, seen, np.concatenate(outputs), np.concatenate(labels))


class TabularEpochs(EpochTask):
    """The MLP inside `run_epochs`: prepared feature vectors in, class-weighted cross-entropy
    or MSE on the standardised target; scored over every worker's val rows gathered together
    (PR-AUC, macro F1 or R²). A checkpoint keeps this epoch's validation outputs as its drift
    reference and, for a binary label, the threshold chosen on them (decision.json)."""

    val_metric = VAL_SCORE
    throughput_metric = "rows_per_second"

    def build_model(self) -> nn.Module:
        return build_mlp(**self.config["model"])

    def start(self, host, cfg: TrainConfig) -> None:
        self.device = host.device

    def val_batch_size(self, train_batch_size: int) -> int:
        return 1024

    def train_epoch(self, model, batches, optimizer, scheduler) -> tuple[float, int]:
        return _epoch(model, batches, optimizer, scheduler, self.config, self.device)

    def validate(self, model, batches, rank: int) -> ValPass:
        return _validate(model, batches, self.config, self.device)

    def scores(self, trained: tuple[float, int], validated: ValPass,
               device: torch.device) -> EpochScores:
        train_total, train_seen, val_total, val_seen = all_reduce_sums(
            [*trained, validated.total, validated.seen], device)
        outputs, labels = _gather(validated.outputs), _gather(validated.labels)
        score = primary_score(self.config["task"], outputs, labels)
        return EpochScores(train_total / max(train_seen, 1), val_total / max(val_seen, 1),
                           score, train_seen, outputs=(outputs, labels))

    def checkpoint_contents(self, scores: EpochScores) -> tuple[dict, dict[str, dict]]:
        config = self.config
        outputs, labels = scores.outputs
        decision = {}
        if config["task"] == "binary":
            decision = choose_threshold(outputs[:, 1], labels,
                                        ThresholdConfig(**config["threshold"]))
        reference = output_reference(outputs, config["task"], config["classes"],
                                     decision.get("threshold"))
        return reference, {"decision.json": {**decision, "task": config["task"],
                                             "classes": config["classes"],
                                             "label": config["label"],
                                             "target_mean": config.get("target_mean"),
                                             "target_std": config.get("target_std")}}


def tabular_loop_per_worker(config: dict) -> None:
    """The Ray Train loop for tables (training/loop.py's `run_epochs`): one DDP replica of
    the MLP per worker; in a one-worker Tune trial, the trial's own process."""
    run_epochs(config, TabularEpochs(config))


def epoch_line(metrics: dict, epochs: int) -> str:
    return (f"epoch {metrics['epoch']}/{epochs}: train loss {metrics['train_loss']:.4f} | "
            f"val loss {metrics['val_loss']:.4f} {VAL_SCORE} {metrics[VAL_SCORE]:.4f} | "
            f"{metrics['rows_per_second']:.0f} rows/s")


def _featurize(batch, state: dict, label: str) -> dict:
    return Featurizer(state).batch(batch, label)


def materialize_features(table: PreparedTable, splits=("train", "val")) -> dict:
    """The splits as materialised Ray Datasets of {"features", "label"}: the fitted
    preparation runs in Ray Data's map_batches, in parallel, once for every epoch."""

    def featurize(dataset):
        return dataset.map_batches(_featurize, batch_format="pandas", batch_size=4096,
                                   fn_kwargs={"state": table.manifest["preprocessing"],
                                              "label": table.label})

    return materialize_splits(table, splits, then=featurize)


def cv_folds(table: PreparedTable, k: int, seed: int) -> list[dict]:
    """`mlsd tune --cv K`: K folds of the train and val rows (stratified by class unless the
    table is a regression), featurised as `materialize_features` does (the preparation as
    fitted on the train split), materialised once."""
    import pandas as pd
    import ray.data

    from mlsd_ray.stages.data import in_blocks
    from mlsd_ray.stages.train import fold_indices

    rows = pd.concat([table.load_split("train"), table.load_split("val")], ignore_index=True)
    labels = None if table.manifest["task"] == "regression" else rows[table.label].to_numpy()

    def featurized(index):
        return ray.data.from_pandas(in_blocks(rows.iloc[index])).map_batches(
            _featurize, batch_format="pandas", batch_size=4096,
            fn_kwargs={"state": table.manifest["preprocessing"], "label": table.label}
        ).materialize()

    return [{"train": featurized(train), "val": featurized(val)}
            for train, val in fold_indices(rows, None, k, seed, labels)]


def feature_reference(table: PreparedTable, seed: int = 0) -> dict:
    """The drift reference of the train split: each raw column's profile
    (tabular/monitoring.py), and the mean and spread of every prepared feature."""
    rows = table.load_split("train")
    features = table.featurizer(rows)
    return {**column_reference(rows, table.manifest["preprocessing"]["plan"], seed),
            "feature_names": table.manifest["feature_names"],
            "feature_mean": features.mean(axis=0).round(5).tolist(),
            "feature_std": features.std(axis=0).round(5).tolist(),
            "rows": int(len(features))}


def loop_config(cfg: TabularTaskConfig, table: PreparedTable, run_name: str,
                init_from: str | None = None,
                reference: PreparedTable | None = None) -> dict:
    """Everything a worker needs, as plain data. `init_from`, a checkpoint folder, starts from
    its weights (fine-tuning); the drift reference profiles `reference` (default: `table`)."""
    m = table.manifest
    task = m["task"]
    outputs = 1 if task == "regression" else len(m["classes"])
    config = {"task": task, "label": m["label"], "classes": m["classes"],
              "train": cfg.train.model_dump(), "threshold": cfg.tabular.threshold.model_dump(),
              "preprocessing": m["preprocessing"],
              "reference": feature_reference(reference or table, cfg.train.seed),
              "init_from": init_from,
              "model": {"name": "tabular_mlp", "in_features": len(m["feature_names"]),
                        "hidden": list(cfg.tabular.hidden), "outputs": outputs,
                        "dropout": cfg.tabular.dropout},
              "metadata": CheckpointMetadata(run_name, DatasetRef(table.path, m["name"],
                                                                  m["fingerprint"]),
                                             cfg.to_dict()).to_dict()}
    if task == "regression":
        config.update(target_mean=m["label_stats"]["mean"], target_std=m["label_stats"]["std"])
    else:
        config["class_weights"] = class_weights(m["label_stats"]["counts"], outputs,
                                                cfg.tabular.class_weight)
    return config


def build_tabular_trainer(cfg: TabularTaskConfig, table: PreparedTable, run_name: str,
                          storage_path: str,
                          datasets: dict | None = None, callbacks: list | None = None,
                          log: Callable[[str], None] | None = None,
                          init_from: str | None = None,
                          reference: PreparedTable | None = None):
    """A TorchTrainer of the MLP over the featurised splits (Tune passes its own `datasets`;
    `init_from` and `reference` as in `loop_config`)."""
    datasets = datasets or materialize_features(table)
    plan = plan_ingest(datasets, cfg.train.in_memory_limit_mb)
    config = loop_config(cfg, table, run_name, init_from, reference)
    return torch_trainer(tabular_loop_per_worker, config, cfg, run_name, storage_path, plan,
                         datasets, callbacks or [], log)


@dataclass
class LoadedTabular:
    """A tabular model ready to score: network, fitted preparation, decision, metadata."""

    model: nn.Module
    featurizer: Featurizer
    model_config: dict
    decision: dict
    reference: dict
    metadata: CheckpointMetadata

    def predict(self, frame) -> np.ndarray:
        """Probabilities per class, or regression predictions, for a pandas frame."""
        return predict(self.model, self.featurizer(frame), self.decision)


def load_tabular(directory: str | Path) -> LoadedTabular:
    """Verify checksums, rebuild the MLP and the fitted preparation from JSON, load weights."""
    from mlsd_ray.training.checkpoint import verify

    directory = Path(directory)
    verify(directory)

    def read(name: str) -> dict:
        return json.loads((directory / name).read_text())

    if not (directory / "decision.json").is_file():
        raise InputError(f"{directory} holds an image model, not a tabular one")
    model_config = read("model.json")
    model = build_mlp(**model_config)
    model.load_state_dict(torch.load(directory / "model.pt", map_location="cpu",
                                     weights_only=True))
    model.eval()
    reference = DRIFT_REFERENCE.read(str(directory / "reference.json"))
    return LoadedTabular(model, Featurizer(read("preprocessing.json")), model_config,
                         read("decision.json"), reference, CheckpointMetadata.read(directory))
