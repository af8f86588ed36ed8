"""`mlsd retrain --source SPEC`: a challenger trained on new data, promoted only if it is better.

The gate is the same for every task; the task (read from the champion's checkpoint) prepares
the data, trains the challenger and scores a model (`Task.retrain_data`,
`Task.train_challenger`, `Task.holdout_scores`):

1. The champion is the version behind `retrain.alias` (production). The task prepares the new
   data in the champion's form (image size and channels; a table's columns and fitted
   preparation) and refuses data with another label set (InputError, exit 2, naming the
   difference).
2. Training data = the champion's train/val splits plus the new data's (`retrain.keep_old_data`),
   as one prepared dataset whose test split is both test splits (so a later retrain's "old
   test" covers every earlier holdout). The challenger trains from the champion's weights
   (`finetune`) or from scratch, and is registered as a new version. Its drift reference
   describes the new data: traffic is expected to look like it from now on.
3. Champion and challenger are scored on the same holdout, by the task's score (accuracy for
   images; PR-AUC, macro F1 or R² for tables): the champion's old test split plus the new
   data's test split. The challenger is promoted only if it beats the champion by more than
   `retrain.margin`; a running Serve app then rolls over to it.
4. decision.json and decision.md go to $MLSD_HOME/retrain/<time>/. `dry_run` decides only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from mlsd_ray.core import storage
from mlsd_ray.core.config import Config
from mlsd_ray.core.contracts import CheckpointMetadata
from mlsd_ray.core.crash_points import crash_point
from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.core.runtime import log_stderr
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.tasks import model_task, stored_config

if TYPE_CHECKING:
    from mlsd_ray.serve.control import RollingUpdate

__all__ = ["challenger_config", "check_classes", "holdout_scores", "HoldoutScore", "ModelScores",
           "retrain", "RetrainData", "RetrainDecision", "Score"]


@dataclass(frozen=True)
class RetrainData:
    """What a task prepared for a retrain: the new data, the champion's, and the two combined
    (the challenger's training data)."""

    new: Any
    old: Any
    combined: Any


@dataclass(frozen=True)
class HoldoutScore:
    """A model's score on one test split (`metric`, higher is better), and how many rows
    (or images) it covers."""

    metric: str
    score: float
    samples: int


def check_classes(model_classes: list[str], data_classes: list[str], source: str) -> None:
    """InputError unless the new data has exactly the model's classes, in the same order."""
    if data_classes == model_classes:
        return
    extra = sorted(set(data_classes) - set(model_classes))
    missing = sorted(set(model_classes) - set(data_classes))
    detail = (f"classes the model does not know: {extra}; " if extra else "") + (
        f"model classes missing from it: {missing}" if missing else "")
    raise InputError(f"retrain source {source} has another label set than the model: "
                     + (detail or f"order {data_classes} vs the model's {model_classes}"))


def challenger_config(cfg: Config, trained: dict, champion_name: str) -> Config:
    """The config the champion was trained with (`trained`, from its checkpoint), with the
    retrain epochs and learning rate, this run's resources, and the champion's name."""
    tree = dict(trained)
    lr = cfg.retrain.lr or (cfg.train.lr / 3 if cfg.retrain.mode == "finetune" else cfg.train.lr)
    resources = cfg.train.model_dump(include={"num_workers", "cpus_per_worker", "use_gpu",
                                              "placement_strategy", "max_failures"})
    tree["train"] = {**tree["train"], **resources,
                     "epochs": cfg.retrain.epochs or cfg.train.epochs, "lr": lr,
                     "run_name": None}
    tree["registry"] = {**tree["registry"], "auto_register": True, "model_name": champion_name}
    tree["retrain"], tree["serve"] = cfg.retrain.model_dump(), cfg.serve.model_dump()
    return stored_config(tree)


@dataclass(frozen=True)
class Score:
    """A score rounded for the decision, and how many rows (or images) it covers."""

    score: float
    samples: int


@dataclass(frozen=True)
class ModelScores:
    """One model's score on the champion's old test split, on the new data's test split, and
    on both together (the holdout that decides)."""

    old_test: Score
    new_test: Score
    holdout: Score


@dataclass
class RetrainDecision:
    """What `mlsd retrain` decided and why; decision.json is `to_dict()`.

    `gain` is the challenger's holdout score minus the champion's (by `metric`); it is
    promoted when `gain > margin`, unless `dry_run`. A promoted challenger is rolled out to
    the running app that serves the model (`rollout`), or `rollout_skipped` says why not.
    `state` is how far the retrain got: "decided" (nothing applied yet), "promoted" (the alias
    moved, the app not yet rolled over) or "done"."""

    champion: str
    challenger: str
    mode: str
    source: str
    task: str
    metric: str
    champion_scores: ModelScores
    challenger_scores: ModelScores
    gain: float
    margin: float
    promote: bool
    dry_run: bool
    alias: str
    reason: str
    rollout: RollingUpdate | None = None
    rollout_skipped: str | None = None
    state: str = "decided"  # then "promoted" (the alias moved), then "done"
    seconds: float = 0.0
    outputs: dict[str, str] = field(default_factory=dict)

    def scores_of(self, who: str) -> ModelScores:
        """"champion" or "challenger"'s scores."""
        return self.champion_scores if who == "champion" else self.challenger_scores

    def to_dict(self) -> dict:
        """The JSON form (decision.json, `--json`): scores as {who: {"metric", part: {...}}}."""
        plain = asdict(self)
        scores = {who: {"metric": self.metric, **plain.pop(f"{who}_scores")}
                  for who in ("champion", "challenger")}
        plain.pop("rollout"), plain.pop("rollout_skipped")
        if self.rollout is not None:
            plain["rollout"] = self.rollout.to_dict()
        elif self.rollout_skipped is not None:
            plain["rollout"] = {"skipped": self.rollout_skipped}
        return {**plain, "scores": scores}


def holdout_scores(task, checkpoint_dir: str, parts: dict) -> tuple[str, ModelScores]:
    """The task's metric name, and its score on each holdout part and on all of them."""
    scores = task.holdout_scores(checkpoint_dir, parts)
    rounded = {name: Score(round(s.score, 4), s.samples) for name, s in scores.items()}
    return scores["holdout"].metric, ModelScores(**rounded)


def retrain(cfg: Config, source: str, workspace: Workspace, model: str | None = None,
            dry_run: bool = False, log: Callable[[str], None] = log_stderr,
            roll_out: bool = True) -> RetrainDecision:
    """Train a challenger on `source`, compare, promote and roll out (see the module docstring).

    With `roll_out=False` a promoted challenger is not deployed (the pipeline deploys it itself,
    under load)."""
    from mlsd_ray import registry
    from mlsd_ray.core.runtime import ensure_ray
    from mlsd_ray.training.trainer import fit_to_free_cpus

    started = time.perf_counter()
    champion_info = registry.pin(model or cfg.serve.model_ref(), workspace)
    if champion_info.version == "local":
        raise InputError("retrain needs a registered champion (models:/NAME@ALIAS), not a "
                         "checkpoint folder: gated promotion moves a registry alias")
    champion_dir = champion_info.checkpoint_here(workspace)
    task, cfg = model_task(champion_dir, cfg)
    trained_with = CheckpointMetadata.read(champion_dir).config
    log(f"champion {champion_info.uri} ({task.name} task); new data {source}")

    data = task.retrain_data(cfg, champion_dir, source, workspace, log)
    mode = cfg.retrain.mode
    challenger_cfg = challenger_config(cfg, trained_with, champion_info.name)
    ensure_ray(workspace)
    fit_to_free_cpus(challenger_cfg.train, log)
    trained = task.train_challenger(challenger_cfg, data,
                                    champion_dir if mode == "finetune" else None, workspace, log)
    if trained.registered is None:
        raise WorkError(f"the {task.name} task's train_challenger registered no version")
    challenger_uri = trained.registered.uri
    challenger_dir = registry.resolve(challenger_uri, workspace)

    holdout = {"old_test": data.old, "new_test": data.new}
    metric, champion_scores = holdout_scores(task, champion_dir, holdout)
    _, challenger_scores = holdout_scores(task, challenger_dir, holdout)
    gain = challenger_scores.holdout.score - champion_scores.holdout.score
    better = gain > cfg.retrain.margin
    decision = RetrainDecision(
        champion=champion_info.uri, challenger=challenger_uri, mode=mode, source=source,
        task=task.name, metric=metric, champion_scores=champion_scores,
        challenger_scores=challenger_scores, gain=round(gain, 4), margin=cfg.retrain.margin,
        promote=better and not dry_run, dry_run=dry_run, alias=cfg.retrain.alias,
        reason=(f"challenger {'beats' if better else 'does not beat'} the champion by more "
                f"than {cfg.retrain.margin} {metric} on the holdout ({gain:+.4f})"))
    log(decision.reason)
    # Written before it is applied, and again after each step (`state`): a retrain killed
    # anywhere leaves a decision.json saying how far it got, and the alias on a version that
    # was whole before it moved (docs/reliability.md).
    decision.outputs = _write_decision(decision, workspace)
    crash_point("retrain.decided")
    if decision.promote:
        version = trained.registered.version
        registry.promote(champion_info.name, version, cfg.retrain.alias, workspace)
        log(f"promoted {challenger_uri} to @{cfg.retrain.alias}")
        decision.state = "promoted"
        _write_decision(decision, workspace)
        crash_point("retrain.promoted")
        if roll_out:
            decision.rollout, decision.rollout_skipped = _roll_out(
                challenger_uri, champion_info.name, cfg, workspace, log)
    decision.state = "done"
    decision.seconds = round(time.perf_counter() - started, 1)
    _write_decision(decision, workspace)
    return decision


def _roll_out(uri: str, model_name: str, cfg: Config, workspace: Workspace,
              log: Callable[[str], None]) -> tuple[RollingUpdate | None, str | None]:
    """Move the running Serve app that serves `model_name` (serve.app_name first, else any
    recorded one: `mlsd serve` names its app after the config it ran with) to `uri`: the
    rolling update, or why there was none."""
    from mlsd_ray.serve import control

    apps = control.apps_serving(workspace, model_name)
    if not apps:
        return None, (f"no running app serves {model_name}: the next `mlsd serve` serves "
                      f"@{cfg.retrain.alias}")
    app = cfg.serve.app_name if cfg.serve.app_name in apps else apps[0]
    return control.deploy(uri, workspace, app, log), None


def _write_decision(decision: RetrainDecision, workspace: Workspace) -> dict[str, str]:
    """Write decision.json and decision.md (each whole or not at all) into the folder of the
    decision's first write, $MLSD_HOME/retrain/<time>/."""
    paths = decision.outputs or _decision_paths(workspace)
    rows = [f"| {who} | " + " | ".join(f"{getattr(decision.scores_of(who), part).score:.4f}"
                                       for part in ("old_test", "new_test", "holdout")) + " |"
            for who in ("champion", "challenger")]
    would = decision.dry_run and decision.gain > decision.margin
    verdict = "rejected"
    if decision.promote:
        verdict = {"decided": "to promote (not applied yet)",
                   "promoted": "promoted (the app not rolled over yet)"}.get(decision.state,
                                                                            "promoted")
    elif would:
        verdict = "would promote (dry run)"
    text = "\n".join([
        f"# Retrain decision: {verdict}", "",
        f"Champion {decision.champion}, challenger {decision.challenger} "
        f"({decision.mode} on {decision.source}).", "",
        f"{decision.metric} of each model:", "",
        "| model | old test | new holdout | all holdout |", "|---|---|---|---|", *rows, "",
        decision.reason + ".", ""])
    storage.write_text(paths["markdown"], text)
    storage.write_json(paths["json"], {**decision.to_dict(), "outputs": paths})
    return paths


def _decision_paths(workspace: Workspace) -> dict[str, str]:
    out = workspace.retrain(time.strftime("%Y%m%d-%H%M%S"))
    return {"json": storage.join(out, "decision.json"),
            "markdown": storage.join(out, "decision.md")}
