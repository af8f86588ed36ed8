"""`mlsd tune` for docs/tasks.md's task of a new kind: a grid search that registers its best
trial, and a cross-validated one (folds chained forward in time, then a refit). Apart from
test_forecast_task.py so that the two run side by side."""

from __future__ import annotations

import json

from tests.conftest import run_mlsd
from tests.e2e.forecast_doc import forecast_package


def test_the_documented_forecasting_task_is_searched_with_and_without_cv(tmp_path, cluster_env):
    env = {**cluster_env, **forecast_package(tmp_path)}
    task = ["--task", "forecast_task:ForecastTask", "--home", str(tmp_path / "home")]
    source = ["--source", "seasonal:1500"]
    searched = run_mlsd("tune", *task, *source, "--set", "tune.space={forecast.hidden: [8, 16]}",
                        "--set", "tune.search=grid", "--set", "train.epochs=1", "--set",
                        "tune.max_epochs=1", "--set", "registry.model_name=fc-tuned", "--json",
                        env=env)
    assert searched.returncode == 0, searched.stderr
    tuned = json.loads(searched.stdout)
    assert tuned["trials"] == 2 and tuned["registered"]["uri"] == "models:/fc-tuned/1", tuned
    # --cv: folds that chain forward in time, then the best configuration refitted
    searched = run_mlsd("tune", *task, *source, "--set", "tune.space={forecast.hidden: [8]}",
                        "--set", "tune.search=grid", "--set", "train.epochs=1", "--set",
                        "tune.cv=2", "--set", "registry.model_name=fc-cv", "--json", env=env)
    assert searched.returncode == 0, searched.stderr
    tuned = json.loads(searched.stdout)
    assert tuned["cv"] == 2 and tuned["best"]["cv_std"] is not None, tuned["best"]
    assert len(tuned["configurations"][0]["fold_scores"]) == 2, tuned["configurations"]
    assert tuned["registered"]["uri"] == "models:/fc-cv/1" and "refit" in searched.stderr
