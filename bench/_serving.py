"""Shared by the serving benchmarks: the model to serve, a request body, locust runs."""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from mlsd_ray.core.workspace import Workspace


def load_parser(doc: str) -> argparse.ArgumentParser:
    """The options every serving benchmark takes: which model, where, and the load (a
    benchmark may redefine --model and --users to take several)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     conflict_handler="resolve")
    parser.add_argument("--model", default="models:/digits-cnn@production")
    parser.add_argument("--home", default=None, help="MLSD_HOME holding the registry")
    parser.add_argument("--users", type=int, default=32, help="concurrent locust clients")
    parser.add_argument("--seconds", type=int, default=30, help="length of the load")
    return parser


def start_local_ray() -> None:
    """A local 2-CPU Ray with the dashboard (Serve needs it), quiet."""
    import ray

    ray.init(num_cpus=2, include_dashboard=True, log_to_driver=False, logging_level="ERROR")


def model_checkpoint(ref: str, workspace: Workspace) -> dict:
    """The registered model to serve and its local checkpoint; exits 2 with the fix if none."""
    from mlsd_ray import registry
    from mlsd_ray.core.errors import InputError

    try:
        model = registry.pin(ref, workspace)
        return {**model.as_dict(), "checkpoint": model.path}
    except InputError as exc:
        sys.exit(f"{exc}\nrun `mlsd pipeline` first (or pass --model / --home)")


def digit_body(count: int = 1) -> bytes:
    """A JSON request with `count` real test digits (scikit-learn's, as 0-255 integers)."""
    from sklearn.datasets import load_digits

    images = (load_digits().images[-count:] * 255 / 16).round().astype(np.uint8)
    return json.dumps({"instances": [image.tolist() for image in images]}).encode()


def wait_for(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (gone ones count 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def serve_pids() -> dict[str, list[int]]:
    """Serve's HTTP proxies and replicas on this machine, by the title Ray gives them
    (`ray::ProxyActor`, `ray::ServeReplica:APP:DEPLOYMENT`), and the HAProxy that replaces
    the proxy's HTTP path with RAY_SERVE_ENABLE_HA_PROXY=1 (`haproxy`)."""
    import psutil

    found: dict[str, list[int]] = {}
    for process in psutil.process_iter(["cmdline"]):
        title = " ".join(process.info["cmdline"] or []).split(" ")[0]
        if title.endswith("/haproxy"):
            title = "haproxy"
        if title.startswith(("ray::ServeReplica", "ray::ProxyActor", "haproxy")):
            found.setdefault(title, []).append(process.pid)
    return found


def locust(host: str, users: int, seconds: int, body: bytes,
           server_pids: dict[str, list[int]] | None = None) -> dict:
    """Run locust headless against `host`; requests/s, latency percentiles (ms), failures,
    and, given the server's processes (by name), their CPU milliseconds per answered request:
    the cost that caps throughput once the cores are busy."""
    server_pids = server_pids or {}
    cpu_before = {name: cpu_seconds(pids) for name, pids in server_pids.items()}
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp, "body.json")
        payload.write_bytes(body)
        prefix = str(Path(tmp, "run"))
        command = [str(Path(sys.executable).with_name("locust")), "-f",
                   str(ROOT / "bench" / "locustfile.py"), "--headless", "--host", host,
                   "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", prefix,
                   "--only-summary", "--loglevel", "WARNING"]
        subprocess.run(command, check=False, env={**os.environ, "BENCH_PAYLOAD": str(payload)},
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(f"{prefix}_stats.csv") as handle:
            total = next(row for row in csv.DictReader(handle) if row["Name"] == "Aggregated")
    requests = max(int(total["Request Count"]), 1)
    cpu_ms = {name: round(1000 * (cpu_seconds(pids) - cpu_before[name]) / requests, 2)
              for name, pids in server_pids.items()}
    return {"requests": int(total["Request Count"]), "failures": int(total["Failure Count"]),
            "requests_per_s": round(float(total["Requests/s"]), 1),
            "p50_ms": float(total["50%"]), "p95_ms": float(total["95%"]),
            "p99_ms": float(total["99%"]),
            **({"server_cpu_ms_per_request": round(sum(cpu_ms.values()), 2),
                "cpu_ms_per_request_by_process": cpu_ms} if server_pids else {})}
