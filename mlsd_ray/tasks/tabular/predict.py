"""Prediction for tables: offline over a source (`mlsd predict --model URI --source SPEC`) and
online against the scoring app (`mlsd predict --url URL rows.csv`).

Offline, Ray Data carries the rows and the model runs on an actor pool (`map_batches` with an
`ActorPoolStrategy`: the model loads once per actor). The rows need no label; where the label
column is there, the summary scores the predictions. Each output row holds the prediction-log
columns (`input.<column>`, score, predicted class: tabular/monitoring.py), so
`mlsd monitor --inputs SPEC --model URI` tests a table for drift as it tests served traffic.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import OfflinePrediction, OnlinePrediction

if TYPE_CHECKING:
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.tasks.tabular.train import LoadedTabular

OK = "ok"


class TablePredictor:
    """An actor holding the model and its fitted preparation; one call per batch of rows."""

    def __init__(self, model: PinnedModel, workspace: Workspace, actor: bool = True):
        from mlsd_ray.core.memory import claim_cpus_for_torch
        from mlsd_ray.tasks.tabular.train import load_tabular

        if actor:
            claim_cpus_for_torch(1)  # one actor per CPU: parallelism comes from the pool
        self.loaded = load_tabular(model.checkpoint_here(workspace))
        self.model = model

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        from mlsd_ray.tasks.tabular.monitoring import log_columns
        from mlsd_ray.tasks.tabular.preprocess import coerce

        decision = self.loaded.decision
        typed, _ = coerce(batch, self.loaded.featurizer.plan)
        frame = log_columns(typed, self.loaded.predict(batch), decision["task"],
                            decision["classes"], decision.get("threshold"))
        label = decision["label"]
        frame.insert(0, "row", batch["__row"].to_numpy())
        frame.insert(1, "label", batch[label].to_numpy() if label in batch else np.nan)
        frame["model_uri"], frame["model_name"] = self.model.uri, self.model.name
        frame["model_version"], frame["status"] = self.model.version, OK
        return frame


def model_outputs(loaded: LoadedTabular, frame: pd.DataFrame) -> pd.DataFrame:
    """What the registered MLflow Model answers for a frame of the model's columns: `score`
    (the positive class's probability, the top class's, or the prediction) and, for
    classifiers, `predicted_class` at the model's threshold and each class's probability.
    The score is the Serve app's; the app's decision adds its policy and rules to it."""
    from mlsd_ray.tasks.tabular.monitoring import predicted_classes, row_scores

    decision = loaded.decision
    task, classes = decision["task"], decision["classes"]
    outputs = np.asarray(loaded.predict(frame), dtype=float)
    answers = pd.DataFrame({"score": row_scores(outputs, task)})
    predicted = predicted_classes(outputs, task, classes, decision.get("threshold"))
    if predicted is not None:
        answers["predicted_class"] = predicted
        for index, name in enumerate(classes):
            answers[f"probability_{name}"] = outputs[:, index]
    return answers


def predict_table(model: PinnedModel, source: str, out: str | None, workspace: Workspace,
                  log: Callable[[str], None], seed: int = 0) -> OfflinePrediction:
    """Predict every row of `source` with `model` (pinned to one version);
    write parquet under `out`; return counts and, for labelled rows, the model's score."""
    from mlsd_ray.core.runtime import needs_ray
    from mlsd_ray.tasks.tabular.sources import read_rows

    frame, name = read_rows(source, seed)
    frame = frame.assign(__row=np.arange(len(frame)))
    out = out or workspace.batch_predictions(time.strftime("%Y%m%d-%H%M%S"))
    started = time.perf_counter()
    if needs_ray(len(frame)):
        written = _predict_with_ray(frame, name, model, str(out), workspace, log)
    else:
        log(f"predicting {len(frame)} rows of {name} with {model.uri} in this process "
            f"-> {out}")
        written = TablePredictor(model, workspace, actor=False)(frame)
        storage.delete_dir(str(out))
        storage.write_bytes(storage.join(str(out), "part-0.parquet"),
                            written.to_parquet(index=False))
    return summarize(written, model, str(out), time.perf_counter() - started)


def _predict_with_ray(frame: pd.DataFrame, name: str, model: PinnedModel, out: str,
                      workspace: Workspace, log: Callable[[str], None]) -> pd.DataFrame:
    """The rows through Ray Data, on an actor pool of one model per CPU."""
    import ray
    import ray.data

    from mlsd_ray.core.runtime import ray_work

    with ray_work(workspace):
        actors = max(1, int(ray.available_resources().get("CPU", 1)))
        log(f"predicting {len(frame)} rows of {name} with {model.uri} on {actors} actor(s) "
            f"-> {out}")
        predictions = ray.data.from_pandas(frame).map_batches(
            TablePredictor, fn_constructor_kwargs={"model": model, "workspace": workspace},
            batch_size=4096, batch_format="pandas", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors))
        storage.delete_dir(out)
        predictions.write_parquet(out)
        return ray.data.read_parquet(out).to_pandas().sort_values("row")



def summarize(frame: pd.DataFrame, model: PinnedModel, out: str,
              seconds: float) -> OfflinePrediction:
    """Counts, predicted classes and (for labelled rows) the model's ranking score."""
    decision = storage.read_json(storage.join(model.path, "decision.json"))
    labelled = frame[frame["label"].notna()]
    classes = None if decision["task"] == "regression" else (
        frame["predicted_class"].value_counts().sort_index().to_dict())
    return OfflinePrediction(out=out, rows=len(frame),
                             predicted=int((frame["status"] == OK).sum()), seconds=seconds,
                             labelled=len(labelled), predicted_classes=classes,
                             scores=_scores(decision, labelled) if len(labelled) else {})


def _class_name(value, classes: set[str]) -> str:
    """A raw label as one of the model's class names: 1.0 read from a CSV is the class "1"
    (unless the model's classes are "0.0" and "1.0")."""
    if str(value) not in classes and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _scores(decision: dict, labelled: pd.DataFrame) -> dict:
    """Accuracy (and PR-AUC for binary, R² for regression) of the labelled rows."""
    from mlsd_ray.tasks.tabular.metrics import primary_score

    task = decision["task"]
    if task == "regression":
        return {"r2": round(primary_score(task, labelled["score"].to_numpy(),
                                          labelled["label"].to_numpy(float)), 4)}
    names = {str(c) for c in decision["classes"]}
    truth = labelled["label"].map(lambda value: _class_name(value, names))
    scores = {"accuracy": round(float((truth == labelled["predicted_class"]).mean()), 4)}
    if task == "binary":
        positive = (truth == str(decision["classes"][1])).astype(int).to_numpy()
        score = labelled["score"].to_numpy()
        scores["pr_auc"] = round(primary_score(task, np.stack([1 - score, score], axis=1),
                                               positive), 4)
    return scores


@dataclass(frozen=True)
class ScoredFile:
    """The scoring app's answers for the rows of one CSV file, and the model that gave them."""

    file: str
    model_name: str
    model_version: str
    task: str
    threshold: float | None
    results: list[dict[str, Any]]  # one per row, as the app answered

    @property
    def outcomes(self) -> list[Any]:
        """Per row: the decision (with a threshold), else the class, else the prediction."""
        return [r.get("decision", r.get("class", r.get("prediction"))) for r in self.results]


@dataclass(frozen=True)
class TablePredictions(OnlinePrediction):
    """`mlsd predict --url URL rows.csv...`: the answers file by file."""

    url: str
    files: list[ScoredFile]

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "files": [asdict(f) for f in self.files]}

    def describe(self) -> str:
        lines = []
        for scored in self.files:
            outcomes = scored.outcomes
            lines.append(f"{scored.file}: {len(outcomes)} rows: {outcomes[:20]}"
                         + (" ..." if len(outcomes) > 20 else ""))
            lines.append(f"model {scored.model_name} version {scored.model_version}")
        return "\n".join(lines)


def predict_files(url: str, files: list[Path], batch: int = 16) -> TablePredictions:
    """Send the rows of CSV files to the scoring app at `url`, `batch` rows per request
    (bodies stay small: the app refuses large ones); only the model's columns are sent (a
    label or an id column stays here)."""
    from mlsd_ray.serve.client import post_json
    from mlsd_ray.serve.control import get_json
    from mlsd_ray.tasks.tabular.serve import PREFIX
    from mlsd_ray.tasks.tabular.traffic import records

    base = f"{url.rstrip('/')}{PREFIX}"
    columns = [c["name"] for c in get_json(f"{base}/model", timeout=30)["columns"]]
    answers = []
    for path in files:
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            raise InputError(f"cannot read {path} as CSV: {exc}") from exc
        missing = [c for c in columns if c not in frame]
        if len(missing) == len(columns):
            raise InputError(f"{path} has none of the model's columns ({', '.join(columns)})")
        rows = records(frame[[c for c in columns if c in frame]])
        parts = [post_json(f"{base}/score", {"records": rows[start:start + batch]})
                 for start in range(0, len(rows), batch)]
        if not parts:
            raise InputError(f"{path} has no rows")
        last = parts[-1]
        answers.append(ScoredFile(str(path), str(last["model_name"]), str(last["model_version"]),
                                  last["task"], last.get("threshold"),
                                  [r for part in parts for r in part["results"]]))
    return TablePredictions(url, answers)
