"""Traffic for a parts task's app: held-out rows sent to `POST /v1/predict` (or saved as new
labelled rows), shifted as its `MonitoringPart` says; the pipeline's drift drill; and the new
rows `retrain --smoke` trains on."""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pandas as pd

from mlsd_ray.core.errors import InputError
from mlsd_ray.monitor.traffic import TrafficReport, deliver
from mlsd_ray.stages.data import ROWS_PREFIX, PreparedRows, write_rows
from mlsd_ray.stages.parts import Parts
from mlsd_ray.tasks.base import TrafficRequest

__all__ = ["DEFAULT_AMOUNTS", "drift_drill_request", "instances", "simulate_traffic"]

DEFAULT_AMOUNTS = {"scale": 2.0, "offset": 1.0, "noise": 0.5, "none": 0.0}


def instances(rows: pd.DataFrame, inputs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows as JSON-ready instances: only the inputs, arrays as lists, numpy numbers as
    Python's, NaN as null."""
    def plain(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, np.generic):
            value = value.item()
        return None if isinstance(value, float) and np.isnan(value) else value

    return [{name: plain(row[name]) for name in inputs} for _, row in rows.iterrows()]


def draw(prepared: PreparedRows, request: TrafficRequest) -> pd.DataFrame:
    """`request.count` rows of the split (all of them for 0), drawn with its seed."""
    rows = prepared.load_split(request.split)
    if rows.empty:
        raise InputError(f"the {request.split} split of {prepared.path} has no rows")
    if request.count:
        rng = np.random.default_rng(request.seed)
        rows = rows.iloc[rng.choice(len(rows), request.count, replace=request.count > len(rows))]
    return rows.reset_index(drop=True)


def simulate_traffic(parts: Parts, prepared: PreparedRows,
                     request: TrafficRequest) -> TrafficReport:
    """Send (and/or save) rows of `prepared`, shifted as asked; the answers scored by the
    model part against the rows' targets."""
    shifts = ("none", *parts.monitoring.shifts)
    if request.shift not in shifts:
        raise InputError(f"--shift {request.shift!r}: this task shifts {', '.join(shifts)}")
    amount = DEFAULT_AMOUNTS.get(request.shift, 1.0) if request.amount is None \
        else request.amount
    rows = draw(prepared, request)
    if request.shift != "none":
        rows = parts.monitoring.shift(rows, parts.data.inputs, request.shift, amount,
                                      np.random.default_rng(request.seed))
    report = TrafficReport(unit="rows", inputs=len(rows), shift=request.shift, amount=amount,
                           split=request.split, seed=request.seed, url=request.url)
    if request.save:
        write_rows(request.save, rows)
        report.saved = request.save
    if request.url:
        send(parts, rows, request, report)
    return report


def send(parts: Parts, rows: pd.DataFrame, request: TrafficRequest,
         report: TrafficReport) -> None:
    """POST the rows in batches; the report gets the delivery, outcomes and scores."""
    sent = instances(rows, parts.data.inputs)
    batch = max(1, request.batch)
    bodies = [{"instances": sent[i:i + batch]} for i in range(0, len(sent), batch)]
    endpoint = request.url.rstrip("/") + "/v1/predict"  # type: ignore[union-attr]
    report.delivery, answers = deliver(endpoint, bodies, request.concurrency,
                                       lambda response: response["predictions"])
    predicted, truth = [], []
    for index, answered in enumerate(answers):
        for offset, answer in enumerate(answered):
            predicted.append(answer["prediction"])
            truth.append(rows[parts.data.target].iloc[index * batch + offset])
    outcomes = [parts.codec.outcome(p) for p in predicted]
    if outcomes and outcomes[0] is not None:
        report.outcomes = dict(Counter(map(str, outcomes)))
    if predicted:
        report.scores = {k: round(float(v), 4) for k, v in
                         parts.model.scores(np.asarray(predicted), np.asarray(truth)).items()}


def drift_drill_request(parts: Parts, incoming: str) -> tuple[TrafficRequest, str]:
    """The pipeline's drift drill: 600 train rows with the task's first shift at its default
    amount, saved as labelled rows under `incoming`; and the source that reads them back."""
    shift = parts.monitoring.shifts[0]
    saved = f"{incoming}/shifted.parquet"
    return (TrafficRequest(None, shift, amount=DEFAULT_AMOUNTS.get(shift, 1.0) + 1.0, count=600,
                           split="train", batch=10, save=saved), f"{ROWS_PREFIX}{saved}")
