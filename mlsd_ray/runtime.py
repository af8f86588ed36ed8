"""Connecting to Ray once per process: a local instance on a laptop, `RAY_ADDRESS` on a cluster."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

_settings = {"quiet": False}


def log_stderr(message: str) -> None:
    """The stages' default progress log: a line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def configure(quiet: bool = False) -> None:
    """Set how the next `ensure_ray` starts Ray. `quiet` keeps worker output off stdout (--json)."""
    _settings["quiet"] = quiet


def ensure_ray(home: str | None = None) -> None:
    """Start or join Ray unless this process already did; on a cluster that spans machines,
    check that `home` (MLSD_HOME) and the MLflow store are shared (cluster.py), else exit 2.

    The dashboard is on because Tune's early stopping, Ray jobs and `serve deploy` need it
    (DESIGN.md §5). Ray Data's per-dataset INFO logs are lowered to warnings: our stages print
    their own steps, and the progress bars stay on.
    """
    import ray

    _quiet_ray_data_console()
    _tune_data_context()
    if not ray.is_initialized():
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address=_address(), include_dashboard=True,
                 log_to_driver=not _settings["quiet"], logging_level=logging.WARNING)
    from mlsd_ray.cluster import check_shared_storage

    check_shared_storage(home)


def recorded_cluster_file() -> str:
    """The file where `ray start` records the local cluster's address (/tmp/ray/...)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def _address() -> str | None:
    """RAY_ADDRESS; else None: join the cluster `ray start` recorded on this machine, or start
    one. A record whose head is gone (killed, machine rebooted) would make ray.init wait for it
    forever, so then a new local instance starts ("local") with a note."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        recorded = Path(recorded_cluster_file()).read_text().strip()
    except OSError:
        return None
    host, _, port = recorded.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        log_stderr(f"note: {recorded_cluster_file()} names a Ray cluster at {recorded} that is "
                   "gone; starting a new local one")
        return "local"
    return None


def _tune_data_context() -> None:
    """Let one Ray Data operator use every CPU.

    With operator resource reservation on (the default), a 2-CPU machine ran our fused
    read-validate-transform operator with about 1.3 tasks at a time; with it off, 1.8
    (measured with bench/data_throughput.py: 20,000 PNGs took 5.1 s -> 3.1 s).
    """
    from ray.data import DataContext

    context = DataContext.get_current()
    context.op_resource_reservation_enabled = False
    context.enable_progress_bar_name_truncation = False  # else a warning per fused operator


def _quiet_ray_data_console() -> None:
    """Ray Data logs every dataset's plan at INFO on the console; keep those in its log file."""
    import ray.data  # noqa: F401  (importing it installs Ray Data's handlers)
    from ray._private.log import PlainRayHandler

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _ExpectedWarningsFilter) for f in handler.filters):
                handler.addFilter(_ExpectedWarningsFilter())


class _ExpectedWarningsFilter(logging.Filter):
    """Drop two Ray Data warnings that are wrong or expected for us.

    "No available CPUs, the job will hang": Ray Data checks free CPUs when a dataset starts;
    right after the previous dataset's tasks end, their CPUs can still read as taken, so the
    warning fires although nothing will hang (the data stage holds no actors).
    "Progress bars disabled": we turn them off on purpose for datasets read before training.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return ("does not have any available CPUs" not in message
                and "Progress bars disabled" not in message)


def set_progress_bars(enabled: bool) -> None:
    """Ray Data progress bars on stderr: on for people, off for tests and logs."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = enabled
