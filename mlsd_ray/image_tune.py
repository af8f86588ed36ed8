"""The image task's part of a search (tune_report.py): its best trial registered."""

from __future__ import annotations


def register_best_trial(run, best: dict, best_cfg, home: str | None, log) -> dict:
    """Register the best trial's checkpoint (its accuracy on test scored here); with CV,
    first refit the best configuration on the whole train split."""
    from mlsd_ray.checkpoint import load_model, load_train_state
    from mlsd_ray.registry import log_and_register
    from mlsd_ray.train import TrainResult, predict_split, run_train

    name = best_cfg.registry.model_name or f"{run.dataset.manifest['name']}-cnn"
    if run.cfg.tune.cv > 1:
        log("refitting the best configuration on the full train split")
        result = run_train(best_cfg, home=home, log=log, run_name=f"{run.name}-refit")
    else:
        path = best["checkpoint"]
        loaded = load_model(path)
        history = load_train_state(path)["history"]
        metrics = next(h for h in history if h["epoch"] == best["best_epoch"])
        result = TrainResult(f"{run.name}-trial-{best['trial']}", run.path, path,
                             best["best_epoch"], best["epochs_run"], metrics,
                             predict_split(loaded, run.dataset, "test").accuracy, 0.0,
                             run.dataset.path)
    registered = log_and_register(result, best_cfg, run.dataset, name, home, nested=True)
    log(f"registered {registered['uri']} (test accuracy {result.test_accuracy:.4f})")
    return {"registered": registered, "test_accuracy": result.test_accuracy}
