"""The data stage of a parts task: source -> checked rows -> splits -> the codec fitted on train.

Output, under `$MLSD_HOME/datasets/<name>/<fingerprint>/`:

    train.parquet val.parquet test.parquet   the kept rows, in the task's columns
    quarantine.parquet                       rejected rows with their `reason`
    quality.md                               the counts and the reasons
    manifest.json                            columns, counts, the codec's fitted state; last

The task's `DataPart.problems` runs over the rows in Ray Data (`map_batches`, in parallel)
when there are more than `MLSD_IN_PROCESS_ROWS`, else in this process; a row without a target
is quarantined too. With `DataPart.order` the split follows time (train the earliest rows,
test the latest); without it, it is drawn at random with the section's seed.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.contracts import MANIFEST
from mlsd_ray.core.errors import InputError
from mlsd_ray.core.split import SPLITS
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.stages.parts import Parts, RowsSection
from mlsd_ray.tasks.base import PreparedFolder

__all__ = ["in_blocks", "ParquetSplits", "PreparedRows", "RowsSummary", "prepare_rows", "read_rows",
           "read_table", "write_rows"]

ROWS_PREFIX = "rows:"  # a source already in the task's columns (simulate-traffic --save)


@dataclass(frozen=True)
class RowsSummary:
    """What `mlsd data` prepared: where, the counts per split, the quarantined rows by reason,
    the input columns, and the quality report."""

    path: str
    name: str
    fingerprint: str
    reused: bool
    rows: int
    splits: dict[str, int]
    quarantined: dict[str, int]
    columns: list[dict[str, Any]]
    quality_report: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        quarantined = sum(self.quarantined.values())
        return "\n".join([
            f"{self.name}: {self.rows} rows -> {self.splits}, {quarantined} quarantined"
            + (f" {self.quarantined}" if quarantined else ""),
            f"prepared: {self.path}" + (" (reused)" if self.reused else ""),
            f"quality report: {self.quality_report}"])


@dataclass
class ParquetSplits(PreparedFolder):
    """Prepared data whose splits are rows in one parquet file each (<split>.parquet)."""

    def split_path(self, split: str) -> str:
        return storage.join(self.path, f"{split}.parquet")

    def load_split(self, split: str) -> pd.DataFrame:
        return pd.read_parquet(self.split_path(split))


@dataclass
class PreparedRows(ParquetSplits):
    """Rows prepared earlier, and their manifest (the codec's fitted state under "codec")."""

    @classmethod
    def open(cls, path: str) -> PreparedRows:
        return cls.read(path, f"no prepared rows at {path} (manifest.json missing)")

    @property
    def codec_state(self) -> dict[str, Any]:
        return self.manifest["codec"]

    def summary(self) -> RowsSummary:
        m = self.manifest
        return RowsSummary(self.path, m["name"], m["fingerprint"], self.reused, m["rows"],
                           m["splits"], m["quarantined"], m["columns"],
                           storage.join(self.path, "quality.md"))


def read_table(spec: str) -> pd.DataFrame:
    """A csv:PATH or parquet:PATH source as a frame; InputError for another form or a file
    that does not read."""
    kind, _, path = spec.partition(":")
    if kind not in ("csv", "parquet") or not path:
        raise InputError(f"source {spec!r}: expected csv:PATH or parquet:PATH")
    if not storage.exists(path):
        raise InputError(f"source {spec!r}: no file at {path}")
    try:
        data = io.BytesIO(storage.read_bytes(path))
        return pd.read_csv(data) if kind == "csv" else pd.read_parquet(data)
    except Exception as exc:  # pandas and pyarrow raise many kinds for a bad file
        raise InputError(f"source {spec!r} does not read as {kind}: {exc}") from None


def read_rows(parts: Parts, section: RowsSection, need_target: bool = True) -> pd.DataFrame:
    """The rows of `section.source` (rows:PATH: as saved; else the DataPart reads them), with
    every column the task needs; InputError naming the missing ones (without `need_target`,
    a missing target column is a column of nulls: rows to predict)."""
    source = section.source
    if source.startswith(ROWS_PREFIX):
        frame = read_table("parquet:" + source[len(ROWS_PREFIX):])
    else:
        frame = parts.data.read(source, section)
    if not need_target and parts.data.target not in frame:
        frame = frame.assign(**{parts.data.target: None})
    needed = [*parts.data.inputs, parts.data.target, *filter(None, [parts.data.order])]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise InputError(f"source {source!r} has no column {', '.join(map(repr, missing))} "
                         f"(it has {list(frame.columns)})")
    return frame[needed].reset_index(drop=True)


def write_rows(path: str, frame: pd.DataFrame) -> None:
    """Rows as parquet at `path` (a rows:PATH source reads them back)."""
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    storage.write_bytes(path, buffer.getvalue())


def problems(parts: Parts, section: RowsSection, frame: pd.DataFrame,
             workspace: Workspace, need_target: bool = True) -> pd.Series:
    """Why each row is unusable ("" if it is): the task's check, and (`need_target`: for
    training) a missing target."""
    from mlsd_ray.core.runtime import needs_ray, ray_work

    if needs_ray(len(frame)):
        import ray.data

        with ray_work(workspace):
            checked = ray.data.from_pandas(in_blocks(frame.assign(_row=np.arange(len(frame))))) \
                .map_batches(functools.partial(_check_batch, parts=parts, section=section),
                             batch_format="pandas").to_pandas()
        reasons = checked.set_index("_row")["reason"].sort_index()
        reasons.index = frame.index
    else:
        reasons = _reasons(parts, section, frame)
    if not need_target:
        return reasons
    return reasons.where(frame[parts.data.target].notna(), "missing target")


def in_blocks(frame: pd.DataFrame, count: int = 8) -> list[pd.DataFrame]:
    """`frame` cut into `count` blocks, so that Ray Data spreads it over its workers (one
    frame is one block: one task or actor would do all the work)."""
    step = max(1, -(-len(frame) // count))
    return [frame.iloc[start:start + step] for start in range(0, len(frame), step)] or [frame]


def _reasons(parts: Parts, section: RowsSection, frame: pd.DataFrame) -> pd.Series:
    return parts.data.problems(frame, section).fillna("").astype(str)


def _check_batch(batch: pd.DataFrame, parts: Parts, section: RowsSection) -> pd.DataFrame:
    return pd.DataFrame({"_row": batch["_row"].to_numpy(),
                         "reason": _reasons(parts, section, batch.drop(columns="_row"))
                         .to_numpy()})


def fingerprint(frame: pd.DataFrame, section: RowsSection,
                codec_state: dict[str, Any] | None = None) -> str:
    """Of the rows, the section and a given codec state: the same reuse the prepared folder."""
    digest = hashlib.sha256(frame.to_json(orient="split").encode())
    digest.update(section.model_dump_json().encode())
    digest.update(json.dumps(codec_state, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def assign_splits(frame: pd.DataFrame, order: str | None, section: RowsSection) -> np.ndarray:
    """train/val/test per row: by time when `order` is set (test the latest), else at random."""
    count = len(frame)
    n_test, n_val = round(count * section.test_fraction), round(count * section.val_fraction)
    ranks = (np.argsort(np.argsort(frame[order].to_numpy(), kind="stable"), kind="stable")
             if order else np.random.default_rng(section.seed).permutation(count))
    return np.where(ranks >= count - n_test, "test",
                    np.where(ranks >= count - n_test - n_val, "val", "train"))


def dataset_name(source: str) -> str:
    """A prepared dataset's name from its source: a file's stem, else the source's kind
    (`seasonal:4000` -> seasonal)."""
    kind, _, rest = source.partition(":")
    return PurePosixPath(rest).stem if rest and ("/" in rest or "." in rest) else kind


def prepare_rows(name: str, parts: Parts, section: RowsSection, workspace: Workspace,
                 log: Callable[[str], None], force: bool = False,
                 codec_state: dict[str, Any] | None = None) -> PreparedRows:
    """`mlsd data` for a parts task: read, check, split, fit the codec (or take
    `codec_state`: a retrain's new rows keep the champion's); reuse when unchanged."""
    frame = read_rows(parts, section)
    if frame.empty:
        raise InputError(f"source {section.source!r} has no rows")
    fp = fingerprint(frame, section, codec_state)
    out = workspace.dataset(name, fp)
    if not force and storage.exists(storage.join(out, "manifest.json")):
        log(f"reusing the prepared rows {out}")
        return PreparedRows.open(out)
    log(f"[1/3] checking {len(frame)} rows of {section.source}")
    reasons = problems(parts, section, frame, workspace)
    bad = reasons != ""
    kept = frame[~bad].reset_index(drop=True)
    if len(kept) < 3:
        raise InputError(f"source {section.source!r}: {len(kept)} usable rows of {len(frame)} "
                         f"(quarantined: {reasons[bad].value_counts().to_dict()})")
    log("[2/3] splitting " + (f"by {parts.data.order}" if parts.data.order else "at random"))
    assignment = assign_splits(kept, parts.data.order, section)
    splits = {s: kept[assignment == s].reset_index(drop=True) for s in SPLITS}
    log("[3/3] fitting the codec on the train split")
    manifest = {"name": name, "fingerprint": fp, "source": section.source,
                "rows": len(frame), "columns": column_specs(kept, parts.data.inputs),
                "target": parts.data.target,
                "splits": {s: len(f) for s, f in splits.items()},
                "quarantined": {str(k): int(v) for k, v in reasons[bad].value_counts().items()},
                "codec": parts.codec.fit(splits["train"]) if codec_state is None
                else codec_state}
    for split, rows in splits.items():
        write_rows(storage.join(out, f"{split}.parquet"), rows)
    write_rows(storage.join(out, "quarantine.parquet"),
               frame[bad].assign(reason=reasons[bad]).reset_index(drop=True))
    storage.write_text(storage.join(out, "quality.md"), quality_markdown(manifest))
    storage.write_json(storage.join(out, "manifest.json"), MANIFEST.stamp(manifest))
    prepared = PreparedRows(out, manifest)
    log(f"prepared {len(kept)} rows ({len(frame) - len(kept)} quarantined) -> {out}")
    return prepared


def column_specs(rows: pd.DataFrame, inputs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Each input column's kind (number, vector with its length, or text): what a request
    carries, and the Open Inference Protocol's tensors."""
    specs = []
    for name in inputs:
        first = rows[name].iloc[0]
        if isinstance(first, (list, tuple, np.ndarray)):
            specs.append({"name": name, "kind": "vector", "length": len(first)})
        elif pd.api.types.is_numeric_dtype(rows[name]):
            specs.append({"name": name, "kind": "number"})
        else:
            specs.append({"name": name, "kind": "text"})
    return specs


def quality_markdown(manifest: dict[str, Any]) -> str:
    """quality.md: rows kept per split, and the quarantined ones by reason."""
    lines = [f"# {manifest['name']}", "", f"Source: `{manifest['source']}`, "
             f"{manifest['rows']} rows.", "", "| split | rows |", "|---|---|"]
    lines += [f"| {split} | {count} |" for split, count in manifest["splits"].items()]
    lines += ["", "## Quarantined", ""]
    lines += ([f"- {reason}: {count}" for reason, count in manifest["quarantined"].items()]
              or ["none"])
    return "\n".join(lines) + "\n"
