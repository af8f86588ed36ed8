"""Tabular models in the registry: the same MLflow store, runs and aliases as the CNN, with
the tabular task's metrics, the decision threshold and the input schema as version tags."""

from __future__ import annotations

import json

from mlsd_ray.core.config import Config
from mlsd_ray.registry import ARTIFACT_DIR, _flat, client, git_commit, new_version
from mlsd_ray.tasks.tabular.prepare import PreparedTable
from mlsd_ray.training.checkpoint import load_train_state


def _scalars(prefix: str, values: dict | None) -> dict:
    return {f"{prefix}{k}": float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def register_tabular(summary: dict, cfg: Config, table: PreparedTable, model_name: str,
                     home: str | None = None, nested: bool = False) -> dict:
    """Log the run (params, per-epoch metrics, test and baseline metrics, checkpoint, report)
    and register the checkpoint as a new version of `model_name`. `nested`: log the run as a
    child of the active run (a search's best trial)."""
    import mlflow

    mlflow_client = client(home)
    m = table.manifest
    history = load_train_state(summary["checkpoint"])["history"]
    schema = {"input": {e["name"]: e["kind"] for e in m["columns"]},
              "output": {"task": m["task"], "classes": m["classes"]}}
    score = summary["score_name"]
    tags = {"task": m["task"], "data_fingerprint": m["fingerprint"], "dataset": table.path,
            "git_commit": git_commit(), "run_name": summary["run_name"],
            "val_score": f"{summary['val_score']:.6f}",
            "test_score": f"{summary['test'][score]:.6f}", "score_name": score,
            "best_epoch": str(summary["best_epoch"]), "model": "tabular_mlp",
            "schema": json.dumps(schema)[:5000]}
    if summary.get("decision"):
        tags["threshold"] = f"{summary['decision']['threshold']:.6f}"
    with mlflow.start_run(run_name=summary["run_name"], nested=nested) as run:
        mlflow.log_params({**_flat("train", cfg.train.model_dump()),
                           **_flat("tabular", cfg.tabular.model_dump(exclude={"columns"})),
                           "tabular.hidden": str(cfg.tabular.hidden),
                           "data.fingerprint": m["fingerprint"]})
        for entry in history:
            mlflow.log_metrics({k: v for k, v in entry.items() if k != "epoch"},
                               step=int(entry["epoch"]))
        mlflow.log_metrics({**_scalars("test_", summary["test"]),
                            **_scalars("baseline_test_", summary.get("baseline"))})
        mlflow.set_tags(tags)
        mlflow.log_artifacts(summary["checkpoint"], artifact_path=ARTIFACT_DIR)
        for path in summary["evaluation"].values():
            mlflow.log_artifact(path, artifact_path="evaluation")
        run_id = run.info.run_id
    return new_version(mlflow_client, model_name, run_id, tags,
                       f"MLP on the {m['name']} table ({m['task']}, mlsd-ray)")
