"""Ray Tune over the training stage's trainer: grid + ASHA, a failing trial, cross-validation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mlsd_ray.registry import client, list_models
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.image.train import run_train
from mlsd_ray.tuning.search import run_tune

pytestmark = [pytest.mark.usefixtures("ray_session"), pytest.mark.slow]

TINY = ["data.image_size=8", "data.augment.random_shift=1", "train.max_failures=0",
        "tune.max_epochs=2"]


def test_grid_search_keeps_good_trials_when_one_fails(digits_workspace):
    workspace = digits_workspace
    cfg = load_config(None, TINY + ["tune.search=grid", "tune.space={train.lr: [0.005, 1.0e6]}",
                                    "train.optimizer=sgd"])
    said: list[str] = []
    summary = run_tune(cfg, workspace=workspace, name="grid", log=said.append)
    assert any(line.startswith("reusing the prepared dataset") for line in said), said
    assert (summary.trials, summary.finished, summary.failed) == (2, 1, 1)
    assert summary.best.params == {"train.lr": 0.005}
    assert summary.metric == "val_accuracy" and summary.best.score > 0.3  # chance: 0.1
    table = pd.read_csv(summary.results)
    failed = table[table["status"] == "error"].iloc[0]
    assert "loss became nan" in failed["error"]
    assert set(table["param.train.lr"]) == {0.005, 1e6}
    assert Image.open(summary.curves).size[0] > 300

    # the best configuration trains with `mlsd train --config` to the trial's own accuracy
    # (here in this process, as the trial trained in its own: the same loop, seed and data)
    best = load_config(summary.best_config)
    assert (best.train.lr, best.train.epochs, best.train.num_workers) == (0.005, 2, 1)
    best.train.num_workers = 0
    again = run_train(best, workspace=workspace, run_name="from-best-yaml", log=lambda _: None)
    assert again.metrics["val_accuracy"] == pytest.approx(summary.best.score)

    # MLflow: the search's run with a child per trial, tracked live (the failed one FAILED,
    # each epoch's score logged as reported), and the best trial registered as a child
    assert summary.registered.uri == "models:/digits-cnn/1"
    assert [v.version for v in list_models(workspace)[0].versions] == [1]
    mlflow_client = client(workspace)
    runs = mlflow_client.search_runs([mlflow_client.get_experiment_by_name("mlsd").experiment_id])
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") ==
                summary.mlflow_run_id]
    trials = [r for r in children if "tune.trial_id" in r.data.tags]
    assert sorted(r.info.status for r in trials) == ["FAILED", "FINISHED"]
    [finished] = [r for r in trials if r.info.status == "FINISHED"]
    curve = mlflow_client.get_metric_history(finished.info.run_id, "val_accuracy")
    assert [m.step for m in curve] == [1, 2]
    assert max(m.value for m in curve) == pytest.approx(summary.best.score)
    assert [r.info.run_id for r in children if r not in trials] == [
        summary.registered.run_id]
    assert mlflow_client.get_run(summary.mlflow_run_id).info.status == "FINISHED"


def test_asha_stops_weak_trials_early(digits_workspace):
    workspace = digits_workspace
    cfg = load_config(None, ["data.image_size=8", "data.augment.random_shift=1",
                             "tune.max_epochs=3", "tune.num_samples=4",
                             "tune.space={train.lr: {loguniform: [1.0e-4, 3.0e-2]}}",
                             "tune.scheduler=asha", "tune.grace_period=1",
                             "tune.reduction_factor=2", "registry.auto_register=false"])
    summary = run_tune(cfg, workspace=workspace, name="asha", log=lambda _: None, register=False)
    assert summary.trials == 4 and summary.failed == 0
    assert summary.stopped_early >= 1
    assert summary.trial_epochs < 4 * 3
    assert summary.registered is None and "registered" not in summary.to_dict()
    # 4 one-worker trials, 2 at a time: a later trial trained in an earlier one's process
    assert len(trial_processes(summary.path)) < summary.trials
    # the stopped trials gave their CPUs back: a later search (or test) can use all of them
    assert cpus_come_back(within_s=30)


def trial_processes(search: str) -> set[int]:
    """The pids that Tune recorded with the trials' reports (each trial's result.json)."""
    return {json.loads(line)["pid"] for path in Path(search).glob("*/result.json")
            for line in path.read_text().splitlines() if line}


def cpus_come_back(within_s: float) -> bool:
    import ray

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if ray.available_resources().get("CPU", 0) >= ray.cluster_resources()["CPU"]:
            return True
        time.sleep(0.5)
    return False


def test_cross_validation_reports_mean_and_spread(digits_workspace):
    workspace = digits_workspace
    cfg = load_config(None, TINY + ["tune.cv=2", "tune.space={train.lr: [0.005]}"])
    summary = run_tune(cfg, workspace=workspace, name="cv", log=lambda _: None)
    assert summary.scheduler == "none"
    line = summary.configurations[0]
    assert len(line["fold_scores"]) == 2 and all(0.3 < s <= 1 for s in line["fold_scores"])
    assert line["cv_mean"] == pytest.approx(sum(line["fold_scores"]) / 2)
    assert line["cv_std"] >= 0
    # the best configuration is refitted on the whole train split and registered
    assert summary.registered.version == 1
    written = json.loads(Path(summary.path, "summary.json").read_text())
    assert written.pop("format_version") == 1 and written.pop("written_by")  # a versioned record
    assert written == json.loads(json.dumps(summary.to_dict(), default=str))  # the same
    assert written["best"]["cv_mean"] == summary.best.cv_mean and "val_accuracy" in written["best"]


def test_a_table_is_cross_validated_in_stratified_folds_and_the_best_refitted(workspace):
    cfg = load_config(None, ["tabular.source=breast-cancer", "train.epochs=2", "tune.cv=2",
                             "tune.space={train.lr: [0.01]}"], example="fraud")
    said: list[str] = []
    summary = run_tune(cfg, workspace=workspace, name="table-cv", log=said.append)
    line = summary.configurations[0]
    # two folds of breast cancer's train+val, each scored by PR-AUC on its held-out half
    assert len(line["fold_scores"]) == 2 and all(0.8 < s <= 1 for s in line["fold_scores"])
    assert "refitting the best configuration on the full train split" in said
    assert summary.registered.uri == "models:/fraud-mlp/1"
    assert summary.best_model["test"]["pr_auc"] > 0.8
