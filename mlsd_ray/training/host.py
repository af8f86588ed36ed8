"""Where a training loop runs, and where its reports go.

The loops (tasks/image/train.py, tasks/tabular/train.py) ask `current()` for their rank and
world size, their device, the checkpoint to resume from, their dataset shard, and where each
epoch's report goes. In a Ray Train worker group that is Ray Train (`TrainWorker`). A Tune
trial with one worker runs the loop in the trial's own process instead (`TrialProcess`, set by
`hosting`): no Train controller and worker group to start, which cost about 11 s per fit on 2
cores (docs/performance.md), and its reports and checkpoints go straight to Tune.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

_hosted: TrialProcess | None = None


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


class TrialProcess:
    """One worker in a Tune trial's own process. `to_tune=False` (a cross-validation fold)
    keeps the reports here (`reports`) instead of sending them to Tune."""

    rank, world = 0, 1

    def __init__(self, datasets: dict | None, use_gpu: bool, threads: int,
                 to_tune: bool = True):
        self.datasets = datasets or {}
        self.to_tune = to_tune
        self.reports: list[dict] = []
        cuda = use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if cuda else "cpu")
        torch.set_num_threads(max(1, threads))

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(self.device)

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

    def dataset_shard(self, split: str):
        return self.datasets[split].iterator()


def current() -> TrainWorker | TrialProcess:
    """Where the calling loop runs: the trial process `hosting` set, else a Train worker."""
    return _hosted or TrainWorker()


@contextlib.contextmanager
def hosting(host: TrialProcess) -> Iterator[TrialProcess]:
    """Run the loops called inside this block in this process, reporting to `host`."""
    global _hosted
    previous, _hosted = _hosted, host
    try:
        yield host
    finally:
        _hosted = previous
