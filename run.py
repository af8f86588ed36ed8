#!/usr/bin/env python3
"""Set up the project's virtual environment when needed, then run one task in it.

    python3 run.py pipeline [ARGS]   `mlsd pipeline` on the embedded digits data
    python3 run.py test [--all] [ARGS]   the test suite (pytest ARGS); --all adds the slow tests
    python3 run.py setup             only create/refresh .venv
    python3 run.py lint              ruff, mypy and the layers (tests/unit/test_lint.py)
    python3 run.py bench [NAME] [ARGS]   bench/NAME.py (default data_throughput), e.g. serve_load

Needs nothing but Python >= 3.10 (with its venv module). `.venv/` is created on first use and
reinstalled whenever pyproject.toml changes; the first install downloads PyTorch (about 5 GB),
with uv where pip can install it (else with pip).
"""

from __future__ import annotations

import ast
import contextlib
import csv
import hashlib
import os
import re
import subprocess
import sys
import threading
import venv
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".mlsd-installed"
TASKS = {
    "pipeline": lambda args: [str(BIN / "mlsd"), "pipeline", *args],
    "test": lambda args: [str(BIN / "python"), "-m", "pytest", *test_selection(args)],
    "lint": lambda args: [str(BIN / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "tests/unit/test_lint.py", *args],
    "bench": lambda args: [str(BIN / "python"), *bench_script(args)],
    "setup": None,
}


def test_selection(args: list[str]) -> list[str]:
    """`test --all` adds the tests marked slow, which the default run (pyproject's addopts)
    leaves out; CI runs them all. They start servers from Debian packages, which main()
    installs first (system_packages_for)."""
    chosen = [*parallel(args), *(a for a in args if a != "--all")]
    if "--all" not in args:
        return chosen
    return ["-m", "slow or not slow", *chosen]


def parallel(args: list[str]) -> list[str]:
    """Test files spread over pytest processes, one more than the cores, up to 4
    (pytest-xdist; each has its own Ray). Most of a test is one process starting or importing
    at a time, or a wait (a replica killed every 10 s, a GCS down for 20 s): one pytest keeps
    2 cores about half busy, two 85 % (docs/performance.md), and a third fills the waits.
    ARGS that say otherwise (-n, -p no:xdist, or --pdb, which needs one process) win."""
    if any(a.startswith(("-n", "--numprocesses", "--pdb")) or a == "no:xdist" for a in args):
        return []
    cores = os.cpu_count() or 1
    workers = min(4, cores + 1) if cores > 1 else 1
    return ["-n", str(workers), "--dist", "loadfile"] if workers > 1 else []


# Programs the slow tests start, and the Debian package of each.
SYSTEM_PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus",
                   "chromium": "chromium", "chromedriver": "chromium-driver",
                   "redis-server": "redis-server",
                   "pg_ctlcluster": "postgresql"}  # the server itself: /usr/lib/postgresql/*


def system_packages_for(argv: list[str]) -> threading.Thread | None:
    """For `test --all`: ensure_system_packages, started beside the virtual environment's
    install, which keeps one core busy (pip installs one file at a time) while apt-get mostly
    waits on downloads and the disk. On a fresh machine this takes apt-get's time off CI's."""
    if argv[:1] != ["test"] or "--all" not in argv[1:]:
        return None
    installing = threading.Thread(target=ensure_system_packages, name="apt-get")
    installing.start()
    return installing


def ensure_system_packages() -> None:
    """Install the Debian packages of SYSTEM_PACKAGES that are missing (apt-get, as root or
    through sudo); where that is not possible, say what to install and go on: the tests that
    need them fail naming the package."""
    import shutil

    missing = sorted({package for program, package in SYSTEM_PACKAGES.items()
                      if shutil.which(program) is None})
    if not missing:
        return
    apt = shutil.which("apt-get")
    sudo = [] if apt is None or os.geteuid() == 0 else ["sudo", "-n"]
    if apt is None or (sudo and shutil.which("sudo") is None):
        print(f"the slow tests need {', '.join(missing)}: install them (Debian/Ubuntu: "
              f"apt-get install {' '.join(missing)})", file=sys.stderr, flush=True)
        return
    print(f"installing {', '.join(missing)} (apt-get) for the slow tests", file=sys.stderr,
          flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "env": {**os.environ,
                                                    "DEBIAN_FRONTEND": "noninteractive"}}
    subprocess.run([*sudo, apt, "update", "-qq"], check=False, **quiet)
    installed = subprocess.run([*sudo, apt, "install", "-y", "-qq", "--no-install-recommends",
                                *missing], check=False, **quiet)
    if installed.returncode != 0:
        print(f"could not install {', '.join(missing)}; the tests that need them will fail",
              file=sys.stderr, flush=True)


def bench_script(args: list[str]) -> list[str]:
    """`bench NAME ARGS` -> bench/NAME.py ARGS; without a known NAME, the data benchmark."""
    if args and (ROOT / "bench" / f"{args[0]}.py").is_file():
        return [f"bench/{args[0]}.py", *args[1:]]
    return ["bench/data_throughput.py", *args]


def requirements_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()


def ensure_environment() -> None:
    """Create .venv and install the project with its dev extra, unless already current."""
    if STAMP.exists() and STAMP.read_text() == requirements_digest():
        return
    if not (BIN / "python").exists():
        print(f"creating {VENV} ...", file=sys.stderr, flush=True)
        try:
            venv.create(VENV, with_pip=True)
        except Exception as exc:  # Debian/Ubuntu ship venv's pip support separately
            sys.exit(f"could not create {VENV}: {exc}\n"
                     "On Debian/Ubuntu: apt-get install python3-venv, then run this again.")
    print("installing mlsd-ray and its dependencies (the first time downloads about 5 GB)",
          file=sys.stderr, flush=True)
    if not uv_install():
        pip = [str(BIN / "python"), "-m", "pip"]
        subprocess.run([*pip, "install", "--quiet", "--upgrade", "pip"], check=True, cwd=ROOT)
        with CompileWhileInstalling():
            pip_install([*pip, "install", "--no-compile", "-e", ".[dev]"])
    compile_bytecode()
    STAMP.write_text(requirements_digest())


UV_LOG = VENV / "uv-install.log"

# pip's settings (`pip config list`: its config files and PIP_* variables) that uv takes as
# options, so that uv installs what pip would, from where pip would. Any other setting that
# changes what pip installs (no-binary, require-hashes, a proxy, ...) leaves the install to pip.
UV_OPTION_OF_PIP = {"index-url": "--index-url", "extra-index-url": "--extra-index-url",
                    "find-links": "--find-links", "constraint": "--constraint",
                    "trusted-host": "--allow-insecure-host"}
PIP_ONLY_SETTINGS = {"default-timeout", "timeout", "retries", "disable-pip-version-check",
                     "no-cache-dir", "cache-dir", "quiet", "verbose", "progress-bar",
                     "no-input", "root-user-action", "no-warn-script-location",
                     "require-virtualenv", "no-color"}  # how pip runs, not what it installs
# the sections that `pip install` reads, the weakest first
PIP_SECTIONS = {"global": 0, "install": 1, ":env:": 2}


class UvSettings(NamedTuple):
    options: list[str]
    env: dict[str, str]  # added to uv's environment: a certificate bundle pip was given


def uv_settings(pip_config: str) -> UvSettings | None:
    """uv's settings for those in `pip config list` output, or None when one of them has no
    uv equivalent (then pip installs). Of the sections, the ones `pip install` reads count,
    and as in pip a PIP_* variable (":env:") wins over the install section, which wins over
    the global one."""
    chosen: dict[str, tuple[int, str]] = {}
    for line in pip_config.splitlines():
        name, _, quoted = line.partition("=")
        section, _, key = name.rpartition(".")
        rank = PIP_SECTIONS.get(section)
        if rank is None or key in PIP_ONLY_SETTINGS:
            continue
        if key != "cert" and key not in UV_OPTION_OF_PIP:
            return None
        try:
            value = str(ast.literal_eval(quoted))  # pip prints each value as a Python repr
        except (ValueError, SyntaxError):
            return None
        if key not in chosen or rank > chosen[key][0]:
            chosen[key] = rank, value
    settings = UvSettings([], {})
    for key, (_, value) in chosen.items():
        if key == "cert":
            settings.env["SSL_CERT_FILE"] = value
        else:
            for item in value.split():
                settings.options.extend([UV_OPTION_OF_PIP[key], item])
    return settings


def uv_install() -> bool:
    """Install with uv, which downloads and unpacks packages in parallel: a new `.venv` took
    47 s instead of 75 s with pip (docs/performance.md, the set-up). False when uv cannot be
    had, pip's configuration has a setting uv cannot follow, or uv fails; pip then installs,
    as before."""
    found = uv_and_its_settings()
    if found is None:
        return False
    uv, settings = found
    # unsafe-best-match: the highest version on any index, as pip chooses (uv's default takes
    # the first index that has the package at all)
    return run_uv([str(uv), "pip", "install", "--python", str(BIN / "python"), "--no-progress",
                   "--index-strategy", "unsafe-best-match", *settings.options, "-e", ".[dev]"],
                  settings.env)


def uv_and_its_settings() -> tuple[Path, UvSettings] | None:
    """uv, which pip installs into `.venv`, and the settings that make it install from where
    pip would; None, said on the console, when either cannot be had."""
    python = str(BIN / "python")
    uv = BIN / ("uv.exe" if os.name == "nt" else "uv")
    got = subprocess.run([python, "-m", "pip", "install", "--quiet", "uv"], cwd=ROOT,
                         capture_output=True)
    if got.returncode != 0 or not uv.exists():
        print("  pip could not install uv: pip installs", file=sys.stderr, flush=True)
        return None
    pip_config = subprocess.run([python, "-m", "pip", "config", "list"], cwd=ROOT,
                                capture_output=True, text=True)
    settings = uv_settings(pip_config.stdout) if pip_config.returncode == 0 else None
    if settings is None:
        print("  pip's configuration has a setting uv has no option for: pip installs",
              file=sys.stderr, flush=True)
        return None
    return uv, settings


def run_uv(command: list[str], env: dict[str, str]) -> bool:
    """Run uv with its output in UV_LOG and each phase's line on the console as the phase
    ends (run_logged); on failure, uv's last 20 lines."""
    def phase_ended(line: str) -> None:
        if line.startswith("Resolved "):
            print(f"  {line.strip()}; downloading what uv's cache does not hold",
                  file=sys.stderr, flush=True)
        elif line.startswith(("Prepared ", "Installed ")):
            print(f"  {line.strip()}", file=sys.stderr, flush=True)

    if run_logged(command, UV_LOG, phase_ended, env) != 0:
        tail = UV_LOG.read_text().splitlines()[-20:]
        print("\n".join(["  uv failed, so pip installs. uv's last lines:", *tail]),
              file=sys.stderr, flush=True)
        return False
    print(f"  installed (uv's log: {UV_LOG})", file=sys.stderr, flush=True)
    return True


PIP_LOG = VENV / "pip-install.log"


def pip_install(command: list[str]) -> None:
    """Run pip with its log in PIP_LOG and one line of progress on the console instead of its
    several hundred (rewritten in place on a terminal; a line per 50 packages otherwise). On
    failure, the log's last 40 lines are printed and CalledProcessError raised."""
    interactive = sys.stderr.isatty()

    def status(text: str, keep: bool) -> None:
        """On a terminal, `text` replaces the line (and stays when `keep`); else only a kept
        line is printed."""
        if interactive:
            print(f"\r{text}\033[K", end="\n" if keep else "", file=sys.stderr, flush=True)
        elif keep:
            print(text, file=sys.stderr, flush=True)

    collected = 0

    def progress(line: str) -> None:
        nonlocal collected
        if line.startswith("Collecting "):
            collected += 1
            status(f"  resolving: {collected} packages ({line.split()[1]})",
                   keep=not interactive and collected % 50 == 0)
        elif line.startswith("Installing collected packages"):
            status(f"  installing {collected} packages (torch is the largest)", keep=True)

    returncode = run_logged(command, PIP_LOG, progress)
    if returncode != 0:
        tail = PIP_LOG.read_text().splitlines()[-40:]
        print("\n".join(["", *tail, f"(the whole log: {PIP_LOG})"]), file=sys.stderr, flush=True)
        raise subprocess.CalledProcessError(returncode, command)
    print(f"  installed (pip's log: {PIP_LOG})", file=sys.stderr, flush=True)


def run_logged(command: list[str], log_path: Path, on_line: Callable[[str], None],
               env: dict[str, str] | None = None) -> int:
    """Run an installer with all its output in `log_path`, each line also handed to
    `on_line` (which shows progress); its exit code. `env` is added to this environment."""
    with open(log_path, "w") as log, subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})}) as process:
        for line in process.stdout or ():
            log.write(line)
            on_line(line)
    return process.returncode


# Not compiled: the packages' own test suites (pandas/tests, sympy/*/tests, ...: 4,000 of
# 21,000 files) and Ray's RLlib and LLM libraries (831 files): none is imported here. A path
# relative to site-packages, so a checkout under a folder named test/ compiles too.
NOT_COMPILED = r"ray[\\/](rllib|llm)[\\/]|.+[\\/]tests?[\\/]"
COMPILE = ("import compileall, re, sysconfig; lib = sysconfig.get_paths()['purelib']; "
           "compileall.compile_dir(lib, quiet=2, workers=0, "
           rf"rx=re.compile(re.escape(lib) + r'[\\/](?:{NOT_COMPILED})'))")
# Compiles each file named on its stdin; compileall skips a file whose .pyc is current.
COMPILE_NAMED = ("import compileall, sys\n"
                 "for line in sys.stdin: compileall.compile_file(line.rstrip('\\n'), quiet=2)")


def compile_bytecode() -> None:
    """Write the .pyc files pip would, in parallel, for what CompileWhileInstalling has not
    done yet. pip compiles one file at a time, half of the install; skipping it is no
    answer: where PYTHONDONTWRITEBYTECODE is set (CI sets it), every process would compile
    each module it imports, every time (the test suite took 23 min instead of 12.5). Files
    that do not compile (Python 2 leftovers in some wheels) are skipped, as pip skips them."""
    print("compiling the installed modules to bytecode", file=sys.stderr, flush=True)
    subprocess.run([str(BIN / "python"), "-c", COMPILE], check=False, cwd=ROOT)


class CompileWhileInstalling:
    """Compiles each package pip has finished installing while pip installs the next ones.
    pip installs on one core, one package after another, and writes a package's RECORD (the
    list of its files) last; a process at low priority compiles the files each new RECORD
    names, on the core pip leaves idle. When pip is done, it is stopped, and
    compile_bytecode compiles the rest on every core (docs/performance.md, set-up)."""

    def __init__(self, python: Path = BIN / "python", site_packages: Path | None = None) -> None:
        self.python = python
        self.site_packages = site_packages or Path(subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True).stdout.strip())
        self.seen = set(self.site_packages.glob("*.dist-info"))  # there before pip: not ours
        self.skipped = re.compile(NOT_COMPILED)
        self.done = threading.Event()
        self.compiler: subprocess.Popen | None = None
        self.watcher = threading.Thread(target=self._watch, name="compile-while-installing")

    def __enter__(self) -> CompileWhileInstalling:
        low_priority = (lambda: os.nice(10)) if hasattr(os, "nice") else None
        self.compiler = subprocess.Popen([str(self.python), "-c", COMPILE_NAMED],
                                         stdin=subprocess.PIPE, text=True, cwd=ROOT,
                                         preexec_fn=low_priority)
        self.watcher.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.done.set()
        assert self.compiler is not None
        # first: the watcher may be blocked writing to the compiler's full pipe. A .pyc is
        # written whole or not at all (py_compile), so a kill leaves none half-written.
        self.compiler.kill()
        self.compiler.wait()
        self.watcher.join()
        with contextlib.suppress(OSError):  # what is still buffered has nowhere to go
            self.compiler.stdin.close()  # type: ignore[union-attr]

    def _watch(self) -> None:
        while not self.done.wait(0.5):
            for dist_info in sorted(set(self.site_packages.glob("*.dist-info")) - self.seen):
                if not (dist_info / "RECORD").exists():
                    continue  # still being installed
                self.seen.add(dist_info)
                if not self._send(self._modules(dist_info / "RECORD")):
                    return

    def _modules(self, record: Path) -> list[str]:
        """The .py files a package's RECORD lists, as absolute paths, less NOT_COMPILED."""
        with open(record, newline="") as rows:
            paths = [row[0] for row in csv.reader(rows) if row]
        return [str(self.site_packages / path) for path in paths
                if path.endswith(".py") and not path.startswith("..")
                and not self.skipped.match(path)]

    def _send(self, paths: list[str]) -> bool:
        assert self.compiler is not None and self.compiler.stdin is not None
        try:
            self.compiler.stdin.write("".join(f"{path}\n" for path in paths))
            self.compiler.stdin.flush()
        except OSError:  # a broken pipe: the compiler died, and compile_bytecode does it all
            return False
        return True


# The project's own code, compiled like the installed modules above. Where
# PYTHONDONTWRITEBYTECODE is set, Python writes no .pyc for it either, and every process
# compiles each of our modules it imports: 0.13 CPU-seconds in each of the ~200 processes of
# a test run that import about 50 of them (replicas, workers, `mlsd` commands). compileall
# skips what is current, and a .pyc older than its source is never used.
PROJECT_CODE = ("mlsd_ray", "tests", "jobs", "bench")


def compile_project() -> None:
    subprocess.run([str(BIN / "python"), "-m", "compileall", "-q", "-j", "0", *PROJECT_CODE],
                   check=False, cwd=ROOT, stdout=subprocess.DEVNULL)


def main(argv: list[str]) -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 (run.py must run on any python3 to say so)
        sys.exit(f"mlsd-ray needs Python >= 3.10; this is {sys.version.split()[0]}")
    if not argv or argv[0] not in TASKS:
        sys.exit(__doc__)
    packages = system_packages_for(argv)
    try:
        ensure_environment()
    except subprocess.CalledProcessError as exc:
        sys.exit(f"set-up failed: {' '.join(exc.cmd)} exited with {exc.returncode}")
    finally:
        if packages:
            packages.join()
    command = TASKS[argv[0]]
    if command is None:
        return
    compile_project()
    os.chdir(ROOT)
    args = command(argv[1:])
    os.execv(args[0], args)  # hand over: exit code and signals are the task's own


if __name__ == "__main__":
    main(sys.argv[1:])
