"""The image task's part of a search (tuning/): K-fold cross-validation folds, and its best
trial registered."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.tasks.image.train import TrainResult


def register_best_trial(run, best: dict, best_cfg, workspace: Workspace, log) -> TrainResult:
    """Register the best trial's checkpoint (its accuracy on test scored here); with CV,
    first refit the best configuration on the whole train split."""
    from mlsd_ray.tasks.image.checkpoint import load_model
    from mlsd_ray.tasks.image.train import (
        TrainResult,
        log_and_register,
        predict_split,
        run_train,
    )
    from mlsd_ray.training.checkpoint import load_train_state

    name = best_cfg.registry.model_name or f"{run.dataset.manifest['name']}-cnn"
    if run.cfg.tune.cv > 1:
        log("refitting the best configuration on the full train split")
        result = run_train(best_cfg, workspace=workspace, log=log, run_name=f"{run.name}-refit")
    else:
        path = best["checkpoint"]
        loaded = load_model(path)
        history = load_train_state(path)["history"]
        metrics = next(h for h in history if h["epoch"] == best["best_epoch"])
        result = TrainResult(run_name=f"{run.name}-trial-{best['trial']}", run_path=run.path,
                             checkpoint=path, best_epoch=best["best_epoch"],
                             epochs_run=best["epochs_run"], dataset=run.dataset.path,
                             metrics=metrics,
                             test_accuracy=predict_split(loaded, run.dataset, "test").accuracy)
    result.registered = log_and_register(result, best_cfg, run.dataset, name, workspace,
                                         nested=True)
    log(f"registered {result.registered.uri} ({result.test_line()})")
    return result


def cv_folds(dataset, k: int, seed: int, rows_per_block: int) -> list[dict]:
    """K stratified folds of train+val as materialised Ray Datasets (test stays untouched)."""
    import pandas as pd

    from mlsd_ray.stages.train import fold_indices
    from mlsd_ray.tasks.image.data.sources import blocks_from_columns

    image_parts, label_parts = zip(*(dataset.load_split(s) for s in ("train", "val")),
                                   strict=True)
    images, labels = np.concatenate(image_parts), np.concatenate(label_parts)
    folds = fold_indices(pd.DataFrame(index=range(len(labels))), None, k, seed, labels)
    return [{name: blocks_from_columns({"image": images[index], "label": labels[index]},
                                       rows_per_block).materialize()
             for name, index in (("train", train_index), ("val", val_index))}
            for train_index, val_index in folds]
