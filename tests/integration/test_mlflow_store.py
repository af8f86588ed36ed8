"""MLflow on PostgreSQL: a real server (Debian's `postgresql`, started here on loopback) as
MLFLOW_TRACKING_URI, written by several processes at once.

The embedded sqlite store takes one writer at a time (README), which is why every MLflow
write of a training or a search comes from its driver. A team that runs several drivers at
once against one store (trainings, searches, retrains) points MLFLOW_TRACKING_URI at a server
or at a database such as this one.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


@pytest.fixture(scope="module")
def postgres_url():
    """postgresql://mlsd@127.0.0.1:PORT/mlflow on a fresh PostgreSQL cluster (trust auth on
    loopback only, fsync off: a test's data). PostgreSQL refuses to run as root, so as root
    it runs as the `postgres` user that Debian's package creates."""
    import psycopg

    initdb = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not initdb:
        pytest.fail("PostgreSQL is not installed: `python3 run.py test --all` installs "
                    "Debian's postgresql, or apt-get install postgresql")
    bin_dir = Path(initdb[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="mlsd-postgres-"))  # not under pytest's 0700 tmp
    as_user: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U",
                    "mlsd", "--no-sync"], check=True, capture_output=True, timeout=120)
    server = subprocess.Popen(
        [*as_user, str(bin_dir / "postgres"), "-D", str(data), "-p", str(port), "-k",
         str(folder), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg.connect(host="127.0.0.1", port=port, user="mlsd",
                                             dbname="postgres", autocommit=True)
                break
            except psycopg.OperationalError:
                assert server.poll() is None, server.communicate()[1][-2000:]
                assert time.monotonic() < deadline, "PostgreSQL did not start within 60 s"
                time.sleep(0.3)
        connection.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://mlsd@127.0.0.1:{port}/mlflow"
    finally:
        server.terminate()
        server.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def test_concurrent_writers_lose_nothing_on_postgresql(postgres_url, tmp_path):
    """Four processes (Ray tasks, each as a driver of its own) at once: each opens a run with
    LiveRun (registry/tracking.py, what a training logs through), logs 40 epochs of three
    metrics, and registers a version of the same model. Every metric point is there, the runs
    are FINISHED, and the versions are 1 to 4, each once."""
    import ray
    from mlflow import MlflowClient

    workspace, writers, epochs = Workspace.at(str(tmp_path / "home")), 4, 40
    metrics = ("train_loss", "val_loss", "val_accuracy")

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"MLFLOW_TRACKING_URI": postgres_url}})
    def writer(index: int) -> tuple[str, int, str]:
        from mlsd_ray import registry
        from mlsd_ray.registry.tracking import LiveRun

        with LiveRun(workspace, f"writer-{index}", {"writer": index}, str(tmp_path),
                     f"fingerprint-{index}", "concurrent") as run:
            for epoch in range(1, epochs + 1):
                run.log_epoch({"epoch": epoch, "train_loss": 1 / epoch,
                               "val_loss": 1.5 / epoch, "val_accuracy": 1 - 1 / epoch})
        version = registry.new_version(registry.client(workspace), "concurrent",
                                       str(run.run_id), {"writer": str(index)}, "a test")
        return str(run.run_id), version.version, workspace.tracking_uri

    started = time.monotonic()
    results = ray.get([writer.remote(i) for i in range(writers)], timeout=300)
    seconds = time.monotonic() - started
    assert {uri for *_, uri in results} == {postgres_url}  # not the workspace's sqlite file
    client = MlflowClient(tracking_uri=postgres_url)
    counts = {metric: sorted(len(client.get_metric_history(run_id, metric))
                             for run_id, *_ in results) for metric in metrics}
    assert counts == {metric: [epochs] * writers for metric in metrics}, counts
    assert {client.get_run(run_id).info.status for run_id, *_ in results} == {"FINISHED"}
    assert sorted(version for _, version, _ in results) == list(range(1, writers + 1))
    experiment = client.get_experiment_by_name("mlsd")
    assert experiment.artifact_location == workspace.mlflow_artifacts  # not ./mlruns
    points = writers * epochs * len(metrics)
    print(f"\n{writers} writers at once: {points} of {points} metric points, versions "
          f"{sorted(v for _, v, _ in results)}, in {seconds:.1f} s")
