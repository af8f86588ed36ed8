"""Shared fixtures: one Ray instance per test session, small generated data, a temp MLSD_HOME."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

# Files that mostly wait go to the pytest-xdist workers first, so that the other files keep
# the cores busy around them: a job on a Ray head of its own (the first `mlsd submit` job took
# 170-220 s beside two other pytest workers), the GCS down for 20 s. By xdist's own rule (the
# files with the most tests first) they came last, and the suite's last minutes ran on one
# worker. The chaos file (a minute of replica kills) too: at the start, beside every
# worker's set-up, Serve took 30-32 s to replace a killed replica (4-7 s later in the run),
# which its test reports and allows up to 90 s.
WAIT_FIRST = ("tests/e2e/test_ray_jobs.py", "tests/e2e/test_gcs_fault_tolerance.py",
              "tests/integration/test_chaos.py")

# Then the longest files first. Seconds each took on its pytest-xdist worker in a run of the
# whole suite (2026-12-06, 713 s in all), setup and teardown included. xdist hands a worker
# its next file when it has 2 tests left, so a long file handed out late ran at the end with
# the other workers done: ordered by test count, the export tests queued behind the two long
# fault tests and one worker ended 31 s after the others. Replayed with xdist's rule on that
# run's test times, this order ends the tests at 670 s instead of 693 s; on the times of the
# next run (in this order, 828 s), at 790 s instead of 893 s. A file not listed counts 10 s a
# test; re-measure with `--durations=0` when a file changes much. (2026-12-08: test_cli.py
# had grown to 950 s, one worker's whole run, and was split into test_cli.py,
# test_forecast_task.py, test_forecast_search.py and test_haproxy.py; their figures are
# estimates from that run's test times.)
FILE_SECONDS = {
    "tests/e2e/test_forecast_task.py": 330, "tests/e2e/test_cli.py": 280,
    "tests/integration/test_tabular.py": 259, "tests/integration/test_serve.py": 253,
    "tests/e2e/test_haproxy.py": 150, "tests/e2e/test_cli_faults.py": 144,
    "tests/integration/test_tune.py": 125, "tests/integration/test_train.py": 111,
    "tests/e2e/test_forecast_search.py": 110,
    "tests/integration/test_monitor.py": 99,
    "tests/e2e/test_multinode.py": 99, "tests/integration/test_mlflow_store.py": 52,
    "tests/integration/test_explain.py": 49, "tests/integration/test_prepare.py": 34,
    "tests/integration/test_registry.py": 24, "tests/integration/test_export.py": 24,
}


def pytest_configure(config):
    """xdist hands out files in the order pytest_collection_modifyitems leaves them."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    """WAIT_FIRST, then the longest files first (FILE_SECONDS), with the unit tests after every
    integration and end-to-end file, those with the most tests first: they take seconds, so
    they fill the workers' ends evenly, where a Tune file handed out last kept one worker busy
    41 s after the others. A file's tests stay together and in order (the sort is stable);
    every worker sorts alike."""
    root = Path(config.rootpath)
    file_of = {id(item): Path(item.path).relative_to(root).as_posix() for item in items}
    tests_in = Counter(file_of.values())

    def rank(item) -> tuple:
        file = file_of[id(item)]
        first = WAIT_FIRST.index(file) if file in WAIT_FIRST else len(WAIT_FIRST)
        unit = file.startswith("tests/unit/")
        seconds = tests_in[file] if unit else FILE_SECONDS.get(file, 10 * tests_in[file])
        return first, unit, -seconds, file

    items.sort(key=rank)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session (starting one costs ~5 s): 2 CPUs, dashboard on.

    A fresh instance even when another Ray runs on this machine (a user's `ray start`, a
    left-over head, another pytest worker's test head): joining that cluster would refuse
    num_cpus, and every test would error at set-up. Its processes know its address
    (runtime.start_local_ray): a head that another test starts meanwhile does not become the
    cluster its Train runs ask about.
    """
    import ray

    from mlsd_ray.core import runtime
    from mlsd_ray.core.workspace import Workspace

    runtime.tune_ray_daemons()  # read when Ray starts: before ray.init
    runtime.start_local_ray(num_cpus=2, include_dashboard=True, log_to_driver=False,
                            object_store_memory=512 * 1024**2, logging_level="WARNING")
    # applies our DataContext settings to the running instance
    runtime.ensure_ray(Workspace.at())
    runtime.set_progress_bars(False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def cluster_env(ray_session) -> dict:
    """The environment that makes an `mlsd` subprocess join the session's Ray, as a user's
    command joins a cluster, instead of starting one of its own."""
    return {"RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember whether a test's own code failed, for the fixtures' teardown."""
    outcome = yield
    if call.when == "call":
        item.call_failed = outcome.get_result().failed


@pytest.fixture(autouse=True)
def serve_removed_after_a_failed_command(request):
    """After a failed test whose `mlsd` commands joined the session's Ray, shut down whatever
    Serve they left running there: a passing test stops its apps itself, and one that failed
    half-way must not fail the tests after it on the CPUs and port its app still holds."""
    yield
    if "cluster_env" in request.fixturenames and getattr(request.node, "call_failed", False):
        from ray import serve

        serve.shutdown()


INTERRUPTED_LINES = 40  # of a command's stderr, when run_mlsd interrupts it


def run_mlsd(*args: str, env: dict | None = None,
             timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -m mlsd_ray.cli ARGS` as a user runs it, output captured; `env` is added to
    this process's environment.

    A command still running after `timeout` seconds is interrupted as a user's Ctrl-C would
    (SIGINT: its stages stop what they started), and the test fails with its last lines. Killed
    outright, a pipeline left its Serve app on the session's Ray, holding CPUs and port 8000,
    and the worker's next three tests failed on that, not on their own code."""
    command = [sys.executable, "-m", "mlsd_ray.cli", *args]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})}) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stderr = _interrupt(process)
            last = "\n".join(stderr.splitlines()[-INTERRUPTED_LINES:])
            pytest.fail(f"`mlsd {' '.join(args)}` ran past {timeout} s and was interrupted; "
                        f"its last {INTERRUPTED_LINES} lines of stderr:\n{last}",
                        pytrace=False)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _interrupt(process: subprocess.Popen, grace_s: float = 60) -> str:
    """SIGINT, then SIGKILL after `grace_s`; everything the process wrote to stderr."""
    process.send_signal(signal.SIGINT)
    try:
        return process.communicate(timeout=grace_s)[1]
    except subprocess.TimeoutExpired:
        process.kill()
        return process.communicate()[1]


@pytest.fixture
def home(tmp_path) -> str:
    """A test's MLSD_HOME, for the CLI's --home."""
    return str(tmp_path / "mlsd-home")


@pytest.fixture
def workspace(home):
    """The test's MLSD_HOME as the stages take it."""
    from mlsd_ray.core.workspace import Workspace

    return Workspace.at(home)


# Small digits (8×8) that still learn in a few epochs: for tests of the plumbing around a model,
# trained in the test's process (train.num_workers=0: no Ray Train start-up, about 10 s a fit);
# tests/integration/test_train.py trains with Ray Train's workers.
SMALL_DIGITS = ["data.image_size=8", "data.augment.random_shift=1", "train.num_workers=0",
                "train.lr=0.005", "train.max_failures=0"]


@dataclass
class TrainedDigits:
    """A model trained by the real training stage, its config, dataset and MLSD_HOME."""

    cfg: object  # mlsd_ray.core.config.Config
    result: object  # mlsd_ray.tasks.image.train.TrainResult
    dataset: object  # mlsd_ray.tasks.image.data.prepare.PreparedDataset
    home: str

    @property
    def workspace(self):
        from mlsd_ray.core.workspace import Workspace

        return Workspace.at(self.home)


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory, ray_session) -> TrainedDigits:
    """One small digits model (4 epochs, in the test's process), trained once per test run and
    shared by the serve, monitor, registry, chaos and fault tests, which only read its
    checkpoint and data (each registers it into an MLSD_HOME of its own). Under pytest-xdist
    the first worker to need it trains it into the run's shared temp folder, under a lock,
    and the others read what it saved there."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest process: nothing to share
        return train_digits(tmp_path_factory.mktemp("digits-model"))
    import fcntl
    import pickle

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, one per xdist worker
    saved = shared / "digits-model.pickle"
    with open(shared / "digits-model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not saved.exists():
            saved.write_bytes(pickle.dumps(train_digits(shared / "digits-model")))
        return pickle.loads(saved.read_bytes())


def train_digits(folder: Path) -> TrainedDigits:
    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.tasks import load_config
    from mlsd_ray.tasks.image.data.prepare import PreparedDataset
    from mlsd_ray.tasks.image.train import run_train

    home = str(folder / "mlsd-home")
    cfg = load_config(None, [*SMALL_DIGITS, "train.epochs=4"])
    result = run_train(cfg, workspace=Workspace.at(home), log=lambda _: None)
    return TrainedDigits(cfg, result, PreparedDataset.open(result.dataset), home)


@pytest.fixture
def digits_workspace(workspace, digits_model):
    """The test's MLSD_HOME holding the session's prepared 8×8 digits, so that a stage run on
    them (`data.image_size=8`, the default data settings otherwise) reuses that dataset as it
    reuses its own earlier output, instead of preparing digits again with Ray Data (about
    12 CPU-seconds each). tests/integration/test_prepare.py and the pipeline test prepare
    them for real."""
    import shutil

    prepared = Path(digits_model.dataset.path)
    relative = prepared.relative_to(digits_model.home)
    shutil.copytree(prepared, Path(workspace.root) / relative)
    return workspace


@pytest.fixture(scope="session")
def digits_registered(tmp_path_factory, digits_model) -> str:
    """An MLSD_HOME where the session's digits model is models:/digits-cnn/1 (the export and
    explain tests read it; neither changes it)."""
    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.tasks.image.train import log_and_register

    home = str(tmp_path_factory.mktemp("digits-registered") / "mlsd-home")
    log_and_register(digits_model.result, digits_model.cfg, digits_model.dataset, "digits-cnn",
                     Workspace.at(home))
    return home


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def make_image_folder(root: Path, per_class: int = 10, classes=("cat", "dog", "fox"),
                      size=(20, 24), seed: int = 0) -> Path:
    """PATH/<class>/<i>.png with random RGB images whose sizes vary a little."""
    rng = np.random.default_rng(seed)
    for name in classes:
        for i in range(per_class):
            shape = (size[0] + i % 3, size[1], 3)
            write_png(root / name / f"{name}{i:03d}.png",
                      rng.integers(0, 255, shape, dtype=np.uint8))
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_image_folder(tmp_path / "images")


def png_declaring(width: int, height: int) -> bytes:
    """A 2×2 PNG whose header claims width×height pixels (a decompression bomb's header)."""
    import io
    import struct
    import zlib

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((2, 2), dtype=np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def actor_processes(class_prefix: str) -> list:
    """The psutil processes of this session's live Ray actors whose class name starts with
    `class_prefix`: "ServeReplica:<app>:" for an app's replicas, "ServeController",
    "ProxyActor"."""
    import psutil
    import ray
    from ray.util.state import list_actors

    alive = list_actors(address=ray.get_runtime_context().gcs_address,
                        filters=[("state", "=", "ALIVE")], limit=1000)
    processes = []
    for actor in alive:
        if actor.class_name.startswith(class_prefix):
            try:
                processes.append(psutil.Process(actor.pid))
            except psutil.NoSuchProcess:  # killed, and the GCS has not heard yet
                continue
    return processes


def fuzz_openapi(url: str, report_dir: Path, seconds: int = 10) -> tuple[int, str]:
    """Schemathesis, every check, against `url`/openapi.json over real HTTP for about
    `seconds`: its exit code and console output (the summary is at the end). Its JUnit
    report goes to `report_dir`."""
    import subprocess
    import sys

    config = Path(__file__).with_name("schemathesis.toml")
    command = [str(Path(sys.executable).with_name("schemathesis")), "--config-file",
               str(config), "run",
               f"{url}/openapi.json", "--checks", "all", "--max-time", str(seconds),
               "--seed", "0", "--workers", "1", "--no-color", "--request-timeout", "30",
               "--generation-database", "none", "--report", "junit",
               "--report-dir", str(report_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 240,
                          cwd=report_dir)  # where it keeps its .schemathesis/ cache
    return done.returncode, done.stdout + done.stderr


def texts(values) -> list[str]:
    """A BYTES tensor as strings (Triton's client gives str from JSON, bytes from binary)."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]


def scrape_until(*needles: str, timeout_s: float = 60) -> str:
    """Every Ray node's Prometheus metrics, once they hold all `needles` (export is periodic),
    or as they are after `timeout_s`."""
    import time

    import requests

    from mlsd_ray.serve import control

    deadline, text = time.monotonic() + timeout_s, ""
    while True:
        text = "\n".join(requests.get(url, timeout=10).text
                         for url in control.metrics_endpoints())
        if all(needle in text for needle in needles) or time.monotonic() > deadline:
            return text
        time.sleep(2)


ARTIFACTS = Path(os.environ.get("MLSD_TEST_ARTIFACTS",
                                Path(__file__).resolve().parents[1] / "test-artifacts"))


@pytest.fixture
def browser():
    """Debian's chromium, headless, driven by Selenium through Debian's chromedriver (no
    driver download): the browser the pages to try a model are tested in."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    assert binary and driver_path, ("install Debian's chromium and chromium-driver packages "
                                    "(`python3 run.py test --all` does)")
    options = Options()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--window-size=1000,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def screenshot(driver, name: str) -> Path:
    """Keep what the browser shows as a test artefact (test-artifacts/, or
    $MLSD_TEST_ARTIFACTS)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    print(f"\nscreenshot: {path}")
    return path
