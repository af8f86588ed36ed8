"""`PartsTask`: a whole `Task` from a few parts. Subclass it, set `name`, `config_class`,
`section` (the name of the task's own config section, a `RowsSection`) and `parts`; every
command, job, search and the pipeline then work for it through the stages of this package.

    class ForecastTask(PartsTask):
        name = "forecast"
        config_class = ForecastConfig       # Config + a `forecast: ForecastSection` field
        section = "forecast"
        parts = Parts(data=Windows(), codec=Scaled(), model=GRU())

`metric` is the model part's metric on the validation split (`val_<metric>`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

from mlsd_ray.core.config import Config
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.data import PreparedRows, RowsSummary, dataset_name, prepare_rows
from mlsd_ray.stages.parts import Parts, RowsSection
from mlsd_ray.tasks.base import (
    DataSummary,
    Log,
    OfflinePrediction,
    ServedApp,
    SmokePrediction,
    Task,
    TrafficRequest,
    TrainedModel,
)

if TYPE_CHECKING:
    from mlsd_ray.explain import ExplanationResult
    from mlsd_ray.export import ExportResult
    from mlsd_ray.monitor.traffic import TrafficReport
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.serve.control import RunningApp
    from mlsd_ray.stages.check import PartsServeCheck
    from mlsd_ray.stages.model import LoadedModel
    from mlsd_ray.stages.predict import OnlineAnswers
    from mlsd_ray.stages.train import PartsEvaluation, PartsTrainResult
    from mlsd_ray.workflows.loop import DriftDrill, LoopSteps
    from mlsd_ray.workflows.retrain import HoldoutScore, RetrainData
    from mlsd_ray.workflows.stages import PipelineResult

__all__ = ["PartsTask"]


class PartsTask(Task):
    """A task that supplies parts; the shared stages do the rest (see the module docstring)."""

    section: ClassVar[str]
    parts: ClassVar[Parts]
    registers_best_trial = True
    cross_validation = True
    train_stage = "train, evaluate, register"
    evaluate_stage = False  # training scores the test split already

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        parts = cls.__dict__.get("parts")
        if isinstance(parts, Parts):
            cls.metric = f"val_{parts.model.metric}"

    @classmethod
    def missing_parts(cls) -> list[str]:
        """Each part the class does not set, with what it is for."""
        from mlsd_ray.stages.parts import Codec, DataPart, ModelPart

        parts = getattr(cls, "parts", None)
        if not isinstance(parts, Parts):
            return ["parts: a Parts(data=..., codec=..., model=...), the typed parts every "
                    "stage calls"]
        lacking = [f"parts.{field}: a {kind.__name__}, {purpose}" for field, kind, purpose in (
            ("data", DataPart, "where rows come from and which are unusable"),
            ("codec", Codec, "rows to the model's arrays and its outputs to answers"),
            ("model", ModelPart, "the network, its loss and its scores"))
            if not isinstance(getattr(parts, field), kind)]
        section = getattr(cls, "section", None)
        fields = getattr(getattr(cls, "config_class", None), "model_fields", {})
        if section not in fields:
            lacking.append("section: the name of the task's own config section, a RowsSection "
                           "field of its config_class")
        return lacking

    # ------------------------------------------------------------------ configuration

    def section_of(self, cfg: Config) -> RowsSection:
        """The task's own config section of `cfg`."""
        return getattr(cfg, self.section)

    def set_source(self, cfg: Config, source: str | None, label: str | None = None) -> None:
        if label is not None:
            raise InputError(f"--label: the {self.name} task learns its column "
                             f"{self.parts.data.target!r}; it takes no --label")
        if source is not None:
            self.section_of(cfg).source = source

    def model_name(self, cfg: Config) -> str:
        """`registry.model_name`, else <dataset>-<task>, as training names it."""
        return cfg.registry.model_name or \
            f"{dataset_name(self.section_of(cfg).source)}-{self.name}"

    def load(self, checkpoint_dir: str, cfg: Config | None = None) -> LoadedModel:
        """The model in `checkpoint_dir`, with the section it was trained with (or `cfg`'s)."""
        from mlsd_ray.stages.model import load_model, load_trained

        if cfg is None:
            return load_trained(self, checkpoint_dir)
        return load_model(checkpoint_dir, self.parts, self.section_of(cfg))

    # ------------------------------------------------------------------ data and training

    def prepare(self, cfg: Config, workspace: Workspace, log: Log,
                force: bool = False) -> PreparedRows:
        section = self.section_of(cfg)
        return prepare_rows(dataset_name(section.source), self.parts, section, workspace, log,
                            force)

    def open_prepared(self, path: str) -> PreparedRows:
        return PreparedRows.open(path)

    def trainer(self, cfg: Config, prepared, run_name: str, storage_path: str,
                datasets: dict | None = None, callbacks: list | None = None,
                log: Log | None = None):
        from mlsd_ray.stages.train import parts_trainer

        return parts_trainer(self.name, self.parts, self.section_of(cfg), cfg, prepared,
                             run_name, storage_path, datasets, callbacks, log)

    def search_datasets(self, prepared) -> dict:
        from mlsd_ray.stages.train import encoded_splits

        return encoded_splits(self.parts, prepared)

    def cv_folds(self, cfg: Config, prepared, k: int) -> list[dict]:
        from mlsd_ray.stages.train import cv_folds

        return cv_folds(self.parts, prepared, k, self.section_of(cfg).seed)

    def train(self, cfg: Config, workspace: Workspace, log: Log, run_name: str | None = None,
              prepared: Any = None) -> PartsTrainResult:
        from mlsd_ray.stages.train import train_stage

        prepared = prepared or self.prepare(cfg, workspace, log)
        return train_stage(self, cfg, prepared, workspace, log, run_name)

    def register_best_trial(self, run, best: dict, best_cfg, workspace: Workspace,
                            log: Log) -> PartsTrainResult:
        """The best trial's model registered as a child of the search's run; with --cv, the
        best configuration refitted on the whole train split first (a fold saw less)."""
        from mlsd_ray.stages.train import register_model, train_stage, trial_result

        if run.cfg.tune.cv > 1:
            log("refitting the best configuration on the full train split")
            refit = best_cfg.model_copy(deep=True)
            refit.registry.auto_register = False  # registered below, as the search's child
            result = train_stage(self, refit, run.dataset, workspace, log, f"{run.name}-refit")
            loaded = self.load(result.checkpoint, best_cfg)
        else:
            loaded = self.load(best["checkpoint"], best_cfg)
            result = trial_result(self, run, best, loaded)
        result.registered = register_model(self, best_cfg, run.dataset, result, loaded,
                                           workspace, nested=True)
        log(f"registered {result.registered.uri}")
        return result

    def evaluate(self, checkpoint_dir: str, split: str, workspace: Workspace,
                 dataset_path: str | None = None) -> PartsEvaluation:
        from dataclasses import replace

        from mlsd_ray.stages.train import evaluate_model

        loaded = self.load(checkpoint_dir)
        run = loaded.metadata.run_name
        prepared = PreparedRows.open(dataset_path or loaded.metadata.dataset.path)
        evaluation = evaluate_model(loaded, prepared, split, workspace.report(run, split))
        return replace(evaluation, model=checkpoint_dir, run_name=run)

    # ------------------------------------------------------------------ serving

    def serve_application(self, settings, model: PinnedModel, workspace: Workspace) -> ServedApp:
        from mlsd_ray.core.contracts import CheckpointMetadata
        from mlsd_ray.stages.serve import PREFIX, parts_application

        if settings.runtime != "torch":
            raise InputError(f"serve.runtime={settings.runtime}: the {self.name} task's "
                             "replicas run torch (serve.runtime=torch)")
        config = CheckpointMetadata.read(model.path).config
        return ServedApp(parts_application(self, settings, model, workspace, config), "/",
                         f"{PREFIX}/health", f"{PREFIX}/model",
                         {"predict_url": f"{PREFIX}/predict"})

    def serve_check(self, cfg: Config, trained: TrainedModel, workspace: Workspace,
                    keep_serving: bool, log: Log,
                    then: Callable[[str, str], LoopSteps] | None = None
                    ) -> tuple[PartsServeCheck, LoopSteps | None]:
        from mlsd_ray.stages.check import serve_check

        return serve_check(self, cfg, trained, workspace, keep_serving, log, then)

    def smoke_prediction(self, served: RunningApp) -> SmokePrediction:
        from mlsd_ray.stages.check import smoke_prediction

        return smoke_prediction(served)

    def predictor(self, checkpoint_dir: str) -> Callable[[Any], Any]:
        """A frame of the input columns -> a frame of the codec's answers."""
        import pandas as pd

        from mlsd_ray.stages.train import answers_frame

        loaded = self.load(checkpoint_dir)
        return lambda frame: answers_frame(loaded, pd.DataFrame(frame))

    def predict_offline(self, model: PinnedModel, cfg: Config, out: str | None,
                        workspace: Workspace, log: Log) -> OfflinePrediction:
        from mlsd_ray.stages.predict import predict_rows

        return predict_rows(self, model.path, self.section_of(cfg), model.uri, out, workspace,
                            log)

    def predict_online(self, url: str, files: list) -> OnlineAnswers:
        from mlsd_ray.stages.predict import predict_files

        return predict_files(self.parts, url, files)

    def explain(self, checkpoint_dir: str, source: str | None, label: str | None, count: int,
                out: str | None, workspace: Workspace) -> ExplanationResult:
        from mlsd_ray.stages.explain import explain_rows

        return explain_rows(self.load(checkpoint_dir), source, label, count, out, workspace)

    def export(self, checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
               model_uri: str, workspace: Workspace) -> ExportResult:
        from mlsd_ray.stages.export import export_model

        return export_model(self.load(checkpoint_dir), fmt, quantize, out, model_uri,
                            workspace)

    # ------------------------------------------------------------------ monitoring, retraining

    def simulate_traffic(self, prepared, request: TrafficRequest) -> TrafficReport:
        from mlsd_ray.stages.traffic import simulate_traffic

        return simulate_traffic(self.parts, prepared, request)

    def drift_drill(self, prepared, incoming: str) -> DriftDrill:
        from mlsd_ray.stages.traffic import drift_drill_request
        from mlsd_ray.workflows.loop import DriftDrill

        return DriftDrill(*drift_drill_request(self.parts, incoming))

    def smoke_retrain_source(self, workspace: Workspace, log: Log) -> str:
        """The task's default source drawn with another seed, saved as rows."""
        from mlsd_ray.stages.data import ROWS_PREFIX, read_rows, write_rows

        default = self.config_class.model_fields[self.section].get_default(
            call_default_factory=True)
        section = default.model_copy(update={"seed": 1})
        path = workspace.incoming(f"smoke-{self.name}.parquet")
        write_rows(path, read_rows(self.parts, section))
        log(f"smoke: new rows of {section.source} (seed 1) written to {path}")
        return f"{ROWS_PREFIX}{path}"

    def retrain_data(self, cfg, champion_dir: str, source: str, workspace: Workspace,
                     log: Log) -> RetrainData:
        from mlsd_ray.stages.retrain import retrain_data

        return retrain_data(self, cfg.retrain.keep_old_data, champion_dir, source, workspace,
                            log)

    def train_challenger(self, cfg, data, init_from: str | None, workspace: Workspace,
                         log: Log) -> PartsTrainResult:
        from mlsd_ray.stages.train import train_stage

        return train_stage(self, cfg, data.combined, workspace, log, init_from=init_from,
                           reference=data.new)

    def holdout_scores(self, checkpoint_dir: str, parts: dict) -> dict[str, HoldoutScore]:
        from mlsd_ray.stages.retrain import holdout_scores

        return holdout_scores(self, checkpoint_dir, parts)

    # ------------------------------------------------------------------ the console

    def render_data(self, summary: DataSummary) -> None:
        print(summary.describe() if isinstance(summary, RowsSummary) else summary.to_dict())

    def render_pipeline(self, result: PipelineResult) -> None:
        from mlsd_ray.workflows.stages import render_stages

        render_stages(result, self.render_data)
