"""Where outputs live: `MLSD_HOME` and path-or-URI file helpers built on pyarrow.fs.

Every location in mlsd-ray is a string that is either a local path or a URI (`s3://`, `gs://`,
`file://`, ...). These helpers hide the difference so that a stage never cares which it got.
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import pyarrow.fs as pafs

__all__ = ["DEFAULT_HOME", "delete_dir", "exists", "filesystem", "home", "is_dir", "is_uri",
           "join", "list_dirs", "list_files", "makedirs", "read_bytes", "read_json", "read_text",
           "write_bytes", "write_json", "write_text"]

DEFAULT_HOME = "./mlsd-home"


def is_uri(location: str) -> bool:
    """True for `scheme://...` locations (a Windows drive letter is not a scheme)."""
    head, sep, _ = location.partition("://")
    return bool(sep) and len(head) > 1


def home(override: str | None = None) -> str:
    """The root for everything the stages write: `override`, else `$MLSD_HOME`, else ./mlsd-home."""
    location = override or os.environ.get("MLSD_HOME") or DEFAULT_HOME
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    """Join path parts under a path or URI."""
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(base, *parts)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and the filesystem-relative path for a location."""
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(location)


def exists(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(location: str) -> None:
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)


def delete_dir(location: str) -> None:
    fs, path = filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def read_bytes(location: str) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(location: str, data: bytes) -> None:
    """Write `data` at `location` whole or not at all, for readers in other processes: `mlsd
    monitor` read a prediction-log file that a replica had created but not yet written (0
    bytes). On a local disk the bytes go to a partial file beside it, which is then renamed
    (atomic); an object store's upload appears whole by itself."""
    fs, path = filesystem(location)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        with fs.open_output_stream(path) as stream:
            stream.write(data)
        return
    partial = f"{path}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with fs.open_output_stream(partial) as stream:
            stream.write(data)
        fs.move(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def read_text(location: str) -> str:
    return read_bytes(location).decode("utf-8")


def write_text(location: str, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def read_json(location: str) -> Any:
    return json.loads(read_text(location))


def write_json(location: str, obj: Any) -> None:
    write_text(location, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def list_files(location: str) -> list[pafs.FileInfo]:
    """All files below a directory, recursively, sorted by path."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    return sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path)


def list_dirs(location: str) -> list[str]:
    """The names of the directories right under `location`, sorted."""
    fs, path = filesystem(location)
    infos = fs.get_file_info(pafs.FileSelector(path))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)
