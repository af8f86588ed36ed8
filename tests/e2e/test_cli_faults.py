"""Faults of the `mlsd` command itself, in a subprocess SIGKILLed mid-work: a training driver
that resumes after its last checkpoint, and a retrain whose registry stays whole wherever it
dies; and Ctrl-C in the middle of Ray Train's workers. They join the session's Ray
(RAY_ADDRESS), as tests/e2e/test_cli.py's commands do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_mlsd


@pytest.mark.slow
def test_a_driver_killed_mid_training_resumes_after_its_last_checkpoint(digits_workspace,
                                                                         cluster_env):
    """SIGKILL `mlsd train` once its second epoch has been reported (a checkpoint every epoch):
    the same command again resumes at the epoch after the last checkpoint it finished, and
    runs to the end. It trains on the session's prepared digits (tests/conftest.py)."""
    home, epochs = Path(digits_workspace.root), 6
    train = ["train", "--source", "digits", "--set", "data.image_size=8", "--num-workers", "0",
             "--epochs", str(epochs), "--run-name", "killed", "--home", str(home),
             "--set", "train.checkpoint_every=1", "--set", "registry.auto_register=false"]
    driver = subprocess.Popen([sys.executable, "-m", "mlsd_ray.cli", *train],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env={**os.environ, **cluster_env}, start_new_session=True)
    said = []
    try:
        for line in driver.stderr:  # type: ignore[union-attr]
            said.append(line)
            if line.startswith(f"epoch 2/{epochs}"):
                break
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    assert any(line.startswith("reusing the prepared dataset") for line in said), said
    run_dir = home / "runs" / "killed"
    finished = sorted(int(p.parent.name.rsplit("_", 1)[1])
                      for p in run_dir.glob("checkpoint_epoch_*/report.json"))
    assert finished and 2 <= finished[-1] < epochs, finished  # killed mid-run, after epoch 2
    started = time.monotonic()
    again = run_mlsd(*train, "--json", env=cluster_env)
    assert again.returncode == 0, again.stderr
    first = next(line for line in again.stderr.splitlines() if line.startswith("epoch "))
    assert first.startswith(f"epoch {finished[-1] + 1}/{epochs}:"), (first, finished)
    assert json.loads(again.stdout)["epochs_run"] == epochs
    print(f"\nkilled after epoch {finished[-1]}; resumed at {first.split(':')[0]} and "
          f"finished in {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_ctrl_c_stops_two_training_workers_and_says_so(digits_workspace, cluster_env):
    """SIGINT, as Ctrl-C sends, to `mlsd train` with two Ray Train workers once an epoch has
    been reported: "interrupted" and exit code 130 (Ray Train's own handler made it exit 1
    with no message), and the workers' CPUs come back to the Ray it joined."""
    import ray

    train = ["train", "--source", "digits", "--set", "data.image_size=8", "--num-workers", "2",
             "--set", "train.cpus_per_worker=0.5", "--epochs", "50", "--run-name", "ctrl-c",
             "--home", digits_workspace.root, "--set", "registry.auto_register=false"]
    driver = subprocess.Popen([sys.executable, "-m", "mlsd_ray.cli", *train],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env={**os.environ, **cluster_env})
    said = []
    try:
        for line in driver.stderr:  # type: ignore[union-attr]
            said.append(line)
            if line.startswith("epoch 1/50"):
                driver.send_signal(signal.SIGINT)
                break
        said.extend(driver.stderr)  # type: ignore[arg-type]
        assert driver.wait(timeout=60) == 130, said
    finally:
        driver.kill()
    assert said[-1] == "error: interrupted\n", said
    assert not any(line.startswith("epoch 50/50") for line in said), said
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray.available_resources()
        time.sleep(0.5)


@pytest.mark.slow
def test_a_retrain_killed_at_each_step_leaves_the_alias_on_a_whole_version(
        tmp_path, cluster_env, digits_model):
    """`mlsd retrain` SIGKILLed (MLSD_CRASH_AT, mlsd_ray/core/crash_points.py) after the
    challenger's run is logged but before its version exists, after decision.json is written
    but before the alias moves, and after the alias moves but before the rest: the alias is
    always on a version whose checkpoint downloads and verifies, and decision.json, where it
    exists, says how far the retrain got."""
    from mlsd_ray import registry
    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.tasks import get_task
    from mlsd_ray.tasks.image.train import log_and_register
    from mlsd_ray.training.checkpoint import verify

    workspace = Workspace.at(str(tmp_path / "home"))
    log_and_register(digits_model.result, digits_model.cfg, digits_model.dataset, "digits-cnn",
                     workspace)
    registry.promote("digits-cnn", 1, "production", workspace)
    source = get_task("image").smoke_retrain_source(workspace, print)
    command = ["retrain", "--source", source, "--home", str(workspace.root), "--set",
               "retrain.epochs=4", "--set", "retrain.margin=0", "--set", "train.num_workers=0"]

    def versions() -> list[int]:
        return sorted(v.version for m in registry.list_models(workspace) for v in m.versions)

    def decisions() -> list[dict]:
        return [json.loads(p.read_text())
                for p in sorted((tmp_path / "home" / "retrain").glob("*/decision.json"))]

    for crash_at, alias_on, state in (("register.artifacts_logged", 1, None),
                                      ("retrain.decided", 1, "decided"),
                                      ("retrain.promoted", "new", "promoted")):
        before = versions()
        killed = run_mlsd(*command, env={**cluster_env, "MLSD_CRASH_AT": crash_at})
        assert killed.returncode == -9, (crash_at, killed.stderr[-3000:])
        production = registry.show("models:/digits-cnn@production", workspace).version
        assert production == (alias_on if alias_on != "new" else versions()[-1]), crash_at
        verify(registry.resolve("models:/digits-cnn@production", workspace))  # whole
        if state is None:
            assert versions() == before, crash_at  # no version points at the half-done run
            print(f"\nkilled at {crash_at}: versions {versions()}, @production on {production}")
            continue
        assert versions() == [*before, before[-1] + 1], crash_at
        last = decisions()[-1]
        assert (last["state"], last["promote"], last["challenger"]) == (
            state, True, f"models:/digits-cnn/{before[-1] + 1}"), crash_at
        print(f"\nkilled at {crash_at}: @production on version {production}, "
              f"decision.json state {last['state']!r}")
