"""`mlsd train` for tables: train the MLP with Ray Train, score it on test at its stored
threshold beside a HistGradientBoosting baseline fitted on the same split, write the evaluation
(report.json, report.md, pr_curve.png), log the run to MLflow and register the model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlsd_ray.tasks.tabular.metrics as tm
from mlsd_ray.core import storage
from mlsd_ray.core.runtime import ensure_ray, log_stderr
from mlsd_ray.core.workspace import Workspace, fresh_name
from mlsd_ray.tasks.tabular.config import TabularTaskConfig
from mlsd_ray.tasks.tabular.prepare import PreparedTable, prepare_table
from mlsd_ray.tasks.tabular.result import SCORE_KEYS, VAL_SCORE, TabularTrainResult
from mlsd_ray.tasks.tabular.train import (
    build_tabular_trainer,
    epoch_line,
    load_tabular,
)
from mlsd_ray.training.progress import EpochRelay
from mlsd_ray.training.trainer import check_resources, fit_best, where_it_trains


def baseline(cfg: TabularTaskConfig, table: PreparedTable) -> dict:
    """HistGradientBoosting (classifier or regressor) on the same prepared features; for a
    binary task its threshold is chosen on val by the same objective as the MLP's."""
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    featurizer, task, label = table.featurizer, table.manifest["task"], table.label
    x, y = {}, {}
    for split in ("train", "val", "test"):
        frame = table.load_split(split)
        x[split], y[split] = featurizer(frame), frame[label].to_numpy()
    started = time.perf_counter()
    if task == "regression":
        model = HistGradientBoostingRegressor(random_state=cfg.train.seed).fit(x["train"],
                                                                             y["train"])
        outputs = model.predict(x["test"])
        chosen = None
    else:
        model = HistGradientBoostingClassifier(
            random_state=cfg.train.seed,
            class_weight="balanced" if cfg.tabular.class_weight == "balanced" else None,
        ).fit(x["train"], y["train"])
        outputs = model.predict_proba(x["test"])
        chosen = (tm.choose_threshold(model.predict_proba(x["val"])[:, 1], y["val"],
                                      cfg.tabular.threshold) if task == "binary" else None)
    result = tm.evaluate_outputs(task, outputs, y["test"], chosen["threshold"] if chosen else None)
    result["fit_seconds"] = round(time.perf_counter() - started, 2)
    result["model"] = type(model).__name__
    if task == "binary":
        result["recall_at_target_precision"] = tm.recall_at_precision(
            outputs[:, 1], y["test"], cfg.tabular.threshold.target)
    return {"metrics": result, "scores": outputs, "labels": y["test"]}


@dataclass(frozen=True)
class TabularEvaluation:
    """The test split scored: the MLP at its stored threshold and the baseline (metric name ->
    value), the decision (binary tables), and the files written in `path`."""

    task: str
    split: str
    score_name: str
    mlp: dict[str, Any]
    baseline: dict[str, Any] | None
    decision: dict[str, Any] | None
    path: str
    report: str  # report.md
    report_json: str
    pr_curve: str | None
    importance: dict[str, float]  # test score drop per shuffled column (tasks/tabular/explain.py)
    importance_png: str
    model: str = ""  # the checkpoint evaluated, and its run (set by `mlsd evaluate`)
    run_name: str = ""

    def files(self) -> dict[str, str]:
        """The files by kind: report (JSON), report_md, pr_curve (binary tables)."""
        named = {"report": self.report_json, "report_md": self.report, "pr_curve": self.pr_curve,
                 "importance": self.importance_png}
        return {kind: path for kind, path in named.items() if path}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "split": self.split, "score_name": self.score_name,
                "mlp": self.mlp, "baseline": self.baseline, "decision": self.decision,
                "permutation_importance": self.importance, "model": self.model,
                "run_name": self.run_name, "path": self.path, **self.files()}

    def describe(self) -> str:
        keys = SCORE_KEYS[self.score_name]
        lines = [f"{self.split} ({self.task}):",
                 "MLP:       " + "  ".join(f"{k} {self.mlp[k]:.4f}" for k in keys)]
        if self.baseline:
            lines.append("baseline:  " + "  ".join(f"{k} {self.baseline[k]:.4f}" for k in keys))
        return "\n".join([*lines, f"report: {self.report}"])


def evaluate_checkpoint(cfg: TabularTaskConfig, table: PreparedTable, directory: str,
                        out: str) -> TabularEvaluation:
    """The MLP's test metrics at its stored threshold, the baseline's, the PR curve PNG, and
    each column's permutation importance with its chart."""
    from mlsd_ray.tasks.tabular.explain import importance_chart, permutation_importance

    loaded = load_tabular(directory)
    test = table.load_split("test")
    task, labels = table.manifest["task"], test[table.label].to_numpy()
    outputs = loaded.predict(test)
    mlp = tm.evaluate_outputs(task, outputs, labels, loaded.decision.get("threshold"))
    report = {"task": task, "split": "test", "score_name": tm.SCORE_NAMES[task], "mlp": mlp}
    if task == "binary":
        mlp["recall_at_target_precision"] = tm.recall_at_precision(
            outputs[:, 1], labels, cfg.tabular.threshold.target)
        report["decision"] = {k: loaded.decision.get(k) for k in
                              ("threshold", "objective", "target", "met", "val_precision",
                               "val_recall")}
    curves = {"MLP": (outputs[:, 1], labels)} if task == "binary" else {}
    if cfg.tabular.baseline:
        reference = baseline(cfg, table)
        report["baseline"] = reference["metrics"]
        if task == "binary":
            curves["HistGradientBoosting"] = (reference["scores"][:, 1], reference["labels"])
    pr_curve = storage.join(out, "pr_curve.png") if curves else None
    if pr_curve:
        storage.write_bytes(pr_curve, tm.pr_curve_png(curves, mlp))
    report["permutation_importance"] = permutation_importance(loaded, test, labels, task)
    importance_png = storage.join(out, "importance.png")
    storage.write_bytes(importance_png,
                        importance_chart(report["permutation_importance"], task))
    report_json, report_md = storage.join(out, "report.json"), storage.join(out, "report.md")
    storage.write_text(report_json, json.dumps(report, indent=2))
    storage.write_text(report_md, render_report(report))
    return TabularEvaluation(task=task, split="test", score_name=report["score_name"], mlp=mlp,
                             baseline=report.get("baseline"), decision=report.get("decision"),
                             path=out, report=report_md, report_json=report_json,
                             pr_curve=pr_curve, importance=report["permutation_importance"],
                             importance_png=importance_png)


def render_report(report: dict) -> str:
    """report.md: the MLP and the baseline side by side."""
    rows = [("MLP", report["mlp"])] + ([("HistGradientBoosting", report["baseline"])]
                                        if "baseline" in report else [])
    keys = {"binary": ["pr_auc", "roc_auc", "precision", "recall", "f1",
                       "recall_at_target_precision", "threshold"],
            "multiclass": ["accuracy", "macro_f1"],
            "regression": ["mse", "mae", "r2"]}[report["task"]]
    lines = [f"# Evaluation on the {report['split']} split ({report['task']})", "",
             "| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, values in rows:
        cells = [("" if values.get(k) is None else f"{values[k]:.4f}") for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if report["task"] == "binary":
        c = report["mlp"]["confusion"]
        lines += ["", f"MLP confusion at threshold {report['mlp']['threshold']:.4f}: "
                      f"TN {c['tn']}, FP {c['fp']}, FN {c['fn']}, TP {c['tp']}"]
    importance = report.get("permutation_importance") or {}
    if importance:
        lines += ["", "## Permutation importance", "",
                  f"The drop of test {report['score_name']} when a column is shuffled.", "",
                  "| column | drop |", "|---|---|"]
        lines += [f"| {column} | {drop:.4f} |" for column, drop in importance.items()]
        lines += ["", "![permutation importance](importance.png)"]
    return "\n".join(lines) + "\n"


def run_tabular_train(cfg: TabularTaskConfig, workspace: Workspace,
                      log: Callable[[str], None] = log_stderr, run_name: str | None = None,
                      table: PreparedTable | None = None, init_from: str | None = None,
                      reference: PreparedTable | None = None) -> TabularTrainResult:
    """Prepare if needed, train, evaluate the best checkpoint on test; register if configured.

    `table` replaces preparing `cfg.tabular.source` (retraining passes old and new rows
    combined); `init_from`, a checkpoint folder, starts from its weights; `reference` is the
    table the drift reference describes (default: the training table)."""
    started = time.perf_counter()
    table = table or prepare_table(cfg, workspace=workspace, log=log)
    ensure_ray(workspace)
    check_resources(cfg.train)
    name = run_name or cfg.train.run_name or fresh_name(f"{table.manifest['name']}-mlp")
    runs = workspace.runs
    log(f"training the MLP on {table.manifest['counts']['splits']['train']} rows × "
        f"{len(table.manifest['feature_names'])} features {where_it_trains(cfg.train)}, "
        f"{cfg.train.epochs} epochs; run {name} under {runs}")
    from mlsd_ray.registry.tracking import LiveRun

    manifest = table.manifest
    with LiveRun(workspace, name, run_params(cfg, table), table.path, manifest["fingerprint"],
                 manifest["name"], enabled=cfg.registry.auto_register) as tracked:
        relay = EpochRelay(lambda metrics: epoch_line(metrics, cfg.train.epochs), log,
                           tracked.log_epoch)
        best = fit_best(build_tabular_trainer(cfg, table, name, runs,
                                              callbacks=[relay.callback()], log=log,
                                              init_from=init_from, reference=reference), relay)
        summary = evaluated_summary(cfg, table, best.path, best.metrics, name,
                                    storage.join(runs, name), best.epochs_run, log)
        summary.wall_seconds = time.perf_counter() - started
        if cfg.registry.auto_register:
            register(summary, cfg, table, workspace, log, live=True)
    return summary


def evaluated_summary(cfg: TabularTaskConfig, table: PreparedTable, checkpoint: str, best: dict,
                      run_name: str, run_path: str, epochs_run: int,
                      log: Callable[[str], None]) -> TabularTrainResult:
    """A trained checkpoint's summary: its best epoch, its test metrics beside the
    baseline's, and where the evaluation went (under `run_path`/evaluation)."""
    log("evaluating on test" + (" beside the HistGradientBoosting baseline"
                                if cfg.tabular.baseline else ""))
    evaluation = evaluate_checkpoint(cfg, table, checkpoint,
                                     storage.join(run_path, "evaluation"))
    return TabularTrainResult(
        run_name=run_name, run_path=run_path, checkpoint=checkpoint,
        best_epoch=int(best["epoch"]), epochs_run=epochs_run, dataset=table.path,
        task=evaluation.task, score_name=evaluation.score_name,
        val_score=float(best[VAL_SCORE]), test=evaluation.mlp, baseline=evaluation.baseline,
        decision=evaluation.decision, evaluation=evaluation.files())


EXAMPLE_ROWS = 3  # test-split rows stored with the model as its input example


def table_signature(table: PreparedTable):
    """The model's columns in (numbers as double, categories as string; each may be
    missing, as the app imputes it), and `model_outputs`' columns out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    m = table.manifest
    inputs = [ColSpec("string" if entry["kind"] == "categorical" else "double", entry["name"],
                      required=False) for entry in m["preprocessing"]["plan"]]
    outputs = [ColSpec("double", "score")]
    if m["task"] != "regression":
        outputs += [ColSpec("string", "predicted_class"),
                    *(ColSpec("double", f"probability_{name}") for name in m["classes"])]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


def input_example(table: PreparedTable):
    """The first test rows, model columns only (ids and the label are not inputs)."""
    columns = [entry["name"] for entry in table.manifest["preprocessing"]["plan"]]
    return table.load_split("test")[columns].head(EXAMPLE_ROWS).reset_index(drop=True)


def _scalars(prefix: str, values: dict | None) -> dict:
    return {f"{prefix}{k}": float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_params(cfg: TabularTaskConfig, table: PreparedTable) -> dict:
    """The params of a tabular training run: the training and table settings, the data."""
    from mlsd_ray.registry import flat_params

    return {**flat_params("train", cfg.train.model_dump()),
            **flat_params("tabular", cfg.tabular.model_dump(exclude={"columns"})),
            "tabular.hidden": str(cfg.tabular.hidden),
            "data.fingerprint": table.manifest["fingerprint"]}


def register(summary: TabularTrainResult, cfg: TabularTaskConfig, table: PreparedTable,
             workspace: Workspace, log: Callable[[str], None], nested: bool = False,
             live: bool = False) -> None:
    """Register the checkpoint as the next version (`summary.registered`), with the test and
    baseline metrics, the evaluation files and the decision threshold (registry/tracking.py's
    `register_trained` says `live` and `nested`)."""
    from mlsd_ray.registry.tracking import Registration, register_trained

    m, score = table.manifest, summary.score_name
    tags = {"table_task": m["task"]}  # binary, multiclass or regression
    if summary.decision:
        tags["threshold"] = f"{summary.decision['threshold']:.6f}"
    summary.registered = register_trained(Registration(
        task="tabular", model_name=cfg.registry.model_name or f"{m['name']}-mlp",
        run_name=summary.run_name, checkpoint=summary.checkpoint,
        params=run_params(cfg, table), score_name=score, val_score=summary.val_score,
        test_score=summary.test[score], best_epoch=summary.best_epoch,
        architecture="tabular_mlp", dataset=table.path, fingerprint=m["fingerprint"],
        schema={"input": {e["name"]: e["kind"] for e in m["columns"]},
                "output": {"task": m["task"], "classes": m["classes"]}},
        signature=table_signature(table), input_example=input_example(table),
        metrics={**_scalars("test_", summary.test),
                 **_scalars("baseline_test_", summary.baseline)},
        description=f"MLP on the {m['name']} table ({m['task']}, mlsd-ray)", tags=tags,
        reports=tuple(summary.evaluation.values())), workspace, live, nested)
    log(f"registered {summary.registered.uri}")


def register_trial(run, best: dict, cfg: TabularTaskConfig, workspace: Workspace,
                   log: Callable[[str], None]) -> TabularTrainResult:
    """A search's best trial, evaluated on test beside the baseline and registered as a child
    of the search's MLflow run; with --cv, the best configuration refitted on the whole train
    split first (a fold saw less)."""
    from mlsd_ray.training.checkpoint import load_train_state

    if run.cfg.tune.cv > 1:
        log("refitting the best configuration on the full train split")
        refit = cfg.model_copy(deep=True)
        refit.registry.auto_register = False  # registered below, as the search's child
        summary = run_tabular_train(refit, workspace, log, f"{run.name}-refit", run.dataset)
        register(summary, cfg, run.dataset, workspace, log, nested=True)
        return summary
    history = load_train_state(best["checkpoint"])["history"]
    metrics = next(h for h in history if h["epoch"] == best["best_epoch"])
    summary = evaluated_summary(cfg, run.dataset, best["checkpoint"], metrics,
                                f"{run.name}-trial-{best['trial']}", run.path,
                                best["epochs_run"], log)
    register(summary, cfg, run.dataset, workspace, log, nested=True)
    return summary
