"""The data stage for tables: source -> checked rows -> stratified splits -> fitted preparation.

Output, under `$MLSD_HOME/datasets/<name>/<fingerprint>/`:

    train.parquet val.parquet test.parquet   the kept rows: feature columns (typed) + label
    quarantine.csv                           rejected rows with their reason
    quality.json quality.md                  missing values and outliers per column, classes
    manifest.json                            task, label, classes, columns, counts and the
                                             fitted preparation (preprocess.py); written last

Rows without a label, or with a label outside the classes, are quarantined; values that are not
numbers in a numeric column become missing (counted per column) and are imputed as configured.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.config import dump_yaml
from mlsd_ray.core.contracts import MANIFEST
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.core.split import stratified_splits
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages import ParquetSplits
from mlsd_ray.tasks.tabular.config import TabularTaskConfig
from mlsd_ray.tasks.tabular.preprocess import (
    Featurizer,
    coerce,
    fit_state,
    plan_columns,
    unused_rules,
)
from mlsd_ray.tasks.tabular.sources import Table, load_table

SPLITS = ("train", "val", "test")
REGRESSION_MIN_VALUES = 20


@dataclass(frozen=True)
class TableCounts:
    """Rows read, kept and quarantined, and the kept rows in each split."""

    rows: int
    kept: int
    quarantined: int
    splits: dict[str, int]


@dataclass(frozen=True)
class TableSummary:
    """What `mlsd data` prepared from a table: where, from which inputs, the task inferred or
    chosen, the label and its classes, the counts, the number of features after preparation,
    and the quality report."""

    path: str
    name: str
    fingerprint: str
    reused: bool
    task: str
    label: str
    classes: list[Any] | None
    counts: TableCounts
    features: int
    quality_report: str

    def to_dict(self) -> dict[str, Any]:
        """`mlsd data --json`."""
        return asdict(self)


@dataclass
class PreparedTable(ParquetSplits):
    """A prepared table on disk (a parquet file per split) and its manifest."""

    @classmethod
    def open(cls, path: str) -> PreparedTable:
        """A table prepared earlier; InputError when `path` holds none."""
        return cls.read(path, f"no prepared table at {path} (manifest.json missing)")

    @property
    def featurizer(self) -> Featurizer:
        return Featurizer(self.manifest["preprocessing"])

    @property
    def label(self) -> str:
        return self.manifest["label"]

    def summary(self) -> TableSummary:
        """What `mlsd data` reports."""
        m = self.manifest
        return TableSummary(path=self.path, name=m["name"], fingerprint=m["fingerprint"],
                            reused=self.reused, task=m["task"], label=m["label"],
                            classes=m["classes"], counts=TableCounts(**m["counts"]),
                            features=len(m["feature_names"]),
                            quality_report=storage.join(self.path, "quality.md"))


def infer_task(labels: pd.Series, requested: str) -> str:
    """binary / multiclass / regression (see TabularConfig.task)."""
    if requested != "auto":
        return requested
    values = labels.dropna()
    if pd.api.types.is_float_dtype(values) and values.nunique() > REGRESSION_MIN_VALUES:
        return "regression"
    return "binary" if values.nunique() <= 2 else "multiclass"


def _labels(table: Table, task: str) -> tuple[pd.Series, pd.Series, list[str] | None]:
    """(numeric labels, reason per row or None, class names); classes sorted by value."""
    raw = table.frame[table.label]
    reasons = pd.Series([None] * len(raw), index=raw.index, dtype=object)
    reasons[raw.isna()] = "missing_label"
    if task == "regression":
        numbers = pd.to_numeric(raw, errors="coerce")
        reasons[numbers.isna() & raw.notna()] = "label_not_a_number"
        return numbers, reasons, None
    classes = sorted(raw.dropna().astype(str).unique(), key=_natural)
    if task == "binary" and len(classes) != 2:
        raise InputError(f"a binary task needs 2 label values; {table.label!r} has "
                         f"{len(classes)}: {classes[:10]}")
    index = {name: i for i, name in enumerate(classes)}
    return raw.astype(str).map(index).where(raw.notna()), reasons, classes


def _natural(text: str):
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def fingerprint(table: Table, cfg: TabularTaskConfig) -> str:
    digest = hashlib.sha256(pd.util.hash_pandas_object(table.frame, index=False).values)
    t = cfg.tabular
    settings = t.model_dump(exclude={"hidden", "dropout", "class_weight", "threshold", "rules",
                                     "baseline", "decline_above", "val_fraction",
                                     "test_fraction", "seed"})
    settings.update(val=t.val_fraction, test=t.test_fraction, seed=t.seed)
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:12]


def prepare_table(cfg: TabularTaskConfig, workspace: Workspace, force: bool = False,
                  log: Callable[[str], None] = log_stderr) -> PreparedTable:
    """`mlsd data` for tables: load, check, split, fit the preparation; reuse when unchanged."""
    t = cfg.tabular
    table = load_table(t.source, t.label, t.seed)
    fp = fingerprint(table, cfg)
    out = workspace.dataset(table.name, fp)
    if not force and storage.exists(storage.join(out, "manifest.json")):
        log(f"reusing the prepared table {out}")
        return PreparedTable.open(out)
    task = infer_task(table.frame[table.label], t.task)
    log(f"[1/3] checking {len(table.frame)} rows of {table.name} ({task}, label "
        f"{table.label!r})")
    plan = plan_columns(table.frame, table.label, t)
    unused = unused_rules(table.frame, t)
    if unused:
        log(f"note: tabular.columns has rules for {unused}, which {table.name} does not have")
    labels, reasons, classes = _labels(table, task)
    features, not_numbers = coerce(table.frame, plan)
    kept = reasons.isna()
    rows = features[kept].assign(**{table.label: labels[kept]})
    if task != "regression":
        rows[table.label] = rows[table.label].astype(int)
    log("[2/3] splitting " + ("by class" if task != "regression" else "at random"))
    assignment = _assign(rows[table.label], task, cfg)
    splits = {s: rows[assignment == s].reset_index(drop=True) for s in SPLITS}
    log("[3/3] fitting the preparation on the train split (Ray Data preprocessors)")
    ensure_ray(workspace)
    import ray.data

    state = fit_state(plan, ray.data.from_pandas(splits["train"]))
    featurizer = Featurizer(state)
    for split, frame in splits.items():
        storage.write_bytes(storage.join(out, f"{split}.parquet"), _parquet(frame))
    quarantine = table.frame[~kept].assign(reason=reasons[~kept])
    storage.write_text(storage.join(out, "quarantine.csv"), quarantine.to_csv(index=False))
    quality = quality_report(features[kept], plan, not_numbers, rows[table.label], classes,
                             int((~kept).sum()), reasons[~kept].value_counts().to_dict())
    manifest: dict[str, Any] = {
        "name": table.name, "fingerprint": fp, "source": t.source, "task": task,
        "label": table.label, "classes": classes, "columns": plan,
        "feature_names": featurizer.feature_names, "preprocessing": state,
        "counts": {"rows": len(table.frame), "kept": int(kept.sum()),
                   "quarantined": int((~kept).sum()),
                   "splits": {s: len(f) for s, f in splits.items()}},
        "label_stats": _label_stats(rows[table.label], task),
        "unused_column_rules": unused}
    storage.write_json(storage.join(out, "quality.json"), quality)
    storage.write_text(storage.join(out, "quality.md"), render_quality(manifest, quality))
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    log(f"prepared {table.name}: {manifest['counts']['splits']} rows, "
        f"{len(featurizer.feature_names)} features, {int((~kept).sum())} quarantined -> {out}")
    return PreparedTable(out, manifest)


def _assign(labels: pd.Series, task: str, cfg: TabularTaskConfig) -> np.ndarray:
    d = cfg.tabular
    if task != "regression":
        return stratified_splits(labels.to_numpy(), d.val_fraction, d.test_fraction, d.seed)
    order = np.random.default_rng(d.seed).permutation(len(labels))
    n_test, n_val = round(len(labels) * d.test_fraction), round(len(labels) * d.val_fraction)
    assignment = np.full(len(labels), "train", dtype=object)
    assignment[order[:n_test]] = "test"
    assignment[order[n_test:n_test + n_val]] = "val"
    return assignment


def _parquet(frame: pd.DataFrame) -> bytes:
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    return buffer.getvalue()


def _label_stats(labels: pd.Series, task: str) -> dict:
    if task == "regression":
        return {"mean": float(labels.mean()), "std": float(labels.std() or 1.0)}
    return {"counts": {str(k): int(v) for k, v in labels.value_counts().sort_index().items()}}


def quality_report(features: pd.DataFrame, plan: list[dict], not_numbers: dict[str, int],
                   labels: pd.Series, classes: list[str] | None, quarantined: int,
                   by_reason: dict) -> dict:
    """Per column: missing values, values that were not numbers, outliers (beyond 3 IQR of
    the quartiles), distinct values; the class balance; the quarantine by reason."""
    columns = {}
    for entry in plan:
        values = features[entry["name"]]
        row = {"kind": entry["kind"], "missing": int(values.isna().sum()),
               "missing_fraction": round(float(values.isna().mean()), 4),
               "not_a_number": not_numbers.get(entry["name"], 0)}
        if entry["kind"] == "numeric":
            q1, q3 = values.quantile([0.25, 0.75])
            spread = 3 * (q3 - q1)
            row.update(outliers=int(((values < q1 - spread) | (values > q3 + spread)).sum()),
                       min=_num(values.min()), median=_num(values.median()),
                       max=_num(values.max()))
        else:
            row["distinct"] = int(values.nunique())
        columns[entry["name"]] = row
    balance = None
    if classes is not None:
        counts = labels.value_counts()
        balance = {classes[int(k)]: int(v) for k, v in counts.sort_index().items()}
    return {"rows": len(features), "columns": columns, "class_balance": balance,
            "quarantined": quarantined, "quarantine_by_reason": by_reason}


def _num(value) -> float | None:
    return None if pd.isna(value) else round(float(value), 4)


def render_quality(manifest: dict, quality: dict) -> str:
    """quality.md: the columns table and the class balance."""
    lines = [f"# Quality report: {manifest['name']} ({manifest['task']}, label "
             f"`{manifest['label']}`)", "",
             f"{manifest['counts']['rows']} rows, {manifest['counts']['kept']} kept, "
             f"{manifest['counts']['quarantined']} quarantined "
             f"{quality['quarantine_by_reason'] or ''}; splits {manifest['counts']['splits']}",
             "", "| column | kind | missing | not a number | outliers | range / distinct |",
             "|---|---|---|---|---|---|"]
    for name, row in quality["columns"].items():
        spread = (f"{row['min']} .. {row['median']} .. {row['max']}" if row["kind"] == "numeric"
                  else f"{row['distinct']} values")
        lines.append(f"| {name} | {row['kind']} | {row['missing']} "
                     f"({100 * row['missing_fraction']:.1f}%) | {row['not_a_number']} | "
                     f"{row.get('outliers', '')} | {spread} |")
    if quality["class_balance"]:
        lines += ["", "Class balance: " + ", ".join(f"{k}: {v}" for k, v in
                                                    quality["class_balance"].items())]
    return "\n".join(lines) + "\n"
