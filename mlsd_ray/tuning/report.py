"""What a finished search leaves behind: the results table, the curves PNG, the best
configuration as YAML, MLflow runs (a parent and a child per trial) and the registered model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, dump_yaml
from mlsd_ray.core.contracts import TUNE_SUMMARY
from mlsd_ray.core.errors import WorkError
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.explain import figure_png
from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.tuning.space import SearchPlan, describe, trial_config

if TYPE_CHECKING:
    from mlsd_ray.registry import RegisteredVersion

__all__ = ["best_config", "BestTrial", "curves_png", "failure_summary", "trial_rows",
           "TuneSummary", "write_outputs"]


@dataclass
class BestTrial:
    """The search's best trial: its score on the task's metric (`TuneSummary.metric`) at its
    best epoch, and its parameters; with cross-validation, the folds' mean and spread."""

    trial: str
    score: float
    best_epoch: int | None
    epochs_run: int
    params: dict[str, Any]
    cv_mean: float | None = None
    cv_std: float | None = None

    def to_dict(self, metric: str) -> dict[str, Any]:
        """As summary.json has it: the score under the metric's own name."""
        plain: dict[str, Any] = {"trial": self.trial, metric: self.score,
                                 "best_epoch": self.best_epoch, "epochs_run": self.epochs_run}
        if self.cv_mean is not None:
            plain.update(cv_mean=self.cv_mean, cv_std=self.cv_std)
        return {**plain, "params": self.params}


@dataclass
class TuneSummary:
    """What `mlsd tune` did: the search, its trials, the best one, the files written under
    `path`, the MLflow run, and (when registered) the best trial's model. `configurations`
    holds one line per trial, best first (`to_dict` is summary.json and `--json`)."""

    name: str
    path: str
    search: str
    scheduler: str
    cv: int
    trials: int
    finished: int
    stopped_early: int
    failed: int
    trial_epochs: int
    max_epochs: int
    metric: str
    best: BestTrial
    configurations: list[dict[str, Any]]
    wall_seconds: float
    results: str
    curves: str
    best_config: str
    mlflow_run_id: str | None = None
    best_model: dict[str, Any] | None = None
    best_test: str | None = None
    registered: RegisteredVersion | None = None

    def to_dict(self) -> dict[str, Any]:
        plain = {name: getattr(self, name) for name in (
            "name", "path", "search", "scheduler", "cv", "trials", "finished", "stopped_early",
            "failed", "trial_epochs", "max_epochs", "metric")}
        plain["best"] = self.best.to_dict(self.metric)
        plain.update(configurations=self.configurations, wall_seconds=self.wall_seconds,
                     results=self.results, curves=self.curves, best_config=self.best_config,
                     mlflow_run_id=self.mlflow_run_id)
        if self.best_model is not None:
            plain.update(best_model=self.best_model, best_test=self.best_test,
                         registered=self.registered.to_dict() if self.registered else None)
        return plain


def trial_rows(grid, plan: SearchPlan) -> list[dict]:
    """One row per trial: its parameters, epochs run, early stop, best val metric, checkpoint."""
    rows, metric = [], plan.metric
    for index, result in enumerate(grid):
        history = _history(result)
        row = {"trial": (result.metrics or {}).get("trial_id") or f"#{index}",
               **{f"param.{k}": v for k, v in result.config.items()},
               "status": "error" if result.error else "ok", "epochs_run": 0,
               "stopped_early": False, "best_epoch": None, metric: None,
               "checkpoint": None, "error": _first_line(result.error) if result.error else ""}
        if len(history):
            best = _best_row(history)
            row.update(epochs_run=int(history["epoch"].max()), best_epoch=int(best["epoch"]),
                       **{metric: float(best[metric]),
                          RANK_METRIC: float(best[RANK_METRIC]),
                          "checkpoint": best.get("checkpoint_path")})
            row["stopped_early"] = not result.error and row["epochs_run"] < plan.epochs
            if "cv_std" in history:
                row.update(cv_mean=float(best[metric]), cv_std=float(best["cv_std"]),
                           fold_scores=list(best["fold_scores"]))
        row["curve"] = history[["epoch", metric]].values.tolist() if len(history) else []
        rows.append(row)
    return rows


def _best_row(history: pd.DataFrame) -> pd.Series:
    """The best epoch whose checkpoint Ray Train kept (ties can leave the first one deleted)."""
    ranked = history.sort_values(RANK_METRIC, ascending=False, kind="stable")
    if "checkpoint_path" not in ranked:
        return ranked.iloc[0]
    for _, row in ranked.iterrows():
        if isinstance(row["checkpoint_path"], str) and storage.exists(row["checkpoint_path"]):
            return row
    return ranked.iloc[0]


def _history(result) -> pd.DataFrame:
    """A trial's epochs, with where each kept checkpoint is (`checkpoint_path`): a Train fit
    reports it (TuneReportCallback); a one-worker trial's checkpoints are Tune's own."""
    frame = result.metrics_dataframe
    if frame is None or RANK_METRIC not in frame:
        return pd.DataFrame()
    frame = frame.dropna(subset=[RANK_METRIC]).sort_values("epoch")
    if "checkpoint_path" not in frame and result.best_checkpoints:
        kept = {int(metrics["epoch"]): checkpoint.path
                for checkpoint, metrics in result.best_checkpoints}
        frame = frame.assign(checkpoint_path=frame["epoch"].astype(int).map(kept))
    return frame


def _first_line(error: BaseException) -> str:
    from mlsd_ray.training.trainer import failure_message

    return failure_message(error)[:300]


def failure_summary(rows: list[dict]) -> str:
    """`N trials failed: 3 × <message>; ...` for the error raised when none finished."""
    counts = pd.Series([r["error"] for r in rows]).value_counts()
    return f"all {len(rows)} trial(s) failed: " + "; ".join(
        f"{n} × {message}" for message, n in counts.items())


def curves_png(rows: list[dict], cv: bool, metric: str) -> bytes:
    """The task's `metric` (val_accuracy, val_score, ...) per epoch for every trial
    (early-stopped dashed); mean ± spread per configuration with CV."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(9, 5))
    ok = [r for r in rows if r["status"] == "ok"]
    name = metric.replace("_", " ")
    if cv:
        labels = [_label(r) for r in ok]
        ax.errorbar(range(len(ok)), [r["cv_mean"] for r in ok], yerr=[r["cv_std"] for r in ok],
                    fmt="o", capsize=4)
        ax.set_xticks(range(len(ok)), labels, rotation=30, ha="right", fontsize=8)
        ax.set(title=f"cross-validation: mean ± std of {name} per configuration",
               ylabel=name)
    else:
        for row in ok:
            epochs, values = zip(*row["curve"], strict=True) if row["curve"] else ([], [])
            style = "--" if row["stopped_early"] else "-"
            ax.plot(epochs, values, style, marker="o", markersize=3,
                    label=_label(row) + (" (stopped early)" if row["stopped_early"] else ""))
        ax.set(title=f"{name} per epoch of every trial", xlabel="epoch", ylabel=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    return figure_png(fig, dpi=100, tight=True)


def _params(row: dict) -> dict:
    """A results row's searched parameters, by their dotted config keys."""
    return {k.removeprefix("param."): v for k, v in row.items() if k.startswith("param.")}


def _label(row: dict) -> str:
    return describe(_params(row), digits=3)


def best_config(base: Config, row: dict, user: Config) -> Config:
    """The winning trial's configuration, ready for `mlsd train --config`."""
    cfg = trial_config(base, _params(row))
    cfg.train.cpus_per_worker = user.train.cpus_per_worker  # the trial's share of a busy node
    cfg.train.max_failures = user.train.max_failures  # in a trial, Tune restarted workers
    return cfg


def _table(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{k: v for k, v in r.items() if k != "curve"} for r in rows])
    return frame.sort_values(RANK_METRIC, ascending=False, na_position="last")


def write_outputs(run, grid, base: Config, plan: SearchPlan, workspace: Workspace,
                  log: Callable[[str], None], register: bool, wall_seconds: float,
                  mlflow_run_id: str | None) -> TuneSummary:
    """Write results.csv, curves.png, best.yaml, summary.json; add the best score to the
    search's MLflow run (`mlflow_run_id`, the active run: its trials were tracked live) and
    register the best trial's model in it."""
    rows, metric = trial_rows(grid, plan), plan.metric
    ok = [r for r in rows if r["status"] == "ok" and r[metric] is not None]
    if not ok:
        raise WorkError(failure_summary(rows))
    cv = run.cfg.tune.cv > 1
    best = max(ok, key=lambda r: r[RANK_METRIC])
    best_cfg = best_config(base, best, run.cfg)
    results, curves = storage.join(run.path, "results.csv"), storage.join(run.path, "curves.png")
    best_yaml = storage.join(run.path, "best.yaml")
    storage.write_text(results, _table(rows).to_csv(index=False))
    storage.write_bytes(curves, curves_png(rows, cv, metric))
    storage.write_text(best_yaml, f"# best of tune run {run.name}: trial {best['trial']}, "
                                  f"{metric} {best[metric]:.4f}\n# train it: mlsd train "
                                  f"--config {best_yaml}\n" + dump_yaml(best_cfg))
    summary = TuneSummary(
        name=run.name, path=run.path, search=plan.search, scheduler=plan.scheduler,
        cv=run.cfg.tune.cv, trials=len(rows), finished=len(ok),
        stopped_early=sum(bool(r["stopped_early"]) for r in rows),
        failed=sum(r["status"] == "error" for r in rows),
        trial_epochs=int(sum(r["epochs_run"] for r in rows)), max_epochs=plan.epochs,
        metric=metric, best=_best_trial(best, metric),
        configurations=[_config_line(r, cv, metric) for r in _table(rows).to_dict("records")],
        wall_seconds=round(wall_seconds, 1), results=results, curves=curves,
        best_config=best_yaml, mlflow_run_id=mlflow_run_id)
    _track(summary, run, best, best_cfg, workspace, log, register)
    storage.write_json(storage.join(run.path, "summary.json"),
                       TUNE_SUMMARY.stamp(summary.to_dict()))
    return summary


def _best_trial(row: dict, metric: str) -> BestTrial:
    return BestTrial(trial=row["trial"], score=row[metric], best_epoch=row["best_epoch"],
                     epochs_run=row["epochs_run"], params=_params(row),
                     cv_mean=row.get("cv_mean"), cv_std=row.get("cv_std"))


def _config_line(row: dict, cv: bool, metric: str) -> dict:
    line = {"trial": row["trial"], "params": _label(row), "status": row["status"],
            "epochs_run": row["epochs_run"], "stopped_early": bool(row["stopped_early"]),
            metric: None if pd.isna(row[metric]) else row[metric]}
    if cv and row["status"] == "ok":
        line.update(cv_mean=row["cv_mean"], cv_std=row["cv_std"], fold_scores=row["fold_scores"])
    return line


def _track(summary: TuneSummary, run, best: dict, best_cfg, workspace: Workspace,
           log: Callable[[str], None], register: bool) -> None:
    """MLflow: the best score and the search's outputs on the search's run; the best model
    registered as a child of it (recorded in `summary`)."""
    import mlflow

    mlflow.log_metric(f"best_{summary.metric}", summary.best.score)
    mlflow.set_tags({"path": run.path})
    if not storage.is_uri(run.path):  # a local search folder: its table beside the runs
        mlflow.log_artifact(summary.results, artifact_path="search")
    if register:
        from mlsd_ray.tasks import get_task

        trained = get_task(run.cfg.task).register_best_trial(run, best, best_cfg, workspace, log)
        # summary.json is plain data: the trial's model as its JSON form
        summary.best_model, summary.best_test = trained.to_dict(), trained.test_line()
        summary.registered = trained.registered
