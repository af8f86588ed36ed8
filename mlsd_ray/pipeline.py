"""`mlsd pipeline`: every stage in order, each reading the previous stage's output by path.

data -> train (Ray Train) -> register (MLflow) -> evaluate on test -> promote the first version
to `production`. Tuning, serving and monitoring join as they land.
"""

from __future__ import annotations

from collections.abc import Callable

from mlsd_ray.config import Config
from mlsd_ray.data.prepare import prepare_dataset
from mlsd_ray.runtime import log_stderr


def run_pipeline(cfg: Config, home: str | None = None, force: bool = False,
                 log: Callable[[str], None] = log_stderr) -> dict:
    """Run the stages end to end; returns one summary per stage."""
    from mlsd_ray.evaluate import evaluate_checkpoint
    from mlsd_ray.registry import promote, show
    from mlsd_ray.train import train_and_register

    log("== stage 1/4: data ==")
    stages = {"data": prepare_dataset(cfg, home=home, force=force, log=log).summary()}
    log("== stage 2/4: train and register ==")
    stages["train"] = train_and_register(cfg, home=home, log=log)
    log("== stage 3/4: evaluate ==")
    stages["evaluate"] = evaluate_checkpoint(stages["train"]["checkpoint"], "test", home)
    registered = stages["train"].get("registered")
    if registered:
        log("== stage 4/4: promote ==")
        name = registered["name"]
        if not show(name, home)["aliases"] and registered["version"] == 1:
            stages["promote"] = promote(name, 1, "production", home)
            log(f"promoted {name} version 1 to production (the first version)")
        else:
            stages["promote"] = {"skipped": f"{name} already has versions; promote one with "
                                            "`mlsd models promote`"}
    return {"stages": stages}
