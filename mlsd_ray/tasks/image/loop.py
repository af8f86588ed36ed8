"""The pipeline's monitoring loop, run against the app it just started:

    unshifted traffic -> monitor (expect no drift) -> rotated traffic, kept as labelled new
    data -> monitor (expect drift) -> retrain on it -> promote if better -> rolling update of
    the live app under steady load -> a summary per step.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config
from mlsd_ray.tasks.image.data.prepare import PreparedDataset


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _monitor_window(cfg: Config, home: str | None, since: str, sent: dict,
                    log: Callable[[str], None]) -> dict:
    """Wait until the replicas have flushed the answers `sent` to the log, then test
    [since, now)."""
    from mlsd_ray.monitor.predlog import log_location, wait_for_rows
    from mlsd_ray.monitor.run import monitor

    wait_for_rows(log_location(cfg.serve.prediction_log, home), dt.datetime.fromisoformat(since),
                  sent["images_answered"], cfg.serve.prediction_log.flush_seconds + 10)
    report = monitor(cfg, home, since=since, until=_now(), log=log)
    log(f"monitor: {report['verdict']}: {report.get('summary', '')}")
    return {"verdict": report["verdict"], "rows": report["rows"],
            "summary": report.get("summary"),
            "report": report.get("outputs", {}).get("report.md")}


def drift_loop(cfg: Config, url: str, served_uri: str, dataset: PreparedDataset,
               home: str | None, log: Callable[[str], None]) -> dict:
    """Run the loop (see the module docstring); returns one entry per step."""
    from mlsd_ray.serve import control
    from mlsd_ray.tasks.image.traffic import BackgroundLoad, simulate_traffic
    from mlsd_ray.workflows.retrain import retrain

    steps: dict = {}
    since = _now()
    steps["traffic_unshifted"] = simulate_traffic(url, dataset, "none", count=200)
    steps["monitor_unshifted"] = _monitor_window(cfg, home, since, steps["traffic_unshifted"],
                                                 log)

    incoming = storage.join(storage.home(home), "incoming", time.strftime("rotated-%Y%m%d-%H%M%S"))
    since = _now()
    steps["traffic_rotated"] = simulate_traffic(url, dataset, "rotate", count=0, split="train",
                                                save=incoming)
    log(f"rotated traffic: accuracy {steps['traffic_rotated']['accuracy']} (unshifted "
        f"{steps['traffic_unshifted']['accuracy']}); kept as new labelled data in {incoming}")
    steps["monitor_rotated"] = _monitor_window(cfg, home, since, steps["traffic_rotated"], log)
    if steps["monitor_rotated"]["verdict"] != "drift":
        steps["retrain"] = {"skipped": "no drift found"}
        return steps

    decision = retrain(cfg, f"folder:{incoming}", home, model=served_uri, log=log,
                       roll_out=False)
    steps["retrain"] = {key: decision[key] for key in ("champion", "challenger", "gain",
                                                       "promote", "reason", "outputs")}
    steps["retrain"]["holdout"] = {who: decision["scores"][who]["holdout"]["score"]
                                   for who in ("champion", "challenger")}
    if decision["promote"]:
        with BackgroundLoad(url, dataset) as load:
            steps["rollout"] = control.deploy(decision["challenger"], home, cfg.serve.app_name,
                                              log)
            time.sleep(1.0)  # a few answers from the new version while the load runs
        steps["rollout"]["load"] = load.totals
        log(f"rolling update under load: {load.totals['requests']} requests, "
            f"{load.totals['failed_requests']} failed, versions {load.totals['model_versions']}")
    return steps
