"""docs/tasks.md's task of a new kind (a forecaster built from parts, in a module outside
mlsd_ray) through every command, as a user runs them. Commands that need Ray join the test
session's instance through RAY_ADDRESS."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mlsd_ray.core.ports import free_port
from tests.conftest import run_mlsd
from tests.e2e.forecast_doc import forecast_package, post, series_csv


def test_the_documented_forecasting_task_runs_every_command(tmp_path, cluster_env):
    """docs/tasks.md's task, built from parts in a module outside mlsd_ray and named by
    --task: data (with quarantine); the pipeline (train, register, serve check, traffic,
    monitor, a gated retrain rolled out under load); evaluate, export, explain and the MLflow
    pyfunc; serve (/v1, its 422s, /v2) with predict online; predict offline. A task that does
    not load exits 2. Its searches are test_forecast_search.py's."""
    env = {**cluster_env, **forecast_package(tmp_path)}
    home = str(tmp_path / "home")
    task = ["--task", "forecast_task:ForecastTask", "--home", home]
    series_csv(tmp_path / "series.csv", 400, bad_at=200)

    # 376 rows over MLSD_IN_PROCESS_ROWS: the rows are checked in Ray Data, on the session's
    # cluster, whose workers import the task from the module shipped with the job
    data = run_mlsd("data", *task, "--source", f"csv:{tmp_path / 'series.csv'}", "--json",
                    env={**env, "MLSD_IN_PROCESS_ROWS": "100"})
    assert data.returncode == 0, data.stderr
    summary = json.loads(data.stdout)
    # windows holding the bad value cannot be used; the one that has it as its target neither
    assert summary["quarantined"] == {"window has a missing value": 24, "missing target": 1}
    assert sum(summary["splits"].values()) == 400 - 24 - 25

    source = ["--source", "seasonal:1500"]
    ran = run_mlsd("pipeline", *task, *source, "--set", "train.epochs=3", "--set",
                   "train.num_workers=0", "--set", f"serve.port={free_port()}", "--set",
                   "registry.model_name=fc", "--json", env=env, timeout=600)
    assert ran.returncode == 0, ran.stderr
    pipeline = json.loads(ran.stdout)["stages"]
    assert pipeline["train"]["registered"]["uri"] == "models:/fc/1"
    assert pipeline["train"]["test"]["r2"] > 0.5, pipeline["train"]["test"]
    assert pipeline["serve"]["agreement"] == 1.0 and pipeline["serve"]["rows"] == 64
    loop = pipeline["loop"]
    assert loop["monitor_shifted"]["verdict"] == "drift", loop["monitor_shifted"]
    assert loop["retrain"]["metric"] == "r2" and loop["retrain"]["promote"], loop["retrain"]
    assert loop["rollout"]["load"]["failed_requests"] == 0, loop["rollout"]
    champion = "models:/fc@production"  # version 2, the retrained one

    evaluated = run_mlsd("evaluate", "--model", "models:/fc/1", "--json", *task[2:], env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["scores"]["r2"] == pytest.approx(
        pipeline["train"]["test"]["r2"])

    exported = run_mlsd("export", "--model", champion, "--format", "onnx", "--out",
                        str(tmp_path / "onnx"), "--json", *task[2:], env=env)
    assert exported.returncode == 0, exported.stderr
    parity = json.loads(exported.stdout)["parity"]
    assert parity["agreement"] == 1.0 and parity["metric"] == "r2"

    explained = run_mlsd("explain", "--model", champion, "--n", "3", "--json", *task[2:],
                         env=env)
    assert explained.returncode == 0, explained.stderr
    explanation = json.loads(explained.stdout)
    assert explanation["explained"] == 3 and len(explanation["overlays"]) == 3
    assert explanation["importance"]["window"] > 0.5  # shuffled windows: r2 falls by > 0.5
    sanity = explanation["sanity"]  # the attributions are the model's, and they rank the steps
    assert sanity["randomised_correlation"]["integrated_gradients"] < 0.5, sanity
    assert sanity["deletion_auc"]["integrated_gradients"] < sanity["random_deletion_auc"], sanity

    pyfunc = subprocess.run([sys.executable, "-c", (
        "import mlflow, numpy as np, pandas as pd\n"
        "from mlsd_ray.core.workspace import Workspace\n"
        f"mlflow.set_tracking_uri(Workspace.at({home!r}).tracking_uri)\n"
        f"model = mlflow.pyfunc.load_model({champion!r})\n"
        "window = list(10 + 3 * np.sin(2 * np.pi * np.arange(24) / 24))\n"
        "print(float(model.predict(pd.DataFrame({'window': [window]}))['prediction'][0]))")],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert pyfunc.returncode == 0, pyfunc.stderr
    assert 5 < float(pyfunc.stdout.strip().splitlines()[-1]) < 15  # the next value, about 10

    # no --model: serve.model defaults to the production alias of the task's own model
    served = run_mlsd("serve", *task, "--set", "registry.model_name=fc", "--detach", "--json",
                      "--port", str(free_port()), env=env)
    assert served.returncode == 0, served.stderr
    url = json.loads(served.stdout)["url"]
    try:
        window = [10.0] * 24
        status, answer = post(f"{url}/v1/predict", {"instances": [{"window": window}]})
        assert status == 200 and answer["model_version"] == "2", answer
        status, answer = post(f"{url}/v1/predict", {"instances": [{"window": [1, 2]}]})
        assert status == 422 and "window has 2 values, not 24" in answer["error"]["message"]
        status, answer = post(f"{url}/v2/models/fc/infer", {"inputs": [
            {"name": "window", "shape": [2, 24], "datatype": "FP32", "data": window * 2}]})
        assert status == 200 and answer["outputs"][0]["shape"] == [2], answer
        (tmp_path / "one.json").write_text(json.dumps({"instances": [{"window": window}]}))
        # no --task: the app says which task it serves
        online = run_mlsd("predict", "--url", url, str(tmp_path / "one.json"), "--json",
                          "--home", home, env=env)
        assert online.returncode == 0, online.stderr
        assert len(json.loads(online.stdout)["predictions"]) == 1
    finally:
        stopped = run_mlsd("serve", "stop", "--home", home, env=env)
    assert stopped.returncode == 0, stopped.stderr

    offline = run_mlsd("predict", *task, "--set", "registry.model_name=fc", "--source",
                       f"csv:{tmp_path / 'series.csv'}", "--json", env=env)
    assert offline.returncode == 0, offline.stderr
    predicted = json.loads(offline.stdout)
    assert predicted["rows"] == 376 and predicted["predicted"] == 376 - 24, predicted
    assert predicted["rejected"] == {"window has a missing value": 24}
    assert "in this process" in offline.stderr  # 376 rows: no Ray started for them

    missing = run_mlsd("train", "--task", "forecast_task:Nope", "--home", home, env=env)
    assert missing.returncode == 2, missing.stderr
    assert "module 'forecast_task' has no 'Nope'" in missing.stderr
    assert "Traceback" not in missing.stderr
