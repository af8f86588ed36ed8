"""The pipeline's monitoring loop, for any task, run against the app the pipeline just started:

    unshifted traffic -> monitor (expect no drift) -> shifted traffic, kept as labelled new
    data -> monitor (expect drift) -> retrain on it -> promote if better -> rolling update of
    the live app under steady load -> a summary per step.

What differs between tasks is only which shift shows drift and what source the saved traffic
becomes: `Task.drift_drill`. Traffic goes through `Task.simulate_traffic`, drift through the
shared monitor (monitor/run.py), the gate through workflows/retrain.py and the rollout through
serve/control.py.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from mlsd_ray.core.config import Config
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import Task, TrafficRequest

UNSHIFTED_COUNT = 200


@dataclass(frozen=True)
class DriftDrill:
    """What a task sends to show drift (`traffic`, saved to `traffic.save`) and the source
    spec under which the saved, labelled traffic is retrained on (`source`)."""

    traffic: TrafficRequest
    source: str


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _monitor_window(cfg: Config, home: str | None, since: str, answered: int,
                    log: Callable[[str], None]) -> dict:
    """Wait until the replicas have flushed `answered` rows to the prediction log, then test
    the window [since, now)."""
    from mlsd_ray.monitor.predlog import log_location, wait_for_rows
    from mlsd_ray.monitor.run import monitor

    wait_for_rows(log_location(cfg.serve.prediction_log, home), dt.datetime.fromisoformat(since),
                  answered, cfg.serve.prediction_log.flush_seconds + 10)
    report = monitor(cfg, home, since=since, until=_now(), log=log)
    log(f"monitor: {report['verdict']}: {report.get('summary', '')}")
    return {"verdict": report["verdict"], "rows": report["rows"],
            "summary": report.get("summary"),
            "report": report.get("outputs", {}).get("report.md")}


class BackgroundLoad:
    """Steady traffic from another thread (a context manager), through the task's own
    `simulate_traffic`: what a rolling update must not disturb. Counts requests, failures and
    the versions that answered."""

    def __init__(self, task: Task, prepared, url: str, batch: int = 4):
        self.task, self.prepared, self.url, self.batch = task, prepared, url, batch
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.totals: dict = {"requests": 0, "failed_requests": 0,
                             "model_versions": Counter(), "errors": []}

    def _run(self) -> None:
        seed = 0
        while not self.stop.is_set():
            seed += 1
            sent = self.task.simulate_traffic(self.prepared, TrafficRequest(
                self.url, count=self.batch, batch=self.batch, concurrency=1, seed=seed))
            self.totals["requests"] += sent["requests"]
            self.totals["failed_requests"] += sent["failed_requests"]
            self.totals["model_versions"].update(sent["model_versions"])
            self.totals["errors"] = (self.totals["errors"] + sent["errors"])[:5]

    def __enter__(self) -> BackgroundLoad:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.totals["seconds"] = round(time.perf_counter() - self.started, 2)
        self.totals["model_versions"] = dict(self.totals["model_versions"])


def monitoring_loop(task: Task, cfg: Config, url: str, served_uri: str, prepared,
                    home: str | None, log: Callable[[str], None]) -> dict:
    """Run the loop (see the module docstring) on the app at `url` serving `served_uri`, with
    traffic from `prepared` (the task's prepared data); returns one entry per step."""
    from mlsd_ray.serve import control
    from mlsd_ray.workflows.retrain import retrain

    steps: dict = {}
    since = _now()
    steps["traffic_unshifted"] = task.simulate_traffic(
        prepared, TrafficRequest(url, count=UNSHIFTED_COUNT))
    steps["monitor_unshifted"] = _monitor_window(cfg, home, since,
                                                 steps["traffic_unshifted"]["answered"], log)

    incoming = Workspace.at(home).incoming(time.strftime("%Y%m%d-%H%M%S"))
    drill = task.drift_drill(prepared, incoming)
    since = _now()
    steps["traffic_shifted"] = task.simulate_traffic(prepared, replace(drill.traffic, url=url))
    log(f"{drill.traffic.shift} traffic: {_quality(steps['traffic_shifted'])} (unshifted "
        f"{_quality(steps['traffic_unshifted'])}); kept as new labelled data: {drill.source}")
    steps["monitor_shifted"] = _monitor_window(cfg, home, since,
                                               steps["traffic_shifted"]["answered"], log)
    if steps["monitor_shifted"]["verdict"] != "drift":
        steps["retrain"] = {"skipped": "no drift found"}
        return steps

    decision = retrain(cfg, drill.source, home, model=served_uri, log=log, roll_out=False)
    steps["retrain"] = {"champion": decision.champion, "challenger": decision.challenger,
                        "gain": decision.gain, "promote": decision.promote,
                        "reason": decision.reason, "outputs": decision.outputs,
                        "holdout": {"champion": decision.champion_scores.holdout.score,
                                    "challenger": decision.challenger_scores.holdout.score}}
    if decision.promote:
        with BackgroundLoad(task, prepared, url) as load:
            steps["rollout"] = control.deploy(decision.challenger, home, cfg.serve.app_name,
                                              log)
            time.sleep(1.0)  # a few answers from the new version while the load runs
        steps["rollout"]["load"] = load.totals
        log(f"rolling update under load: {load.totals['requests']} requests, "
            f"{load.totals['failed_requests']} failed, versions {load.totals['model_versions']}")
    return steps


def _quality(sent: dict) -> str:
    """How the traffic was answered: accuracy where the task measures it, else outcomes."""
    if sent.get("accuracy") is not None:
        return f"accuracy {sent['accuracy']}"
    return f"outcomes {sent.get('outcomes', {})}"


def render_loop(steps: dict) -> None:
    """The monitoring loop as a step / result table."""
    def traffic(sent: dict) -> str:
        return (f"{sent['answered']} answered ({sent['shift']}), {_quality(sent)}, "
                f"{sent['failed_requests']} failed requests")

    rows = [("unshifted traffic", traffic(steps["traffic_unshifted"])),
            ("monitor", f"{steps['monitor_unshifted']['summary']}"),
            ("shifted traffic", traffic(steps["traffic_shifted"])),
            ("monitor", f"{steps['monitor_shifted']['summary']}")]
    retrained = steps.get("retrain", {})
    if "skipped" in retrained:
        rows.append(("retrain", f"skipped: {retrained['skipped']}"))
    elif retrained:
        rows.append(("retrain", f"holdout score champion {retrained['holdout']['champion']:.4f}"
                                f" -> challenger {retrained['holdout']['challenger']:.4f}: "
                                + ("promoted " if retrained["promote"] else "rejected ")
                                + retrained["challenger"]))
    if "rollout" in steps:
        rollout, load = steps["rollout"], steps["rollout"]["load"]
        rows.append(("rolling update", f"{rollout['from']['uri']} -> {rollout['to']['uri']} in "
                                       f"{rollout['seconds']} s under load: {load['requests']} "
                                       f"requests, {load['failed_requests']} failed, answered "
                                       f"by versions {load['model_versions']}"))
    print("\nmonitoring loop:")
    for step, result in rows:
        print(f"  {step:18s} {result}")
