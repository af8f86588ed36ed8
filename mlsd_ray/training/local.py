"""Training in the driver's own process: `train.num_workers: 0`.

Ray Train calls this its local mode (`ScalingConfig(num_workers=0)`), but keeps no checkpoint
there. On one small machine a Ray Train run starts a controller and a worker group first:
about 10 s on 2 cores before the first epoch, longer than a whole digits training
(docs/performance.md). `InProcessTrainer` runs the same loop (training/loop.py) here instead,
on every core of this process, and keeps what a Ray Train run keeps: checkpoints under the
run's folder, the best `keep` by RANK_METRIC plus the latest, a re-run of the same name
resuming from the latest, and `max_failures` retries from it. Data-parallel workers, GPUs
per worker and surviving a lost process need Ray Train: any `num_workers` of 1 or more.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mlsd_ray.core import storage
from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.training.host import DriverProcess, hosting

if TYPE_CHECKING:
    from ray.train import Checkpoint

__all__ = ["CheckpointStore", "InProcessResult", "InProcessTrainer", "REPORT"]

REPORT = "report.json"  # the epoch's metrics, beside the checkpoint's files


class CheckpointStore:
    """A run's checkpoints as folders `checkpoint_epoch_NNNN` under `run_dir`, each with its
    epoch's metrics; the `keep` best by RANK_METRIC and the latest survive."""

    def __init__(self, run_dir: str, keep: int):
        self.run_dir, self.keep_best = run_dir, keep

    def kept(self) -> list[tuple[Checkpoint, dict]]:
        """(ray.train.Checkpoint, its metrics) for every checkpoint kept, oldest first."""
        from ray.train import Checkpoint

        if not storage.is_dir(self.run_dir):
            return []
        found = []
        for name in storage.list_dirs(self.run_dir):
            if not name.startswith("checkpoint_epoch_"):
                continue
            path = storage.join(self.run_dir, name)
            if storage.exists(storage.join(path, REPORT)):  # a copy that finished
                found.append((Checkpoint(path), storage.read_json(storage.join(path, REPORT))))
        return found

    def latest(self) -> Checkpoint | None:
        kept = self.kept()
        return kept[-1][0] if kept else None

    def keep(self, directory: str, metrics: dict) -> Checkpoint:
        """Copy the checkpoint in `directory` into the run, then drop what falls out."""
        from ray.train import Checkpoint

        name = f"checkpoint_epoch_{int(metrics['epoch']):04d}"
        with open(os.path.join(directory, REPORT), "w") as out:
            json.dump(metrics, out, default=float)
        target = storage.join(self.run_dir, name)
        _copy_folder(directory, target)
        self._prune()
        return Checkpoint(target)

    def _prune(self) -> None:
        kept = self.kept()
        ranked = sorted(kept, key=lambda cm: cm[1][RANK_METRIC], reverse=True)
        survivors = {id(cm[0]) for cm in [*ranked[:self.keep_best], kept[-1]]}
        for checkpoint, _ in kept:
            if id(checkpoint) not in survivors:
                storage.delete_dir(checkpoint.path)


def _copy_folder(source: str, target: str) -> None:
    """A local folder to a path or URI; the metrics file goes last, so a checkpoint whose
    copy was cut short is never taken for a finished one."""
    if not storage.is_uri(target):
        partial = f"{target}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
        return
    for name in sorted(os.listdir(source), key=lambda n: n == REPORT):
        with open(os.path.join(source, name), "rb") as handle:
            storage.write_bytes(storage.join(target, name), handle.read())


@dataclass
class InProcessResult:
    """What `fit()` returns, shaped as Ray Train's Result where the stages read it."""

    best_checkpoints: list[tuple[Checkpoint, dict]]
    metrics: dict
    reports: list[dict] = field(default_factory=list)


class InProcessTrainer:
    """`fit()` runs `loop(config)` in this process (see the module's docstring)."""

    def __init__(self, loop: Callable[[dict], None], config: dict, run_dir: str, keep: int,
                 max_failures: int, datasets: dict, use_gpu: bool, callbacks: list):
        self.train_loop_per_worker, self.train_loop_config = loop, config
        self.store = CheckpointStore(run_dir, keep)
        self.max_failures, self.datasets, self.use_gpu = max_failures, datasets, use_gpu
        self.callbacks = [cb for cb in callbacks if hasattr(cb, "after_report")]

    def _after_report(self, metrics: dict, checkpoint) -> None:
        for callback in self.callbacks:  # Ray Train's UserCallback, called as its controller does
            callback.after_report(None, [metrics], checkpoint)

    def fit(self) -> InProcessResult:
        """Train, retrying from the latest checkpoint up to `max_failures` times; a failure
        past that raises Ray Train's WorkerGroupError, as a worker group's would."""
        from ray.train import WorkerGroupError

        storage.makedirs(self.store.run_dir)
        for attempt in range(self.max_failures + 1):
            host = DriverProcess(self.store, self.datasets, self.use_gpu, self._after_report)
            try:
                with hosting(host):
                    self.train_loop_per_worker(self.train_loop_config)
                break
            except Exception as exc:  # noqa: BLE001 - re-raised below once retries run out
                if attempt == self.max_failures:
                    raise WorkerGroupError(f"{type(exc).__name__}: {exc}", {0: exc}) from exc
        kept = self.store.kept()
        return InProcessResult(best_checkpoints=kept, metrics=host.reports[-1] if host.reports
                               else kept[-1][1], reports=host.reports)
