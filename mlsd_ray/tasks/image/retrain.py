"""The image task's part of a retrain (retrain.py): the new images prepared at the champion's
size and channels, combined with the champion's splits, the challenger trained from its
weights, and a model's accuracy on a test split."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, cast

from mlsd_ray.core import storage
from mlsd_ray.core.contracts import MANIFEST
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.image.config import ImageConfig
from mlsd_ray.tasks.image.data.prepare import PreparedDataset, prepare_dataset
from mlsd_ray.workflows.retrain import HoldoutScore, RetrainData, check_classes

if TYPE_CHECKING:
    from mlsd_ray.tasks.image.train import TrainResult

SPLITS = ("train", "val", "test")


def retrain_data(cfg: ImageConfig, champion_dir: str, source: str, workspace: Workspace,
                 log: Callable[[str], None]) -> RetrainData:
    """The new images at the champion's size and channels, and old plus new combined."""
    from mlsd_ray.tasks.image.checkpoint import load_model

    champion = load_model(champion_dir)
    pre = champion.preprocessor
    new_cfg = cfg.model_copy(deep=True)
    new_cfg.data.source, new_cfg.data.name = source, None
    # The champion was trained on 1 or 3 channels (pydantic checks the assignment).
    new_cfg.data.image_size = pre.image_size
    new_cfg.data.channels = cast(Literal[1, 3], pre.channels)
    new = prepare_dataset(new_cfg, workspace=workspace, log=log)
    check_classes(pre.class_names, new.manifest["class_names"], source)
    old = PreparedDataset.open(champion.metadata.dataset.path)
    train_parts = [new, old] if cfg.retrain.keep_old_data else [new]
    combined = combine({"train": train_parts, "val": train_parts, "test": [new, old]},
                       pre.to_dict(), f"retrain-{new.manifest['name']}", workspace)
    log(f"challenger: {cfg.retrain.mode}, {combined.manifest['counts']['splits']['train']} "
        f"training images ({'new + old' if cfg.retrain.keep_old_data else 'new only'})")
    return RetrainData(new, old, combined)


def train_challenger(cfg: ImageConfig, data: RetrainData, init_from: str | None,
                     workspace: Workspace, log: Callable[[str], None]) -> TrainResult:
    """Train and register the challenger on the combined data; its drift reference is the
    new data."""
    from mlsd_ray.tasks.image.train import train_and_register

    return train_and_register(cfg, workspace, log, dataset=data.combined, init_from=init_from,
                              reference=data.new)


def holdout_scores(checkpoint_dir: str, parts: dict[str, PreparedDataset]
                   ) -> dict[str, HoldoutScore]:
    """Accuracy of the model in `checkpoint_dir` on each part's test split, and pooled."""
    from mlsd_ray.tasks.image.checkpoint import load_model
    from mlsd_ray.tasks.image.train import predict_split

    loaded = load_model(checkpoint_dir)
    results = {name: predict_split(loaded, dataset, "test") for name, dataset in parts.items()}
    scores = {name: HoldoutScore("accuracy", r.accuracy, r.samples)
              for name, r in results.items()}
    samples = sum(r.samples for r in results.values())
    correct = sum(round(r.accuracy * r.samples) for r in results.values())
    scores["holdout"] = HoldoutScore("accuracy", correct / max(samples, 1), samples)
    return scores


def combine(parts: dict[str, list[PreparedDataset]], champion_pre: dict, name: str,
            workspace: Workspace) -> PreparedDataset:
    """One prepared dataset whose splits concatenate the given datasets' splits."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = "|".join(f"{s}:{','.join(d.manifest['fingerprint'] for d in ds)}"
                   for s, ds in parts.items())
    fingerprint = hashlib.sha256(key.encode()).hexdigest()[:12]
    out = workspace.dataset(name, fingerprint)
    counts = {}
    for split, datasets in parts.items():
        tables = []
        for dataset in datasets:
            fs, path = storage.filesystem(dataset.split_path(split))
            tables.append(pq.read_table(path, filesystem=fs))
        table = pa.concat_tables(tables)
        fs, path = storage.filesystem(storage.join(out, split, "part-0.parquet"))
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        pq.write_table(table, path, filesystem=fs)
        counts[split] = table.num_rows
    newest = parts["train"][0].manifest
    manifest = {**newest, "name": name, "fingerprint": fingerprint,
                "source": " + ".join(d.manifest["source"] for d in parts["train"]),
                "counts": {**newest["counts"], "splits": counts},
                "splits": {s: storage.join(out, s) for s in SPLITS},
                "preprocessing": champion_pre}
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    return PreparedDataset(out, manifest)
