"""run.py's set-up: uv installs from where pip would; with pip, the bytecode of each package pip
has finished is written while pip goes on."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_run_py():
    spec = importlib.util.spec_from_file_location("mlsd_run_py", ROOT / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def install(site: Path, package: str, files: dict[str, str]) -> None:
    """What pip leaves: the files, then the package's RECORD, written last."""
    for name, text in files.items():
        (site / name).parent.mkdir(parents=True, exist_ok=True)
        (site / name).write_text(text)
    info = site / f"{package}-1.0.dist-info"
    info.mkdir()
    (info / "RECORD").write_text("".join(f"{name},,\n" for name in files))


def test_a_finished_package_is_compiled_while_the_install_goes_on(tmp_path):
    run = load_run_py()
    site = tmp_path / "site-packages"
    site.mkdir()
    (site / "half-1.0.dist-info").mkdir()  # still being installed: no RECORD yet
    with run.CompileWhileInstalling(Path(sys.executable), site):
        install(site, "pkg", {"pkg/__init__.py": "X = 1\n", "pkg/core.py": "Y = 2\n",
                              "pkg/tests/test_core.py": "Z = 3\n", "ray/rllib/algo.py": "",
                              "pkg/data.txt": "not python\n"})
        compiled = [site / "pkg" / "__pycache__" / f"{name}.{sys.implementation.cache_tag}.pyc"
                    for name in ("__init__", "core")]
        deadline = time.monotonic() + 30
        while not all(path.exists() for path in compiled) and time.monotonic() < deadline:
            time.sleep(0.1)
    assert all(path.exists() for path in compiled), list(site.rglob("*.pyc"))
    # the packages' own tests and Ray's RLlib are left out, as compile_bytecode leaves them
    assert sorted(path.name.split(".")[0] for path in site.rglob("*.pyc")) == ["__init__", "core"]


@pytest.mark.timeout(60)  # a set-up that waited for it would hang here
def test_leaving_does_not_wait_for_a_stuck_compiler(tmp_path, monkeypatch):
    """When pip is done, the compiler is stopped where it is (compile_bytecode does the rest
    on every core), even while the watcher waits to hand it more paths than its pipe holds."""
    run = load_run_py()
    monkeypatch.setattr(run, "COMPILE_NAMED",  # takes one path, then never another
                        "import sys, time\nsys.stdin.readline()\ntime.sleep(600)")
    site = tmp_path / "site-packages"
    site.mkdir()
    info = site / "big-1.0.dist-info"
    with run.CompileWhileInstalling(Path(sys.executable), site) as compiling:
        info.mkdir()  # 4,000 paths of 80 characters: 320 KB, five times what a pipe holds
        (info / "RECORD").write_text("".join(f"big/{i:05d}/{'x' * 70}.py,,\n"
                                             for i in range(4000)))
        deadline = time.monotonic() + 30
        while info not in compiling.seen and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1)  # the watcher is blocked writing into the full pipe
        leaving = time.monotonic()
    assert info in compiling.seen
    assert time.monotonic() - leaving < 10


def test_uv_installs_from_where_pip_would_and_leaves_what_it_cannot_honour_to_pip():
    """`pip config list` -> uv's options: the indexes, links and constraints pip installs
    from, a PIP_* variable winning over the config files as in pip; a setting that changes
    what pip installs and has no uv option (no-binary here) leaves the install to pip."""
    run = load_run_py()
    config = "\n".join([
        ":env:.find-links='/opt/wheels'",
        ":env:.default-timeout='180'",
        "global.cert='/etc/ssl/certs/ca-certificates.crt'",
        "global.constraint='/etc/pip/constraints.txt'",
        "global.extra-index-url='file:///opt/a/simple file:///opt/b/simple'",
        "global.find-links='/srv/old-wheels'",
        "global.index-url='https://mirror.example/simple'",
        "freeze.exclude='pip'",  # not read by `pip install`
    ])
    settings = run.uv_settings(config)
    assert settings.options == [
        "--find-links", "/opt/wheels",
        "--constraint", "/etc/pip/constraints.txt",
        "--extra-index-url", "file:///opt/a/simple", "--extra-index-url", "file:///opt/b/simple",
        "--index-url", "https://mirror.example/simple"]
    assert settings.env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt"}
    assert run.uv_settings("") == run.UvSettings([], {})
    assert run.uv_settings(config + "\nglobal.no-binary=':all:'") is None
    assert run.uv_settings("install.require-hashes='true'") is None
    assert run.uv_settings("global.index-url=not a repr") is None  # not as pip prints it
