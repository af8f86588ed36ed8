"""The training stage of a parts task: Ray Train over the encoded splits, the best checkpoint
scored on test, the run tracked in MLflow and registered.

Inside each worker `PartsEpochs` is the `EpochTask` of training/loop.py's `run_epochs` (which
owns DDP, optimizers, schedules, resuming, early stopping and checkpoints): the task's model
part builds the network and gives its loss; validation outputs from every worker are gathered,
decoded by the codec and scored by the model part, whose `metric` ranks the checkpoints.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, TrainConfig
from mlsd_ray.core.contracts import CheckpointMetadata, DatasetRef
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace, fresh_name
from mlsd_ray.stages.data import PreparedRows, in_blocks
from mlsd_ray.stages.model import LoadedModel, feature_reference, output_reference
from mlsd_ray.stages.parts import Parts, RowsSection
from mlsd_ray.tasks.base import TrainedModel
from mlsd_ray.training.loop import (
    EpochScores,
    EpochTask,
    all_reduce_sums,
    distributed,
    run_epochs,
    train_pass,
)

if TYPE_CHECKING:
    from mlsd_ray.registry import RegisteredVersion

__all__ = ["cv_folds", "fold_indices", "PartsEvaluation", "PartsTrainResult", "encoded_splits",
           "evaluate_model", "parts_trainer", "register_model", "train_stage"]

EXAMPLE_ROWS = 3  # test rows stored with a registered model as its input example


@dataclass(frozen=True)
class PartsEvaluation:
    """A split scored by the model part (`scores`, `metric` first), and the report written."""

    split: str
    metric: str
    scores: dict[str, float]
    rows: int
    report: str
    report_json: str
    model: str = ""
    run_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"split": self.split, "metric": self.metric, "scores": self.scores,
                "rows": self.rows, "report": self.report, "report_json": self.report_json,
                "model": self.model, "run_name": self.run_name}

    def describe(self) -> str:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in self.scores.items())
        return f"{self.split} ({self.rows} rows): {scores}\nreport: {self.report}"


@dataclass(kw_only=True)
class PartsTrainResult(TrainedModel):
    """A parts task's training: the run, its best checkpoint's validation score, and its
    scores on the test split."""

    metric: str
    val_score: float
    test: dict[str, float]
    report: str

    def test_line(self) -> str:
        return f"test {self.metric} {self.test[self.metric]:.4f}"

    def describe(self) -> str:
        lines = super().describe().splitlines()
        lines.insert(1, f"val {self.metric} {self.val_score:.4f}; test "
                     + "  ".join(f"{k} {v:.4f}" for k, v in self.test.items()))
        return "\n".join([*lines, f"report: {self.report}"])

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "metric": self.metric, "val_score": self.val_score,
                "test": self.test, "report": self.report}


class PartsEpochs(EpochTask):
    """The task's network inside `run_epochs` (see the module docstring)."""

    throughput_metric = "rows_per_second"

    def __init__(self, config: dict):
        super().__init__(config)
        self.parts: Parts = config["parts"]
        self.val_metric = f"val_{self.parts.model.metric}"  # type: ignore[misc]

    def build_model(self):
        return self.parts.model.build(self.config["section"],
                                      np.zeros(self.config["model"]["example_shape"],
                                               dtype=np.float32))

    def start(self, host, cfg: TrainConfig) -> None:
        self.device = host.device

    def train_epoch(self, model, batches, optimizer, scheduler) -> tuple[float, int]:
        import torch

        def loss_of(model, batch):
            y = torch.as_tensor(batch["y"], device=self.device)
            return self.parts.model.loss(model(torch.as_tensor(batch["x"], device=self.device)),
                                         y), len(y)

        return train_pass(model, batches, optimizer, scheduler, loss_of)

    def validate(self, model, batches, rank: int) -> tuple[float, int, list, list]:
        import torch

        model.eval()
        total, seen, outputs, truth = 0.0, 0, [], []
        with torch.no_grad():
            for batch in batches:
                out = model(torch.as_tensor(batch["x"], device=self.device))
                y = torch.as_tensor(batch["y"], device=self.device)
                total += self.parts.model.loss(out, y).item() * len(y)
                seen += len(y)
                outputs.append(out.float().cpu().numpy())
                truth.append(batch["truth"])
        return total, seen, outputs, truth

    def scores(self, trained, validated, device) -> EpochScores:
        train_total, train_seen, val_total, val_seen = all_reduce_sums(
            [*trained, validated[0], validated[1]], device)
        outputs, truth = _gather(validated[2]), _gather(validated[3])
        predicted = self.parts.codec.decode(outputs, self.config["state"])
        scores = self.parts.model.scores(predicted, truth)
        metric = self.parts.model.metric
        return EpochScores(train_total / max(train_seen, 1), val_total / max(val_seen, 1),
                           scores[metric], train_seen,
                           extra={f"val_{k}": v for k, v in scores.items() if k != metric},
                           outputs=predicted)

    def checkpoint_contents(self, scores: EpochScores) -> tuple[dict, dict[str, dict]]:
        return output_reference(self.parts, scores.outputs), {}


def _gather(parts: list) -> np.ndarray:
    """Every worker's arrays, concatenated (small: the val split)."""
    import torch

    mine = np.concatenate(parts) if parts else np.zeros((0,))
    if not distributed():
        return mine
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, mine)
    return np.concatenate([g for g in gathered if len(g)])


def parts_loop_per_worker(config: dict) -> None:
    """The Ray Train loop of a parts task: one DDP replica per worker."""
    run_epochs(config, PartsEpochs(config))


def _encode_batch(batch: pd.DataFrame, parts: Parts, state: dict) -> dict[str, np.ndarray]:
    return {"x": np.asarray(parts.codec.encode(batch, state), dtype=np.float32),
            "y": np.asarray(parts.codec.target(batch, state), dtype=np.float32),
            "truth": batch[parts.data.target].to_numpy()}


def encoded_splits(parts: Parts, prepared: PreparedRows, splits=("train", "val")) -> dict:
    """The splits encoded by the codec in Ray Data's map_batches, materialised once for every
    epoch (and for every trial of a search)."""
    from mlsd_ray.training.trainer import materialize_splits

    def encode(dataset):
        return dataset.map_batches(_encode_batch, batch_format="pandas", batch_size=4096,
                                   fn_kwargs={"parts": parts, "state": prepared.codec_state})

    return materialize_splits(prepared, splits, then=encode)


def fold_indices(rows: pd.DataFrame, order: str | None, k: int, seed: int,
                 labels: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """K (train, val) positions of `rows` for cross-validation, the one fold maker of every
    task. With an `order` column the folds chain forward in time (sklearn's TimeSeriesSplit:
    each fold validates on rows later than every row it trains on, so no fold learns from its
    future); with class `labels`, K shuffled folds that keep each class's share; else K
    shuffled folds. InputError when there are too few rows, or members of a class, for K."""
    from sklearn.model_selection import KFold, StratifiedKFold, TimeSeriesSplit

    if len(rows) < 2 * k:
        raise InputError(f"--cv {k}: train+val hold {len(rows)} rows; use at most "
                         f"--cv {max(len(rows) // 2, 2)}")
    if labels is not None:
        smallest = int(pd.Series(labels).value_counts().min())
        if smallest < k:
            raise InputError(f"--cv {k}: the smallest class has {smallest} train+val rows; "
                             f"use at most --cv {max(smallest, 2)}")
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(rows, labels))
    if order is None:
        return list(KFold(k, shuffle=True, random_state=seed).split(rows))
    ranked = np.argsort(rows[order].to_numpy(), kind="stable")
    return [(ranked[train], ranked[val]) for train, val in TimeSeriesSplit(k).split(ranked)]


def cv_folds(parts: Parts, prepared: PreparedRows, k: int, seed: int) -> list[dict]:
    """`mlsd tune --cv K`: K folds of the train and val rows (fold_indices), encoded as
    `encoded_splits` encodes (the codec as fitted on the train split), materialised once."""
    import ray.data

    rows = pd.concat([prepared.load_split("train"), prepared.load_split("val")],
                     ignore_index=True)

    def encoded(index):
        return ray.data.from_pandas(in_blocks(rows.iloc[index])).map_batches(
            _encode_batch, batch_format="pandas", batch_size=4096,
            fn_kwargs={"parts": parts, "state": prepared.codec_state}).materialize()

    return [{"train": encoded(train), "val": encoded(val)}
            for train, val in fold_indices(rows, parts.data.order, k, seed)]


def loop_config(task_name: str, parts: Parts, section: RowsSection, cfg: Config,
                prepared: PreparedRows, run_name: str, init_from: str | None = None,
                reference: PreparedRows | None = None) -> dict:
    """Everything a worker needs. `init_from` (a checkpoint folder) starts from its weights;
    the drift reference describes `reference`'s train split (default: `prepared`'s)."""
    state = prepared.codec_state
    example = parts.codec.encode(prepared.load_split("train").head(2), state)
    return {"parts": parts, "section": section, "state": state,
            "train": cfg.train.model_dump(), "preprocessing": state,
            "reference": feature_reference(parts, (reference or prepared).load_split("train"),
                                           cfg.train.seed),
            "init_from": init_from,
            "model": {"task": task_name, "example_shape": list(example.shape),
                      "columns": prepared.manifest["columns"]},
            "metadata": CheckpointMetadata(run_name, DatasetRef(
                prepared.path, prepared.name, prepared.fingerprint), cfg.to_dict()).to_dict()}


def parts_trainer(task_name: str, parts: Parts, section: RowsSection, cfg: Config,
                  prepared: PreparedRows, run_name: str, storage_path: str,
                  datasets: dict | None = None, callbacks: list | None = None,
                  log: Callable[[str], None] | None = None, init_from: str | None = None,
                  reference: PreparedRows | None = None):
    """The shared TorchTrainer (training/trainer.py) over the encoded splits."""
    from mlsd_ray.training.ingest import plan_ingest
    from mlsd_ray.training.trainer import torch_trainer

    datasets = datasets or encoded_splits(parts, prepared)
    plan = plan_ingest(datasets, cfg.train.in_memory_limit_mb)
    config = loop_config(task_name, parts, section, cfg, prepared, run_name, init_from,
                         reference)
    return torch_trainer(parts_loop_per_worker, config, cfg, run_name, storage_path, plan,
                         datasets, callbacks or [], log)


def evaluate_model(loaded: LoadedModel, prepared: PreparedRows, split: str,
                   out: str) -> PartsEvaluation:
    """Score the model on a split; write report.json and report.md into `out`."""
    rows = prepared.load_split(split)
    scores = loaded.scores(rows)
    metric = loaded.parts.model.metric
    scores = {metric: scores[metric], **{k: v for k, v in scores.items() if k != metric}}
    report_json, report_md = storage.join(out, "report.json"), storage.join(out, "report.md")
    storage.write_json(report_json, {"split": split, "rows": len(rows), "metric": metric,
                                     "scores": scores, "dataset": prepared.path})
    storage.write_text(report_md, "\n".join([
        f"# Evaluation on the {split} split", "", f"{len(rows)} rows of `{prepared.path}`.",
        "", "| score | value |", "|---|---|",
        *(f"| {k} | {v:.4f} |" for k, v in scores.items())]) + "\n")
    return PartsEvaluation(split, metric, scores, len(rows), report_md, report_json)


def epoch_line(metric: str, epochs: int) -> Callable[[dict], str]:
    def line(m: dict) -> str:
        return (f"epoch {m['epoch']}/{epochs}: train loss {m['train_loss']:.4f} | val loss "
                f"{m['val_loss']:.4f} {metric} {m[metric]:.4f} | "
                f"{m['rows_per_second']:.0f} rows/s")
    return line


def run_params(cfg: Config, section_name: str, prepared: PreparedRows) -> dict[str, Any]:
    from mlsd_ray.registry import flat_params

    return {**flat_params("train", cfg.train.model_dump()),
            **flat_params(section_name, getattr(cfg, section_name).model_dump()),
            "data.fingerprint": prepared.fingerprint}


def train_stage(task, cfg: Config, prepared: PreparedRows, workspace: Workspace,
                log: Callable[[str], None], run_name: str | None = None,
                init_from: str | None = None,
                reference: PreparedRows | None = None) -> PartsTrainResult:
    """Train `task` (a PartsTask) on `prepared`, score the best checkpoint on test, and
    register it when registry.auto_register."""
    from mlsd_ray.core.runtime import ensure_ray
    from mlsd_ray.registry.tracking import LiveRun
    from mlsd_ray.training.progress import EpochRelay
    from mlsd_ray.training.trainer import check_resources, fit_best, where_it_trains

    started = time.perf_counter()
    ensure_ray(workspace)
    check_resources(cfg.train)
    name = run_name or cfg.train.run_name or fresh_name(f"{prepared.name}-{task.name}")
    log(f"training on {prepared.manifest['splits']['train']} rows "
        f"{where_it_trains(cfg.train)}, {cfg.train.epochs} epochs; run {name} under "
        f"{workspace.runs}")
    with LiveRun(workspace, name, run_params(cfg, task.section, prepared), prepared.path,
                 prepared.fingerprint, prepared.name,
                 enabled=cfg.registry.auto_register) as tracked:
        relay = EpochRelay(epoch_line(task.metric, cfg.train.epochs), log, tracked.log_epoch)
        best = fit_best(parts_trainer(task.name, task.parts, task.section_of(cfg), cfg,
                                      prepared, name, workspace.runs,
                                      callbacks=[relay.callback()], log=log,
                                      init_from=init_from, reference=reference), relay)
        loaded = task.load(best.path, cfg)  # scored and registered from one load
        summary = scored_result(task, loaded, prepared, best.metrics, name, best.epochs_run,
                                storage.join(workspace.runs, name))
        summary.wall_seconds = time.perf_counter() - started
        if cfg.registry.auto_register:
            summary.registered = register_model(task, cfg, prepared, summary, loaded, workspace,
                                                live=True)
            log(f"registered {summary.registered.uri}")
    return summary


def scored_result(task, loaded: LoadedModel, prepared: PreparedRows, best: dict,
                  run_name: str, epochs_run: int, run_path: str) -> PartsTrainResult:
    """A trained checkpoint's result (`loaded` from it): its best epoch's val score, its test
    scores."""
    evaluation = evaluate_model(loaded, prepared, "test", storage.join(run_path, "evaluation"))
    return PartsTrainResult(run_name=run_name, run_path=run_path,
                            checkpoint=str(loaded.directory), best_epoch=int(best["epoch"]),
                            epochs_run=epochs_run, dataset=prepared.path,
                            metric=task.parts.model.metric, val_score=float(best[task.metric]),
                            test=evaluation.scores, report=evaluation.report)


def register_model(task, cfg: Config, prepared: PreparedRows, summary: PartsTrainResult,
                   loaded: LoadedModel, workspace: Workspace, live: bool = False,
                   nested: bool = False) -> RegisteredVersion:
    """Log the run (test scores, the MLflow Model, the report) and register its checkpoint
    (`loaded` from it: the signature's example answers) as the next version of
    registry.model_name (default: <dataset>-<task>)."""
    import mlflow

    from mlsd_ray.registry.tracking import Registration, register_trained

    metric = summary.metric
    example = prepared.load_split("test").head(EXAMPLE_ROWS)[list(task.parts.data.inputs)]
    return register_trained(Registration(
        task=task.name, model_name=task.model_name(cfg),
        run_name=summary.run_name, checkpoint=summary.checkpoint,
        params=run_params(cfg, task.section, prepared), score_name=metric,
        val_score=summary.val_score, test_score=summary.test[metric],
        best_epoch=summary.best_epoch, architecture=task.name, dataset=prepared.path,
        fingerprint=prepared.fingerprint,
        schema={"input": {c["name"]: c["kind"] for c in prepared.manifest["columns"]},
                "output": prepared.manifest["target"]},
        signature=mlflow.models.infer_signature(example, answers_frame(loaded, example)),
        input_example=example.reset_index(drop=True),
        metrics={f"test_{k}": float(v) for k, v in summary.test.items()},
        description=f"{task.name} model on {prepared.name} (mlsd-ray)",
        reports=(summary.report,)), workspace, live, nested)


def answers_frame(loaded: LoadedModel, rows: pd.DataFrame) -> pd.DataFrame:
    """The codec's answers for rows, one column per answer key (what the pyfunc returns)."""
    codec = loaded.parts.codec
    return pd.DataFrame([codec.answer(p) for p in loaded.predict(rows)])


def read_history(checkpoint: str) -> list[dict]:
    """The epochs a checkpoint's run reported (for a search's best trial)."""
    from mlsd_ray.training.checkpoint import load_train_state

    return load_train_state(checkpoint)["history"]


def trial_result(task, run, best: dict, loaded: LoadedModel) -> PartsTrainResult:
    """A search's best trial (`loaded` from its checkpoint) as a training result, scored on
    test."""
    history = read_history(best["checkpoint"])
    metrics = next(h for h in history if h["epoch"] == best["best_epoch"])
    return scored_result(task, loaded, run.dataset, metrics,
                         f"{run.name}-trial-{best['trial']}", best["epochs_run"], run.path)

