"""Chaos check: SIGKILL one model replica's process during a load run.

Serves the model with two replicas, drives --users clients with locust for --seconds, kills one
Model replica's worker process with SIGKILL after --kill-after seconds, and measures how long
Serve takes to have two running replicas again. Prints one JSON line with the requests, failures,
success ratio and the replacement time. Target: >= 99.9% of requests succeed.

    python bench/replica_kill.py [--model models:/digits-cnn@production] [--home DIR]
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

from _serving import digit_body, load_parser, locust, model_checkpoint, start_local_ray
from autoscale import running_replicas

from mlsd_ray.core.workspace import Workspace


def model_replica_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")], detail=True)
            if a.class_name.endswith(":Model")]


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--kill-after", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    args.workspace = Workspace.at(args.home)  # resolved once, handed down
    model = model_checkpoint(args.model, args.workspace)

    import ray
    from ray import serve

    from mlsd_ray.core.config import ServeConfig
    from mlsd_ray.serve import control

    start_local_ray()
    settings = ServeConfig(model=model["uri"], port=args.port, num_cpus=0.5,
                           autoscaling={"min_replicas": 2, "max_replicas": 2})
    result: dict = {}
    try:
        control.start(settings, workspace=args.workspace, log=lambda _: None)
        load = threading.Thread(target=lambda: result.update(locust(
            f"http://127.0.0.1:{args.port}", args.users, args.seconds, digit_body())))
        load.start()
        time.sleep(args.kill_after)
        victim = model_replica_pids()[0]
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        while running_replicas() == 2 and time.monotonic() - killed < 30:
            time.sleep(0.1)  # Serve notices the death
        while running_replicas() < 2 and time.monotonic() - killed < 120:
            time.sleep(0.25)
        replaced = round(time.monotonic() - killed, 1) if running_replicas() == 2 else None
        load.join()
        print(json.dumps({
            "bench": "replica_kill", "users": args.users, "seconds": args.seconds,
            "killed_pid": victim, "killed_at_s": args.kill_after,
            "seconds_to_replace": replaced, "requests": result["requests"],
            "failures": result["failures"],
            "success_ratio": round(1 - result["failures"] / max(1, result["requests"]), 5),
            "requests_per_s": result["requests_per_s"], "p99_ms": result["p99_ms"]}))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
