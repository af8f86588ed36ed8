"""`mlsd serve` with Serve's HAProxy in front of the replica, on a Ray head of its own (the
cluster must be started with RAY_SERVE_ENABLE_HA_PROXY=1)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mlsd_ray.core.ports import free_port, port_in_use


@pytest.mark.slow  # a Ray head of its own, with Serve's HAProxy in front of the replica
def test_serving_through_haproxy_answers_and_stops_cleanly(tmp_path, digits_model):
    """`mlsd serve --detach --set serve.ingress=haproxy` with no RAY_ADDRESS starts a head of
    its own with RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (not Serve's Python proxy) holds the
    port and forwards to the replica, which answers /v1 and /v2, and HAProxy balances as
    serve.router=round_robin asks; `serve stop` frees the port and leaves no HAProxy
    behind."""
    import psutil
    import requests

    env = {name: value for name, value in os.environ.items() if name != "RAY_ADDRESS"}
    home, port = str(tmp_path / "home"), str(free_port())
    command = [sys.executable, "-m", "mlsd_ray.cli", "serve", "--detach", "--json", "--model",
               digits_model.result.checkpoint, "--home", home, "--port", port,
               "--set", "serve.ingress=haproxy", "--router", "round_robin"]

    def run(*extra: str, **more_env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*command, *extra], capture_output=True, text=True,
                              timeout=300, env={**env, **more_env})

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
        # serve.router=round_robin reached HAProxy as its balance. Any HAProxy of it will do:
        # each reads the same file (one may be gone, replaced by a reload).
        haproxy = next(p.info["cmdline"] for p in psutil.process_iter(["name", "cmdline"])
                       if p.info["name"] == "haproxy" and "-f" in (p.info["cmdline"] or []))
        config = Path(haproxy[haproxy.index("-f") + 1]).read_text()
        assert "balance roundrobin" in config and "balance leastconn" not in config
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
