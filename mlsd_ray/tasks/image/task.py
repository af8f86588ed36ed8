"""The image task: a CNN classifying images (the embedded digits, folders, torchvision sets).

Its stages live beside it (data/prepare.py, train.py, evaluate.py, smoke.py, retrain.py,
serve.py); this class is the face the commands, jobs, searches and the shared pipeline
(workflows/pipeline.py) see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import (
    DataSummary,
    Log,
    OfflinePrediction,
    OnlinePrediction,
    ServedApp,
    SmokePrediction,
    Task,
    TrafficRequest,
    TrainedModel,
)
from mlsd_ray.tasks.image.config import ImageConfig

if TYPE_CHECKING:
    from mlsd_ray.explain import ExplanationResult
    from mlsd_ray.export import ExportResult
    from mlsd_ray.monitor.traffic import TrafficReport
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.serve.control import RunningApp
    from mlsd_ray.tasks.image.data.prepare import DatasetSummary
    from mlsd_ray.tasks.image.evaluate import ImageEvaluation
    from mlsd_ray.tasks.image.smoke import ImageServeCheck
    from mlsd_ray.tasks.image.train import TrainResult
    from mlsd_ray.workflows.loop import LoopSteps
    from mlsd_ray.workflows.stages import PipelineResult

VAL_METRIC = "val_accuracy"  # train.VAL_METRIC, without importing torch


class ImageTask(Task):
    """Image classification: the `data`, `model` and `train` sections of the config."""

    name = "image"
    metric = VAL_METRIC
    config_class = ImageConfig
    searchable = ("model.", "data.augment.")  # other data keys change the prepared dataset
    cross_validation = True
    registers_best_trial = True

    def set_source(self, cfg: ImageConfig, source: str | None, label: str | None = None) -> None:
        if label is not None:
            raise InputError("--label names a table's label column; images take their labels "
                             "from their folders (or the dataset)")
        if source is not None:
            cfg.data.source = source

    def model_name(self, cfg: ImageConfig) -> str:
        """`registry.model_name`, else <dataset>-cnn (digits-cnn), as training names it."""
        from mlsd_ray.tasks.image.data.sources import source_name

        return cfg.registry.model_name or \
            f"{cfg.data.name or source_name(cfg.data.source, cfg.data)}-cnn"

    def prepare(self, cfg: ImageConfig, workspace: Workspace, log: Log, force: bool = False):
        from mlsd_ray.tasks.image.data.prepare import prepare_dataset

        return prepare_dataset(cfg, workspace=workspace, force=force, log=log)

    def trainer(self, cfg: ImageConfig, prepared, run_name: str, storage_path: str,
                datasets: dict | None = None, callbacks: list | None = None,
                log: Log | None = None):
        from mlsd_ray.tasks.image.train import build_trainer

        return build_trainer(cfg, prepared, run_name, storage_path, datasets=datasets,
                             callbacks=callbacks, log=log)

    def search_datasets(self, prepared) -> dict:
        from mlsd_ray.tasks.image.train import materialize_splits

        return materialize_splits(prepared)

    def cv_folds(self, cfg: ImageConfig, prepared, k: int) -> list[dict]:
        from mlsd_ray.tasks.image.tune import cv_folds

        return cv_folds(prepared, k, cfg.data.seed, cfg.data.rows_per_task)

    def open_prepared(self, path: str):
        from mlsd_ray.tasks.image.data.prepare import PreparedDataset

        return PreparedDataset.open(path)

    def train(self, cfg: ImageConfig, workspace: Workspace, log: Log, run_name: str | None = None,
              prepared=None) -> TrainResult:
        from mlsd_ray.tasks.image.train import train_and_register

        return train_and_register(cfg, workspace=workspace, log=log, run_name=run_name,
                                  dataset=prepared)

    def serve_check(self, cfg: ImageConfig, trained: TrainedModel, workspace: Workspace,
                    keep_serving: bool, log: Log,
                    then: Callable[[str, str], LoopSteps] | None = None
                    ) -> tuple[ImageServeCheck, LoopSteps | None]:
        from mlsd_ray.tasks.image.smoke import serve_smoke_check

        return serve_smoke_check(cfg.serve, trained.model_uri(), trained.dataset, workspace,
                                 keep_serving, log, then=then)

    def serve_application(self, settings, model: PinnedModel, workspace: Workspace) -> ServedApp:
        from mlsd_ray.tasks.image.serve import app_from_config

        return ServedApp(app_from_config(settings, model, workspace), "/", "/v1/health",
                         "/v1/model", {"predict_url": "/v1/predict"})

    def predictor(self, checkpoint_dir: str):
        """uint8 images (N, H, W, C) -> class probabilities (N, K)."""
        from mlsd_ray.tasks.image.checkpoint import load_model

        return load_model(checkpoint_dir).predict

    def evaluate(self, checkpoint_dir: str, split: str, workspace: Workspace,
                 dataset_path: str | None = None) -> ImageEvaluation:
        from mlsd_ray.tasks.image.evaluate import evaluate_checkpoint

        return evaluate_checkpoint(checkpoint_dir, split, workspace, dataset_path)

    def register_best_trial(self, run, best: dict, best_cfg, workspace: Workspace,
                            log: Log) -> TrainResult:
        from mlsd_ray.tasks.image.tune import register_best_trial

        return register_best_trial(run, best, best_cfg, workspace, log)

    def explain(self, checkpoint_dir: str, source: str | None, label: str | None, count: int,
                out: str | None, workspace: Workspace) -> ExplanationResult:
        from mlsd_ray.tasks.image.explain import explain_checkpoint

        return explain_checkpoint(checkpoint_dir, source, label, count, out, workspace)

    def export(self, checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
               model_uri: str, workspace: Workspace) -> ExportResult:
        from mlsd_ray.tasks.image.export import export_image_model

        return export_image_model(checkpoint_dir, fmt, quantize, out, model_uri, workspace)

    def predict_offline(self, model: PinnedModel, cfg: ImageConfig,
                        out: str | None, workspace: Workspace,
                        log: Log) -> OfflinePrediction:
        from mlsd_ray.tasks.image.batch import predict_dataset

        return predict_dataset(model, cfg, out, workspace, log)

    def predict_online(self, url: str, files: list) -> ImagePredictions:
        from mlsd_ray.serve.client import predict_files

        return ImagePredictions.of(url, [str(f) for f in files], predict_files(url, files))

    def simulate_traffic(self, prepared, request: TrafficRequest) -> TrafficReport:
        from mlsd_ray.tasks.image.traffic import simulate_traffic

        if request.column:
            raise InputError("--column is for tables; an image shift changes whole images")
        return simulate_traffic(request.url, prepared, request.shift, request.amount,
                                request.count, request.split, request.seed, request.batch,
                                request.concurrency, request.save)

    def retrain_data(self, cfg: ImageConfig, champion_dir: str, source: str,
                     workspace: Workspace, log: Log):
        from mlsd_ray.tasks.image.retrain import retrain_data

        return retrain_data(cfg, champion_dir, source, workspace, log)

    def train_challenger(self, cfg: ImageConfig, data, init_from: str | None, workspace: Workspace,
                         log: Log) -> TrainResult:
        from mlsd_ray.tasks.image.retrain import train_challenger

        return train_challenger(cfg, data, init_from, workspace, log)

    def holdout_scores(self, checkpoint_dir: str, parts: dict) -> dict:
        from mlsd_ray.tasks.image.retrain import holdout_scores

        return holdout_scores(checkpoint_dir, parts)

    def drift_drill(self, prepared, incoming: str):
        """The whole train split rotated 30 degrees, saved as a labelled folder."""
        from mlsd_ray.workflows.loop import DriftDrill

        return DriftDrill(TrafficRequest(None, "rotate", count=0, split="train", save=incoming),
                          f"folder:{incoming}")

    def smoke_retrain_source(self, workspace: Workspace, log: Log) -> str:
        """300 digits rotated 30 degrees, as a labelled folder in the workspace."""
        import numpy as np
        from sklearn.datasets import load_digits

        from mlsd_ray.tasks.image.data.sources import digits_uint8
        from mlsd_ray.tasks.image.traffic import save_folder, shift_images

        digits = load_digits()
        images = digits_uint8(digits.images[:300])[..., None]
        folder = workspace.incoming("smoke-rotated")
        save_folder(shift_images(images, "rotate", 30.0, np.random.default_rng(0)),
                    digits.target[:300], [str(c) for c in range(10)], folder, "rotated")
        log(f"smoke: 300 rotated digits written to {folder}")
        return f"folder:{folder}"

    def smoke_prediction(self, served: RunningApp) -> SmokePrediction:
        """One embedded digit (a 0) predicted over HTTP."""
        from sklearn.datasets import load_digits

        from mlsd_ray.serve.client import b64_instance, post_json
        from mlsd_ray.tasks.image.data.sources import digits_uint8
        from mlsd_ray.tasks.image.traffic import png_bytes

        image = digits_uint8(load_digits().images[0])[..., None]
        answer = post_json(served.endpoint("predict_url"),
                           {"instances": [b64_instance(png_bytes(image))]})
        return SmokePrediction(sent="the first embedded digit, a 0",
                               answer=answer["predictions"][0],
                               model_version=str(answer["model_version"]))

    def render_data(self, summary: DataSummary) -> None:
        render_dataset(cast("DatasetSummary", summary))

    def render_pipeline(self, result: PipelineResult) -> None:
        from mlsd_ray.tasks.image.evaluate import ImageEvaluation

        render_dataset(cast("DatasetSummary", result.data))
        if result.tune is not None:
            searched = result.tune
            print(f"\ntuned {searched.trials} trials ({searched.stopped_early} stopped "
                  f"early): best {searched.best.params}, val accuracy "
                  f"{searched.best.score:.4f}; results {searched.results}")
        train = result.train
        print(f"\ntrained {train.run_name}: {train.test_line()} in {train.wall_seconds:.1f} s")
        if train.registered:
            print(f"registered: {train.registered.uri}")
        evaluation = result.evaluation
        if isinstance(evaluation, ImageEvaluation):
            print(f"evaluation: {evaluation.headline()}; report {evaluation.report}")
        if result.promoted is not None:
            print(result.promoted.describe())
        if result.serve is not None:
            print(result.serve.describe())
        if result.loop is not None:
            from mlsd_ray.workflows.loop import render_loop

            render_loop(result.loop)


def render_dataset(summary: DatasetSummary) -> None:
    """The data stage's counts, classes and where its outputs are."""
    from rich.console import Console
    from rich.table import Table

    counts = summary.counts
    table = Table(title=f"dataset {summary.name} ({summary.fingerprint})"
                        + (" — reused" if summary.reused else ""))
    for column in ("input", "kept", "quarantined", "train", "val", "test"):
        table.add_column(column, justify="right")
    table.add_row(*(str(v) for v in (counts.input, counts.kept, counts.quarantined,
                                     *counts.splits.values())))
    console = Console()
    console.print(table)
    for reason, count in summary.quarantine_by_reason.items():
        console.print(f"  quarantined {count} × {reason}")
    for warning in summary.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"classes: {len(summary.class_names)}, images stored as "
                  f"{'×'.join(map(str, summary.image_shape))} uint8")
    console.print(f"quality report: {summary.quality_report}", soft_wrap=True)
    console.print(f"examples: {summary.samples}", soft_wrap=True)
    console.print(f"output: {summary.path}", soft_wrap=True)


@dataclass(frozen=True)
class ImageAnswer:
    """The app's answer for one image file: its class and that class's probability."""

    file: str
    class_name: str
    probability: float


@dataclass(frozen=True)
class ImagePredictions(OnlinePrediction):
    """`mlsd predict --url URL IMAGE...`: one answer per file, and the model that gave them."""

    url: str
    answers: list[ImageAnswer]
    model_name: str
    model_version: str
    response: dict[str, Any]  # /v1/predict's JSON as it came: what --json prints

    @classmethod
    def of(cls, url: str, files: list[str], response: dict[str, Any]) -> ImagePredictions:
        """Read /v1/predict's answer (one prediction per file, in order)."""
        answers = [ImageAnswer(file, p["class_name"], max(p["probabilities"].values()))
                   for file, p in zip(files, response["predictions"])]
        return cls(url, answers, str(response["model_name"]), str(response["model_version"]),
                   response)

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "files": [a.file for a in self.answers], **self.response}

    def describe(self) -> str:
        lines = [f"{a.file}: {a.class_name} ({a.probability:.3f})" for a in self.answers]
        return "\n".join([*lines, f"model {self.model_name} version {self.model_version}"])
