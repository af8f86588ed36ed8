"""What a retrain (workflows/retrain.py owns the gate) asks of a parts task: the new rows
prepared in the champion's form, the champion's rows and the new ones combined, and a model's
score on each holdout.

The new rows are checked and split like any source, but encoded with the champion's fitted
codec state, so that fine-tuning from its weights sees inputs on the same scale. The combined
dataset's test split is the old and new ones together; its train and val splits too, or the
new ones only with `retrain.keep_old_data: false`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.contracts import MANIFEST
from mlsd_ray.core.split import SPLITS
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.data import PreparedRows, prepare_rows, quality_markdown, write_rows
from mlsd_ray.workflows.retrain import HoldoutScore, RetrainData

__all__ = ["combine", "holdout_scores", "retrain_data"]


def retrain_data(task, keep_old_data: bool, champion_dir: str, source: str,
                 workspace: Workspace, log: Callable[[str], None]) -> RetrainData:
    """`source` prepared with the champion's section and codec state, and combined with the
    champion's own prepared rows (see the module docstring)."""
    champion = task.load(champion_dir)
    section = champion.section.model_copy(update={"source": source})
    old = PreparedRows.open(champion.metadata.dataset.path)
    new = prepare_rows(f"{old.name}-new", task.parts, section, workspace, log,
                       codec_state=champion.state)
    combined = combine(old, new, workspace, keep_old_data)
    log(f"challenger data: {combined.manifest['splits']['train']} training rows "
        f"({'new + old' if keep_old_data else 'new only'})")
    return RetrainData(new=new, old=old, combined=combined)


def combine(old: PreparedRows, new: PreparedRows, workspace: Workspace,
            keep_old_data: bool = True) -> PreparedRows:
    """One dataset of both, with the old codec state: the test split the old rows then the
    new; train and val so too, or only the new rows unless `keep_old_data`."""
    key = f"{old.fingerprint}+{new.fingerprint}" + ("" if keep_old_data else ":new-only")
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    name = f"{old.name}-retrain"
    out = workspace.dataset(name, fingerprint)
    if storage.exists(storage.join(out, "manifest.json")):
        return PreparedRows.open(out)
    splits = {s: pd.concat([*([old.load_split(s)] if keep_old_data or s == "test" else []),
                            new.load_split(s)], ignore_index=True)
              for s in SPLITS}
    for split, rows in splits.items():
        write_rows(storage.join(out, f"{split}.parquet"), rows)
    manifest = {**{k: v for k, v in old.manifest.items()
                   if k not in ("format_version", "written_by")},
                "name": name, "fingerprint": fingerprint,
                "source": f"{old.manifest['source']} + {new.manifest['source']}",
                "rows": old.manifest["rows"] + new.manifest["rows"],
                "splits": {s: len(f) for s, f in splits.items()},
                "quarantined": new.manifest["quarantined"]}
    storage.write_text(storage.join(out, "quality.md"), quality_markdown(manifest))
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    return PreparedRows(out, manifest)


def holdout_scores(task, checkpoint_dir: str,
                   parts: dict[str, PreparedRows]) -> dict[str, HoldoutScore]:
    """The model's metric on each part's test split, and on all of them pooled ("holdout")."""
    loaded = task.load(checkpoint_dir)
    metric = task.parts.model.metric
    tests = {name: prepared.load_split("test") for name, prepared in parts.items()}
    tests["holdout"] = pd.concat(list(tests.values()), ignore_index=True)
    return {name: HoldoutScore(metric, float(loaded.scores(rows)[metric]), len(rows))
            for name, rows in tests.items()}
