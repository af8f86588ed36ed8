"""docs/tasks.md's forecasting task as its end-to-end tests use it: the module the page's code
makes, written outside mlsd_ray, and the data and requests those tests send."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np


def forecast_task_code() -> str:
    """docs/tasks.md's forecasting task: the Python blocks of its section, in order, joined as
    one module (the page says so)."""
    text = (Path(__file__).parents[2] / "docs" / "tasks.md").read_text()
    section = text.split("## A task of a new kind")[1].split("\n## ")[0]
    return "\n\n".join(re.findall(r"```python\n(.*?)```", section, re.S))


def forecast_package(tmp_path) -> dict:
    """The doc's task written as a module outside mlsd_ray; the environment that finds it."""
    site = tmp_path / "site"
    site.mkdir()
    code = forecast_task_code()
    assert len(code.rstrip("\n").splitlines()) <= 250  # the page's promise: a task is a page
    (site / "forecast_task.py").write_text(code)
    return {"PYTHONPATH": str(site)}


def series_csv(path, points: int, bad_at: int) -> None:
    """A seasonal series as a `value` column, with one value that is not a number."""
    values = [f"{10 + 3 * np.sin(2 * np.pi * t / 24):.4f}" for t in range(points)]
    values[bad_at] = "oops"
    path.write_text("value\n" + "\n".join(values) + "\n")


def post(url: str, body: dict) -> tuple[int, dict]:
    import requests

    response = requests.post(url, json=body, timeout=60)
    return response.status_code, response.json()
