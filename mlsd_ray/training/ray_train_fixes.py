"""What we change in the trainers Ray Train 2.60 builds, each for a cost or fault we measured
(docs/reliability.md, docs/performance.md). Imported only where a TorchTrainer is built: it
reaches into Ray Train's internals, pinned with the Ray version in pyproject.toml."""

from __future__ import annotations

from typing import Any

from ray.train.v2._internal.callbacks.datasets import DatasetsCallback


def adjust(trainer: Any) -> None:
    """Both changes below, on a TorchTrainer before its fit()."""
    keep_ctrl_c_ours(trainer)
    no_idle_dataset_manager(trainer)


def keep_ctrl_c_ours(trainer: Any) -> None:
    """Leave Ctrl-C to Python's KeyboardInterrupt, which the CLI turns into "interrupted" and
    exit code 130 (the driver's Ray, its train controller and workers end with it).

    Ray Train 2.60's fit() installs a SIGINT handler of its own and never puts the old one
    back. During fit, it made `mlsd train` exit 1 with no message. After fit, it held the
    finished controller and swallowed the next two Ctrl-C: the pipeline's serve stage and
    `--keep-serving` ("Ctrl-C stops") did not stop, and a test that interrupted a pipeline had
    to kill it, which left its Serve app on the test session's Ray."""
    trainer._register_sigint_handler = lambda controller: None


def no_idle_dataset_manager(trainer: Any) -> None:
    """A trainer given no Ray Datasets (the splits in the workers' memory, training/ingest.py)
    starts no DatasetManager actor. Ray Train 2.60 starts one for every worker group even
    with nothing to hand out: a Python process of about 2.5 CPU-seconds each time, which only
    idles. Ray Data's context still reaches the workers."""
    if trainer.datasets:
        return
    defaults = trainer._create_default_callbacks

    def callbacks() -> list:
        return [WithoutDatasets(trainer.train_run_context)
                if isinstance(callback, DatasetsCallback) else callback
                for callback in defaults()]

    trainer._create_default_callbacks = callbacks


class WithoutDatasets(DatasetsCallback):
    """Ray Train's DatasetsCallback for a run without datasets: the workers get Ray Data's
    context as before, and no shard provider (nothing asks one for a shard)."""

    def __init__(self, train_run_context: Any):
        super().__init__(train_run_context, datasets={})

    def before_init_train_context(self, workers: list) -> dict:
        return {}
