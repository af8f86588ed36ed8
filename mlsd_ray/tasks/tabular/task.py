"""The tabular task: an MLP on a table (fraud detection, or any CSV/parquet with a label).

Its stages live in mlsd_ray/tasks/tabular/ (prepare.py, train.py, stage.py, smoke.py, serve.py);
this class is the face the commands, jobs, searches and the shared pipeline
(workflows/pipeline.py) see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, cast

from mlsd_ray.core.contracts import CheckpointMetadata
from mlsd_ray.core.workspace import Workspace
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
from mlsd_ray.tasks.tabular.config import TabularTaskConfig
from mlsd_ray.tasks.tabular.result import VAL_SCORE

if TYPE_CHECKING:
    from mlsd_ray.explain import ExplanationResult
    from mlsd_ray.export import ExportResult
    from mlsd_ray.monitor.traffic import TrafficReport
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.serve.control import RunningApp
    from mlsd_ray.tasks.tabular.predict import TablePredictions
    from mlsd_ray.tasks.tabular.prepare import TableSummary
    from mlsd_ray.tasks.tabular.result import TabularTrainResult
    from mlsd_ray.tasks.tabular.smoke import TabularServeCheck
    from mlsd_ray.tasks.tabular.stage import TabularEvaluation
    from mlsd_ray.workflows.loop import LoopSteps
    from mlsd_ray.workflows.stages import PipelineResult

# The metrics a summary shows, by the name of the score the task ranks by.


class TabularTask(Task):
    """Tables: the `tabular` section of the config (source, columns, the MLP, the decision)."""

    name = "tabular"
    metric = VAL_SCORE
    config_class = TabularTaskConfig
    searchable = ("tabular.hidden", "tabular.dropout", "tabular.class_weight")  # the MLP's
    registers_best_trial = True
    cross_validation = True
    train_stage = "train, evaluate, register"  # training scores test at the chosen threshold
    evaluate_stage = False

    def set_source(self, cfg: TabularTaskConfig, source: str | None,
                   label: str | None = None) -> None:
        if source is not None:
            cfg.tabular.source = source
        if label is not None:
            cfg.tabular.label = label

    def model_name(self, cfg: TabularTaskConfig) -> str:
        """`registry.model_name`, else <table>-mlp (fraud-synth-mlp), as training names it."""
        from mlsd_ray.tasks.tabular.sources import source_name

        return cfg.registry.model_name or f"{source_name(cfg.tabular.source)}-mlp"

    def prepare(self, cfg: TabularTaskConfig, workspace: Workspace, log: Log, force: bool = False):
        from mlsd_ray.tasks.tabular.prepare import prepare_table

        return prepare_table(cfg, workspace=workspace, force=force, log=log)

    def trainer(self, cfg: TabularTaskConfig, prepared, run_name: str, storage_path: str,
                datasets: dict | None = None, callbacks: list | None = None,
                log: Log | None = None):
        from mlsd_ray.tasks.tabular.train import build_tabular_trainer

        return build_tabular_trainer(cfg, prepared, run_name, storage_path, datasets=datasets,
                                     callbacks=callbacks, log=log)

    def search_datasets(self, prepared) -> dict:
        from mlsd_ray.tasks.tabular.train import materialize_features

        return materialize_features(prepared)

    def open_prepared(self, path: str):
        from mlsd_ray.tasks.tabular.prepare import PreparedTable

        return PreparedTable.open(path)

    def train(self, cfg: TabularTaskConfig, workspace: Workspace, log: Log,
              run_name: str | None = None,
              prepared=None) -> TabularTrainResult:
        from mlsd_ray.tasks.tabular.stage import run_tabular_train

        return run_tabular_train(cfg, workspace=workspace, log=log, run_name=run_name,
                                 table=prepared)

    def serve_check(self, cfg: TabularTaskConfig, trained: TrainedModel, workspace: Workspace,
                    keep_serving: bool, log: Log,
                    then: Callable[[str, str], LoopSteps] | None = None
                    ) -> tuple[TabularServeCheck, LoopSteps | None]:
        """Test rows scored over HTTP beside the same model offline, and the decisions."""
        from mlsd_ray.tasks.tabular.smoke import serve_check_fraud

        return serve_check_fraud(cfg, trained.model_uri(), self.open_prepared(trained.dataset),
                                 workspace, log, keep_serving, then=then)

    def serve_application(self, settings, model: PinnedModel, workspace: Workspace) -> ServedApp:
        """The fraud scoring app (threshold, rules, policy) with the `tabular` section the
        model was trained with, from its checkpoint."""
        from mlsd_ray.core.errors import InputError

        if settings.runtime != "torch":
            raise InputError(f"serve.runtime={settings.runtime} runs image models; the tabular "
                             "task's replicas run torch (serve.runtime=torch)")
        trained = TabularTaskConfig.from_record(_metadata(model.path).config)
        return fraud_application(settings, trained.tabular, model, workspace)

    def predictor(self, checkpoint_dir: str):
        """A frame of the model's columns -> its score and class at the model's threshold
        (binary), class probabilities and class (multiclass), or the prediction."""
        from mlsd_ray.tasks.tabular.predict import model_outputs
        from mlsd_ray.tasks.tabular.train import load_tabular

        loaded = load_tabular(checkpoint_dir)
        return lambda frame: model_outputs(loaded, frame)

    def evaluate(self, checkpoint_dir: str, split: str, workspace: Workspace,
                 dataset_path: str | None = None) -> TabularEvaluation:
        """The MLP at its stored threshold beside the baseline, on the test split."""
        from mlsd_ray.core.errors import InputError
        from mlsd_ray.tasks.tabular.prepare import PreparedTable
        from mlsd_ray.tasks.tabular.stage import evaluate_checkpoint

        if split != "test":
            raise InputError(f"a tabular model is evaluated on its test split, not {split!r} "
                             "(its threshold was chosen on val)")
        metadata = _metadata(checkpoint_dir)
        table = PreparedTable.open(dataset_path or metadata.dataset.path)
        out = workspace.report(metadata.run_name, split)
        evaluation = evaluate_checkpoint(TabularTaskConfig.from_record(metadata.config), table,
                                         checkpoint_dir, out)
        return replace(evaluation, model=checkpoint_dir, run_name=metadata.run_name)

    def explain(self, checkpoint_dir: str, source: str | None, label: str | None, count: int,
                out: str | None, workspace: Workspace) -> ExplanationResult:
        from mlsd_ray.tasks.tabular.explain import explain_table

        return explain_table(checkpoint_dir, source, label, count, out, workspace)

    def export(self, checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
               model_uri: str, workspace: Workspace) -> ExportResult:
        from mlsd_ray.tasks.tabular.export import export_tabular_model

        return export_tabular_model(checkpoint_dir, fmt, quantize, out, model_uri, workspace)

    def cv_folds(self, cfg: TabularTaskConfig, prepared, k: int) -> list[dict]:
        from mlsd_ray.tasks.tabular.train import cv_folds

        return cv_folds(prepared, k, cfg.tabular.seed)

    def register_best_trial(self, run, best: dict, best_cfg, workspace: Workspace,
                            log: Log) -> TabularTrainResult:
        from mlsd_ray.tasks.tabular.stage import register_trial

        return register_trial(run, best, best_cfg, workspace, log)

    def predict_offline(self, model: PinnedModel, cfg: TabularTaskConfig,
                        out: str | None, workspace: Workspace,
                        log: Log) -> OfflinePrediction:
        from mlsd_ray.tasks.tabular.predict import predict_table

        return predict_table(model, cfg.tabular.source, out, workspace, log, cfg.tabular.seed)

    def predict_online(self, url: str, files: list) -> TablePredictions:
        from mlsd_ray.tasks.tabular.predict import predict_files

        return predict_files(url, files)

    def simulate_traffic(self, prepared, request: TrafficRequest) -> TrafficReport:
        from mlsd_ray.tasks.tabular.traffic import simulate_table_traffic

        return simulate_table_traffic(request.url, prepared, request.shift, request.amount,
                                      request.column, request.count, request.split,
                                      request.seed, request.batch, request.concurrency,
                                      request.save)

    def retrain_data(self, cfg: TabularTaskConfig, champion_dir: str, source: str,
                     workspace: Workspace, log: Log):
        from mlsd_ray.tasks.tabular.retrain import retrain_data

        return retrain_data(cfg, champion_dir, source, workspace, log)

    def train_challenger(self, cfg: TabularTaskConfig, data, init_from: str | None,
                         workspace: Workspace,
                         log: Log) -> TabularTrainResult:
        from mlsd_ray.tasks.tabular.retrain import train_challenger

        return train_challenger(cfg, data, init_from, workspace, log)

    def holdout_scores(self, checkpoint_dir: str, parts: dict) -> dict:
        from mlsd_ray.tasks.tabular.retrain import holdout_scores

        return holdout_scores(checkpoint_dir, parts)

    def drift_drill(self, prepared, incoming: str):
        """600 train rows with the first numeric column tripled, saved as a labelled CSV."""
        from mlsd_ray.core.errors import InputError
        from mlsd_ray.workflows.loop import DriftDrill

        plan = prepared.manifest["preprocessing"]["plan"]
        numeric = [entry["name"] for entry in plan if entry["kind"] == "numeric"]
        if not numeric:
            raise InputError("the monitoring loop shifts a numeric column; this table has none")
        saved = f"{incoming}/shifted.csv"
        return DriftDrill(TrafficRequest(None, "scale", amount=3.0, column=numeric[0],
                                         count=600, split="train", batch=10, save=saved),
                          f"csv:{saved}")

    def smoke_retrain_source(self, workspace: Workspace, log: Log) -> str:
        """2,000 new generated transactions (another seed) as a CSV in the workspace."""
        from mlsd_ray.core import storage
        from mlsd_ray.tasks.tabular.sources import fraud_synth

        path = workspace.incoming("smoke-fraud.csv")
        storage.write_text(path, fraud_synth(2000, seed=1).to_csv(index=False))
        log(f"smoke: 2000 new transactions written to {path}")
        return f"csv:{path}"

    def smoke_prediction(self, served: RunningApp) -> SmokePrediction:
        """One record built from the served model's own columns, scored over HTTP."""
        from mlsd_ray.serve.client import post_json
        from mlsd_ray.serve.control import get_json

        columns = get_json(f"{served.url}{served.model_path}", timeout=30)["columns"]
        record = {c["name"]: (c["categories"] or ["x"])[0] if c["kind"] == "categorical"
                  else 1.0 for c in columns}
        answer = post_json(served.endpoint("score_url"), {"records": [record]})
        return SmokePrediction(sent=record, answer=answer["results"][0],
                               model_version=str(answer["model_version"]))

    def render_data(self, summary: DataSummary) -> None:
        render_table(cast("TableSummary", summary))

    def render_pipeline(self, result: PipelineResult) -> None:
        from mlsd_ray.workflows.stages import render_stages

        render_stages(result, self.render_data)


def fraud_application(settings, tabular, model: PinnedModel, workspace: Workspace) -> ServedApp:
    """The fraud app (its routes at /v1/fraud, the V2 protocol's at /v2), starting from its
    config's policy (not the last one set)."""
    import os

    from mlsd_ray.tasks.tabular.serve import PREFIX, fraud_app, policy_file

    policy = policy_file(workspace, settings.app_name)
    if os.path.exists(policy):
        os.remove(policy)
    return ServedApp(fraud_app(settings, tabular, model, workspace), "/", f"{PREFIX}/health",
                     f"{PREFIX}/model", {"score_url": f"{PREFIX}/score"})


def _metadata(checkpoint_dir: str) -> CheckpointMetadata:
    """A checkpoint's metadata.json: its run, its dataset and the config it was trained with."""
    return CheckpointMetadata.read(checkpoint_dir)


def render_table(summary: TableSummary) -> None:
    """The prepared table: task, label, rows, features, where it went."""
    print(f"table {summary.name} ({summary.task}, label {summary.label!r}): "
          f"{summary.counts.splits} rows, {summary.features} features, "
          f"{summary.counts.quarantined} quarantined")
    print(f"prepared: {summary.path}" + (" (reused)" if summary.reused else ""))
    print(f"quality report: {summary.quality_report}")
