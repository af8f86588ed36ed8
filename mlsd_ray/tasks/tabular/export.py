"""The tabular task's `mlsd export`: the MLP as one graph, and its preparation as numbers.

The graph takes the prepared feature matrix (float32 N×F) and returns what the app scores
with: class probabilities (binary, multiclass) or the prediction in the label's units
(regression). The preparation before it (imputation, signed log, scaling, one-hot) goes into
metadata.json as one recipe per feature, so that numpy alone rebuilds the matrix from records
(`recipe_features`, which docs/export.md shows). The recipe is read off the fitted
preparation by feeding it probe values, and the export is checked on the test split through
the recipe, not through our featurizer: what it writes is what a user would run.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from mlsd_ray import export
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.export import ExportResult
from mlsd_ray.tasks.tabular.prepare import PreparedTable
from mlsd_ray.tasks.tabular.preprocess import Featurizer
from mlsd_ray.tasks.tabular.train import LoadedTabular, load_tabular

INPUT = "features"
PROBES = (0.0, 1.0, 7.5)  # a line through the first two, checked on the third


class ServedTable(nn.Module):
    """Prepared features N×F -> probabilities N×K, or predictions N in the label's units."""

    def __init__(self, loaded: LoadedTabular):
        super().__init__()
        self.model, self.task = loaded.model, loaded.decision["task"]
        self.mean = float(loaded.decision.get("target_mean") or 0.0)  # None for classes
        self.std = float(loaded.decision.get("target_std") or 1.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        outputs = self.model(features)
        if self.task == "regression":
            return outputs.reshape(-1) * self.std + self.mean
        return torch.softmax(outputs, dim=1)


def output_name(task: str) -> str:
    return "prediction" if task == "regression" else "probabilities"


def _signed_log(value: float) -> float:
    return math.copysign(math.log1p(abs(value)), value)


def _probe(featurizer: Featurizer, column: str, values: list) -> np.ndarray:
    """The features of `column` for records holding only `values` of it, one row each."""
    frame = pd.DataFrame({c: [None] * len(values) for c in featurizer.columns})
    frame[column] = pd.Series(values, dtype=object)
    features = featurizer(frame)
    owned = [i for i, name in enumerate(featurizer.feature_names)
             if name == column or name.startswith(f"{column}=")]
    return features[:, owned]


def feature_recipe(featurizer: Featurizer) -> list[dict]:
    """One entry per feature, in the matrix's order. A number: `weight * t + bias`, where t is
    the value (signed log1p of it when `log`), and `if_missing` when it is missing. A
    category's indicator: 1.0 when the value (or `if_missing`, the category a missing value
    gets) `equals` it, else 0.0. InputError for a preparation that is not of that form."""
    recipe: list[dict] = []
    for entry in featurizer.plan:
        column = entry["name"]
        if entry["impute"] == "iterative":
            raise InputError(f"column {column!r} is imputed by regression on the other "
                             "columns (impute: iterative), which the export's recipe cannot "
                             "write as numbers: train with impute mean or median to export")
        if entry["kind"] == "numeric":
            recipe.append(_number(featurizer, column, entry["scale"] == "log"))
        elif entry["encode"] == "onehot":
            recipe += _categories(featurizer, column)
        else:
            raise InputError(f"column {column!r} is encoded {entry['encode']!r}; the export "
                             "writes one-hot categories only")
    return recipe


def _number(featurizer: Featurizer, column: str, log: bool) -> dict:
    found = _probe(featurizer, column, [*PROBES, None])[:, 0]
    inputs = [_signed_log(p) if log else p for p in PROBES]
    weight = (found[1] - found[0]) / (inputs[1] - inputs[0])
    bias = found[0] - weight * inputs[0]
    if not math.isclose(weight * inputs[2] + bias, found[2], rel_tol=1e-4, abs_tol=1e-5):
        raise InputError(f"column {column!r}'s preparation is not a scaling of its value: "
                         "the export cannot write it as numbers")
    return {"column": column, "kind": "number", "log": log, "weight": float(weight),
            "bias": float(bias), "if_missing": float(found[3])}


def _categories(featurizer: Featurizer, column: str) -> list[dict]:
    names = [n for n in featurizer.feature_names if n.startswith(f"{column}=")]
    values = [name.split("=", 1)[1] for name in names]
    missing = _probe(featurizer, column, [None])[0]
    if_missing = values[int(missing.argmax())] if missing.any() else None
    return [{"column": column, "kind": "category", "equals": value, "if_missing": if_missing}
            for value in values]


def recipe_features(records: list[dict], recipe: list[dict]) -> np.ndarray:
    """The feature matrix of `records` (dicts) from the recipe alone: numpy and the standard
    library, as docs/export.md shows it."""
    rows = []
    for record in records:
        row = []
        for feature in recipe:
            value = record.get(feature["column"])
            if isinstance(value, float) and math.isnan(value):
                value = None
            if feature["kind"] == "number":
                if value is None:
                    row.append(feature["if_missing"])
                    continue
                t = _signed_log(float(value)) if feature["log"] else float(value)
                row.append(feature["weight"] * t + feature["bias"])
            else:
                value = feature["if_missing"] if value is None else str(value)
                row.append(1.0 if value == feature["equals"] else 0.0)
        rows.append(row)
    return np.nan_to_num(np.asarray(rows, dtype=np.float32))


def export_tabular_model(checkpoint_dir: str, fmt: str, quantize: str | None, out: str,
                         model_uri: str, workspace: Workspace) -> ExportResult:
    """Write the tabular model in `checkpoint_dir` as `fmt` with metadata.json (the recipe,
    the classes and threshold) into `out`, checked on its test split through the recipe, and
    register it beside `model_uri`. Nothing is written when a check fails."""
    export.check_request(fmt, quantize)
    if quantize:
        raise InputError("--quantize int8 is for image models; a tabular MLP is exported in "
                         "fp32")
    loaded = load_tabular(checkpoint_dir)
    table = PreparedTable.open(loaded.metadata.dataset.path)
    recipe = feature_recipe(loaded.featurizer)
    test = table.load_split("test")
    labels = test[table.label].to_numpy()
    records = test[loaded.featurizer.columns].astype(object).where(
        test[loaded.featurizer.columns].notna(), None).to_dict("records")
    task = loaded.decision["task"]
    served = ServedTable(loaded).eval()
    with tempfile.TemporaryDirectory(prefix="mlsd-export-") as scratch:
        built = _build(served, fmt, task, Path(scratch), recipe_features(records[:2], recipe))
        checked = _parity(loaded.predict(test),
                          export.run_model_file(built, recipe_features(records, recipe)),
                          labels, task)
        export.check_agreement(checked, fmt, "records")
        metadata = _metadata(loaded, recipe, fmt, built.name, model_uri, checked)
        export.write_folder(out, {
            built.name: lambda path: shutil.copyfile(built, path),
            "metadata.json": lambda path: path.write_text(json.dumps(metadata, indent=2))})
    return ExportResult(format=fmt, quantize=None, out=str(out),
                        model_file=str(Path(out) / built.name),
                        metadata_file=str(Path(out) / "metadata.json"),
                        size_bytes=(Path(out) / built.name).stat().st_size, parity=checked,
                        registered=export.register_export(model_uri, out, fmt, workspace))


def _build(served: ServedTable, fmt: str, task: str, scratch: Path,
           sample: np.ndarray) -> Path:
    example = torch.from_numpy(sample)
    if fmt == "torchscript":
        export.save_torchscript(served, example, scratch / "model.torchscript.pt")
        return scratch / "model.torchscript.pt"
    export.export_onnx(served, example, scratch / "model.onnx", INPUT, output_name(task))
    return scratch / "model.onnx"


def _parity(reference: np.ndarray, exported: np.ndarray, labels: np.ndarray,
            task: str) -> export.Parity:
    """Classes: as for images. Regression: the predictions within 1e-3 of their scale, and
    the R² of both."""
    if task != "regression":
        return export.parity(reference, exported, labels)
    return export.value_parity(reference, exported, labels)


def _metadata(loaded: LoadedTabular, recipe: list[dict], fmt: str, file_name: str,
              model_uri: str, checked: export.Parity) -> dict:
    decision = loaded.decision
    return {"format": fmt, "model_file": file_name, "model_uri": model_uri, "task": "tabular",
            "input": {"name": INPUT, "shape": [-1, len(recipe)], "dtype": "float32",
                      "features": recipe},
            "output": {"name": output_name(decision["task"]), "kind": decision["task"]},
            "label": decision["label"], "classes": decision["classes"],
            "threshold": decision.get("threshold"),
            "parity": {"samples": checked.samples, "max_abs_diff": checked.max_abs_diff,
                       "agreement": checked.agreement}}
