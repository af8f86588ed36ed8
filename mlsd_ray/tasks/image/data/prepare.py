"""The data stage: source -> validated, de-duplicated, split parquet + manifest + quality report.

Output layout, under `$MLSD_HOME/datasets/<name>/<fingerprint>/`:

    train/ val/ test/        parquet: id, source, image (uint8 H×W×C), label (int), hash
    quarantine/rows/         parquet: every rejected row with its reason and original payload
    quarantine/index.csv     one line per rejected row: id, source, label, reason, detail
    quality.json quality.md  the quality report
    samples.png              a few training images per class
    config.yaml              the resolved config
    manifest.json            counts, classes, schema, preprocessing state; written last, so
                             its presence marks a complete dataset
"""

from __future__ import annotations

import datetime as dt
import functools
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
from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.core.split import SPLITS, resolve
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks.base import PreparedFolder
from mlsd_ray.tasks.image.config import ImageConfig
from mlsd_ray.tasks.image.data.report import (
    build_quality,
    pixel_statistics,
    render_markdown,
    sample_grid_png,
)
from mlsd_ray.tasks.image.data.sources import Source, parse_source
from mlsd_ray.tasks.image.data.transforms import Preprocessor, channel_moments
from mlsd_ray.tasks.image.data.validate import DUPLICATE, OK, ValidationSpec, validate_batch

FORMAT_VERSION = 2  # 2: split files keep the source's row order (1 did not always)
SPLIT_COLUMNS = ["id", "source", "image", "label", "hash"]
QUARANTINE_COLUMNS = ["id", "source", "label_name", "status", "detail", "payload"]
META_COLUMNS = ["id", "source", "label_name", "label", "hash", "status", "detail",
                "orig_height", "orig_width"]
# Config fields that change what is written; the rest (augmentation, task size) do not.
_NOT_IN_FINGERPRINT = {"augment", "name", "rows_per_task"}


def _plural(count: int, one: str, many: str) -> str:
    return f"{count} {one if count == 1 else many}"


@dataclass(frozen=True)
class ImageCounts:
    """Rows read, kept and quarantined, and the kept rows in each split."""

    input: int
    kept: int
    quarantined: int
    splits: dict[str, int]


@dataclass(frozen=True)
class DatasetSummary:
    """What `mlsd data` prepared from images: where, from which inputs (name, fingerprint,
    whether an earlier identical preparation was reused), the counts, why rows were
    quarantined, warnings, the classes and stored image shape, and the files to open."""

    path: str
    name: str
    fingerprint: str
    reused: bool
    counts: ImageCounts
    quarantine_by_reason: dict[str, int]
    warnings: list[str]
    class_names: list[str]
    image_shape: list[int]
    quality_report: str
    samples: str

    def to_dict(self) -> dict[str, Any]:
        """`mlsd data --json`."""
        return asdict(self)


@dataclass
class PreparedDataset(PreparedFolder):
    """A prepared dataset on disk (or at a URI) and its manifest."""

    def split_path(self, split: str) -> str:
        return storage.join(self.path, split)

    @property
    def preprocessor(self) -> Preprocessor:
        return Preprocessor.from_dict(self.manifest["preprocessing"])

    @classmethod
    def open(cls, path: str) -> PreparedDataset:
        """A dataset written earlier; InputError when `path` holds no complete dataset."""
        return cls.read(path, f"no prepared dataset at {path} (manifest.json missing): run "
                              "`mlsd data` first")

    def load_split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """One split in memory on the driver: uint8 N×H×W×C images and int labels."""
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(self.split_path(split))
        table = pq.read_table(path, filesystem=fs, columns=["image", "label"])
        shape = self.manifest["schema"]["image"]["shape"]
        column = table.column("image").combine_chunks()
        # Ray's tensor extension type when Ray is imported, its fixed-size-list storage if not
        values = getattr(column, "storage", column).flatten()
        images = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.uint8)
        return images.reshape(table.num_rows, *shape), table.column("label").to_numpy()

    def summary(self) -> DatasetSummary:
        """What `mlsd data` reports."""
        m = self.manifest
        return DatasetSummary(
            path=self.path, name=m["name"], fingerprint=m["fingerprint"], reused=self.reused,
            counts=ImageCounts(**m["counts"]), quarantine_by_reason=m["quarantine_by_reason"],
            warnings=m["warnings"], class_names=m["class_names"],
            image_shape=m["schema"]["image"]["shape"],
            quality_report=storage.join(self.path, "quality.md"),
            samples=storage.join(self.path, "samples.png"))


def fingerprint(source: Source, cfg: ImageConfig) -> str:
    """12 hex digits over the source's identity and the data config that shapes the output."""
    data = {k: v for k, v in cfg.data.model_dump(mode="json").items()
            if k not in _NOT_IN_FINGERPRINT}
    blob = json.dumps({"format": FORMAT_VERSION, "source": source.identity(), "data": data},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def apply_decisions(batch: dict[str, np.ndarray], decisions: dict) -> dict[str, np.ndarray]:
    """Ray Data batch function: add `split` and mark duplicates, from the driver's decisions."""
    splits, statuses, details = [], [], []
    for row_id, status, detail in zip(batch["id"], batch["status"], batch["detail"]):
        split, new_status, new_detail = decisions.get(row_id, ("", status, detail))
        splits.append(split)
        statuses.append(new_status)
        details.append(new_detail)
    batch["split"] = np.array(splits, dtype=object)
    batch["status"] = np.array(statuses, dtype=object)
    batch["detail"] = np.array(details, dtype=object)
    return batch


def split_moments(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Ray Data batch function: per-split pixel moments of kept rows (for normalisation)."""
    rows: dict[str, list] = {"split": [], "count": [], "sum": [], "sumsq": []}
    for split in np.unique(batch["split"]):
        moments = channel_moments(batch["image"][batch["split"] == split])
        rows["split"].append(split)
        for key in ("count", "sum", "sumsq"):
            rows[key].append(moments[key])
    return {"split": np.array(rows["split"], dtype=object),
            "count": np.array(rows["count"], dtype=np.float64),
            "sum": np.array(rows["sum"], dtype=np.float64).reshape(len(rows["split"]), -1),
            "sumsq": np.array(rows["sumsq"], dtype=np.float64).reshape(len(rows["split"]), -1)}


def _reasons(meta: pd.DataFrame) -> str:
    counts = meta.loc[meta["status"] != OK, "status"].value_counts()
    return ", ".join(f"{n} {r}" for r, n in counts.items())


def _decide(meta: pd.DataFrame, cfg: ImageConfig,
            class_names: list[str]) -> tuple[pd.DataFrame, dict]:
    """Splits for valid rows, quarantine for duplicates; returns every row with its decision."""
    valid = meta[meta["status"] == OK]
    if valid.empty:
        raise InputError(f"no valid image in {cfg.data.source}: all {len(meta)} rows were "
                         f"quarantined ({_reasons(meta)})")
    decided, duplicates = resolve(valid[["id", "label", "hash"]].copy(), cfg.data.val_fraction,
                                  cfg.data.test_fraction, cfg.data.seed, class_names)
    decided = decided.set_index("id")[["split", "status", "detail"]].fillna("")
    rows = meta.set_index("id").assign(split="")
    rows.loc[decided.index, decided.columns] = decided
    return rows.reset_index(), duplicates


def _write_quarantine(tagged, rows: pd.DataFrame, out: str) -> None:
    quarantined = rows[rows["status"] != OK]
    if quarantined.empty:
        return
    index = quarantined[["id", "source", "label_name", "status", "detail"]].rename(
        columns={"label_name": "label", "status": "reason"})
    buffer = io.StringIO()
    index.to_csv(buffer, index=False)
    storage.write_text(storage.join(out, "quarantine", "index.csv"), buffer.getvalue())
    tagged.filter(expr=f"status != '{OK}'").select_columns(QUARANTINE_COLUMNS).write_parquet(
        storage.join(out, "quarantine", "rows"))


def _check_writable(out: str) -> None:
    """Fail before any work when the output location cannot be written."""
    try:
        storage.makedirs(out)
    except OSError as exc:
        raise InputError(f"cannot write to {out}: {exc} (set --home or MLSD_HOME)") from exc


def _check_ids_unique(meta: pd.DataFrame) -> None:
    if meta["id"].duplicated().any():
        raise WorkError("source produced duplicate row ids (a bug in the source): "
                        f"{meta.loc[meta['id'].duplicated(), 'id'].head(3).tolist()}")


def prepare_dataset(cfg: ImageConfig, workspace: Workspace, force: bool = False,
                    log: Callable[[str], None] = log_stderr) -> PreparedDataset:
    """Run the data stage (or reuse its earlier output for the same inputs and config)."""
    source = parse_source(cfg.data.source, cfg.data, workspace)
    name = cfg.data.name or source.name
    fp = fingerprint(source, cfg)
    out = workspace.dataset(name, fp)
    manifest_path = storage.join(out, "manifest.json")
    if not force and storage.exists(manifest_path):
        log(f"reusing the prepared dataset at {out} (same inputs and config; --force rebuilds)")
        return PreparedDataset(out, MANIFEST.read(manifest_path), reused=True)
    storage.delete_dir(out)  # a half-written earlier attempt, or --force
    _check_writable(out)

    class_names = source.class_names()  # may load or download data: fail before Ray starts
    ensure_ray(workspace)
    spec = ValidationSpec(image_size=source.image_size(), channels=source.channels(),
                          class_names=tuple(class_names), pixel_range=cfg.data.pixel_range,
                          min_side=cfg.data.min_side)
    size = f"{spec.image_size}×{spec.image_size}×{spec.channels}"
    log(f"[1/4] reading and validating {cfg.data.source} with Ray Data "
        f"({_plural(len(class_names), 'class', 'classes')}, output {size})")
    validated = source.read(then=functools.partial(validate_batch, spec=spec))
    # Blocks in source order through every step below (datasets derived from this one share
    # its context). Else the split files list rows in whichever read task finished first, and
    # training, which deals rows by position, trains another model from the same seed.
    validated.context.execution_options.preserve_order = True
    validated = validated.materialize()
    meta = validated.select_columns(META_COLUMNS).to_pandas()
    if meta.empty:
        raise InputError(f"source {cfg.data.source} has no rows")
    _check_ids_unique(meta)

    log(f"[2/4] splitting {len(meta)} rows (stratified, seed {cfg.data.seed}) and removing "
        "exact duplicates")
    rows, duplicates = _decide(meta, cfg, class_names)
    decisions = {r.id: (r.split, r.status, r.detail) for r in rows.itertuples()
                 if r.status in (OK, DUPLICATE)}
    # Not materialised: each write below re-applies these cheap lookups to `validated` rather
    # than holding a second copy of every image in the object store.
    tagged = validated.map_batches(apply_decisions, fn_kwargs={"decisions": decisions},
                                   batch_size=None, batch_format="numpy")

    log(f"[3/4] writing splits and quarantine to {out}")
    for split in SPLITS:
        tagged.filter(expr=f"split == '{split}'").select_columns(SPLIT_COLUMNS).write_parquet(
            storage.join(out, split))
    _write_quarantine(tagged, rows, out)

    log("[4/4] computing statistics and the quality report")
    moments = tagged.filter(expr=f"status == '{OK}'").map_batches(
        split_moments, batch_size=None, batch_format="numpy").to_pandas()
    examples = tagged.filter(expr="split == 'train'").select_columns(["image", "label"])
    sample = examples.take_batch(int(min(4096, (rows["split"] == "train").sum())),
                                 batch_format="numpy")
    storage.write_bytes(storage.join(out, "samples.png"), sample_grid_png(
        sample["image"], sample["label"], class_names))
    manifest = _finish(cfg, source, name, fp, out, rows, class_names, spec, moments, duplicates)
    return PreparedDataset(out, manifest)


def _finish(cfg, source, name, fp, out, rows, class_names, spec, moments, duplicates) -> dict:
    """Write the report, config and (last) the manifest; check the row accounting."""
    pixels = pixel_statistics(moments)
    train = pixels["train"]
    preprocessing = Preprocessor(spec.image_size, spec.channels, train["mean"], train["std"],
                                 class_names).to_dict()
    split_counts = {s: int((rows["split"] == s).sum()) for s in SPLITS}
    counts: dict[str, Any] = {"input": int(len(rows)), "kept": sum(split_counts.values()),
                              "quarantined": int((rows["status"] != OK).sum()),
                              "splits": split_counts}
    if counts["input"] != counts["kept"] + counts["quarantined"]:
        raise WorkError(f"row accounting does not add up: {counts}")
    shape = [spec.image_size, spec.image_size, spec.channels]
    quality = build_quality(rows, class_names, pixels, duplicates, shape)
    manifest = {
        "name": name, "fingerprint": fp, "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": cfg.data.source, "source_identity": _short_identity(source.identity()),
        "counts": counts, "class_names": class_names,
        "quarantine_by_reason": quality["quarantine"]["by_reason"],
        "warnings": quality["warnings"],
        "duplicates": duplicates,
        "schema": {"id": "string", "source": "string", "label": "int64", "hash": "string",
                   "image": {"dtype": "uint8", "shape": shape, "layout": "HWC"}},
        "splits": {s: storage.join(out, s) for s in SPLITS},
        "preprocessing": preprocessing, "config": cfg.to_dict(),
    }
    storage.write_json(storage.join(out, "quality.json"), quality)
    storage.write_text(storage.join(out, "quality.md"), render_markdown(manifest, quality))
    storage.write_text(storage.join(out, "config.yaml"), dump_yaml(cfg))
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    return manifest


def _short_identity(identity: dict) -> dict:
    """The source identity without per-file lists (those only feed the fingerprint)."""
    short = {k: v for k, v in identity.items() if k != "files"}
    if "files" in identity:
        short["file_count"] = len(identity["files"])
    return short
