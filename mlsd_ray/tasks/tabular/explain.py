"""The tabular task's `mlsd explain`: which columns the model relies on, globally and for
each scored record.

- Global: permutation importance on the test split. Each input column is shuffled in turn
  (the same seeded permutation for all), and the drop of the task's score (PR-AUC, macro F1
  or R²) is that column's importance.
- Per record: Captum's Integrated Gradients on the MLP's prepared features (the baseline is
  all zeros: the training mean of a scaled number, no category), summed back onto the column
  each feature came from (a category's one-hot features make one column).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from mlsd_ray import explain
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.explain import ExplanationResult
from mlsd_ray.tasks.tabular.train import LoadedTabular, load_tabular

SEED = 0
IG_STEPS = 32


def permutation_importance(loaded: LoadedTabular, frame, labels: np.ndarray,
                           task: str) -> dict[str, float]:
    """Score drop per input column when it is shuffled, largest first."""
    import mlsd_ray.tasks.tabular.metrics as tm

    score_name, threshold = tm.SCORE_NAMES[task], loaded.decision.get("threshold")

    def score(data) -> float:
        return float(tm.evaluate_outputs(task, loaded.predict(data), labels, threshold)[score_name])

    return explain.permutation_importance(score, frame, loaded.featurizer.columns, SEED)


def record_attributions(loaded: LoadedTabular, frame, task: str) -> list[dict[str, float]]:
    """Integrated Gradients per record, summed per input column: for the fraud (positive)
    class of a binary table, the predicted class of a multiclass one, the prediction of a
    regression."""
    from captum.attr import IntegratedGradients

    from mlsd_ray.tasks.tabular.train import _outputs

    features = torch.as_tensor(loaded.featurizer(frame), dtype=torch.float32)

    def forward(x: torch.Tensor) -> torch.Tensor:
        outputs = _outputs(loaded.model, x, task)
        return outputs if task == "regression" else torch.softmax(outputs, dim=1)

    with torch.no_grad():
        answered = forward(features)
    targets = None if task == "regression" else (
        torch.ones(len(features), dtype=torch.long) if task == "binary"
        else answered.argmax(1))
    attributions = IntegratedGradients(forward).attribute(
        features, baselines=torch.zeros_like(features), target=targets,
        n_steps=IG_STEPS).detach().numpy()
    columns = [name.split("=", 1)[0] for name in loaded.featurizer.feature_names]
    per_record = []
    for row in attributions:
        summed: dict[str, float] = {}
        for column, value in zip(columns, row):
            summed[column] = summed.get(column, 0.0) + float(value)
        per_record.append({c: round(v, 5) for c, v in
                           sorted(summed.items(), key=lambda item: -abs(item[1]))})
    return per_record


def explain_table(checkpoint_dir: str, source: str | None, label: str | None, count: int,
                  out: str | None, workspace: Workspace) -> ExplanationResult:
    """Permutation importance on the model's test split, and the attributions of `count`
    records (of the test split, or of `source`; with `label`, of that label only)."""
    import time

    import pandas as pd

    from mlsd_ray.tasks.tabular.prepare import PreparedTable

    loaded = load_tabular(checkpoint_dir)
    table = PreparedTable.open(loaded.metadata.dataset.path)
    task, test = table.manifest["task"], table.load_split("test")
    importance = permutation_importance(loaded, test, test[table.label].to_numpy(), task)
    records = _records(source, table.label) if source else test
    if label is not None:
        records = records[records[table.label].astype(str) == label]
    records = records.head(count)
    if records.empty:
        raise InputError(f"no record{' labelled ' + repr(label) if label else ''} to explain "
                         f"in {source or 'the test split'}")
    attributions = record_attributions(loaded, records, task)
    out = out or workspace.explanations(loaded.metadata.run_name,
                                                 time.strftime("%Y%m%d-%H%M%S"))
    chart = explain.write_output(out, "importance.png", importance_chart(importance, task))
    charts = [explain.write_output(out, f"records/{i:03d}.png", _record_chart(a, i))
              for i, a in enumerate(attributions)]
    explained = [{"record": json.loads(pd.DataFrame([row]).to_json(orient="records"))[0],
                  "attributions": a} for row, a in zip(records.to_dict("records"), attributions)]
    json_file = explain.write_output(out, "explanations.json", json.dumps(
        {"permutation_importance": importance, "explanations": explained}, indent=2).encode())
    return ExplanationResult(out=out, explained=len(records), overlays=charts, figures=[chart],
                             json_file=json_file, sanity=None, importance=importance)


def _records(source: str, label_column: str):
    """A --source read with the training table's reader (a CSV or parquet path, or a
    generated source such as fraud-synth:200); the label column may be missing."""
    from mlsd_ray.tasks.tabular.sources import read_rows

    frame, _ = read_rows(source)
    return frame if label_column in frame else frame.assign(**{label_column: None})


def importance_chart(importance: dict[str, float], task: str) -> bytes:
    """A bar per column: its permutation importance, largest at the top."""
    import mlsd_ray.tasks.tabular.metrics as tm

    return explain.bars_png(importance, f"drop of test {tm.SCORE_NAMES[task]} when the "
                            "column is shuffled", "permutation importance")


def _record_chart(attributions: dict[str, float], index: int) -> bytes:
    return explain.bars_png(attributions, "integrated gradients (red: towards the class "
                            "explained)", f"record {index}", signed=True)
