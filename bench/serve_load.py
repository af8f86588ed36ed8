"""Benchmark: our Serve app (dynamic batching) against plain FastAPI + uvicorn, same model.

Locust (headless, closed loop, no think time) drives each server at the same concurrency for the
same time with the same one-digit request; a third figure is the bare model's batched forward
rate in this process (no HTTP). Prints a JSON line per system, then one with the ratios.
Targets on 2 cores: Serve >= 1.0x plain FastAPI's requests/s at equal or better p99, and
>= 50% of the bare batched forward rate.

    python bench/serve_load.py [--model models:/digits-cnn@production] [--home DIR]
                               [--users 32] [--seconds 30] [--topology single split]

Each `serve.topology` given is measured in turn (single: routes and model in one replica;
split: an ingress replica in front of the model replica).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from _serving import (
    ROOT,
    digit_body,
    load_parser,
    locust,
    model_checkpoint,
    start_local_ray,
    wait_for,
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def bare_forward_rate(checkpoint: str, batch: int, seconds: float = 5.0) -> dict:
    """Images/s of preprocessing + forward on full batches, one thread, no HTTP."""
    import numpy as np
    import torch

    from mlsd_ray.tasks.image.checkpoint import load_model

    torch.set_num_threads(1)
    loaded = load_model(checkpoint)
    images = [np.asarray(i, dtype=np.uint8)[:, :, None] for i in
              json.loads(digit_body(batch))["instances"]]
    done, started = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - started < seconds:
            torch.softmax(loaded.model(loaded.preprocessor(images)), dim=1)
            done += batch
    return {"images_per_s": round(done / (time.perf_counter() - started), 1), "batch": batch}


def ray_serve(model_uri: str, home: str | None, args, topology: str) -> dict:
    import ray
    from ray import serve

    from mlsd_ray.core.config import ServeConfig
    from mlsd_ray.serve import control

    start_local_ray()
    port = free_port()
    settings = ServeConfig(model=model_uri, port=port, num_cpus=1, max_batch_size=32,
                           max_ongoing_requests=64, batch_wait_timeout_s=args.batch_wait,
                           autoscaling={"min_replicas": 1, "max_replicas": 1},
                           topology=topology)
    try:
        control.start(settings, home=home, log=lambda _: None)
        return locust(f"http://127.0.0.1:{port}", args.users, args.seconds, digit_body())
    finally:
        serve.shutdown()
        ray.shutdown()


def plain_fastapi(checkpoint: str, args) -> dict:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "bench.plain_server:app", "--port", str(port),
         "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, "BENCH_CHECKPOINT": checkpoint})
    try:
        wait_for(f"http://127.0.0.1:{port}/docs")
        return locust(f"http://127.0.0.1:{port}", args.users, args.seconds, digit_body())
    finally:
        server.terminate()
        server.wait()


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--batch-wait", type=float, default=0.005)
    parser.add_argument("--topology", nargs="+", choices=("single", "split"),
                        default=["single", "split"])
    args = parser.parse_args()
    model = model_checkpoint(args.model, args.home)
    bare = bare_forward_rate(model["checkpoint"], batch=32)
    print(json.dumps({"bench": "serve_load", "system": "bare_forward", **bare}), flush=True)
    plain = plain_fastapi(model["checkpoint"], args)
    print(json.dumps({"bench": "serve_load", "system": "plain_fastapi", "users": args.users,
                      "seconds": args.seconds, **plain}), flush=True)
    for topology in args.topology:
        ours = ray_serve(model["uri"], args.home, args, topology)
        print(json.dumps({"bench": "serve_load", "system": "ray_serve_batched",
                          "topology": topology, "users": args.users, "seconds": args.seconds,
                          **ours}), flush=True)
        print(json.dumps({
            "bench": "serve_load", "model": model["uri"], "topology": topology,
            "serve_vs_fastapi_throughput": round(ours["requests_per_s"]
                                                 / plain["requests_per_s"], 3),
            "serve_vs_fastapi_p99": round(ours["p99_ms"] / plain["p99_ms"], 3),
            "serve_vs_bare_forward": round(ours["requests_per_s"] / bare["images_per_s"], 3),
            "errors": {"serve": ours["failures"], "fastapi": plain["failures"]}}), flush=True)

if __name__ == "__main__":
    main()
