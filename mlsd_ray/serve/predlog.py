"""The prediction log: one row per served image, buffered and written as parquet files.

    $MLSD_HOME/predictions/date=YYYY-MM-DD/<time>-<replica>-<n>.parquet

A row holds the time, request id, model name and version, the summary features of the input
(monitor/features.py), the predicted class, its confidence and the request's latency. Logging
never blocks a request: `record` only appends to a bounded in-memory buffer (rows past the bound
are dropped and counted); a daemon thread writes the buffer once it holds `flush_rows` rows or
its oldest row waited `flush_seconds`; `close` writes what is left: Serve calls the replica's
`__del__` on shutdown, and a replica killed with SIGTERM runs it at exit. Only SIGKILL loses
rows: those of the last flush interval at most (docs/monitoring.md, "Prediction log").
"""

from __future__ import annotations

import atexit
import datetime as dt
import io
import threading
import time
from collections import deque

import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.config import PredictionLogConfig
from mlsd_ray.core.workspace import Workspace

__all__ = ["BASE_COLUMNS", "log_location", "parse_since", "PredictionLog", "read_log",
           "wait_for_rows"]

BASE_COLUMNS = ("time", "request_id", "model_name", "model_version", "predicted_class",
                "confidence", "latency_ms")


def log_location(settings: PredictionLogConfig, workspace: Workspace) -> str:
    """Where the log lives: the configured URI, else $MLSD_HOME/predictions."""
    return settings.uri or workspace.predictions


class PredictionLog:
    """Bounded buffer + background writer (see the module docstring)."""

    def __init__(self, location: str, settings: PredictionLogConfig, writer_id: str):
        self.location = location
        self.settings = settings
        self.writer_id = writer_id.replace("/", "_")
        self.rows: deque[dict] = deque()
        self.dropped = 0
        self.written = 0
        self.files = 0
        self.oldest: float | None = None
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.thread = threading.Thread(target=self._run, name="prediction-log", daemon=True)
        self.thread.start()
        # A replica that gets SIGTERM exits through SystemExit (Ray's worker handler), which
        # runs atexit: the buffered rows are written then too, not only on Serve's shutdown.
        atexit.register(self.close)

    def record(self, rows: list[dict]) -> None:
        """Queue rows for writing; O(rows), no I/O. Rows past the buffer bound are dropped."""
        with self.lock:
            room = self.settings.max_buffered_rows - len(self.rows)
            if room < len(rows):
                self.dropped += len(rows) - max(room, 0)
                rows = rows[:max(room, 0)]
            if rows and self.oldest is None:
                self.oldest = time.monotonic()
            self.rows.extend(rows)
            if len(self.rows) >= self.settings.flush_rows:
                self.wake.set()

    def _due(self) -> bool:
        return bool(self.rows) and (len(self.rows) >= self.settings.flush_rows or (
            time.monotonic() - (self.oldest or 0) >= self.settings.flush_seconds))

    def _run(self) -> None:
        while not self.closed:
            self.wake.wait(timeout=min(1.0, self.settings.flush_seconds))
            self.wake.clear()
            if self._due():
                self.flush()

    def flush(self) -> int:
        """Write the buffered rows as one parquet file now; returns how many were written."""
        with self.lock:
            rows, self.rows, self.oldest = list(self.rows), deque(), None
        if not rows:
            return 0
        frame = pd.DataFrame(rows)
        now = dt.datetime.now(dt.timezone.utc)
        name = f"{now:%H%M%S%f}-{self.writer_id}-{self.files:05d}.parquet"
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        storage.write_bytes(storage.join(self.location, f"date={now:%Y-%m-%d}", name),
                            buffer.getvalue())
        self.files += 1
        self.written += len(rows)
        return len(rows)

    def close(self) -> None:
        """Stop the writer thread and write what is left (again: a no-op)."""
        if self.closed and not self.rows:
            return
        self.closed = True
        self.wake.set()
        self.thread.join(timeout=10)
        self.flush()

    def stats(self) -> dict:
        return {"written": self.written, "buffered": len(self.rows), "dropped": self.dropped,
                "files": self.files, "location": self.location}


def parse_since(text: str) -> dt.timedelta:
    """'90s', '15m', '1h', '2d' -> a timedelta; ValueError naming the accepted forms."""
    units = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
    number, unit = text[:-1], text[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1
    if unit not in units or value <= 0:
        raise ValueError(f"time window {text!r}: use a number and a unit, e.g. 90s, 15m, 1h, 2d")
    return dt.timedelta(**{units[unit]: value})


def read_log(location: str, since: dt.datetime | None = None,
             until: dt.datetime | None = None) -> pd.DataFrame:
    """Rows logged in [since, until) (UTC), from every parquet file under `location`."""
    if not storage.exists(location):
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    fs, _ = storage.filesystem(location)
    frames = []
    for info in storage.list_files(location):
        if not info.path.endswith(".parquet") or not _day_in_window(info.path, since, until):
            continue
        with fs.open_input_file(info.path) as handle:
            frames.append(pd.read_parquet(handle))
    if not frames:
        return pd.DataFrame(columns=list(BASE_COLUMNS))
    frame = pd.concat(frames, ignore_index=True)
    frame["time"] = pd.to_datetime(frame["time"], utc=True)
    if since is not None:
        frame = frame[frame["time"] >= pd.Timestamp(since)]
    if until is not None:
        frame = frame[frame["time"] < pd.Timestamp(until)]
    return frame.sort_values("time").reset_index(drop=True)


def wait_for_rows(location: str, since: dt.datetime, expected: int, timeout_s: float,
                  poll_s: float = 0.25) -> int:
    """Wait until `expected` rows logged since `since` are readable (the replicas flush every
    `flush_seconds`), or `timeout_s` passed; returns the rows found."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = len(read_log(location, since))
        if found >= expected or time.monotonic() >= deadline:
            return found
        time.sleep(poll_s)


def _day_in_window(path: str, since: dt.datetime | None, until: dt.datetime | None) -> bool:
    """Skip whole date=YYYY-MM-DD partitions outside the window without reading them."""
    for part in path.split("/"):
        if part.startswith("date="):
            try:
                day = dt.date.fromisoformat(part[5:])
            except ValueError:
                return True
            if since is not None and day < since.date():
                return False
            if until is not None and day > until.date():
                return False
    return True
