"""Predictions outside the app (`mlsd predict --model URI --source SPEC`) and through it
(`mlsd predict --url URL FILE...`) for a parts task.

Offline, rows the task's `DataPart.problems` refuses are kept in the output with their reason
as `status`; the others are predicted by the same loaded model the replicas run
(stages/model.py), in this process for up to MLSD_IN_PROCESS_ROWS rows, else in Ray Data
(`map_batches` over actors that each load the model once).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace, fresh_name
from mlsd_ray.stages.data import in_blocks, problems, read_rows, read_table, write_rows
from mlsd_ray.stages.model import log_columns
from mlsd_ray.stages.parts import Parts, RowsSection
from mlsd_ray.stages.traffic import instances
from mlsd_ray.tasks.base import OfflinePrediction, OnlinePrediction

__all__ = ["OnlineAnswers", "predict_files", "predict_rows"]


def predict_rows(task, checkpoint: str, section: RowsSection, model_uri: str, out: str | None,
                 workspace: Workspace, log: Callable[[str], None]) -> OfflinePrediction:
    """Every row of `section.source` predicted by the model in `checkpoint`, written as
    parquet (the prediction-log columns, `prediction`, `status`) under `out`."""
    parts: Parts = task.parts
    started = time.perf_counter()
    rows = read_rows(parts, section, need_target=False)
    reasons = problems(parts, section, rows, workspace, need_target=False)
    good = rows[reasons == ""].reset_index(drop=True)
    predictions = _predict(task, checkpoint, good, workspace, log)
    table = log_columns(parts, good, predictions)
    table.insert(0, "prediction", list(predictions))
    table["status"] = "ok"
    table["model_uri"] = model_uri
    table[parts.data.target] = good[parts.data.target].to_numpy()
    refused = rows[reasons != ""].assign(status=reasons[reasons != ""])[
        [parts.data.target, "status"]]
    table = pd.concat([table, refused], ignore_index=True)
    out = out or workspace.batch_predictions(fresh_name("predictions"))
    path = storage.join(out, "predictions.parquet")
    write_rows(path, table)
    known = good[parts.data.target].notna().to_numpy()
    scores = (parts.model.scores(predictions[known], good[parts.data.target].to_numpy()[known])
              if known.any() else {})
    outcomes = [parts.codec.outcome(p) for p in predictions]
    classes = dict(Counter(map(str, outcomes))) if outcomes and outcomes[0] is not None \
        else None
    return OfflinePrediction(out=path, rows=len(rows), predicted=len(good),
                             seconds=time.perf_counter() - started, labelled=int(known.sum()),
                             rejected=reasons[reasons != ""].value_counts().to_dict(),
                             predicted_classes=classes,
                             scores={k: round(float(v), 4) for k, v in scores.items()})


def _predict(task, checkpoint: str, rows: pd.DataFrame, workspace: Workspace,
             log: Callable[[str], None]) -> np.ndarray:
    from mlsd_ray.core.runtime import needs_ray, ray_work

    if not needs_ray(len(rows)):
        log(f"predicting {len(rows)} rows in this process")
        return task.load(checkpoint).predict(rows)
    import ray
    import ray.data

    with ray_work(workspace):
        actors = max(1, int(ray.available_resources().get("CPU", 1)))
        log(f"predicting {len(rows)} rows with Ray Data on up to {actors} actor(s), each "
            "loading the model once")
        blocks = ray.data.from_pandas(in_blocks(rows.assign(_row=np.arange(len(rows)))))
        predicted = blocks.map_batches(
            _Predictor, fn_constructor_kwargs={"task": task, "checkpoint": checkpoint},
            batch_format="pandas", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors)
        ).to_pandas().sort_values("_row")
    return np.asarray(list(predicted["prediction"]))


class _Predictor:
    """A Ray Data actor: the model loaded once, then batches of rows predicted."""

    def __init__(self, task, checkpoint: str):
        self.loaded = task.load(checkpoint)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame({"_row": batch["_row"].to_numpy(),
                             "prediction": list(self.loaded.predict(batch.drop(columns="_row")))})


@dataclass
class OnlineAnswers(OnlinePrediction):
    """What the app answered for the files' instances."""

    url: str
    files: list[str]
    answers: list[dict[str, Any]] = field(default_factory=list)
    model_version: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "files": self.files, "predictions": self.answers,
                "model_version": self.model_version}

    def describe(self) -> str:
        lines = [f"{index}: {json.dumps(answer)}" for index, answer in enumerate(self.answers)]
        return "\n".join([*lines, f"model version {self.model_version}"])


def file_instances(path: str, inputs: tuple[str, ...]) -> list[dict[str, Any]]:
    """A file's instances: JSON ({"instances": [...]}, a list, or one object), or a CSV or
    parquet table with the input columns."""
    if not Path(path).is_file():
        raise InputError(f"no file {path}")
    if path.endswith((".csv", ".parquet")):
        frame = read_table(("csv:" if path.endswith(".csv") else "parquet:") + path)
        return instances(frame, inputs)
    try:
        body = json.loads(Path(path).read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not JSON, CSV or parquet: {exc}") from None
    found = body.get("instances", [body]) if isinstance(body, dict) else body
    if not isinstance(found, list):
        raise InputError(f"{path}: expected instances, a list of objects")
    return found


def predict_files(parts: Parts, url: str, files: list) -> OnlineAnswers:
    """POST the files' instances to the app at `url`, one request per file."""
    from mlsd_ray.serve.client import post_json

    result = OnlineAnswers(url=url, files=[str(f) for f in files])
    for path in result.files:
        answer = post_json(url.rstrip("/") + "/v1/predict",
                           {"instances": file_instances(path, parts.data.inputs)})
        result.answers += answer["predictions"]
        result.model_version = str(answer["model_version"])
    return result

