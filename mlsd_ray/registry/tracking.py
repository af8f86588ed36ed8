"""Live tracking: the MLflow run of a training is open while it trains.

It starts before the fit with the run's params and its dataset (an MLflow input whose digest
is the dataset's fingerprint), takes each epoch's metrics from the driver as the epoch lines
arrive (training/progress.py), and ends FAILED (an error) or KILLED (Ctrl-C) with what it had
when training does not finish. On success the task logs its model into it and registers it
(tasks/*/registry.py).
"""

from __future__ import annotations

import time
from typing import Any

from mlsd_ray.core.runtime import log_stderr


class LiveRun:
    """`with LiveRun(home, run_name, params, dataset_path, fingerprint) as run:` ... fit with
    `observe=run.log_epoch`; the run is the active MLflow run inside the block.

    Disabled (`enabled=False`: a training that is not registered), it does nothing."""

    def __init__(self, home: str | None, run_name: str, params: dict[str, Any],
                 dataset_path: str, fingerprint: str, dataset_name: str,
                 enabled: bool = True, nested: bool = False):
        self.home, self.run_name, self.params, self.nested = home, run_name, params, nested
        self.dataset = (dataset_path, fingerprint, dataset_name)
        self.enabled, self.run_id = enabled, None
        self._warned = False

    def __enter__(self) -> LiveRun:
        if not self.enabled:
            return self
        import mlflow

        from mlsd_ray.registry import client

        self.client = client(self.home)
        run = mlflow.start_run(run_name=self.run_name, nested=self.nested)
        self.run_id = run.info.run_id
        mlflow.log_params(self.params)
        mlflow.log_input(_dataset(*self.dataset), context="training")
        return self

    def log_epoch(self, metrics: dict[str, Any]) -> None:
        """One report's numbers at step = its epoch. Called from the relay thread, so by run
        id (MLflow's active run is per thread); a store that refuses costs a warning, never
        the training."""
        if self.run_id is None:
            return
        from mlflow.entities import Metric

        stamp, step = int(time.time() * 1000), int(metrics.get("epoch", 0))
        values = [Metric(key, float(value), stamp, step) for key, value in metrics.items()
                  if key != "epoch" and isinstance(value, (int, float))
                  and not isinstance(value, bool)]
        try:
            self.client.log_batch(self.run_id, metrics=values)
        except Exception as exc:  # tracking is a record of the training, not a part of it
            if not self._warned:
                log_stderr(f"MLflow did not take epoch {step}'s metrics: {exc}")
                self._warned = True

    def __exit__(self, exc_type, exc, traceback) -> None:
        if self.run_id is None:
            return
        import mlflow

        status = ("FINISHED" if exc_type is None
                  else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        mlflow.end_run(status)


def _dataset(path: str, fingerprint: str, name: str):
    """The prepared dataset as an MLflow input: where it is, and its fingerprint."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    return MetaDataset(resolve_dataset_source(path), name=name, digest=fingerprint[:36])
