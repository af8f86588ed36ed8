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
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

from mlsd_ray.core.config import Config
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.monitor.traffic import Delivery, TrafficReport
from mlsd_ray.tasks.base import Task, TrafficRequest

if TYPE_CHECKING:
    from mlsd_ray.serve.control import RollingUpdate
    from mlsd_ray.workflows.retrain import RetrainDecision

__all__ = ["BackgroundLoad", "DriftDrill", "LoopSteps", "monitoring_loop", "MonitorWindow",
           "render_loop", "Rollout", "UNSHIFTED_COUNT"]

UNSHIFTED_COUNT = 200


@dataclass(frozen=True)
class DriftDrill:
    """What a task sends to show drift (`traffic`, saved to `traffic.save`) and the source
    spec under which the saved, labelled traffic is retrained on (`source`)."""

    traffic: TrafficRequest
    source: str


@dataclass(frozen=True)
class MonitorWindow:
    """The monitor's verdict on the traffic of one step: drift or not, over how many rows,
    the one-line summary and where the report was written."""

    verdict: str
    rows: int
    summary: str | None
    report: str | None


@dataclass
class Rollout:
    """The rolling update to a promoted challenger and the steady load that ran through it."""

    update: RollingUpdate
    load: Delivery


@dataclass
class LoopSteps:
    """Each step's result: traffic and the monitor's verdict, unshifted then shifted; the
    retrain decision (or why there was none); the rollout when the challenger won."""

    traffic_unshifted: TrafficReport
    monitor_unshifted: MonitorWindow
    traffic_shifted: TrafficReport
    monitor_shifted: MonitorWindow
    retrain: RetrainDecision | None = None
    retrain_skipped: str | None = None
    rollout: Rollout | None = None

    def to_dict(self) -> dict[str, Any]:
        steps: dict[str, Any] = {
            "traffic_unshifted": self.traffic_unshifted.to_dict(),
            "monitor_unshifted": asdict(self.monitor_unshifted),
            "traffic_shifted": self.traffic_shifted.to_dict(),
            "monitor_shifted": asdict(self.monitor_shifted)}
        if self.retrain_skipped:
            steps["retrain"] = {"skipped": self.retrain_skipped}
        elif self.retrain:
            steps["retrain"] = self.retrain.to_dict()
        if self.rollout:
            steps["rollout"] = {**self.rollout.update.to_dict(),
                                "load": self.rollout.load.to_dict()}
        return steps


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _monitor_window(cfg: Config, workspace: Workspace, since: str, answered: int,
                    log: Callable[[str], None]) -> MonitorWindow:
    """Wait until the replicas have flushed `answered` rows to the prediction log, then test
    the window [since, now)."""
    from mlsd_ray.monitor.run import monitor
    from mlsd_ray.serve.predlog import log_location, wait_for_rows

    wait_for_rows(log_location(cfg.serve.prediction_log, workspace),
                  dt.datetime.fromisoformat(since), answered,
                  cfg.serve.prediction_log.flush_seconds + 10)
    report = monitor(cfg, workspace, since=since, until=_now(), log=log)
    log(f"monitor: {report.verdict}: {report.summary}")
    return MonitorWindow(report.verdict, report.rows, report.summary,
                         report.outputs.get("report.md"))


class BackgroundLoad:
    """Steady traffic from another thread (a context manager), through the task's own
    `simulate_traffic`: what a rolling update must not disturb. `totals` counts requests,
    failures and the versions that answered.

    At most PER_SECOND requests a second, each of `batch` inputs: steady, not flat out.
    Unpaced, it competed for the CPU with the very replica start it was there to watch (the
    pipeline test took 31 CPU-seconds more; docs/performance.md)."""

    PER_SECOND = 10.0

    def __init__(self, task: Task, prepared, url: str, batch: int = 4):
        self.task, self.prepared, self.url, self.batch = task, prepared, url, batch
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.totals = Delivery()

    def _run(self) -> None:
        seed, next_at = 0, time.monotonic()
        while not self.stop.wait(max(0.0, next_at - time.monotonic())):
            # the next slot, or now if this one came late: no burst after a stall
            next_at = max(next_at + 1 / self.PER_SECOND, time.monotonic())
            seed += 1
            sent = self.task.simulate_traffic(self.prepared, TrafficRequest(
                self.url, count=self.batch, batch=self.batch, concurrency=1, seed=seed))
            if sent.delivery:
                self.totals.add(sent.delivery)

    def __enter__(self) -> BackgroundLoad:
        self.started = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        self.totals.seconds = round(time.perf_counter() - self.started, 2)


def monitoring_loop(task: Task, cfg: Config, url: str, served_uri: str, prepared,
                    workspace: Workspace, log: Callable[[str], None]) -> LoopSteps:
    """Run the loop (see the module docstring) on the app at `url` serving `served_uri`, with
    traffic from `prepared` (the task's prepared data)."""
    from mlsd_ray.serve import control
    from mlsd_ray.workflows.retrain import retrain

    since = _now()
    unshifted = task.simulate_traffic(prepared, TrafficRequest(url, count=UNSHIFTED_COUNT))
    unshifted_window = _monitor_window(cfg, workspace, since, unshifted.answered, log)

    incoming = workspace.incoming(time.strftime("%Y%m%d-%H%M%S"))
    drill = task.drift_drill(prepared, incoming)
    since = _now()
    shifted = task.simulate_traffic(prepared, replace(drill.traffic, url=url))
    log(f"{drill.traffic.shift} traffic: {shifted.quality()} (unshifted "
        f"{unshifted.quality()}); kept as new labelled data: {drill.source}")
    steps = LoopSteps(unshifted, unshifted_window, shifted,
                      _monitor_window(cfg, workspace, since, shifted.answered, log))
    if steps.monitor_shifted.verdict != "drift":
        steps.retrain_skipped = "no drift found"
        return steps

    steps.retrain = retrain(cfg, drill.source, workspace, model=served_uri, log=log, roll_out=False)
    if steps.retrain.promote:
        with BackgroundLoad(task, prepared, url) as load:
            update = control.deploy(steps.retrain.challenger, workspace, cfg.serve.app_name, log)
            time.sleep(1.0)  # a few answers from the new version while the load runs
        steps.rollout = Rollout(update, load.totals)
        log(f"rolling update under load: {load.totals.requests} requests, "
            f"{load.totals.failed_requests} failed, versions {load.totals.model_versions}")
    return steps


def render_loop(steps: LoopSteps) -> None:
    """The monitoring loop as a step / result table."""
    def traffic(sent: TrafficReport) -> str:
        return (f"{sent.answered} answered ({sent.shift}), {sent.quality()}, "
                f"{sent.failed_requests} failed requests")

    rows = [("unshifted traffic", traffic(steps.traffic_unshifted)),
            ("monitor", f"{steps.monitor_unshifted.summary}"),
            ("shifted traffic", traffic(steps.traffic_shifted)),
            ("monitor", f"{steps.monitor_shifted.summary}")]
    if steps.retrain_skipped:
        rows.append(("retrain", f"skipped: {steps.retrain_skipped}"))
    elif steps.retrain:
        decision = steps.retrain
        rows.append(("retrain", f"holdout score champion "
                                f"{decision.champion_scores.holdout.score:.4f} -> challenger "
                                f"{decision.challenger_scores.holdout.score:.4f}: "
                                + ("promoted " if decision.promote else "rejected ")
                                + decision.challenger))
    if steps.rollout:
        update, load = steps.rollout.update, steps.rollout.load
        rows.append(("rolling update", f"{update.before.uri} -> {update.after.uri} in "
                                       f"{update.seconds} s under load: {load.requests} "
                                       f"requests, {load.failed_requests} failed, answered "
                                       f"by versions {load.model_versions}"))
    print("\nmonitoring loop:")
    for step, result in rows:
        print(f"  {step:18s} {result}")
