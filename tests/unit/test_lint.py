"""The code stays within the project's ruff rules, type-checks with mypy, and keeps its layers
(import-linter's contracts), all configured in pyproject.toml, on every CI run: a renamed
field, a wrong type or an import across the layers fails CI, not a user."""

import ast
import os
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


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`, with the contracts of its pyproject.toml."""
    linter = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    if not Path(linter).exists():
        pytest.fail("import-linter is part of the dev extra; install with pip install -e '.[dev]'")
    return subprocess.run([linter, "--no-cache", "--no-logo"], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(root)})


def test_the_layers_hold():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


@pytest.mark.parametrize("module, line, broken", [
    ("core/errors.py", "from mlsd_ray.serve import control", "layers"),
    ("cli/support.py", "    from mlsd_ray.tasks.image import ImageTask", "specific task"),
    ("tuning/space.py", "from mlsd_ray.tuning import search", "no import cycle"),
])
def test_an_import_across_the_layers_breaks_a_contract(tmp_path, module, line, broken):
    """The contracts bite: a copy of the package with one import that crosses them (inside a
    function too) fails, naming the contract."""
    shutil.copytree(ROOT / "mlsd_ray", tmp_path / "mlsd_ray",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    target = tmp_path / "mlsd_ray" / module
    body = f"def _crossing():\n{line if line.startswith(' ') else '    ' + line}\n"
    target.write_text(target.read_text() + "\n\n" + body)
    result = lint_imports(tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    broken_lines = [row for row in result.stdout.splitlines() if row.endswith("BROKEN")]
    assert len(broken_lines) == 1 and broken in broken_lines[0], result.stdout


def test_a_task_imports_only_public_names():
    """The built-in tasks import from the shared packages only names those modules declare in
    `__all__` (and never an underscored one): the shared packages' public faces."""
    import importlib

    crossings = []
    for task in ("image", "tabular"):
        for path in (ROOT / "mlsd_ray" / "tasks" / task).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if not (isinstance(node, ast.ImportFrom) and node.module
                        and node.module.startswith("mlsd_ray")
                        and not node.module.startswith(f"mlsd_ray.tasks.{task}")):
                    continue
                module = importlib.import_module(node.module)
                public = getattr(module, "__all__", None)
                for alias in node.names:
                    submodule = hasattr(module, "__path__") and importlib.util.find_spec(
                        f"{node.module}.{alias.name}") is not None
                    if submodule:
                        continue
                    if public is None or alias.name not in public:
                        crossings.append(f"{path.relative_to(ROOT)}: {node.module}.{alias.name}")
    assert not crossings, "names outside their module's __all__:\n" + "\n".join(crossings)
