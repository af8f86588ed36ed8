"""The `mlsd` command as a user runs it, in a subprocess.

Commands that need Ray join the test session's instance through RAY_ADDRESS (the way a user's
command joins a cluster) instead of starting one of their own each.
"""

from __future__ import annotations

import base64
import json
import os

import numpy as np
import pytest

from mlsd_ray.core.ports import free_port
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
