"""`mlsd pipeline`: every stage in order, each reading the previous stage's output by path.

For now the pipeline is the data stage; training, evaluation, registration and serving join it
as they land.
"""

from __future__ import annotations

from collections.abc import Callable

from mlsd_ray.config import Config
from mlsd_ray.data.prepare import prepare_dataset
from mlsd_ray.runtime import log_stderr


def run_pipeline(cfg: Config, home: str | None = None, force: bool = False,
                 log: Callable[[str], None] = log_stderr) -> dict:
    """Run the stages end to end; returns one summary per stage."""
    log("== stage: data ==")
    dataset = prepare_dataset(cfg, home=home, force=force, log=log)
    return {"stages": {"data": dataset.summary()}}
