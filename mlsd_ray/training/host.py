"""Where a training loop runs, and where its reports go.

The loops (tasks/image/train.py, tasks/tabular/train.py) ask `current()` for their rank and
world size, their device, the checkpoint to resume from, their dataset shard, and where each
epoch's report goes. In a Ray Train worker group that is Ray Train (`TrainWorker`). A Tune
trial with one worker runs the loop in the trial's own process instead (`TrialProcess`, set by
`hosting`): no Train controller and worker group to start, which cost about 11 s per fit on 2
cores (docs/performance.md), and its reports and checkpoints go straight to Tune. Training with
`train.num_workers: 0` runs it in the driver's process (`DriverProcess`, training/local.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

__all__ = ["current", "DriverProcess", "hosting", "InProcess", "TrainWorker", "TrialProcess"]

_hosted: InProcess | None = None


class TrainWorker:
    """The loop inside a Ray Train worker group."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this worker's device, in DDP when there are several workers."""
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def latest_checkpoint(self):
        """Ray's latest checkpoint of this run (after a failure, or a re-run of the name)."""
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict, directory: str | None = None) -> None:
        """Every worker reports (a barrier); `directory`, when given, is a checkpoint."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(directory) if directory else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def dataset_shard(self, split: str):
        import ray.train

        return ray.train.get_dataset_shard(split)


class InProcess:
    """One worker in this process (rank 0 of 1): no Train controller and worker group to
    start. Subclasses say where its reports and checkpoints go."""

    rank, world = 0, 1

    def __init__(self, datasets: dict | None, use_gpu: bool):
        self.datasets = datasets or {}
        self.reports: list[dict] = []
        cuda = use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

    def dataset_shard(self, split: str):
        return self.datasets[split].iterator()

    def latest_checkpoint(self):
        """The checkpoint to resume from, or None."""
        raise NotImplementedError

    def report(self, metrics: dict, directory: str | None = None) -> None:
        """One epoch's metrics; `directory`, when given, is a checkpoint."""
        raise NotImplementedError


class TrialProcess(InProcess):
    """One worker in a Tune trial's own process. `to_tune=False` (a cross-validation fold)
    keeps the reports here (`reports`) instead of sending them to Tune."""

    def __init__(self, datasets: dict | None, use_gpu: bool, threads: int,
                 to_tune: bool = True):
        super().__init__(datasets, use_gpu)
        self.to_tune = to_tune
        torch.set_num_threads(max(1, threads))

    def latest_checkpoint(self):
        """Tune's latest checkpoint of this trial (when Tune restarts a failed one)."""
        import ray.tune

        return ray.tune.get_checkpoint() if self.to_tune else None

    def report(self, metrics: dict, directory: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if not self.to_tune:
            return
        import ray.tune

        checkpoint = ray.tune.Checkpoint.from_directory(directory) if directory else None
        ray.tune.report(metrics, checkpoint=checkpoint)


class DriverProcess(InProcess):
    """The loop in the driver's own process (`train.num_workers: 0`, training/local.py): its
    checkpoints go to `store`, which also holds the one to resume from; `after_report(metrics,
    checkpoint)` hears every report (the console's epoch lines, live tracking)."""

    def __init__(self, store, datasets: dict | None, use_gpu: bool,
                 after_report: Callable[[dict, object], None]):
        super().__init__(datasets, use_gpu)
        self.store, self.after_report = store, after_report

    def latest_checkpoint(self):
        """The run's latest kept checkpoint (after a failure, or a re-run of the name)."""
        return self.store.latest()

    def report(self, metrics: dict, directory: str | None = None) -> None:
        self.reports.append(dict(metrics))
        checkpoint = self.store.keep(directory, metrics) if directory else None
        self.after_report(metrics, checkpoint)


def current() -> TrainWorker | InProcess:
    """Where the calling loop runs: the process `hosting` set, else a Train worker."""
    return _hosted or TrainWorker()


@contextlib.contextmanager
def hosting(host: InProcess) -> Iterator[InProcess]:
    """Run the loops called inside this block in this process, reporting to `host`."""
    global _hosted
    previous, _hosted = _hosted, host
    try:
        yield host
    finally:
        _hosted = previous
