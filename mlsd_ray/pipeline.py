"""`mlsd pipeline`: every stage in order, each reading the previous stage's output by path.

data -> [tune (Ray Tune), with --tune] -> train (Ray Train) -> register (MLflow) -> evaluate on
test -> promote the first version to `production`. Serving and monitoring join as they land.
"""

from __future__ import annotations

from collections.abc import Callable

from mlsd_ray.config import Config
from mlsd_ray.data.prepare import prepare_dataset
from mlsd_ray.runtime import log_stderr


def run_pipeline(cfg: Config, home: str | None = None, force: bool = False,
                 log: Callable[[str], None] = log_stderr, tune: bool = False) -> dict:
    """Run the stages end to end; returns one summary per stage.

    With `tune`, a search (cfg.tune) runs first and the final training uses its best
    parameters on top of `cfg` (so with the pipeline's own workers and epochs).
    """
    from mlsd_ray.evaluate import evaluate_checkpoint
    from mlsd_ray.registry import promote, show
    from mlsd_ray.train import train_and_register

    log("== stage 1/4: data ==")
    stages = {"data": prepare_dataset(cfg, home=home, force=force, log=log).summary()}
    if tune:
        from mlsd_ray.tune import run_tune, trial_config

        log("== stage 1b/4: tune ==")
        stages["tune"] = run_tune(cfg, home=home, log=log, register=False)
        cfg = trial_config(cfg, stages["tune"]["best"]["params"])
        log(f"training with the best parameters: {stages['tune']['best']['params']}")
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
