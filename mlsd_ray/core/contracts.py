"""The records one stage writes and another reads back, with a version.

A prepared dataset's manifest.json, a checkpoint's metadata.json and reference.json, and a
search's summary.json each carry `format_version` (the layout of the record) and `written_by`
(the mlsd-ray version that wrote it). A reader accepts its own version and older ones (a record
from before versions counts as 0); a newer one stops with exit 2 and names both versions, rather
than failing later on a key that moved.

`CheckpointMetadata` is the typed form of metadata.json, which every task writes the same way:
the run, the dataset it trained on, and the resolved config (as plain data: its class is the
task's, found from `config["task"]` by `mlsd_ray.tasks`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlsd_ray import __version__
from mlsd_ray.core import storage
from mlsd_ray.core.errors import InputError

__all__ = ["CHECKPOINT_METADATA", "CheckpointMetadata", "DatasetRef", "DRIFT_REFERENCE",
           "MANIFEST", "RecordFormat", "TUNE_SUMMARY"]


@dataclass(frozen=True)
class RecordFormat:
    """One kind of record and the newest `version` of its layout that this code reads and
    writes."""

    kind: str
    version: int

    def stamp(self, record: dict[str, Any]) -> dict[str, Any]:
        """`record` with this format's version and the mlsd-ray version that writes it."""
        return {**record, "format_version": self.version, "written_by": __version__}

    def check(self, record: dict[str, Any], where: str) -> dict[str, Any]:
        """`record` if this code can read it; InputError (exit 2) when it is of a newer format,
        naming both versions and what wrote it."""
        found = record.get("format_version", 0)
        if not isinstance(found, int) or isinstance(found, bool) or found < 0:
            raise InputError(f"{where}: format_version {found!r} is not a version number")
        if found > self.version:
            raise InputError(
                f"{where} is a {self.kind} of format_version {found}, written by mlsd-ray "
                f"{record.get('written_by', '(unknown)')}; this mlsd-ray ({__version__}) reads "
                f"up to format_version {self.version}: upgrade mlsd-ray to read it")
        return record

    def read(self, path: str) -> dict[str, Any]:
        """The JSON record at `path` (a local path or a URI), checked."""
        return self.check(storage.read_json(path), path)


MANIFEST = RecordFormat("dataset manifest", 1)
CHECKPOINT_METADATA = RecordFormat("checkpoint", 1)
DRIFT_REFERENCE = RecordFormat("drift reference", 1)
TUNE_SUMMARY = RecordFormat("search summary", 1)


@dataclass(frozen=True)
class DatasetRef:
    """The prepared dataset a model was trained on: where, its name, its fingerprint."""

    path: str
    name: str
    fingerprint: str


@dataclass(frozen=True)
class CheckpointMetadata:
    """metadata.json of a checkpoint: the run that wrote it, its dataset, its config."""

    run_name: str
    dataset: DatasetRef
    config: dict[str, Any]

    @property
    def task(self) -> str | None:
        """The task the config names (None: a config from before tasks had names)."""
        return self.config.get("task")

    def to_dict(self) -> dict[str, Any]:
        """metadata.json as written, stamped with its format."""
        return CHECKPOINT_METADATA.stamp({
            "run_name": self.run_name, "config": self.config,
            "dataset": {"path": self.dataset.path, "name": self.dataset.name,
                        "fingerprint": self.dataset.fingerprint}})

    @classmethod
    def from_dict(cls, record: dict[str, Any], where: str) -> CheckpointMetadata:
        """The record read from `where`; InputError for a newer format or a missing key."""
        CHECKPOINT_METADATA.check(record, where)
        try:
            dataset = record["dataset"]
            return cls(run_name=record["run_name"], config=record["config"],
                       dataset=DatasetRef(dataset["path"], dataset.get("name", ""),
                                          dataset.get("fingerprint", "")))
        except (KeyError, TypeError) as exc:
            raise InputError(f"{where} is not a checkpoint's metadata (missing {exc})") from None

    @classmethod
    def read(cls, directory: str | Path) -> CheckpointMetadata:
        """The metadata of the checkpoint in `directory` (a local folder or a URI)."""
        path = storage.join(str(directory), "metadata.json")
        if not storage.exists(path):
            raise InputError(f"no checkpoint at {directory} (metadata.json missing)")
        try:
            record = storage.read_json(path)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(record, path)
