"""The code stays within the project's ruff rules and type-checks with mypy (both configured in
pyproject.toml), on every CI run: a renamed field or a wrong type fails CI, not a user."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is part of the dev extra; install with pip install -e '.[dev]'")
    result = subprocess.run([ruff, "check", "mlsd_ray", "tests", "bench", "jobs", "run.py"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy_finds_no_type_errors():
    mypy = shutil.which("mypy") or str(Path(sys.executable).with_name("mypy"))
    if not Path(mypy).exists():
        pytest.fail("mypy is part of the dev extra; install with pip install -e '.[dev]'")
    result = subprocess.run([mypy], cwd=ROOT, capture_output=True, text=True)  # [tool.mypy]
    assert result.returncode == 0, result.stdout + result.stderr
