"""False-alarm and detection rates of `mlsd monitor` on live traffic.

Against a running app (`mlsd serve --detach`), sends `--runs` fresh samples of each shift through
HTTP and runs the monitor on each sample's window alone; prints one JSON line with, per shift,
how many runs said "drift" and which features or tests were named.

    python3 run.py bench drift_detection --home ./mlsd-home --url http://127.0.0.1:8000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from collections import Counter

from mlsd_ray.core.workspace import Workspace
from mlsd_ray.monitor.run import monitor
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.image.data.prepare import prepare_dataset
from mlsd_ray.tasks.image.traffic import simulate_traffic


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--home", default=None)
    parser.add_argument("--runs", type=int, default=20, help="samples of unshifted traffic")
    parser.add_argument("--shifted-runs", type=int, default=5, help="samples of each shift")
    parser.add_argument("--count", type=int, default=200, help="images per sample")
    parser.add_argument("--flush-wait", type=float, default=None, help="seconds to wait for "
                        "the log flush (default serve.prediction_log.flush_seconds + 1.5)")
    args = parser.parse_args()
    args.workspace = Workspace.at(args.home)  # resolved once, handed down

    cfg = load_config(None, [])
    dataset = prepare_dataset(cfg, workspace=args.workspace, log=lambda _: None)
    wait = args.flush_wait or cfg.serve.prediction_log.flush_seconds + 1.5
    results = {}
    plan = [("none", args.runs)] + [(s, args.shifted_runs)
                                    for s in ("rotate", "invert", "noise", "imbalance")]
    for shift, runs in plan:
        verdicts, named = Counter(), Counter()
        for seed in range(runs):
            since = now()
            sent = simulate_traffic(args.url, dataset, shift, count=args.count, seed=100 + seed)
            assert sent.failed_requests == 0, sent.delivery
            time.sleep(wait)
            report = monitor(cfg, args.workspace, since=since, until=now(), log=lambda _: None)
            verdicts[report.verdict] += 1
            for result in report.models.values():
                named.update(result.drifted_features)
                named.update(name for name, test in (("skew", result.skew),
                                                     ("confidence", result.confidence))
                             if test and test.drifted)
        results[shift] = {"runs": runs, "verdicts": dict(verdicts), "flagged": dict(named)}
        print(f"{shift}: {dict(verdicts)}; flagged {dict(named)}", flush=True)
    print(json.dumps({"benchmark": "drift_detection", "images_per_run": args.count,
                      "false_alarm_rate": results["none"]["verdicts"].get("drift", 0)
                      / results["none"]["runs"], "shifts": results}))


if __name__ == "__main__":
    main()
