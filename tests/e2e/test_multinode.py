"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`), driven by the CLI through
RAY_ADDRESS and by Ray jobs through its dashboard, as a real cluster is: training workers spread
over two nodes learn, their replicas identical at every checkpoint; Serve replicas on two nodes
both answer; the training job submitted with `mlsd submit` and with `ray job submit`, each
registering a model version, and a failing job and what `mlsd submit` says about it; a cluster
whose nodes have different IP addresses (two "machines") refuses a node-local MLSD_HOME at
start. One cluster serves them all: a Ray head costs about 20 CPU-seconds to start, plus its
idle daemons.

Run with `-s` to see which nodes the workers and replicas ran on, the job ids, their final
statuses and the registered versions.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient
from sklearn.datasets import load_digits

from mlsd_ray.cli.submit import submit_when_ready, use_local_token
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.serve import control
from mlsd_ray.serve.client import b64_instance
from mlsd_ray.serve.control import free_port
from mlsd_ray.tasks.image.data.sources import digits_uint8
from mlsd_ray.tasks.image.traffic import png_bytes

NODE = {"num_cpus": 1, "object_store_memory": 150 * 1024**2}
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SMALL_TRAINING = ["--source", "digits", "--set", "data.image_size=8",
                  "--set", "data.augment.random_shift=1", "--epochs", "2", "--num-workers", "2",
                  "--cpus-per-worker", "0.5", "--set", "registry.auto_register=false"]


@pytest.fixture(scope="module")
def node_args():
    """NODE with a Ray temp dir of this cluster's own: a head records itself as the machine's
    current cluster in its temp dir, and another test's head (pytest-xdist runs files side by
    side) would find this one there in the shared /tmp/ray."""
    temp_dir = tempfile.mkdtemp(prefix="ray-multinode-", dir="/tmp")  # short: socket paths
    yield {**NODE, "temp_dir": temp_dir}
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(node_args):
    """A head and a second node of 1 CPU each, on this machine (the same IP address). They run
    with this venv first on PATH, as a real cluster's nodes run in the environment that has
    mlsd-ray installed: a job's entrypoint (`python jobs/train.py`) runs that `python`."""
    from ray.cluster_utils import Cluster

    second_temp_dir = tempfile.mkdtemp(prefix="ray-multinode-", dir="/tmp")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
        nodes = Cluster(initialize_head=True, connect=False,
                        head_node_args={**node_args, "include_dashboard": True,
                                        "dashboard_port": None})
        # a temp dir of its own, as on another machine: nodes that share one delete each
        # other's copy of a job's working dir (runtime_resources/) when their own use ends
        nodes.add_node(**{**node_args, "temp_dir": second_temp_dir})
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()
    shutil.rmtree(second_temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("multinode") / "mlsd-home")


def mlsd(cluster, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mlsd_ray.cli", *args], capture_output=True,
                          text=True, timeout=400,
                          env={**os.environ, "RAY_ADDRESS": cluster.address, **env})


def short(node_id: str) -> str:
    return node_id[:8]


@pytest.fixture(scope="module")
def trained(cluster, home) -> dict:
    """Two workers spread over the two nodes (placement SPREAD)."""
    result = mlsd(cluster, "train", "--json", "--home", home, *SMALL_TRAINING,
                  "--set", "train.placement_strategy=SPREAD", "--run-name", "SPREAD")
    assert result.returncode == 0, result.stderr[-3000:]
    return {"SPREAD": json.loads(result.stdout)}


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_spread_workers_run_on_two_nodes_and_learn(trained):
    """Ranks on two nodes (DDP over gloo between them) train a model that learned, and the
    replicas held bit-identical weights at every checkpoint (replicas_in_sync)."""
    from mlsd_ray.training.checkpoint import load_train_state

    spread = trained["SPREAD"]
    print("\nSPREAD: " + ", ".join(f"rank {n['rank']} on node {short(n['node_id'])}"
                                   for n in spread["worker_nodes"])
          + f"; val {spread['val_accuracy']:.4f}, test {spread['test_accuracy']:.4f}")
    assert len({n["node_id"] for n in spread["worker_nodes"]}) == 2
    assert spread["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    history = load_train_state(spread["checkpoint"])["history"]
    assert [h.get("replicas_in_sync") for h in history] == [1.0, 1.0]  # both checkpointed


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_serve_replicas_on_two_nodes_answer(cluster, home, trained):
    from ray.util.state import list_actors

    port = free_port()
    started = mlsd(cluster, "serve", "--detach", "--json", "--home", home,
                   "--model", trained["SPREAD"]["checkpoint"], "--port", str(port),
                   "--min-replicas", "2", "--max-replicas", "2",
                   # One proxy (one port, one machine). It routes straight to the replicas
                   # (single topology), and Serve's default router prefers the proxy's own
                   # node: round robin spreads light traffic over both nodes.
                   "--router", "round_robin",
                   "--set", "serve.proxy_location=HeadOnly")
    assert started.returncode == 0, started.stderr[-3000:]
    url = json.loads(started.stdout)["url"]
    try:
        images = digits_uint8(load_digits().images[:40])[..., None]
        replicas = []
        for image in images:
            body = json.dumps({"instances": [b64_instance(png_bytes(image))]}).encode()
            request = urllib.request.Request(f"{url}/v1/predict", data=body,
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                assert response.status == 200
                replicas.append(json.loads(response.read())["replica"])
        actors = list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")],
                             limit=1000)
        node_of = {a.name.rsplit("#", 1)[-1]: a.node_id for a in actors
                   if a.name and a.name.startswith("SERVE_REPLICA::") and "#Model#" in a.name}
        answered = {r: short(node_of[r]) for r in set(replicas)}
        print(f"\n{len(replicas)} requests answered by replicas {answered} "
              f"({ {r: replicas.count(r) for r in answered} })")
        assert len(set(answered.values())) == 2
    finally:
        stopped = mlsd(cluster, "serve", "stop", "--home", home)
        assert stopped.returncode == 0, stopped.stderr


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
def dashboard(cluster) -> str:
    """The cluster's dashboard address, once its job agent takes jobs: a fresh head answers on
    its dashboard port before that. Waited for the way `mlsd submit` waits, so that
    `ray job submit` (which does not wait) finds it ready."""
    address = f"http://{cluster.head_node.address_info['webui_url']}"
    use_local_token()
    ready = submit_when_ready(JobSubmissionClient(address), "python -c pass", {}, "ready",
                              lambda line: None)
    print(f"\nhead at {address} took its first job {ready}")
    return address


def test_a_head_that_exits_while_starting_is_started_once_more_then_named(tmp_path):
    """`ray start` that fails (here on an option it does not know) is tried twice, and the
    error names its log, which holds both attempts."""
    said: list[str] = []
    with pytest.raises(control.HeadExited, match="exited with 2; see .*ray-head.log"):
        control.start_head(Workspace.at(str(tmp_path)), said.append, ("--no-such-option",))
    assert said[1:] == ["the Ray head exited while starting; starting it once more"]
    assert (tmp_path / "serve" / "ray-head.log").read_text().count("no-such-option") == 2


@pytest.fixture(scope="module")
def jobs_home(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("jobs") / "mlsd-home")


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_train_job_with_mlsd_submit(dashboard, jobs_home):
    result = run([str(BIN / "mlsd"), "submit", "train", "--address", dashboard,
                  "--smoke", "--wait", "--json", "--home", jobs_home, "--set", "train.seed=1",
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


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_train_job_with_ray_job_submit(dashboard, jobs_home):
    result = run([str(BIN / "ray"), "job", "submit", "--address", dashboard,
                  "--working-dir", ".", "--runtime-env", "jobs/runtime-env/local.yaml", "--",
                  "python", "jobs/train.py", "--smoke", "--home", jobs_home], **token_auth())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = next(line.split("'")[1] for line in result.stdout.splitlines()
                  if "submitted successfully" in line)
    assert f"Job '{job_id}' succeeded" in result.stdout
    summary = json.loads(next(line for line in result.stdout.splitlines()
                              if line.startswith("MLSD_RESULT "))[len("MLSD_RESULT "):])
    print(f"\nray job submit: {job_id} SUCCEEDED, registered {summary['registered']['uri']}, "
          f"test accuracy {summary['test_accuracy']:.4f}")
    assert summary["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    listed = run([str(BIN / "mlsd"), "models", "list", "--json", "--home", jobs_home])
    [model] = json.loads(listed.stdout)["models"]
    versions = [v["version"] for v in model["versions"]]
    print(f"registered: {model['name']} versions {versions}")
    assert summary["registered"]["version"] in versions  # one version per training job


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_failing_job_exits_1_with_its_last_log_lines(dashboard, jobs_home):
    result = run([str(BIN / "mlsd"), "submit", "data", "--address", dashboard,
                  "--wait", "--home", jobs_home, "--", "--source", "folder:/no/such/folder"])
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


@pytest.mark.slow  # two extra Ray nodes: CI only
def test_cluster_of_two_machines_refuses_a_node_local_home(cluster, node_args, home, trained):
    """A node with another IP address (127.0.0.2) makes the cluster span two "machines"."""
    cluster.add_node(**node_args, node_ip_address="127.0.0.2")
    cluster.wait_for_nodes()
    result = mlsd(cluster, "train", "--home", home, *SMALL_TRAINING)
    print(f"\nexit {result.returncode}: {result.stderr.strip().splitlines()[-1][:300]}")
    assert result.returncode == 2
    assert "spans 2 machines" in result.stderr and f"MLSD_HOME is {home}" in result.stderr
    assert "s3://" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert "Traceback" not in result.stderr
