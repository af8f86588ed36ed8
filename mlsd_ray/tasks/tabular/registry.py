"""Tabular models in the registry: the same MLflow store, runs and aliases as the CNN, with
the tabular task's metrics, the decision threshold and the input schema as version tags."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import (
    RegisteredVersion,
    client,
    flat_params,
    log_checkpoint_model,
    new_version,
    version_tags,
)
from mlsd_ray.tasks.tabular.config import TabularTaskConfig
from mlsd_ray.tasks.tabular.prepare import PreparedTable

if TYPE_CHECKING:
    from mlsd_ray.tasks.tabular.result import TabularTrainResult

EXAMPLE_ROWS = 3  # test-split rows stored with the model as its input example


def table_signature(table: PreparedTable):
    """The model's columns in (numbers as double, categories as string; each may be
    missing, as the app imputes it), and `model_outputs`' columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    m = table.manifest
    inputs = [ColSpec("string" if entry["kind"] == "categorical" else "double", entry["name"],
                      required=False) for entry in m["preprocessing"]["plan"]]
    outputs = [ColSpec("double", "score")]
    if m["task"] != "regression":
        outputs += [ColSpec("string", "predicted_class"),
                    *(ColSpec("double", f"probability_{name}") for name in m["classes"])]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(table: PreparedTable):
    """The first test rows, model columns only (ids and the label are not inputs)."""
    columns = [entry["name"] for entry in table.manifest["preprocessing"]["plan"]]
    return table.load_split("test")[columns].head(EXAMPLE_ROWS).reset_index(drop=True)


def _scalars(prefix: str, values: dict | None) -> dict:
    return {f"{prefix}{k}": float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_params(cfg: TabularTaskConfig, table: PreparedTable) -> dict:
    """The params of a tabular training run: the training and table settings, the data."""
    return {**flat_params("train", cfg.train.model_dump()),
            **flat_params("tabular", cfg.tabular.model_dump(exclude={"columns"})),
            "tabular.hidden": str(cfg.tabular.hidden),
            "data.fingerprint": table.manifest["fingerprint"]}


def register_tabular(summary: TabularTrainResult, cfg: TabularTaskConfig, table: PreparedTable,
                     model_name: str, workspace: Workspace, nested: bool = False,
                     live: bool = False) -> RegisteredVersion:
    """Log the run (test and baseline metrics, the model, the evaluation report) and register
    the checkpoint as a new version of `model_name`.

    `live`: the run is the active one, opened with its params and fed each epoch while it
    trained (registry/tracking.py); else a run is opened here (a child of the active run
    when `nested`: a search's best trial) with the params and the history replayed."""
    import mlflow

    from mlsd_ray.registry.tracking import registration_run

    mlflow_client = client(workspace)
    m = table.manifest
    schema = {"input": {e["name"]: e["kind"] for e in m["columns"]},
              "output": {"task": m["task"], "classes": m["classes"]}}
    score = summary.score_name
    tags = version_tags(task="tabular", run_name=summary.run_name, score_name=score,
                        val_score=summary.val_score, test_score=summary.test[score],
                        best_epoch=summary.best_epoch, model="tabular_mlp",
                        dataset=table.path, fingerprint=m["fingerprint"], schema=schema)
    tags["table_task"] = m["task"]  # binary, multiclass or regression
    if summary.decision:
        tags["threshold"] = f"{summary.decision['threshold']:.6f}"
    with registration_run(summary.run_name, run_params(cfg, table), summary.checkpoint,
                          live, nested) as run:
        mlflow.log_metrics({**_scalars("test_", summary.test),
                            **_scalars("baseline_test_", summary.baseline)})
        mlflow.set_tags(tags)
        log_checkpoint_model(summary.checkpoint, table_signature(table), input_example(table))
        for path in summary.evaluation.values():
            mlflow.log_artifact(path, artifact_path="evaluation")
        run_id = run.info.run_id
    return new_version(mlflow_client, model_name, run_id, tags,
                       f"MLP on the {m['name']} table ({m['task']}, mlsd-ray)")
