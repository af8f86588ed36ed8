"""The small typed parts a task supplies; the stages of this package do everything else.

A task built from parts (`PartsTask`, task.py) works on rows: a pandas frame whose columns are
the task's inputs (numbers, vectors of numbers, or text) and its target. It supplies

- `DataPart`: where rows come from (`read`), and which rows are unusable (`problems`): the
  data stage quarantines those, and the Serve app refuses such a request with 422;
- `Codec`: rows -> the model's input array and target, model outputs -> predictions in the
  target's units, and a prediction -> its JSON answer (`fit` learns what the encoding needs
  from the train split, e.g. a scale; it is stored in the checkpoint);
- `ModelPart`: the network, its loss, and its scores (`metric` names the one that ranks runs);
- `MonitoringPart` (optional): the numbers per row that drift is tested on, and the shifts
  that `mlsd simulate-traffic` can apply. The defaults cover numeric and vector inputs;
- its config section: a `RowsSection` subclass (source, split, and its own keys), a field of
  the task's `Config` subclass named by `PartsTask.section`.

docs/tasks.md writes a task of a new kind from these parts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from pydantic import Field

from mlsd_ray.core.config import SplitConfig
from mlsd_ray.core.errors import InputError

__all__ = ["Codec", "DataPart", "ModelPart", "MonitoringPart", "Parts", "parts_of",
           "RowsSection", "regression_scores", "vector"]


class RowsSection(SplitConfig):
    """A parts task's config section: where its rows come from, and how they are split
    (`val_fraction`, `test_fraction`, `seed`). A task's section extends it with its own keys."""

    source: str = Field("default", description="Where the rows come from: 'default' (the "
                        "task's embedded data) or a spec its DataPart reads; rows:PATH reads "
                        "rows already in the task's columns (simulate-traffic --save writes "
                        "them).")


class DataPart(ABC):
    """Where a task's rows come from, and which are unusable.

    `inputs` are the columns a request carries; `target` the column the model learns; `order`,
    when set, a column that orders rows in time: the data stage then splits by it (train the
    earliest, test the latest) instead of at random.
    """

    inputs: ClassVar[tuple[str, ...]]
    target: ClassVar[str]
    order: ClassVar[str | None] = None

    @abstractmethod
    def read(self, source: str, section: RowsSection) -> pd.DataFrame:
        """The rows of `source` (section.source), with the `inputs`, the `target` and the
        `order` column; InputError (exit 2) for a source it cannot read."""

    @abstractmethod
    def problems(self, rows: pd.DataFrame, section: RowsSection) -> pd.Series:
        """Per row, why its inputs are unusable ("" when they are usable), e.g. a window of
        the wrong length. Rows in training are quarantined with this reason; a request with
        such an input is refused with 422 naming it."""


class Codec(ABC):
    """Rows to the model's arrays, and its outputs back to answers. `state` is what `fit`
    learned on the train split (JSON), stored in the checkpoint's preprocessing.json."""

    def fit(self, train: pd.DataFrame) -> dict[str, Any]:
        """What encoding needs from the train split (a scale, a vocabulary); {} for nothing."""
        return {}

    @abstractmethod
    def encode(self, rows: pd.DataFrame, state: dict[str, Any]) -> np.ndarray:
        """The model's input for `rows`: a float32 array, one entry per row."""

    @abstractmethod
    def target(self, rows: pd.DataFrame, state: dict[str, Any]) -> np.ndarray:
        """What the model's outputs are trained toward, one entry per row."""

    @abstractmethod
    def decode(self, outputs: np.ndarray, state: dict[str, Any]) -> np.ndarray:
        """The model's outputs for N rows -> N predictions in the target's units."""

    def answer(self, prediction: Any) -> dict[str, Any]:
        """One prediction as the JSON answer for its row."""
        return {"prediction": round(float(prediction), 6)}

    def outcome(self, prediction: Any) -> str | None:
        """The class a prediction names, for metrics and drift (None: the task predicts
        values, which are tested as numbers)."""
        return None


class ModelPart(ABC):
    """The network and how it is judged. `metric` is a key of `scores` (higher is better):
    it ranks checkpoints and trials, stops training early, and gates a retrain."""

    metric: ClassVar[str]

    @abstractmethod
    def build(self, section: RowsSection, example: np.ndarray) -> Any:
        """A fresh torch.nn.Module for inputs shaped like `example` (a few encoded rows)."""

    def loss(self, outputs: Any, targets: Any) -> Any:
        """The training loss (default: mean squared error)."""
        import torch.nn.functional as F

        return F.mse_loss(outputs.float().reshape(targets.shape), targets.float())

    @abstractmethod
    def scores(self, predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
        """The scores of predictions (the codec's `decode`) against the target's values."""


class MonitoringPart:
    """What drift is tested on, and how traffic can be shifted. The defaults: each numeric
    input as itself, each vector input as its mean and spread per row; the shifts scale,
    offset and noise apply to every numeric and vector input."""

    shifts: ClassVar[tuple[str, ...]] = ("scale", "offset", "noise")

    def features(self, rows: pd.DataFrame, inputs: tuple[str, ...]) -> pd.DataFrame:
        """Named numbers per row, compared with the train split's by `mlsd monitor`."""
        out = {}
        for name in inputs:
            values = rows[name]
            if len(values) and _is_vector(values.iloc[0]):
                stacked = vector(values)
                out[f"{name}_mean"], out[f"{name}_std"] = stacked.mean(1), stacked.std(1)
            elif pd.api.types.is_numeric_dtype(values):
                out[name] = values.astype(float).to_numpy()
        return pd.DataFrame(out, index=rows.index)

    def shift(self, rows: pd.DataFrame, inputs: tuple[str, ...], kind: str, amount: float,
              rng: np.random.Generator) -> pd.DataFrame:
        """`rows` with `kind` applied to their inputs by `amount` (scale: times it; offset:
        plus it; noise: plus normal noise of that spread)."""
        shifted = rows.copy()
        for name in inputs:
            values = shifted[name]
            if len(values) and _is_vector(values.iloc[0]):
                moved = _moved(vector(values), kind, amount, rng)
                shifted[name] = list(moved)
            elif pd.api.types.is_numeric_dtype(values):
                shifted[name] = _moved(values.to_numpy(float), kind, amount, rng)
        return shifted


@dataclass(frozen=True)
class Parts:
    """A task's parts: the stages call these and nothing else of the task."""

    data: DataPart
    codec: Codec
    model: ModelPart
    monitoring: MonitoringPart = field(default_factory=MonitoringPart)


def parts_of(task: object, where: str) -> tuple[Parts, str]:
    """A task's parts and the name of its config section; InputError when `task` (which
    trained the model at `where`) is not built from parts."""
    parts, section = getattr(task, "parts", None), getattr(task, "section", None)
    if not isinstance(parts, Parts) or not isinstance(section, str):
        raise InputError(f"{where}: the {getattr(task, 'name', task)} task is not built from "
                         "parts")
    return parts, section


def vector(values: pd.Series) -> np.ndarray:
    """A column of equal-length sequences as one float array (rows × length)."""
    return np.stack([np.asarray(v, dtype=np.float64) for v in values]) if len(values) else \
        np.zeros((0, 0))


def regression_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """R² (the ranking score), mean absolute error and root mean squared error."""
    predicted, truth = np.asarray(predicted, float).ravel(), np.asarray(truth, float).ravel()
    spread = float(((truth - truth.mean()) ** 2).sum()) if len(truth) else 0.0
    error = predicted - truth
    return {"r2": 1 - float((error ** 2).sum()) / spread if spread else 0.0,
            "mae": float(np.abs(error).mean()) if len(truth) else 0.0,
            "rmse": float(np.sqrt((error ** 2).mean())) if len(truth) else 0.0}


def _is_vector(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _moved(values: np.ndarray, kind: str, amount: float, rng: np.random.Generator) -> np.ndarray:
    if kind == "scale":
        return values * amount
    if kind == "offset":
        return values + amount
    return values + rng.normal(0, amount, values.shape)
