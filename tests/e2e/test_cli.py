"""The `mlsd` command as a user runs it, in a subprocess.

Commands that need Ray join the test session's instance through RAY_ADDRESS (the way a user's
command joins a cluster) instead of starting one of their own each.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsd_ray.core.ports import free_port, port_in_use
from tests.conftest import make_image_folder, run_mlsd, write_png

RAY_NOISE = ("Execution plan", "Starting execution of Dataset", "(TrainController",
             "(RayTrainWorker", "(SplitCoordinator", "Token authentication is enabled",
             "(raylet)")


def test_version_and_help():
    assert run_mlsd("--version").stdout.startswith("mlsd-ray ")
    for command in ("data", "pipeline"):
        result = run_mlsd(command, "--help")
        assert result.returncode == 0 and "--source" in result.stdout and "--json" in result.stdout
        # flags read as flags: `--force`, not `--force <bool>` (nor `--help <bool>`)
        assert "<bool>" not in result.stdout and "--force" in result.stdout


def test_unknown_config_key_exits_2_and_names_it():
    result = run_mlsd("data", "--set", "data.bogus=1")
    assert result.returncode == 2
    assert "data.bogus" in result.stderr and "Traceback" not in result.stderr
    as_json = run_mlsd("data", "--set", "data.bogus=1", "--json")
    assert as_json.returncode == 2
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "bad_input" and "data.bogus" in error["message"]


@pytest.mark.parametrize("args, message", [
    (["--source", "nope"], "unknown source 'nope'"),
    (["--source", "folder:/definitely/not/here"], "folder not found"),
    (["--config", "/no/such.yaml"], "config file not found"),
    (["--set", "data.seed"], "KEY=VALUE"),
    (["--bogus-flag"], "No such option"),
])
def test_bad_usage_exits_2(args, message):
    result = run_mlsd("data", *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_folder_with_bad_files_json(tmp_path, cluster_env):
    root = make_image_folder(tmp_path / "imgs", per_class=34)  # 102 images in 3 classes
    for name in ("cat/aaa-broken.png", "dog/aaa-broken.png"):
        os.remove(root / name.replace("aaa-broken", "cat000" if "cat" in name else "dog000"))
        (root / name).write_bytes(b"\x89PNG broken")
    (root / "fox" / "truncated.png").write_bytes((root / "fox" / "fox001.png").read_bytes()[:60])
    write_png(root / "stray1.png", np.zeros((8, 8, 3), np.uint8))
    (root / "stray2.png").write_bytes((root / "fox" / "fox002.png").read_bytes())
    home = tmp_path / "home"

    result = run_mlsd("data", "--source", f"folder:{root}", "--json", "--home", str(home),
                  env=cluster_env)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert summary["counts"]["input"] == 105
    assert summary["counts"]["kept"] == 100
    assert summary["counts"]["quarantined"] == 5
    assert summary["quarantine_by_reason"] == {"corrupt_image": 3, "missing_label": 2}
    assert summary["class_names"] == ["cat", "dog", "fox"]
    assert os.path.isfile(os.path.join(summary["path"], "manifest.json"))

    again = run_mlsd("data", "--source", f"folder:{root}", "--home", str(home), env=cluster_env)
    assert again.returncode == 0
    assert "reused" in again.stdout and summary["path"] in again.stdout.replace("\n", "")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pipeline_on_digits(tmp_path, cluster_env):
    home = str(tmp_path / "home")
    # digits at their own 8×8 (the default upsamples to 16×16): the same plumbing, 4× less compute.
    # It takes 70-130 s. In a CI run on a VM at half its usual speed (three pytest workers on two
    # cores) it still ran at 300 s; 450 s leaves such a machine room.
    result = run_mlsd("pipeline", "--json", "--home", home, "--set", "train.epochs=2",
                  "--set", "data.image_size=8",
                  "--set", "train.cpus_per_worker=0.5", "--set", "retrain.epochs=1",
                  "--set", "serve.prediction_log.flush_seconds=0.5", env=cluster_env,
                  timeout=450)
    assert result.returncode == 0, result.stderr
    check_console_is_ours(result.stderr)
    stages = json.loads(result.stdout)["stages"]
    data = stages["data"]
    assert data["counts"]["input"] == 1797
    assert sum(data["counts"]["splits"].values()) == data["counts"]["kept"]
    assert data["path"].startswith(str(tmp_path / "home" / "datasets" / "digits"))
    assert stages["train"]["epochs_run"] == 2 and stages["train"]["test_accuracy"] > 0.3
    assert stages["train"]["registered"]["uri"] == "models:/digits-cnn/1"
    assert stages["evaluate"]["accuracy"] == pytest.approx(stages["train"]["test_accuracy"])
    assert os.path.isfile(stages["evaluate"]["confusion_matrix_png"])
    assert stages["promote"]["aliases"] == ["production"]

    listed = run_mlsd("models", "list", "--json", "--home", home)
    assert listed.returncode == 0, listed.stderr
    model = json.loads(listed.stdout)["models"][0]
    production = 2 if stages["loop"]["retrain"]["promote"] else 1  # the loop's challenger
    assert model["name"] == "digits-cnn" and model["aliases"] == {"production": production}
    evaluated = run_mlsd("evaluate", "--model", "models:/digits-cnn/1", "--json", "--home", home)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["accuracy"] == pytest.approx(
        stages["evaluate"]["accuracy"])
    missing = run_mlsd("models", "show", "digits-cnn@staging", "--home", home)
    assert missing.returncode == 2 and "no registered model version" in missing.stderr

    served = stages["serve"]  # the pipeline's own check: HTTP answers from the new version
    assert served["images"] == 32 and served["accuracy"] > 0.3
    assert served["model_version"] == "1" and not served["kept_serving"]
    check_monitoring_loop(stages["loop"])
    check_serve_commands(home, cluster_env, tmp_path, str(production))


def check_console_is_ours(console: str) -> None:
    """One line per epoch reaches the console from the train controller (a file on the
    driver's node, not Ray's log forwarding); Ray's own lines stay in its logs, and the
    MLflow tracking and registration print no warnings of MLflow's."""
    lines = console.splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("epoch ")] == [
        "epoch 1/2", "epoch 2/2", "epoch 1/1"]  # the training, then the loop's retraining
    assert "registered models:/digits-cnn/1" in console and "fit in memory" in console
    assert "Warning" not in console and "INFO mlflow" not in console, console
    assert sum(line.startswith("Ray's logs: ") for line in lines) <= 1  # named once (if ours)
    assert not [line for line in lines if any(noise in line for noise in RAY_NOISE)], lines


def check_monitoring_loop(loop: dict) -> None:
    """The pipeline's loop on the live app: drift found only in the rotated traffic, a
    challenger trained and judged, and a promoted one rolled out with no failed request."""
    assert loop["traffic_unshifted"]["failed_requests"] == 0
    assert loop["monitor_unshifted"]["rows"] == 200
    assert loop["monitor_shifted"]["verdict"] == "drift"
    assert "orientation" in loop["monitor_shifted"]["summary"]
    assert loop["traffic_shifted"]["shift"] == "rotate"
    retrained = loop["retrain"]
    assert retrained["challenger"].startswith("models:/digits-cnn/")
    assert retrained["promote"] == (retrained["gain"] > 0.005)
    if retrained["promote"]:
        assert loop["rollout"]["load"]["failed_requests"] == 0


def check_serve_commands(home: str, cluster_env: dict, tmp_path, production: str) -> None:
    """`mlsd serve --detach`, a PNG over HTTP, status, a pipeline refused beside it, predict
    --url, stop; bad model -> 2."""
    import requests
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    image = (digits.images[-1] * 255 / 16).round().astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "digit.png")
    port = str(free_port())

    nope = run_mlsd("serve", "--detach", "--model", "models:/digits-cnn@nope", "--home", home,
                "--port", port, env=cluster_env)
    assert nope.returncode == 2 and "no registered model version" in nope.stderr

    started = run_mlsd("serve", "--detach", "--json", "--home", home, "--port", port,
                   env=cluster_env)
    assert started.returncode == 0, started.stderr
    url = json.loads(started.stdout)["url"]
    try:
        body = {"instances": [{"b64": base64.b64encode((tmp_path / "digit.png").read_bytes())
                               .decode()}]}
        answer = requests.post(f"{url}/v1/predict", json=body, timeout=60).json()
        assert answer["model_version"] == production and answer["model_name"] == "digits-cnn"
        assert answer["predictions"][0]["class_index"] in range(10)

        status = run_mlsd("serve", "status", "--json", "--home", home, env=cluster_env)
        assert status.returncode == 0, status.stderr
        status = json.loads(status.stdout)
        assert status["status"] == "RUNNING" and status["model_version"] == production
        assert status["deployments"]["Model"]["replicas"] == {"RUNNING": 1}
        assert set(status["deployments"]) == {"Model"}  # one hop: routes and model together

        # the next pipeline joins this Ray: its serve check would take the app over, then
        # stop it, so it is refused before any training, and the app goes on serving
        clash = run_mlsd("pipeline", "--home", home, "--set", "data.image_size=8",
                         env=cluster_env)
        assert clash.returncode == 2 and "app 'mlsd' already serves on this Ray" in clash.stderr
        assert "epoch " not in clash.stderr, clash.stderr

        sent = run_mlsd("predict", "--url", url, str(tmp_path / "digit.png"), "--json")
        assert sent.returncode == 0, sent.stderr
        assert json.loads(sent.stdout)["predictions"] == answer["predictions"]
    finally:
        stopped = run_mlsd("serve", "stop", "--json", "--home", home, env=cluster_env)
    assert stopped.returncode == 0, stopped.stderr
    gone = run_mlsd("serve", "status", "--home", home, env=cluster_env)
    assert gone.returncode == 2 and "mlsd serve --detach" in gone.stderr


@pytest.mark.slow  # a Ray head of its own, with Serve's HAProxy in front of the replica
def test_serving_through_haproxy_answers_and_stops_cleanly(tmp_path, digits_model):
    """`mlsd serve --detach --set serve.ingress=haproxy` with no RAY_ADDRESS starts a head of
    its own with RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (not Serve's Python proxy) holds the
    port and forwards to the replica, which answers /v1 and /v2; `serve stop` frees the port
    and leaves no HAProxy behind. A router HAProxy cannot apply is refused first."""
    import psutil
    import requests

    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    home, port = str(tmp_path / "home"), str(free_port())
    command = [sys.executable, "-m", "mlsd_ray.cli", "serve", "--detach", "--json", "--model",
               digits_model.result.checkpoint, "--home", home, "--port", port,
               "--set", "serve.ingress=haproxy"]

    def run(*extra: str, **more_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], capture_output=True, text=True,
                              timeout=300, env={**env, **more_env})

    refused = run("--set", "serve.router=round_robin")
    assert refused.returncode == 2 and "serve.router=round_robin needs serve.ingress=proxy" \
        in refused.stderr
    # Serve fails after the head started (its HAProxy cannot start): the head is stopped too,
    # not left running with no record that `mlsd serve stop` could find
    broken = run(RAY_SERVE_HAPROXY_BINARY_PATH="/nonexistent/haproxy")
    assert broken.returncode == 1 and "Traceback" not in broken.stderr, broken.stderr
    head_log = tmp_path / "home" / "serve" / "ray-head.log"
    assert head_log.is_file() and not processes_with_open(head_log)
    started = run()
    assert started.returncode == 0, started.stderr
    url = json.loads(started.stdout)["url"]
    try:
        listening = {c.pid for c in psutil.net_connections("tcp")
                     if c.laddr and c.laddr.port == int(port) and c.status == psutil.CONN_LISTEN}
        assert {psutil.Process(pid).name() for pid in listening} == {"haproxy"}
        image = np.zeros((8, 8, 1), dtype=np.uint8).tolist()
        answer = requests.post(f"{url}/v1/predict", json={"instances": [image]}, timeout=60)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["class_index"] \
            in range(10)
        bad = requests.post(f"{url}/v1/predict", data=b"{", timeout=60,
                            headers={"Content-Type": "application/json"})
        assert bad.status_code == 400 and "error" in bad.json()  # our JSON error, through it
        assert requests.get(f"{url}/v2/health/ready", timeout=30).status_code == 200
    finally:
        stopped = subprocess.run([sys.executable, "-m", "mlsd_ray.cli", "serve", "stop",
                                  "--home", home], capture_output=True, text=True, timeout=120,
                                 env=env)
    assert stopped.returncode == 0, stopped.stderr
    assert port_in_use("127.0.0.1", int(port)) is None
    assert not [p for p in psutil.process_iter(["name", "status"])  # a zombie holds nothing
                if p.info["name"] == "haproxy" and p.info["status"] != psutil.STATUS_ZOMBIE]


def processes_with_open(path) -> list:
    """The processes that have `path` open: a `ray start` head, and what it started, write
    their console output to its log."""
    import psutil

    holding = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error):  # gone, or not ours to read
            if any(file.path == str(path) for file in process.open_files()):
                holding.append(process)
    return holding


SMALL_TRAIN = ["train", "--source", "digits", "--set", "data.image_size=8", "--epochs", "2",
               "--num-workers", "0", "--set", "registry.auto_register=false"]


@pytest.mark.slow
def test_verbose_hands_the_console_to_ray_and_keeps_the_epoch_lines(digits_workspace,
                                                                    cluster_env):
    verbose = run_mlsd(*SMALL_TRAIN, "--home", digits_workspace.root, "--verbose",
                       env=cluster_env)
    assert verbose.returncode == 0, verbose.stderr
    assert "reusing the prepared dataset" in verbose.stderr  # the session's (conftest.py)
    assert "epoch 2/2" in verbose.stderr
    assert "Ray's logs: " not in verbose.stderr  # Ray forwards its processes' output instead


def test_no_valid_image_exits_2(tmp_path, cluster_env):
    (tmp_path / "bad" / "x").mkdir(parents=True)
    (tmp_path / "bad" / "x" / "a.png").write_bytes(b"junk")
    result = run_mlsd("data", "--source", f"folder:{tmp_path / 'bad'}", "--home",
                  str(tmp_path / "home"), env=cluster_env)
    assert result.returncode == 2
    assert "no valid image" in result.stderr


def test_torchvision_offline_names_where_files_go(tmp_path):
    result = run_mlsd("data", "--source", f"torchvision:CIFAR10:{tmp_path / 'tv'}",
                  "--home", str(tmp_path / "home"), env={"MLSD_OFFLINE": "1"})
    assert result.returncode == 2
    assert "cifar-10-batches-py" in result.stderr and str(tmp_path / "tv") in result.stderr


def test_source_paths_are_taken_as_typed(tmp_path, cluster_env):
    root = make_image_folder(tmp_path / "shots #1: final", per_class=3, classes=("a", "b"))
    result = run_mlsd("data", "--source", f"folder:{root}", "--json", "--home",
                  str(tmp_path / "home"), env=cluster_env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["counts"]["kept"] == 6


def test_unwritable_home_fails_before_any_work(tmp_path, image_folder):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run_mlsd("data", "--source", f"folder:{image_folder}", "--home", str(blocker / "home"))
    assert result.returncode == 2
    assert "cannot write to" in result.stderr and "[1/4]" not in result.stderr


def test_evaluate_without_a_checkpoint_exits_2(tmp_path):
    result = run_mlsd("evaluate", "--model", str(tmp_path / "nope"))
    assert result.returncode == 2 and "no checkpoint at" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["-p", "train.lr=-0.1,0.01"], "train.lr=-0.1"),
    (["-p", "train.bogus=1,2"], "unknown config key 'train.bogus'"),
    (["-p", "train.batch_size=loguniform:1:64", "--search", "grid"], "grid search needs a list"),
    (["--set", "tune.space={train.lr: []}"], "empty list"),
    (["--cv", "3", "--scheduler", "asha"], "--scheduler none"),
    (["--resume", "never-ran"], "no tune run to resume"),
])
def test_tune_bad_space_exits_2_before_any_trial(tmp_path, args, message):
    result = run_mlsd("tune", "--home", str(tmp_path), *args, "--json", timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in json.loads(result.stdout)["error"]["message"]
    assert not (tmp_path / "tune").exists() or not any((tmp_path / "tune").iterdir())


def forecast_task_code() -> str:
    """docs/tasks.md's forecasting task: the Python blocks of its section, in order, joined as
    one module (the page says so)."""
    text = (Path(__file__).parents[2] / "docs" / "tasks.md").read_text()
    section = text.split("## A task of a new kind")[1].split("\n## ")[0]
    return "\n\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def forecast_package(tmp_path) -> dict:
    """The doc's task written as a module outside mlsd_ray; the environment that finds it."""
    site = tmp_path / "site"
    site.mkdir()
    code = forecast_task_code()
    assert len(code.rstrip("\n").splitlines()) <= 250  # the page's promise: a task is a page
    (site / "forecast_task.py").write_text(code)
    return {"PYTHONPATH": str(site)}


def series_csv(path, points: int, bad_at: int) -> None:
    """A seasonal series as a `value` column, with one value that is not a number."""
    values = [f"{10 + 3 * np.sin(2 * np.pi * t / 24):.4f}" for t in range(points)]
    values[bad_at] = "oops"
    path.write_text("value\n" + "\n".join(values) + "\n")


def post(url: str, body: dict) -> tuple[int, dict]:
    import requests

    response = requests.post(url, json=body, timeout=60)
    return response.status_code, response.json()


def test_the_documented_forecasting_task_runs_every_command(tmp_path, cluster_env):
    """docs/tasks.md's task, built from parts in a module outside mlsd_ray and named by
    --task: data (with quarantine); the pipeline (train, register, serve check, traffic,
    monitor, a gated retrain rolled out under load); evaluate, tune, export, explain and the
    MLflow pyfunc; serve (/v1, its 422s, /v2) with predict online; predict offline. A task that does
    not load exits 2."""
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
    assert explanation["randomised_correlation"] < 0.5  # the attributions are the model's

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
