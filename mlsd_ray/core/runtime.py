"""Connecting to Ray once per process: a local instance on a laptop, `RAY_ADDRESS` on a cluster."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace

__all__ = ["configure", "ensure_ray", "environment", "in_process_rows", "IN_PROCESS_ROWS",
           "IN_PROCESS_ROWS_ENV", "log_stderr",
           "native_lines_off_console", "needs_ray", "ray_is_up", "ray_work",
           "quiet_serve_console", "quiet_token_notice", "ray_logs_dir", "RayEchoFilter",
           "reachable", "recorded_cluster_file", "set_progress_bars", "ship_to_cluster",
           "start_local_ray", "unpackaged_code",
           "told_its_address", "tune_ray_daemons"]

_settings = {"quiet": False, "verbose": False}


def log_stderr(message: str) -> None:
    """The stages' default progress log: a line on stderr (stdout stays for results)."""
    print(message, file=sys.stderr, flush=True)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set how the next `ensure_ray` starts Ray.

    By default the console shows our own lines only: the output of Ray's workers (Ray Data's
    execution plans, Serve's access logs, Train's worker logs) stays in Ray's log files, and
    MLflow draws no download bars. `verbose` prints all of it; `quiet` (--json) wins over it.
    """
    _settings["quiet"], _settings["verbose"] = quiet, verbose
    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


# Ray's driver echoes errors its processes report on stdout, as "(raylet) ..." (in colour):
# for example "Task ServeController.graceful_shutdown failed" each time Serve shuts down.
_RAY_ECHO = re.compile(r"^(\x1b\[[0-9;]*m)?\((raylet|pid=\d+)[^)]*\)")


class RayEchoFilter:
    """A command's stdout while it works, without --verbose: our lines pass; the lines Ray's
    driver echoes from its processes are dropped, because Ray's log files, which the output
    names, hold them already (the driver's core log records the failed task)."""

    def __init__(self, target: TextIO):
        self.target, self.pending = target, ""

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if not _RAY_ECHO.match(line):
                self.target.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        if self.pending and not _RAY_ECHO.match(self.pending):
            self.target.write(self.pending)
        self.pending = ""
        self.target.flush()

    def __getattr__(self, name: str):  # isatty, encoding, fileno: the real stream's
        return getattr(self.target, name)


# A line Ray's C++ core writes itself:
# "[2026-11-30 03:41:43,346 E 32216 32216] core_worker.cc:2465: ..."
_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWEF] \d+ \d+\] \S+:\d+: ")


# Offline work on at most this many inputs runs in the calling process: starting Ray costs
# more (about 20 s on 2 cores with the first import of Ray Data) than predicting them here.
# MLSD_IN_PROCESS_ROWS changes it (0: always Ray).
IN_PROCESS_ROWS_ENV = "MLSD_IN_PROCESS_ROWS"
IN_PROCESS_ROWS = 5000


def in_process_rows() -> int:
    """The most inputs that offline work handles in this process (`IN_PROCESS_ROWS`)."""
    return int(os.environ.get(IN_PROCESS_ROWS_ENV, IN_PROCESS_ROWS))


def needs_ray(rows: int) -> bool:
    """Whether offline work on `rows` inputs is worth Ray: more than `in_process_rows`, or a
    Ray this process has joined already (`ray_is_up`)."""
    return rows > in_process_rows() or ray_is_up()


def ray_is_up() -> bool:
    """Whether this process has joined Ray already (its actors then cost little to start)."""
    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


@contextlib.contextmanager
def ray_work(workspace: Workspace) -> Iterator[None]:
    """Ray up (`ensure_ray`), then the work inside with Ray's own C++ lines about Ray Data's
    actor pools kept off the console (`native_lines_off_console`)."""
    ensure_ray(workspace)
    with native_lines_off_console():
        yield


@contextlib.contextmanager
def native_lines_off_console() -> Iterator[None]:
    """While inside, the lines Ray's C++ core writes straight to this process's stderr (file
    descriptor 2, past sys.stderr and RayEchoFilter) stay off the console; everything else on
    stderr passes. Ray Data's actor pools make one on every run: "core_worker.cc:2465: Actor
    with class name: 'MapWorker(...)' ... has constructor arguments in the object store and
    max_restarts > 0". The driver's core log in Ray's logs (named once) keeps them. With
    --verbose, stderr is left alone.

    Enter it once Ray runs, around work that starts no process of its own: a child would
    inherit the pipe as its stderr.
    """
    if _settings["verbose"]:
        yield
        return
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    console = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    relay = threading.Thread(target=_relay_all_but_native_lines, args=(read_end, console),
                             name="native-lines-filter", daemon=True)
    relay.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(console, 2)  # closes the pipe's only write end: the relay drains it and ends
        relay.join(timeout=5)
        if not relay.is_alive():
            os.close(console)


def _relay_all_but_native_lines(read_end: int, console: int) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not _NATIVE_LINE.match(line):
                    os.write(console, line + b"\n")
    if pending and not _NATIVE_LINE.match(pending):
        os.write(console, pending)


def ensure_ray(workspace: Workspace) -> None:
    """Start or join Ray unless this process already did; on a cluster that spans machines,
    check that the workspace (MLSD_HOME) and the MLflow store are shared (cluster.py), else exit 2.

    The dashboard is on because Tune's early stopping, Ray jobs and `serve deploy` need it
    (without it, trials stopped early by ASHA leak their Train reservations and the search
    hangs). Ray Data's per-dataset INFO logs are lowered to warnings: our stages print their
    own steps, and the progress bars stay on. Unless --verbose, Ray's processes log to its
    files only (`configure`).
    """
    import ray

    _quiet_ray_data_console()
    _tune_data_context()
    _tune_train_controller()
    tune_ray_daemons()
    if not ray.is_initialized():
        to_console = _settings["verbose"] and not _settings["quiet"]
        quiet_token_notice()
        options: dict[str, Any] = {"include_dashboard": True, "log_to_driver": to_console,
                                   "logging_level": logging.WARNING}
        address = _address()
        if address == "local":
            start_local_ray(**options)
        else:
            if _shipped:  # a cluster's workers do not see this machine's PYTHONPATH
                options["runtime_env"] = {"py_modules": sorted(_shipped)}
            ray.init(address=address, **options)
        if not to_console:
            log_stderr(f"Ray's logs: {ray_logs_dir()} (--verbose prints them here)")
    from mlsd_ray.core.cluster import check_shared_storage

    check_shared_storage(workspace)


_shipped: set[str] = set()


def unpackaged_code(module_name: str) -> str | None:
    """Where the code of `module_name`'s top package is, when no installed distribution holds
    it (a folder or a .py file on PYTHONPATH); None for an installed one, or mlsd_ray."""
    from importlib.metadata import packages_distributions

    top = module_name.partition(".")[0]
    if top == "mlsd_ray" or packages_distributions().get(top):
        return None
    module = sys.modules.get(top)
    root = Path(getattr(module, "__file__", None) or "")
    if not root.name:
        return None
    return str(root.parent if root.name == "__init__.py" else root)


def ship_to_cluster(path: str) -> None:
    """Send the code at `path` (a package folder or a .py file) with this process's Ray job
    when it joins a cluster (runtime_env py_modules), so that its workers, trials and replicas
    import it too. A Ray this process starts itself inherits PYTHONPATH instead."""
    _shipped.add(path)


def quiet_token_notice() -> None:
    """Ray 2.60 warns "Token authentication is enabled" whenever a driver connects: expected
    (its default), so on the console only with --verbose."""
    if not _settings["verbose"] or _settings["quiet"]:
        logging.getLogger("ray._private.authentication.authentication_token_setup"
                          ).setLevel(logging.ERROR)


def quiet_serve_console() -> None:
    """Serve's driver-side INFO lines ("Started Serve", "Application ... is ready", "Deleting
    app") go to Serve's log files unless --verbose. Call after importing ray.serve: its
    import sets the level."""
    if not _settings["verbose"]:
        logging.getLogger("ray.serve").setLevel(logging.WARNING)


def ray_logs_dir() -> str:
    """Where this Ray session keeps its processes' logs (on a cluster: on the head node)."""
    from ray._private import worker

    node = worker._global_node
    return node.get_logs_dir_path() if node is not None else "/tmp/ray/session_latest/logs"


def recorded_cluster_file() -> str:
    """The file where `ray start` records the local cluster's address (/tmp/ray/...)."""
    from ray._common.utils import get_ray_address_file

    return get_ray_address_file(None)


def _address() -> str | None:
    """RAY_ADDRESS; else None: ray.init joins the cluster `ray start` recorded on this
    machine; else "local": start one here. A record whose head is gone (killed, machine
    rebooted) would make ray.init wait for it forever, so then a new local instance starts,
    with a note."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:
        recorded = Path(recorded_cluster_file()).read_text().strip()
    except OSError:
        return "local"
    if not reachable(recorded):
        log_stderr(f"note: {recorded_cluster_file()} names a Ray cluster at {recorded} that is "
                   "gone; starting a new local one")
        return "local"
    return None


def start_local_ray(**init_options: Any) -> None:
    """`ray.init(address="local", **init_options)`: a new Ray instance on this machine, whose
    own processes are told its address.

    Asked from one of Ray's processes with no RAY_ADDRESS set, Ray's state API answers for
    the cluster that `ray start` last recorded on this machine, not for its own. Ray Train
    2.60 asks it every second, from a PlacementGroupCleaner beside each run, whether the
    run's controller lives. Once another head had started on the machine (`ray start`,
    `mlsd serve --detach`, a test's head), the answer was "no such actor", and the cleaner
    removed the live run's placement group: "Destroying worker since its placement group was
    removed" (docs/reliability.md). So the instance's GCS gets a port chosen here, and what it
    starts (its raylet, and through it every worker) inherits RAY_ADDRESS naming it. This
    process's own environment is put back: a command it runs still chooses its own Ray.
    """
    import ray

    with told_its_address():
        ray.init(address="local", **init_options)


@contextlib.contextmanager
def told_its_address() -> Iterator[int]:
    """For a Ray head started meanwhile in this process: the GCS port it is to take (yielded;
    RAY_GCS_SERVER_PORT, a user's own value kept), and RAY_ADDRESS naming it, which the
    processes it starts inherit (start_local_ray says why)."""
    import ray

    port = os.environ.get("RAY_GCS_SERVER_PORT") or str(free_port("0.0.0.0"))
    with environment(RAY_GCS_SERVER_PORT=port,
                     RAY_ADDRESS=f"{ray.util.get_node_ip_address()}:{port}"):
        yield int(port)


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """os.environ with `values` set, and afterwards as it was: for the processes started
    meanwhile, which inherit it."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def reachable(address: str, timeout: float = 2) -> bool:
    """Whether something accepts TCP connections at `address` (host:port)."""
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError):
        return False
    return True


def _tune_train_controller() -> None:
    """Ray Train settings read from the driver's environment (and passed on to the train
    controller) when a trainer starts; a user's own values win.

    The controller takes each worker's report off a queue of one every health-check interval
    (2 s by default) and a worker's next report waits for that, so no epoch could take less
    than 2 s: 61 % of a digits epoch was that wait (docs/performance.md). The preemption
    watcher only matters on spot instances, and polls.
    """
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def tune_ray_daemons() -> None:
    """Settings that Ray's own processes read from the environment of the process that
    starts them (ray.init of a new instance, `ray start`); a cluster sets them where it starts
    its head. A user's own values win.

    Serve's controller health-checks each HTTP proxy every 10 s by default and replaces one
    after 3 failed checks: a SIGKILLed proxy left the port dark for 27 s
    (docs/reliability.md). Every 2 s, a dead proxy is replaced in about 10 s; a check is one
    small call.

    Ray's log monitor lists its logs folder 10 times a second while the folder holds fewer
    than 1,000 files, which grow by 2 a worker: an idle local Ray spent 2.4 CPU-seconds a
    minute on it (docs/performance.md). Every 2 s it costs 0.9, and a new worker's first
    lines reach a --verbose console at most 2 s later; files it already follows are still
    read 10 times a second.
    """
    os.environ.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S", "2")
    os.environ.setdefault("RAY_LOG_MONITOR_MANY_FILES_THRESHOLD", "0")
    os.environ.setdefault("LOG_NAME_UPDATE_INTERVAL_S", "2")


def _tune_data_context() -> None:
    """Let one Ray Data operator use every CPU.

    With operator resource reservation on (the default), a 2-CPU machine ran our fused
    read-validate-transform operator with about 1.3 tasks at a time; with it off, 1.8
    (measured with bench/data_throughput.py: 20,000 PNGs took 5.1 s -> 3.1 s).

    Shuffles and aggregations sort-based, not through Ray 2.60's default hash-shuffle actors:
    those actors start for every aggregation (a scaler's fit, a column's statistics) and hold
    CPUs while they live. On 2 CPUs an aggregate of 300 rows took 4.0 s that way and 0.06 s
    sorted, and preparing a 300-row table (five fitted preprocessors) 44 s -> see
    docs/performance.md.

    Parquet read by Ray Data's first datasource: Ray 2.60's second one (its default) starts a
    pool of up to 32 actors to read the files' footers on every read_parquet. Three reads of
    a 4-file split took 9.6 s and 19.1 CPU-seconds that way, 3.3 s and 7.3 without it.
    """
    from ray.data import DataContext
    from ray.data.context import ShuffleStrategy

    context = DataContext.get_current()
    context.op_resource_reservation_enabled = False
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    context.enable_progress_bar_name_truncation = False  # else a warning per fused operator
    context.use_datasource_v2 = False


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
