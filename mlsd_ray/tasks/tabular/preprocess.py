"""Per-column preparation of a table with Ray Data preprocessors, fitted once on the train split.

A *plan* says, per feature column, its kind (numeric or categorical), how missing values are
imputed (mean, median, most frequent, constant, iterative regression, none), how numbers are
scaled (standard, min-max, robust, log then standard) and how categories are encoded (one-hot,
ordinal). `fit_state` turns the plan into a chain of Ray Data preprocessors, fits it on a Ray
Dataset and returns its fitted state as plain JSON (the checkpoint's preprocessing.json, no
pickle); `Featurizer` rebuilds the fitted chain from that state and turns a pandas batch into
the MLP's float32 matrix, in Ray Data (`map_batches`) at training and in the Serve replica.
"""

from __future__ import annotations

import base64
from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd
from ray.data.preprocessor import Preprocessor
from ray.data.preprocessors import (
    Chain,
    MinMaxScaler,
    OneHotEncoder,
    OrdinalEncoder,
    RobustScaler,
    SimpleImputer,
    StandardScaler,
)

from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.tabular.config import TabularConfig

MISSING_CATEGORY = "missing"
# The only types a saved IterativeImputer may contain: skops refuses anything else on load.
ITERATIVE_TRUSTED = ["numpy.dtype", "sklearn.impute._iterative.IterativeImputer",
                     "sklearn.impute._iterative._ImputerTriplet",
                     "sklearn.linear_model._bayes.BayesianRidge"]
ITERATIVE_FIT_ROWS = 50_000


# ----------------------------------------------------------------------------- the plan


NUMERIC_SHARE = 0.9


def column_kind(series: pd.Series) -> str:
    """numeric for numbers (booleans included) and for text columns whose values are mostly
    (NUMERIC_SHARE) numbers, a few typed wrong; categorical for everything else."""
    if pd.api.types.is_numeric_dtype(series):
        return "numeric"
    present = series.dropna()
    if len(present) and pd.to_numeric(present, errors="coerce").notna().mean() >= NUMERIC_SHARE:
        return "numeric"
    return "categorical"


def unused_rules(frame: pd.DataFrame, cfg: TabularConfig) -> list[str]:
    """Columns that `tabular.columns` has rules for but the table lacks (the fraud example's
    rules on another table, or a typo): reported by the data stage, not fatal."""
    return sorted(set(cfg.columns) - set(map(str, frame.columns)))


def plan_columns(frame: pd.DataFrame, label: str, cfg: TabularConfig) -> list[dict]:
    """One entry per feature column: name, kind, impute, fill_value, scale, encode."""
    plan = []
    for name in frame.columns:
        if name == label or name in cfg.drop_columns:
            continue
        rule = cfg.columns.get(name)
        kind = (rule.kind if rule and rule.kind else column_kind(frame[name]))
        entry = {"name": str(name), "kind": kind, "fill_value": rule.fill_value if rule else None}
        if kind == "numeric":
            entry.update(impute=(rule and rule.impute) or cfg.numeric_impute,
                         scale=(rule and rule.scale) or cfg.numeric_scale, encode=None)
        else:
            entry.update(impute=(rule and rule.impute) or cfg.categorical_impute, scale=None,
                         encode=(rule and rule.encode) or cfg.categorical_encode)
        _check_entry(entry, rule)
        plan.append(entry)
    if not plan:
        raise InputError(f"the table has no feature columns besides the label {label!r}")
    return plan


def _check_entry(entry: dict, rule) -> None:
    name, kind = entry["name"], entry["kind"]
    if kind == "categorical" and entry["impute"] in ("mean", "median", "iterative"):
        raise InputError(f"column {name!r} is categorical: impute {entry['impute']!r} needs "
                         "numbers; use most_frequent or constant")
    if kind == "categorical" and rule and rule.scale:
        raise InputError(f"column {name!r} is categorical: it is encoded, not scaled")
    if kind == "numeric" and rule and rule.encode:
        raise InputError(f"column {name!r} is numeric: set kind: categorical to encode it")
    if entry["impute"] == "constant" and entry["fill_value"] is None:
        entry["fill_value"] = 0.0 if kind == "numeric" else MISSING_CATEGORY


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def coerce(frame: pd.DataFrame, plan: list[dict]) -> tuple[pd.DataFrame, dict[str, int]]:
    """The feature columns with the plan's types: numbers as float (a value that is not a
    number becomes missing, and is counted), categories as strings with None for missing."""
    out, wrong = {}, {}
    for entry in plan:
        column = frame[entry["name"]] if entry["name"] in frame else pd.Series(
            [None] * len(frame), index=frame.index, dtype=object)
        if entry["kind"] == "numeric":
            numbers = pd.to_numeric(column, errors="coerce").astype(float)
            numbers[~np.isfinite(numbers)] = np.nan
            wrong[entry["name"]] = int((numbers.isna() & column.notna()).sum())
            out[entry["name"]] = numbers
        else:
            out[entry["name"]] = pd.Series([None if _missing(v) else str(v) for v in column],
                                           index=frame.index, dtype=object)
    return pd.DataFrame(out, index=frame.index), wrong


# ----------------------------------------------------------------------------- preprocessors


class MedianImputer(Preprocessor):
    """Fill missing numbers with the column's median (Ray Data's approximate quantile)."""

    def __init__(self, columns: list[str]):
        super().__init__()
        self.columns = columns

    def _fit(self, ds):
        from ray.data.aggregate import ApproximateQuantile

        found = ds.aggregate(*[ApproximateQuantile(on=c, quantiles=[0.5]) for c in self.columns])
        self.stats_ = {f"median({c})": float(found[f"approx_quantile({c})"][0])
                       for c in self.columns}
        return self

    def _transform_pandas(self, df: pd.DataFrame) -> pd.DataFrame:
        return df.fillna({c: self.stats_[f"median({c})"] for c in self.columns})


class IterativeImputation(Preprocessor):
    """Regression imputation: scikit-learn's IterativeImputer over these numeric columns,
    each missing value predicted from the others (fitted on at most ITERATIVE_FIT_ROWS rows)."""

    def __init__(self, columns: list[str]):
        super().__init__()
        self.columns = columns
        self._model: Any = None  # the fitted IterativeImputer, loaded from stats_ on first use

    def _fit(self, ds):
        import skops.io
        from sklearn.experimental import enable_iterative_imputer  # noqa: F401
        from sklearn.impute import IterativeImputer

        sample = ds.select_columns(self.columns).limit(ITERATIVE_FIT_ROWS).to_pandas()
        model = IterativeImputer(max_iter=10, random_state=0, keep_empty_features=True)
        model.fit(np.array(sample[self.columns], dtype=float))  # a writable copy: Ray's
        # blocks are read-only views, and IterativeImputer writes into its input
        self.stats_ = {"skops": base64.b64encode(skops.io.dumps(model)).decode("ascii")}
        return self

    def _transform_pandas(self, df: pd.DataFrame) -> pd.DataFrame:
        if self._model is None:
            import skops.io

            self._model = skops.io.loads(base64.b64decode(self.stats_["skops"]),
                                         trusted=ITERATIVE_TRUSTED)
        df = df.copy()
        df[self.columns] = self._model.transform(np.array(df[self.columns], dtype=float))
        return df


class Log1p(Preprocessor):
    """sign(x) · log(1 + |x|): tames log-normal columns such as amounts (stateless)."""

    _is_fittable = False

    def __init__(self, columns: list[str]):
        super().__init__()
        self.columns = columns

    def _transform_pandas(self, df: pd.DataFrame) -> pd.DataFrame:
        df = df.copy()
        values = df[self.columns].to_numpy(dtype=float)
        df[self.columns] = np.sign(values) * np.log1p(np.abs(values))
        return df


SCALERS = {"standard": StandardScaler, "minmax": MinMaxScaler, "robust": RobustScaler}


def _steps(plan: list[dict]) -> list[dict]:
    """The plan as an ordered list of {type, args}: impute, then scale, then encode."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    for entry in plan:
        if entry["impute"] == "constant":
            groups[("constant", entry["fill_value"])].append(entry["name"])
        elif entry["impute"] != "none":
            groups[(entry["impute"], None)].append(entry["name"])
    steps = []
    for (how, fill), columns in groups.items():
        if how in ("mean", "most_frequent"):
            steps.append({"type": "SimpleImputer", "args": {"columns": columns, "strategy": how}})
        elif how == "constant":
            steps.append({"type": "SimpleImputer", "args": {
                "columns": columns, "strategy": "constant", "fill_value": fill}})
        else:
            steps.append({"type": {"median": "MedianImputer",
                                   "iterative": "IterativeImputation"}[how],
                          "args": {"columns": columns}})
    logged = [e["name"] for e in plan if e["scale"] == "log"]
    if logged:
        steps.append({"type": "Log1p", "args": {"columns": logged}})
    for scale, cls in SCALERS.items():
        columns = [e["name"] for e in plan if e["scale"] == scale
                   or (scale == "standard" and e["scale"] == "log")]
        if columns:
            steps.append({"type": cls.__name__, "args": {"columns": columns}})
    for encode, cls in (("onehot", OneHotEncoder), ("ordinal", OrdinalEncoder)):
        columns = [e["name"] for e in plan if e["encode"] == encode]
        if columns:
            steps.append({"type": cls.__name__, "args": {"columns": columns}})
    return steps


TYPES = {cls.__name__: cls for cls in (SimpleImputer, MedianImputer, IterativeImputation, Log1p,
                                       StandardScaler, MinMaxScaler, RobustScaler,
                                       OneHotEncoder, OrdinalEncoder)}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def fit_state(plan: list[dict], train_dataset) -> dict:
    """Fit the plan's preprocessors on a Ray Dataset of coerced columns; the state as JSON."""
    steps = _steps(plan)
    # Ray annotates Chain's members as SerializablePreprocessorBase, yet it uses only the
    # Preprocessor interface, which MedianImputer, IterativeImputation and Log1p implement.
    chain = Chain(*[TYPES[s["type"]](**s["args"]) for s in steps])  # type: ignore[arg-type]
    if steps:
        chain.fit(train_dataset)
    for step, fitted in zip(steps, chain.preprocessors, strict=True):
        step["stats"] = _jsonable(dict(fitted.stats_))
    return {"plan": plan, "steps": steps}


class Featurizer:
    """The fitted preparation from its JSON state: a pandas batch in, float32 features out."""

    def __init__(self, state: dict):
        self.plan = state["plan"]
        self.columns = [e["name"] for e in self.plan]
        self.preprocessors = []
        for step in state["steps"]:
            preprocessor = TYPES[step["type"]](**step["args"])
            if preprocessor._is_fittable:
                preprocessor.stats_ = dict(step["stats"])
                preprocessor._fitted = True
            self.preprocessors.append(preprocessor)
        self.onehot = {c: len(s["stats"][f"unique_values({c})"])
                       for s in state["steps"] if s["type"] == "OneHotEncoder"
                       for c in s["args"]["columns"]}
        self.feature_names = [name for e in self.plan for name in self._names(e, state)]

    def _names(self, entry: dict, state: dict) -> list[str]:
        name = entry["name"]
        if name not in self.onehot:
            return [name]
        values = next(s["stats"][f"unique_values({name})"] for s in state["steps"]
                      if s["type"] == "OneHotEncoder" and name in s["args"]["columns"])
        return [f"{name}={value}" for value in sorted(values, key=values.get)]

    def transform(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The prepared columns (one-hot columns hold lists), before flattening."""
        frame, _ = coerce(frame, self.plan)
        for preprocessor in self.preprocessors:
            frame = preprocessor.transform_batch(frame)
        return frame

    def __call__(self, frame: pd.DataFrame) -> np.ndarray:
        """N × len(feature_names) float32; a value left missing (impute: none) becomes 0."""
        prepared = self.transform(frame)
        parts = []
        for name in self.columns:
            if name in self.onehot:
                parts.append(np.stack([np.asarray(v, dtype=np.float32)
                                       for v in prepared[name]]).reshape(len(prepared), -1))
            else:
                parts.append(prepared[name].to_numpy(dtype=np.float32).reshape(-1, 1))
        features = np.concatenate(parts, axis=1) if parts else np.zeros((len(prepared), 0))
        return np.nan_to_num(features.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)

    def batch(self, frame: pd.DataFrame, label: str) -> dict[str, np.ndarray]:
        """For Ray Data's map_batches: {"features", "label"}."""
        return {"features": self(frame), "label": frame[label].to_numpy()}

    def categories(self, name: str) -> list[str] | None:
        """The categories a categorical column was fitted with (None if not encoded)."""
        for preprocessor in self.preprocessors:
            if isinstance(preprocessor, (OneHotEncoder, OrdinalEncoder)):
                values = preprocessor.stats_.get(f"unique_values({name})")
                if values is not None:
                    return list(values)
        return None
