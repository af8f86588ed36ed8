"""A real local cluster: `ray start --head` on loopback (dashboard on), the training job submitted
with `mlsd submit` and with `ray job submit`, each registering a model version; a failing job and
what `mlsd submit` says about it. Only the head this module started is stopped.

Run with `-s` to see the job ids, their final statuses and the registered versions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from mlsd_ray.cli.submit import submit_when_ready, use_local_token
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.serve import control

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def run(command: list[str], timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """A command as a user types it, from the project directory, with this venv first on PATH."""
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
                               **env})


def token_auth() -> dict:
    """What a user of `ray job submit` sets when Ray made the head require a token (it does
    when ~/.ray/auth_token exists; any local ray.init() creates one)."""
    return {"RAY_AUTH_MODE": "token"} if (Path.home() / ".ray" / "auth_token").exists() else {}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """`ray start --head --block` with 2 CPUs in its own process group, and a Ray temp dir of
    its own: a job's supervisor finds its head through the temp dir's record of the current
    cluster, which another test's head (pytest-xdist runs files side by side) would replace
    in the shared /tmp/ray."""
    logs = Workspace.at(str(tmp_path_factory.mktemp("head")))  # its serve/ray-head.log
    temp_dir = tempfile.mkdtemp(prefix="ray-jobs-", dir="/tmp")  # short: Ray's socket paths
    started = control.start_head(logs, lambda line: None,
                                 ("--num-cpus=2", f"--temp-dir={temp_dir}"))
    # A fresh head answers on its dashboard port before its job agent takes jobs: wait for it
    # the way `mlsd submit` does, so that `ray job submit` (which does not wait) finds it ready.
    use_local_token()
    client = JobSubmissionClient(started.dashboard)
    ready = submit_when_ready(client, "python -c pass", {}, "ready", lambda line: None)
    print(f"\nhead at {started.dashboard} took its first job {ready}")
    yield started
    # The head takes ~3 s to shut down on SIGTERM; nothing of this throwaway head needs it.
    control.stop_head(started.cluster_pid, started.ray_address, timeout=1)
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_a_head_that_exits_while_starting_is_started_once_more_then_named(tmp_path):
    """`ray start` that fails (here on an option it does not know) is tried twice, and the
    error names its log, which holds both attempts."""
    said: list[str] = []
    with pytest.raises(control.HeadExited, match="exited with 2; see .*ray-head.log"):
        control.start_head(Workspace.at(str(tmp_path)), said.append, ("--no-such-option",))
    assert said[1:] == ["the Ray head exited while starting; starting it once more"]
    assert (tmp_path / "serve" / "ray-head.log").read_text().count("no-such-option") == 2


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jobs") / "mlsd-home")


@pytest.mark.slow
def test_train_job_with_mlsd_submit(head, home):
    result = run([str(BIN / "mlsd"), "submit", "train", "--address", head.dashboard,
                  "--smoke", "--wait", "--json", "--home", home, "--set", "train.seed=1",
                  # in the job's driver: the job path is under test here, and the other
                  # job (below) trains with Ray Train's workers on this head
                  "--set", "train.num_workers=0"])
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "SUCCEEDED"
    registered = summary["result"]["registered"]
    print(f"\nmlsd submit: {summary['job_id']} {summary['status']} in {summary['seconds']} s, "
          f"registered {registered['uri']}")
    assert summary["result"]["test_accuracy"] > 0.5
    # the config sent from here was the one used there, --set winning over --smoke's values
    assert "epoch 2/2" in result.stderr
    assert "in this process (train.num_workers=0)" in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_train_job_with_ray_job_submit(head, home):
    result = run([str(BIN / "ray"), "job", "submit", "--address", head.dashboard,
                  "--working-dir", ".", "--runtime-env", "jobs/runtime-env/local.yaml", "--",
                  "python", "jobs/train.py", "--smoke", "--home", home], **token_auth())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in result.stdout.splitlines()
                  if "submitted successfully" in line)
    assert f"Job '{job_id}' succeeded" in result.stdout
    summary = json.loads(next(line for line in result.stdout.splitlines()
                              if line.startswith("MLSD_RESULT "))[len("MLSD_RESULT "):])
    print(f"\nray job submit: {job_id} SUCCEEDED, registered {summary['registered']['uri']}, "
          f"test accuracy {summary['test_accuracy']:.4f}")
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    listed = run([str(BIN / "mlsd"), "models", "list", "--json", "--home", home])
    [model] = json.loads(listed.stdout)["models"]
    versions = [v["version"] for v in model["versions"]]
    print(f"registered: {model['name']} versions {versions}")
    assert summary["registered"]["version"] in versions  # one version per training job


@pytest.mark.slow
def test_failing_job_exits_1_with_its_last_log_lines(head, home):
    result = run([str(BIN / "mlsd"), "submit", "data", "--address", head.dashboard,
                  "--wait", "--home", home, "--", "--source", "folder:/no/such/folder"])
    print(f"\nfailing job: exit {result.returncode}: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "last lines of its log" in result.stderr
    assert "folder not found" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["trian", "--address", "http://127.0.0.1:8265"],
     "unknown stage 'trian'; the stages are: pipeline, data, train, tune, retrain, deploy"),
    (["train", "--address", "http://127.0.0.1:1"], "cannot reach the Ray dashboard"),
    (["train", "--address", "http://127.0.0.1:1", "--set", "train.epochz=2"], "train.epochz"),
])
def test_submit_bad_usage_exits_2_in_seconds(args, message):
    result = run([str(BIN / "mlsd"), "submit", *args], timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
