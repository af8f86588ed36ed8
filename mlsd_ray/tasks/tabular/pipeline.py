"""`mlsd pipeline --example fraud`: the tabular stages end to end.

data (Ray Data preprocessors fitted on train) -> [tune] -> train the MLP (Ray Train) and the
HistGradientBoosting reference -> evaluate on test at the chosen threshold -> register (MLflow)
-> promote the first version -> serve `/v1/fraud/score` (Ray Serve), score test transactions
and a rule-breaking one over HTTP -> the monitoring loop on the live app (workflows/loop.py:
unshifted and shifted traffic, monitor, retrain, gated promotion, rolling update under load)
-> stop the app.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mlsd_ray.core.config import Config
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.workflows.stages import PipelineResult, StageHeadings, search_first

if TYPE_CHECKING:
    from mlsd_ray.workflows.loop import LoopSteps

SERVE_CHECK_ROWS = 64
LOOP = "monitor -> retrain -> rolling update"


def run_tabular_pipeline(cfg: Config, home: str | None = None, force: bool = False,
                         log: Callable[[str], None] = log_stderr, tune: bool = False,
                         serve_check: bool = True, keep_serving: bool = False,
                         monitor_loop: bool = True) -> PipelineResult:
    """Run the tabular stages; returns what each stage did."""
    from mlsd_ray.registry import promote_first
    from mlsd_ray.tasks.tabular.prepare import prepare_table
    from mlsd_ray.tasks.tabular.stage import run_tabular_train

    registers = cfg.registry.auto_register
    heading = StageHeadings("data", tune and "tune", "train, evaluate, register",
                            registers and "promote", serve_check and "serve",
                            serve_check and monitor_loop and registers and LOOP)
    log(heading("data"))
    table = prepare_table(cfg, home=home, force=force, log=log)
    searched = None
    if tune:
        log(heading("tune"))
        cfg, searched = search_first(cfg, home, log)
    log(heading("train, evaluate, register"))
    trained = run_tabular_train(cfg, home=home, log=log, table=table)
    result = PipelineResult(task="tabular", data=table.summary(), tune=searched, train=trained)
    registered = trained.registered
    if registered:
        log(heading("promote"))
        result.promoted = promote_first(registered, home, log)
    if serve_check:
        log(heading("serve"))
        model = trained.model_uri()
        loop = None
        if monitor_loop and registered:  # retraining moves a registry alias: needs a version
            loop = functools.partial(_loop, cfg, table, home, log, heading(LOOP))
        result.serve = serve_check_fraud(cfg, model, table, home, log, keep_serving,
                                         then=loop)
        result.loop = result.serve.pop("loop", None)
    return result


def _loop(cfg: Config, table, home: str | None, log: Callable[[str], None], heading: str,
          url: str, served_uri: str) -> LoopSteps:
    from mlsd_ray.tasks import get_task
    from mlsd_ray.workflows.loop import monitoring_loop

    log(heading)
    return monitoring_loop(get_task(cfg.task), cfg, url, served_uri, table, home, log)


def serve_check_fraud(cfg: Config, model: str, table, home: str | None,
                      log: Callable[[str], None], keep_serving: bool = False,
                      then: Callable[[str, str], LoopSteps] | None = None) -> dict:
    """Start the fraud app on `model`, score test rows over HTTP (and, for a binary task, a
    transaction the example rules catch), compare with the offline scores, then stop the app
    (`keep_serving`: on serve.port, until Ctrl-C). `then(url, served_uri)` runs while the app
    is up (the monitoring loop); its result is the summary's "loop"."""
    from mlsd_ray import registry
    from mlsd_ray.serve import control
    from mlsd_ray.serve.client import post_json
    from mlsd_ray.tasks.tabular.train import load_tabular

    settings = cfg.serve.model_copy(update={"model": model})
    if not keep_serving and control.port_in_use(settings.host, settings.port):
        settings.port = control.free_port(settings.host)
    app = control.start(settings, home, log=log)  # the checkpoint's task: the fraud app
    try:
        test = table.load_split("test")
        rows = _check_rows(test, table.label, table.manifest["task"])
        records = [_record(row) for row in rows.drop(columns=[table.label]).to_dict("records")]
        answer = post_json(app.endpoint("score_url"), {"records": records})
        result = {"url": app.endpoint("score_url"), "model_version": answer["model_version"],
                  "records": len(records), "seconds_to_healthy": app.seconds_to_healthy}
        offline = load_tabular(registry.resolve(app.model.uri, home)).predict(rows)
        if table.manifest["task"] == "binary":
            result.update(_binary_check(answer, offline, rows[table.label].to_numpy()))
            log(f"served version {answer['model_version']}: decisions {result['decisions']} "
                f"for {len(records)} test rows ({result['frauds']} positive)")
            if {"amount", "country"} <= set(records[0]):
                result["example"] = _rule_example(app.endpoint("score_url"), records[-1],
                                                  post_json)
                log(f"a large foreign transaction: {result['example']['decision']}, score "
                    f"{result['example']['score']:.4f}, rules {result['example']['rules']}")
        else:
            served = np.array([r.get("prediction", np.nan) for r in answer["results"]])
            result["max_abs_difference"] = float(np.nanmax(np.abs(served - offline.reshape(-1))))
            log(f"served version {answer['model_version']}: {len(records)} rows scored over HTTP")
        if then is not None:
            result["loop"] = then(app.url, app.model.uri)
        return result
    finally:
        if keep_serving:
            control.serve_until_interrupted(app, log)
        else:
            control.remove_app(settings.app_name)
            control.state_file(home, settings.app_name).unlink(missing_ok=True)


def _check_rows(test, label: str, task: str):
    """Up to SERVE_CHECK_ROWS test rows, every positive first (frauds are rare)."""
    if task != "binary":
        return test.head(SERVE_CHECK_ROWS)
    positives = test[test[label] == 1].head(SERVE_CHECK_ROWS // 4)
    negatives = test[test[label] == 0].head(SERVE_CHECK_ROWS - len(positives))
    return pd.concat([positives, negatives], ignore_index=True)


def _record(row: dict) -> dict:
    """A JSON-ready record: NaN becomes null (sent as missing, imputed by the server)."""
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in row.items()}


def _binary_check(answer: dict, offline: np.ndarray, labels: np.ndarray) -> dict:
    scores = np.array([r["score"] for r in answer["results"]])
    decisions = [r["decision"] for r in answer["results"]]
    flagged = np.array([d != "approve" for d in decisions])
    return {"decisions": {d: decisions.count(d) for d in ("approve", "review", "decline")},
            "frauds": int(labels.sum()), "frauds_flagged": int((flagged & (labels == 1)).sum()),
            "max_abs_difference": float(np.max(np.abs(scores - offline[:, 1]))),
            "threshold": answer["threshold"]}


def _rule_example(url: str, record: dict, post_json) -> dict:
    """One transaction that the example rules review: a large amount from abroad."""
    example = {**record, "amount": 12000.0, "country": "NG", "velocity_1h": 1.0}
    answer = post_json(url, {"records": [example]})["results"][0]
    return {"record": example, "decision": answer["decision"], "score": answer["score"],
            "rules": [r["name"] for r in answer.get("rules_fired", [])]}
