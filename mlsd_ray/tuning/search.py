"""Hyperparameter search with Ray Tune: grid or random search, ASHA/median early stopping, K-fold
cross-validation, resume.

Each trial is a small Tune function that builds the task's trainer (`Task.trainer`) with the
trial's overrides. A trial of one worker (`tune.workers_per_trial`, the default) runs the
trainer's loop in the trial's own process and reports each epoch and checkpoint to Tune
(training/host.py): it needs no Train controller and worker group, about 11 s less per trial
on 2 cores, and the next trial reuses that process (Tune's `reuse_actors`). A trial of
several workers fits the TorchTrainer and forwards every epoch's report through
`TuneReportCallback` (the Train V2 pattern: `Tuner(trainer)` fails in V2). The prepared
splits (or the folds) are read once here and shared by every trial.

Outputs under $MLSD_HOME/tune/NAME/: results.csv (one row per trial), curves.png (the task's
val metric per epoch of every trial), best.yaml (the best configuration, for `mlsd train
--config`), summary.json; Ray Tune's own experiment state (what `--resume` reads) sits beside them.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, dump_yaml
from mlsd_ray.core.errors import InputError, Interrupted
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.core.workspace import Workspace, fresh_name
from mlsd_ray.registry.tracking import LiveSearch
from mlsd_ray.tasks import get_task, stored_config
from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.tuning.report import TuneSummary, write_outputs
from mlsd_ray.tuning.space import (
    SearchPlan,
    describe,
    ray_space,
    trial_config,
    validate_space,
)

__all__ = ["run_trial", "run_tune", "search_plan", "TRIAL_DRIVER_CPU", "trial_resources",
           "TuneRun"]

# The Tune function itself only waits on its trainer; the CPUs go to the Train workers.
TRIAL_DRIVER_CPU = 0.05


def search_plan(cfg: Config) -> SearchPlan:
    """Trials, epochs per trial and the scheduler this configuration asks for."""
    t = cfg.tune
    scheduler = t.scheduler
    if scheduler == "auto":
        scheduler = "none" if t.cv > 1 else "asha"
    if t.cv > 1 and scheduler != "none":
        raise InputError(f"--cv {t.cv} reports once per configuration (the mean over folds); "
                         f"early stopping needs per-epoch reports: use --scheduler none")
    search, samples = t.search, t.num_samples or (1 if t.search == "grid" else 8)
    combinations = math.prod(len(v) if isinstance(v, list) else math.inf
                             for v in t.space.values())
    if search == "random" and combinations <= samples:
        # random draws from a few discrete values would repeat configurations: run each once
        search, samples = "grid", 1
    trials = samples * (combinations if search == "grid" else 1)
    task = get_task(cfg.task)
    if t.cv > 1 and not task.cross_validation:
        raise InputError(f"--cv is not offered by the {task.name} task: its search ranks "
                         f"trials by {task.metric} (leave tune.cv at 1)")
    return SearchPlan(search=search, scheduler=scheduler, num_samples=samples,
                      trials=int(trials), epochs=t.max_epochs or cfg.train.epochs,
                      metric=task.metric)


# ---------------------------------------------------------------- resources


def trial_resources(cfg: Config, trials: int) -> tuple[int, float]:
    """(trials at once, CPUs per Train worker): fill the cluster without oversubscribing it."""
    import ray

    total = ray.cluster_resources()
    workers = cfg.tune.workers_per_trial
    if cfg.train.use_gpu:
        fit = int(total.get("GPU", 0) // workers)
        if fit < 1:
            raise InputError(f"--use-gpu: a trial needs {workers} GPU(s); the Ray cluster has "
                             f"{total.get('GPU', 0):g}")
    else:
        fit = int(total.get("CPU", 0) // workers)
    concurrent = max(1, min(cfg.tune.max_concurrent or fit, trials))
    per_worker = (total.get("CPU", 0) / concurrent - TRIAL_DRIVER_CPU) / workers
    if per_worker < 0.25:
        raise InputError(f"{concurrent} trials at once × {workers} worker(s) leave "
                         f"{max(per_worker, 0):.2f} CPU per worker on a cluster with "
                         f"{total.get('CPU', 0):g} CPUs: lower --max-concurrent or "
                         "tune.workers_per_trial")
    return concurrent, round(per_worker, 3)


# ---------------------------------------------------------------- data for the trials


# ---------------------------------------------------------------- the trial


def run_trial(params: dict, *, base: dict, dataset, datasets: dict | None, folds: list | None,
              storage_path: str) -> None:
    """One Tune trial: the training stage's trainer with this trial's overrides.

    Without folds every epoch reaches Tune (so ASHA can stop the trial); with folds the trial
    trains fold after fold and reports the mean and spread of their best val scores once.
    A trial of one worker runs the loop in its own process (training/host.py), without a Train
    controller and worker group; several workers run as a Ray Train fit.
    """
    import ray.tune

    cfg = trial_config(stored_config(base), params)
    task = get_task(cfg.task)
    name = f"trial-{ray.tune.get_context().get_trial_id()}"
    if not folds:
        _fit(task, cfg, dataset, name, storage_path, datasets, to_tune=True)
        return
    scores, epochs = [], []
    for index, fold in enumerate(folds, start=1):
        history = _fit(task, cfg, dataset, f"{name}-fold{index}", storage_path, fold,
                       to_tune=False)
        best = max(history, key=lambda m: m[RANK_METRIC])
        scores.append(best[task.metric])
        epochs.append(int(history[-1]["epoch"]))
    mean = float(np.mean(scores))
    ray.tune.report({task.metric: mean, RANK_METRIC: mean, "cv_std": float(np.std(scores)),
                     "fold_scores": scores, "epoch": max(epochs)})


def _fit(task, cfg: Config, dataset, name: str, storage_path: str, datasets: dict | None,
         to_tune: bool) -> list[dict]:
    """Train once; every epoch reported to Tune (`to_tune`) or only returned (a fold)."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from mlsd_ray.training.host import TrialProcess, hosting

    callbacks = [TuneReportCallback()] if to_tune else []
    trainer = task.trainer(cfg, dataset, name, storage_path, datasets=datasets,
                           callbacks=callbacks)
    if cfg.train.num_workers <= 1:
        host = TrialProcess(datasets, cfg.train.use_gpu, round(cfg.train.cpus_per_worker),
                            to_tune)
        with hosting(host):
            trainer.train_loop_per_worker(trainer.train_loop_config)
        return host.reports
    result = trainer.fit()
    return [m for _, m in result.best_checkpoints] + [result.metrics]


def _progress(total: int, log: Callable[[str], None], metric: str):
    """A Tune callback printing a line per finished (or failed) trial."""
    from ray.tune import Callback

    class TrialProgress(Callback):
        def __init__(self):
            self.done = 0

        def on_trial_start(self, iteration, trials, trial, **info):
            log(f"trial started: {describe(trial.config)}")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            result = trial.last_result or {}
            log(f"trial {self.done}/{total} {describe(trial.config)}: "
                f"{int(result.get('epoch', 0))} epoch(s), "
                f"{metric} {result.get(metric, float('nan')):.4f}")

        def on_trial_error(self, iteration, trials, trial, **info):
            self.done += 1
            log(f"trial {self.done}/{total} {describe(trial.config)}: failed")

    return TrialProgress()


# ---------------------------------------------------------------- the search


@dataclass
class TuneRun:
    """Where a search lives and what it searches."""

    name: str
    path: str
    cfg: Config
    dataset: Any

    @property
    def train_runs(self) -> str:
        return storage.join(self.path, "train-runs")


def _scheduler(cfg: Config, plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule

    t = cfg.tune
    if plan.scheduler == "asha":
        return ASHAScheduler(time_attr="epoch", max_t=plan.epochs,
                             grace_period=min(t.grace_period, plan.epochs),
                             reduction_factor=t.reduction_factor)
    if plan.scheduler == "median":
        return MedianStoppingRule(time_attr="epoch", grace_period=t.grace_period,
                                  min_samples_required=3)
    return None


def _trainable(run: TuneRun, plan: SearchPlan, per_worker_cpu: float):
    """The Tune function with its fixed inputs bound, and its resource request."""
    from ray import tune

    base = run.cfg.model_copy(deep=True)
    base.train.epochs = plan.epochs
    base.train.num_workers = run.cfg.tune.workers_per_trial
    base.train.cpus_per_worker = per_worker_cpu
    base.train.run_name = None
    # A trial's trainer never restarts its own workers: Tune does (run_tune's FailureConfig).
    # ASHA stops a trial by ending its actor, which takes the Train controller down; a
    # controller that still saw its dying worker restarted the group in a new placement
    # group that nothing then removed, and its CPU was lost to every later trial.
    base.train.max_failures = 0
    folds = None
    datasets = None
    if run.cfg.tune.cv > 1:
        folds = get_task(run.cfg.task).cv_folds(run.cfg, run.dataset, run.cfg.tune.cv)
    else:
        datasets = get_task(run.cfg.task).search_datasets(run.dataset)
    function = tune.with_parameters(run_trial, base=base.to_dict(), dataset=run.dataset,
                                    datasets=datasets, folds=folds,
                                    storage_path=run.train_runs)
    resources = {"cpu": TRIAL_DRIVER_CPU}
    if base.train.num_workers <= 1:  # the trial's own process trains (run_trial)
        resources = {"cpu": TRIAL_DRIVER_CPU + per_worker_cpu,
                     **({"gpu": 1} if base.train.use_gpu else {})}
    return tune.with_resources(function, resources), base


def run_tune(cfg: Config, workspace: Workspace, log: Callable[[str], None] = log_stderr,
             name: str | None = None, resume: str | None = None,
             register: bool = True) -> TuneSummary:
    """`mlsd tune`: search, write the outputs, register the best trial's model."""
    from ray import tune
    from ray.tune.search import BasicVariantGenerator


    started = time.perf_counter()
    root = workspace.searches
    if resume:
        name, cfg = resume, _saved_config(storage.join(root, resume))
    cfg = cfg.model_copy(deep=True)
    task = get_task(cfg.task)
    cfg.tune.space = validate_space(cfg.tune.space, cfg.tune.search, cfg, task.searchable)
    plan = search_plan(cfg)
    dataset = task.prepare(cfg, workspace, log)
    register = register and task.registers_best_trial
    ensure_ray(workspace)
    name = name or fresh_name(f"{dataset.name}-tune")
    run = TuneRun(name, storage.join(root, name), cfg, dataset)
    concurrent, per_worker = trial_resources(cfg, plan.trials)
    trainable, base = _trainable(run, plan, per_worker)
    if plan.search != cfg.tune.search:
        log(f"the space has only {plan.trials} distinct configurations: trying each once")
    log(f"tuning {plan.trials} trial(s) ({plan.search} search, scheduler "
        f"{plan.scheduler}, {plan.epochs} epochs max, {concurrent} at a time, "
        f"{cfg.tune.workers_per_trial} worker(s) × {per_worker:g} CPU each"
        + (f", {cfg.tune.cv}-fold CV" if cfg.tune.cv > 1 else "") + f"); outputs in {run.path}")
    search = LiveSearch(workspace, name, {"search": plan.search, "scheduler": plan.scheduler,
                                     "cv": cfg.tune.cv, "space": str(cfg.tune.space)[:500],
                                     "trials": plan.trials})
    if resume:
        if not tune.Tuner.can_restore(run.path):
            raise InputError(f"no tune run to resume at {run.path}")
        tuner = tune.Tuner.restore(run.path, trainable=trainable, resume_errored=True)
    else:
        storage.write_text(storage.join(run.path, "tune-config.yaml"), dump_yaml(cfg))
        tuner = tune.Tuner(
            trainable, param_space=ray_space(cfg.tune.space, plan.search),
            tune_config=tune.TuneConfig(metric=RANK_METRIC, mode="max",
                                        num_samples=plan.num_samples,
                                        # seeded: the same space draws the same trials.
                                        # The limit must sit here: Tune ignores
                                        # max_concurrent_trials with a SearchGenerator, and
                                        # extra trial drivers starve the running trials'
                                        # workers of CPU (measured: one trial at a time).
                                        search_alg=BasicVariantGenerator(
                                            random_state=cfg.train.seed,
                                            max_concurrent=concurrent),
                                        scheduler=_scheduler(cfg, plan),
                                        # A one-worker trial trains in its Tune actor: the
                                        # next trial reuses that process instead of starting
                                        # one and importing torch again (about 5 CPU-s a
                                        # trial). Several workers: each trial's actor goes,
                                        # and its Train controller with it (_trainable).
                                        reuse_actors=base.train.num_workers <= 1),
            run_config=tune.RunConfig(name=name, storage_path=root, verbose=0,
                                      # one-worker trials report checkpoints to Tune itself
                                      checkpoint_config=tune.CheckpointConfig(
                                          num_to_keep=cfg.train.keep_checkpoints,
                                          checkpoint_score_attribute=RANK_METRIC,
                                          checkpoint_score_order="max"),
                                      failure_config=tune.FailureConfig(
                                          max_failures=cfg.train.max_failures),
                                      callbacks=[_progress(plan.trials, log,
                                                           plan.metric),
                                                 search.trial_callback(describe)]))
    with search:  # the search's MLflow run, and a child per trial, live
        return _search(tuner, run, base, plan, workspace, log, register, started, search)


def _search(tuner, run: TuneRun, base: Config, plan: SearchPlan, workspace: Workspace,
            log: Callable[[str], None], register: bool, started: float,
            search: LiveSearch) -> TuneSummary:
    """Fit the tuner, refuse an interrupted search (its state saved), write the outputs."""
    handler = signal.getsignal(signal.SIGINT)
    grid = tuner.fit()
    # Tune turns Ctrl-C into a saved, stopped experiment and returns normally; its handler
    # puts ours back only when it fired. A trial that ran reports at least one epoch.
    results = [grid[i] for i in range(len(grid))]  # ResultGrid iterates by index
    never_ran = sum(r.metrics_dataframe is None or not len(r.metrics_dataframe)
                    for r in results if not r.error)
    if never_ran or (signal.getsignal(signal.SIGINT) is handler
                     and threading.current_thread() is threading.main_thread()
                     and os.environ.get("TUNE_DISABLE_SIGINT_HANDLER", "0") == "0"):
        raise Interrupted(f"tune run {run.name} was interrupted; its state is saved: continue "
                          f"with `mlsd tune --resume {run.name}`")
    return write_outputs(run, grid, base, plan, workspace, log, register,
                         time.perf_counter() - started, search.run_id)


def _saved_config(path: str) -> Config:
    """The configuration a run started with (`--resume` continues exactly that search)."""
    import yaml

    saved = storage.join(path, "tune-config.yaml")
    if not storage.exists(saved):
        raise InputError(f"no tune run to resume at {path} (tune-config.yaml missing)")
    return stored_config(yaml.safe_load(storage.read_text(saved)))
