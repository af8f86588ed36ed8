"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`), driven by the CLI through
RAY_ADDRESS as on a real cluster: training workers spread over two nodes learn, their replicas
identical at every checkpoint; Serve replicas on two nodes both answer; a cluster whose nodes have
different IP addresses (two "machines") refuses a node-local MLSD_HOME at start.

Run with `-s` to see which nodes the workers and replicas ran on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request

import pytest
from sklearn.datasets import load_digits

from mlsd_ray.core.ports import free_port
from mlsd_ray.serve.client import b64_instance
from mlsd_ray.tasks.image.data.sources import digits_uint8
from mlsd_ray.tasks.image.traffic import png_bytes

pytestmark = pytest.mark.slow  # two extra Ray nodes and trainings over them: CI only
NODE = {"num_cpus": 1, "object_store_memory": 150 * 1024**2}
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
    """A head and a second node of 1 CPU each, on this machine (the same IP address)."""
    from ray.cluster_utils import Cluster

    from mlsd_ray.core import runtime

    # Its processes are told its address, as runtime.start_local_ray tells a local Ray's:
    # Ray's state API would otherwise answer them for the head that `ray start` recorded last
    with runtime.told_its_address() as port:
        nodes = Cluster(initialize_head=True, connect=False,
                        head_node_args={**node_args, "include_dashboard": True,
                                        "dashboard_port": None, "gcs_server_port": port})
        nodes.add_node(**node_args)
    nodes.wait_for_nodes()
    yield nodes
    nodes.shutdown()


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
