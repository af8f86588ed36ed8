"""Benchmark: replica autoscaling under a load step, and back down after it.

Serves the model with autoscaling (1..--max-replicas, short delays), sends 1 client for
--warmup seconds, then --users clients for --seconds (locust, no think time), then nothing.
Polls Serve's status every 0.5 s: a replica counts as wanted from the moment it is starting
(Serve's scale-up decision) and as serving once it runs. Then redeploys with min_replicas 0,
waits until no replica runs and times the first request (the cold start). Prints one JSON
line: seconds from the step until a second replica serves, split into the decision and the
replica's start-up; the most replicas seen; seconds from the end of the load until one replica
is left; the replica count over time (changes only); locust's request and error counts; and
the cold start.

    python bench/autoscale.py [--model models:/digits-cnn@production] [--home DIR]
                              [--users 32] [--seconds 30] [--max-replicas 2]
"""

from __future__ import annotations

import json
import sys
import threading
import time

from _serving import digit_body, load_parser, locust, model_checkpoint, start_local_ray

from mlsd_ray.core.workspace import Workspace


def replica_counts(app: str = "mlsd", deployment: str = "Model") -> tuple[int, int]:
    """(running, wanted): replicas serving, and those serving or starting. A replica starts
    once the controller has decided to scale up, so `wanted` rising marks the decision."""
    from ray import serve

    states = serve.status().applications[app].deployments[deployment].replica_states
    by_state = {str(getattr(state, "value", state)): int(count) for state, count in states.items()}
    running = by_state.get("RUNNING", 0)
    return running, running + by_state.get("STARTING", 0) + by_state.get("UPDATING", 0)


def running_replicas() -> int:
    return replica_counts()[0]


class Timeline:
    """Replica counts over time, sampled in the background."""

    def __init__(self):
        self.samples: list[tuple[float, int]] = []
        self.wanted: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            running, wanted = replica_counts()
            self.samples.append((time.monotonic() - self.started, running))
            self.wanted.append((self.samples[-1][0], wanted))
            time.sleep(0.5)

    def now(self) -> float:
        return time.monotonic() - self.started

    def first(self, after: float, test, series: str = "samples") -> float | None:
        return next((t for t, n in getattr(self, series) if t >= after and test(n)), None)

    def changes(self) -> list[list[float]]:
        out, last = [], None
        for t, n in self.samples:
            if n != last:
                out.append([round(t, 1), n])
                last = n
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def cold_start(settings, args) -> dict:
    """min_replicas 0: wait until no replica runs, then time the first request (a cold start)."""
    import urllib.request

    from mlsd_ray.serve import control

    scaling = {**settings.autoscaling.model_dump(), "min_replicas": 0, "downscale_delay_s": 5.0}
    control.start(type(settings).model_validate({**settings.model_dump(), "autoscaling": scaling}),
                  workspace=args.workspace, log=lambda _: None)
    deadline = time.monotonic() + 120
    while running_replicas() > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    idle = running_replicas() == 0
    request = urllib.request.Request(f"http://127.0.0.1:{args.port}/v1/predict",
                                     data=digit_body(), method="POST",
                                     headers={"content-type": "application/json"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=120) as response:
        status = response.status
    return {"replicas_before": 0 if idle else running_replicas(), "status": status,
            "first_request_seconds": round(time.perf_counter() - started, 2)}


def main() -> None:
    parser = load_parser(__doc__)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--max-replicas", type=int, default=2)
    parser.add_argument("--downscale-delay", type=float, default=10.0)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--autoscaling", nargs=2, action="append", metavar=("FIELD", "VALUE"),
                        help="override a serve.autoscaling field, e.g. upscale_delay_s 2")
    args = parser.parse_args()
    args.workspace = Workspace.at(args.home)  # resolved once, handed down
    model = model_checkpoint(args.model, args.workspace)

    import ray
    from ray import serve

    from mlsd_ray.core.config import ServeConfig
    from mlsd_ray.serve import control

    start_local_ray()
    from mlsd_ray.core.config import AutoscalingConfig

    # serve.autoscaling's defaults (what `mlsd serve` uses), with this run's bounds
    scaling = AutoscalingConfig(min_replicas=1, max_replicas=args.max_replicas,
                                downscale_delay_s=args.downscale_delay).model_dump()
    for name, value in args.autoscaling or []:
        scaling[name] = float(value)
    settings = ServeConfig(model=model["uri"], port=args.port, num_cpus=0.5,
                           autoscaling=scaling)
    try:
        control.start(settings, workspace=args.workspace, log=lambda _: None)
        url = f"http://127.0.0.1:{args.port}"
        timeline = Timeline()
        warm = locust(url, 1, args.warmup, digit_body())
        step = timeline.now()
        loaded = locust(url, args.users, args.seconds, digit_body())
        quiet = timeline.now()
        # a replica still starting when the load ends counts: wait for it, then for the way down
        while timeline.now() - quiet < 180 and (running_replicas() > 1 or (
                timeline.first(step, lambda n: n >= 2) is None and timeline.now() - quiet < 30)):
            time.sleep(0.5)
        time.sleep(1)
        timeline.stop()
        up = timeline.first(step, lambda n: n >= 2)
        decided = timeline.first(step, lambda n: n >= 2, series="wanted")
        down = timeline.first(quiet, lambda n: n <= 1)
        cold = cold_start(settings, args)
        print(json.dumps({
            "bench": "autoscale", "users": args.users, "load_seconds": args.seconds,
            "settings": scaling, "seconds_to_second_replica": round(up - step, 1)
            if up is not None else None,
            # what the reaction is made of: Serve's decision, then the replica's start-up
            "seconds_to_scale_up_decision": round(decided - step, 1)
            if decided is not None else None,
            "seconds_replica_start": round(up - decided, 1)
            if up is not None and decided is not None else None,
            "max_replicas_seen": max(n for _, n in timeline.samples),
            "seconds_to_scale_down_after_load": round(down - quiet, 1)
            if down is not None else None,
            "replicas_over_time": timeline.changes(),
            "load": loaded, "warmup": warm, "scale_to_zero": cold,
            "errors": loaded["failures"] + warm["failures"]}))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
