"""The versioned records (core/contracts.py): what mlsd writes carries its format, and a record
of a newer format stops with a message that names both versions, as exit 2 on the CLI."""

import json
import subprocess
import sys

import pytest

from mlsd_ray import __version__
from mlsd_ray.core.contracts import (
    DRIFT_REFERENCE,
    MANIFEST,
    CheckpointMetadata,
    DatasetRef,
)
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks import task_of_checkpoint
from mlsd_ray.tasks.image.data.prepare import PreparedDataset
from mlsd_ray.tasks.tabular.prepare import PreparedTable


def write_metadata(folder, **changes):
    folder.mkdir(parents=True, exist_ok=True)
    record = CheckpointMetadata("run-1", DatasetRef("/data/d", "digits", "abc"),
                                {"task": "tabular"}).to_dict()
    (folder / "metadata.json").write_text(json.dumps({**record, **changes}))
    return folder


def test_checkpoint_metadata_round_trips_with_its_format(tmp_path):
    folder = write_metadata(tmp_path / "ckpt")
    written = json.loads((folder / "metadata.json").read_text())
    assert written["format_version"] == 1 and written["written_by"] == __version__
    metadata = CheckpointMetadata.read(folder)
    assert (metadata.run_name, metadata.dataset.fingerprint, metadata.task) == (
        "run-1", "abc", "tabular")
    assert task_of_checkpoint(str(folder)).name == "tabular"


def test_a_record_from_before_versions_is_read(tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "metadata.json").write_text(json.dumps(
        {"run_name": "r", "config": {"task": "image"}, "dataset": {"path": "/d"}}))
    assert CheckpointMetadata.read(folder).dataset.path == "/d"


def test_a_newer_checkpoint_names_both_versions(tmp_path):
    folder = write_metadata(tmp_path / "new", format_version=7, written_by="9.0.0")
    with pytest.raises(InputError) as error:
        task_of_checkpoint(str(folder))
    message = str(error.value)
    assert "format_version 7" in message and "mlsd-ray 9.0.0" in message
    assert f"this mlsd-ray ({__version__}) reads up to format_version 1" in message


@pytest.mark.parametrize("opener", [PreparedDataset.open, PreparedTable.open])
def test_a_newer_manifest_is_refused_when_opened(tmp_path, opener):
    (tmp_path / "manifest.json").write_text(json.dumps(
        MANIFEST.stamp({"name": "x"}) | {"format_version": 2, "written_by": "0.9.0"}))
    with pytest.raises(InputError, match=r"dataset manifest of format_version 2, written by "
                                         r"mlsd-ray 0\.9\.0"):
        opener(str(tmp_path))


@pytest.mark.parametrize("bad", ["2", -1, True])
def test_a_format_version_that_is_no_number_is_named(bad):
    with pytest.raises(InputError, match="is not a version number"):
        DRIFT_REFERENCE.check({"format_version": bad}, "reference.json")


def test_the_cli_exits_2_on_a_newer_checkpoint(tmp_path):
    folder = write_metadata(tmp_path / "new", format_version=3, written_by="2.0.0")
    done = subprocess.run([sys.executable, "-m", "mlsd_ray.cli", "evaluate", "--model",
                           str(folder), "--home", str(tmp_path / "home")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "format_version 3, written by mlsd-ray 2.0.0" in done.stderr
    assert "Traceback" not in done.stderr
