"""A parts task's trained model, loaded from its checkpoint: what serving, offline prediction,
export, evaluation and the retrain gate all run, so they predict alike.

The checkpoint (training/checkpoint.py) keeps the weights, `model.json` (the encoded input's
shape, from which `ModelPart.build` makes the network again), `preprocessing.json` (the
codec's fitted state), the drift reference and the metadata, whose config names the task.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlsd_ray.core.contracts import DRIFT_REFERENCE, CheckpointMetadata
from mlsd_ray.core.errors import InputError
from mlsd_ray.stages.parts import Parts, RowsSection, parts_of

__all__ = ["feature_reference", "LoadedModel", "load_model", "load_trained", "log_columns",
           "LOG_PREFIX", "output_reference", "REFERENCE_ROWS"]

REFERENCE_ROWS = 5000  # samples per feature in reference.json: stable KS tests, a small file
LOG_PREFIX = "input."  # a feature's column in the prediction log (monitor/drift.py)
PREDICT_BATCH = 1024


@dataclass
class LoadedModel:
    """A trained network with its task's parts, section and the codec's fitted state."""

    parts: Parts
    section: RowsSection
    state: dict[str, Any]
    module: Any  # torch.nn.Module, in eval mode
    metadata: CheckpointMetadata
    reference: dict[str, Any]
    columns: list[dict[str, Any]]  # the input columns' kinds (stages/data.py column_specs)
    directory: Path  # the checkpoint it was loaded from

    def outputs(self, inputs: np.ndarray) -> np.ndarray:
        """The network's raw outputs for encoded inputs, in batches, without gradients."""
        import torch

        with torch.inference_mode():
            return np.concatenate([
                self.module(torch.from_numpy(np.ascontiguousarray(inputs[i:i + PREDICT_BATCH])))
                .float().numpy() for i in range(0, len(inputs), PREDICT_BATCH)]) \
                if len(inputs) else np.zeros((0,), np.float32)

    def predict(self, rows: pd.DataFrame) -> np.ndarray:
        """Predictions for rows, in the target's units (the codec's `decode`)."""
        return self.parts.codec.decode(self.outputs(self.parts.codec.encode(rows, self.state)),
                                       self.state)

    def scores(self, rows: pd.DataFrame) -> dict[str, float]:
        """The model part's scores on labelled rows."""
        return self.parts.model.scores(self.predict(rows),
                                       rows[self.parts.data.target].to_numpy())


def load_model(directory: str | Path, parts: Parts, section: RowsSection) -> LoadedModel:
    """Verify the checkpoint's checksums, rebuild the network, load its weights."""
    import torch

    from mlsd_ray.training.checkpoint import verify

    directory = Path(directory)
    verify(directory)
    described = json.loads((directory / "model.json").read_text())
    shape = described.get("example_shape")
    if shape is None:
        raise InputError(f"{directory} holds a model of another kind of task")
    module = parts.model.build(section, np.zeros(shape, dtype=np.float32))
    module.load_state_dict(torch.load(directory / "model.pt", map_location="cpu",
                                      weights_only=True))
    module.eval()
    state = json.loads((directory / "preprocessing.json").read_text())
    return LoadedModel(parts, section, state, module, CheckpointMetadata.read(directory),
                       DRIFT_REFERENCE.read(str(directory / "reference.json")),
                       described["columns"], directory)


def load_trained(task: object, directory: str | Path,
                 config: dict[str, Any] | None = None) -> LoadedModel:
    """The model in `directory`, trained by `task` (a task built from parts), with the
    section of the config it was trained with (or of `config`)."""
    parts, section = parts_of(task, str(directory))
    if config is None:
        config = CheckpointMetadata.read(directory).config
    trained = task.config_class.from_record(config)  # type: ignore[attr-defined]
    return load_model(directory, parts, getattr(trained, section))


def feature_reference(parts: Parts, rows: pd.DataFrame, seed: int = 0) -> dict[str, Any]:
    """The drift reference of training rows: samples of each monitoring feature, named by
    where the prediction log keeps it."""
    features = parts.monitoring.features(rows, parts.data.inputs)
    if len(features) > REFERENCE_ROWS:
        features = features.sample(REFERENCE_ROWS, random_state=seed)
    return {"log_prefix": LOG_PREFIX,
            "features": {name: np.round(values.to_numpy(float), 6).tolist()
                         for name, values in features.items()}}


def output_reference(parts: Parts, predictions: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """The validation predictions a checkpoint's served ones are compared with: the predicted
    classes' counts (a task with outcomes), else a sample of the predicted values."""
    outcomes = [parts.codec.outcome(p) for p in predictions]
    if outcomes and outcomes[0] is not None:
        counts = pd.Series(outcomes).value_counts()
        return {"label_counts": {str(k): int(v) for k, v in counts.items()}}
    values = np.asarray(predictions, dtype=float).ravel()
    pick = np.random.default_rng(seed).permutation(len(values))[:REFERENCE_ROWS]
    return {"scores": np.round(values[np.sort(pick)], 6).tolist()}


def log_columns(parts: Parts, rows: pd.DataFrame, predictions: np.ndarray) -> pd.DataFrame:
    """The task's columns of the prediction log: its monitoring features (as `input.<name>`),
    the prediction as `score` (a number) and its class as `predicted_class` (outcomes)."""
    frame = parts.monitoring.features(rows, parts.data.inputs).add_prefix(LOG_PREFIX)
    frame = frame.reset_index(drop=True)
    outcomes = [parts.codec.outcome(p) for p in predictions]
    if outcomes and outcomes[0] is not None:
        frame["predicted_class"] = outcomes
        frame["score"] = np.nan
    else:
        frame["predicted_class"] = None
        frame["score"] = np.asarray(predictions, dtype=float).ravel()
    return frame
