"""The tabular task's part of a retrain (retrain.py): new labelled rows checked against the
champion's columns and classes, combined with the champion's splits under the champion's
fitted preparation (so the challenger's features mean what the champion's meant, and
fine-tuning starts from weights that fit them), the challenger trained and evaluated beside
the baseline, and a model's score on test splits (PR-AUC, macro F1 or R², as it was trained).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.contracts import MANIFEST, CheckpointMetadata
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.tabular.config import TabularTaskConfig
from mlsd_ray.tasks.tabular.prepare import (
    SPLITS,
    PreparedTable,
    _label_stats,
    _parquet,
    prepare_table,
)
from mlsd_ray.workflows.retrain import HoldoutScore, RetrainData, check_classes

if TYPE_CHECKING:
    from mlsd_ray.tasks.tabular.result import TabularTrainResult

Log = Callable[[str], None]


def retrain_data(cfg: TabularTaskConfig, champion_dir: str, source: str, workspace: Workspace,
                 log: Log) -> RetrainData:
    """The new rows prepared (checked, split) with the champion's label and column rules, and
    old plus new as one table under the champion's preparation."""
    metadata = CheckpointMetadata.read(champion_dir)
    old = PreparedTable.open(metadata.dataset.path)
    trained = TabularTaskConfig.from_record(metadata.config)
    trained.tabular.source, trained.tabular.label = source, old.label
    trained.tabular.seed = cfg.tabular.seed
    new = prepare_table(trained, workspace=workspace, log=log)
    _check_compatible(old, new, source)
    train_parts = [new, old] if cfg.retrain.keep_old_data else [new]
    combined = combine({"train": train_parts, "val": train_parts, "test": [new, old]}, old,
                       f"retrain-{new.manifest['name']}", workspace)
    log(f"challenger: {cfg.retrain.mode}, {combined.manifest['counts']['splits']['train']} "
        f"training rows ({'new + old' if cfg.retrain.keep_old_data else 'new only'})")
    return RetrainData(new, old, combined)


def _check_compatible(old: PreparedTable, new: PreparedTable, source: str) -> None:
    """InputError unless the new table has the champion's task, classes and columns."""
    if new.manifest["task"] != old.manifest["task"]:
        raise InputError(f"retrain source {source} is a {new.manifest['task']} table; the "
                         f"model is {old.manifest['task']}")
    if old.manifest["task"] != "regression":
        check_classes([str(c) for c in old.manifest["classes"]],
                      [str(c) for c in new.manifest["classes"]], source)
    missing = sorted({e["name"] for e in old.manifest["columns"]}
                     - {e["name"] for e in new.manifest["columns"]})
    if missing:
        raise InputError(f"retrain source {source} lacks the model's column(s) {missing}")


def combine(parts: dict[str, list[PreparedTable]], champion: PreparedTable, name: str,
            workspace: Workspace) -> PreparedTable:
    """One prepared table whose splits concatenate the parts' rows (the champion's columns),
    with the champion's fitted preparation and label statistics of the combined train rows."""
    columns = [e["name"] for e in champion.manifest["columns"]] + [champion.label]
    key = "|".join(f"{s}:{','.join(t.manifest['fingerprint'] for t in ts)}"
                   for s, ts in parts.items())
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = workspace.dataset(name, fingerprint)
    frames = {split: pd.concat([t.load_split(split)[columns] for t in tables],
                               ignore_index=True) for split, tables in parts.items()}
    for split in SPLITS:
        storage.write_bytes(storage.join(out, f"{split}.parquet"), _parquet(frames[split]))
    m = champion.manifest
    manifest = {**m, "name": name, "fingerprint": fingerprint,
                "source": " + ".join(t.manifest["source"] for t in parts["train"]),
                "counts": {**m["counts"], "splits": {s: len(f) for s, f in frames.items()}},
                "label_stats": _label_stats(frames["train"][champion.label], m["task"])}
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    return PreparedTable(out, manifest)


def train_challenger(cfg: TabularTaskConfig, data: RetrainData, init_from: str | None,
                     workspace: Workspace, log: Log) -> TabularTrainResult:
    """Train, evaluate and register the challenger on the combined rows; its drift reference
    is the new table."""
    from mlsd_ray.tasks.tabular.stage import run_tabular_train

    return run_tabular_train(cfg, workspace=workspace, log=log, table=data.combined,
                             init_from=init_from, reference=data.new)


def holdout_scores(checkpoint_dir: str, parts: dict[str, PreparedTable]
                   ) -> dict[str, HoldoutScore]:
    """The model's ranking score on each part's test split, and on them pooled (PR-AUC does
    not average: the pooled rows are scored together)."""
    from mlsd_ray.tasks.tabular.metrics import SCORE_NAMES, primary_score
    from mlsd_ray.tasks.tabular.train import load_tabular

    loaded = load_tabular(checkpoint_dir)
    task, label = loaded.decision["task"], loaded.decision["label"]
    tests = {name: table.load_split("test") for name, table in parts.items()}
    outputs = {name: np.asarray(loaded.predict(test)) for name, test in tests.items()}

    def score(out: np.ndarray, labels: np.ndarray) -> HoldoutScore:
        return HoldoutScore(SCORE_NAMES[task], primary_score(task, out, labels), len(labels))

    scores = {name: score(outputs[name], test[label].to_numpy())
              for name, test in tests.items()}
    scores["holdout"] = score(np.concatenate(list(outputs.values())),
                              np.concatenate([t[label].to_numpy() for t in tests.values()]))
    return scores
