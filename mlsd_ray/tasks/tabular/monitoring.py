"""What a served table row leaves in the prediction log, and the training reference that drift
checks (monitor/drift.py) compare it with.

A log row holds every input column as the model took it (numbers as floats, categories as
strings, None where missing), under `input.<column>` so that a user's column named `time` or
`score` never collides with the log's own columns, plus the model's score for the row and
the class it predicts at the checkpoint's threshold.

The reference, in each checkpoint's reference.json: samples of every numeric column, the
counts of every categorical column and each column's share of missing values, all from the
train split before any imputation (so served records, which arrive raw, are measured the same
way); then, per checkpoint, the validation rows' scores and predicted classes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlsd_ray.tasks.tabular.preprocess import coerce

LOG_PREFIX = "input."
REFERENCE_ROWS = 5000  # enough for stable quantiles and KS tests; keeps reference.json small
DECIMALS = 5


def column_reference(frame: pd.DataFrame, plan: list[dict], seed: int = 0) -> dict:
    """Per-column profile of raw train rows: numbers sampled, categories counted, missing
    shares (see the module docstring)."""
    typed, _ = coerce(frame, plan)
    missing = {name: round(float(typed[name].isna().mean()), DECIMALS) for name in typed}
    if len(typed) > REFERENCE_ROWS:
        typed = typed.sample(REFERENCE_ROWS, random_state=seed)
    features, categories = {}, {}
    for entry in plan:
        values = typed[entry["name"]].dropna()
        if entry["kind"] == "numeric":
            features[entry["name"]] = values.astype(float).round(DECIMALS).tolist()
        else:
            categories[entry["name"]] = {str(k): int(v) for k, v in
                                         values.astype(str).value_counts().items()}
    return {"log_prefix": LOG_PREFIX, "features": features, "categories": categories,
            "missing_rate": missing}


def row_scores(outputs: np.ndarray, task: str) -> np.ndarray:
    """One number per row for drift checks: the positive-class score (binary), the top class's
    probability (multiclass) or the predicted value (regression)."""
    outputs = np.asarray(outputs, dtype=float)
    if task == "binary":
        return outputs[:, 1]
    if task == "multiclass":
        return outputs.max(axis=1)
    return outputs.reshape(-1)


def predicted_classes(outputs: np.ndarray, task: str, classes: list[str] | None,
                      threshold: float | None) -> list[str] | None:
    """The class each row is predicted to be (binary: at `threshold`); None for regression."""
    if task == "regression" or not classes:
        return None
    outputs = np.asarray(outputs, dtype=float)
    if task == "binary":
        picked = (outputs[:, 1] >= (0.5 if threshold is None else threshold)).astype(int)
    else:
        picked = outputs.argmax(axis=1)
    return [str(classes[i]) for i in picked]


def output_reference(outputs: np.ndarray, task: str, classes: list[str] | None,
                     threshold: float | None, seed: int = 0) -> dict:
    """The validation rows' scores and predicted-class counts: what served scores and
    predictions are compared with (they depend on the weights, so one per checkpoint)."""
    scores = row_scores(outputs, task)
    predicted = predicted_classes(outputs, task, classes, threshold)
    reference: dict = {}
    if len(scores):
        pick = np.random.default_rng(seed).permutation(len(scores))[:REFERENCE_ROWS]
        reference["scores"] = np.round(scores[np.sort(pick)], DECIMALS).tolist()
    if predicted is not None and classes is not None:  # classes are set when predicted is
        counts = pd.Series(predicted).value_counts()
        reference["label_counts"] = {str(c): int(counts.get(str(c), 0)) for c in classes}
    return reference


def log_columns(typed: pd.DataFrame, outputs: np.ndarray, task: str,
                classes: list[str] | None, threshold: float | None) -> pd.DataFrame:
    """The task's columns of the prediction log for rows already typed by the model's plan
    (the app adds time, request id, model and latency; offline prediction, its own ids)."""
    outputs = np.asarray(outputs, dtype=float)
    frame = typed.add_prefix(LOG_PREFIX).reset_index(drop=True)
    frame["score"] = row_scores(outputs, task)
    frame["confidence"] = outputs.max(axis=1) if task != "regression" else np.nan
    predicted = predicted_classes(outputs, task, classes, threshold)
    frame["predicted_class"] = predicted if predicted is not None else None
    return frame


def log_rows(records: list[dict], outputs: np.ndarray, task: str, classes: list[str] | None,
             threshold: float | None) -> list[dict]:
    """`log_columns` for served records (already checked and typed), one dict per record."""
    frame = log_columns(pd.DataFrame(records), outputs, task, classes, threshold)
    plain = frame.astype(object).where(frame.notna(), None)
    return plain.to_dict("records")
