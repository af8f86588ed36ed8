"""How training workers get their batches: from memory when the splits fit, else streamed.

Ray Data's streaming split re-executes a dataset for every epoch and every worker: on the
1,259 digits that cost more than the forward and backward passes (docs/performance.md). So
when the splits together are no larger than `train.in_memory_limit_mb`, the driver puts each
split into the object store once as plain columns (read straight from the prepared parquet,
or from materialised Ray Datasets such as Tune's folds), and every worker reads them from
there (zero-copy on its node) and deals itself a disjoint share each epoch, as PyTorch's
DistributedSampler does. Larger splits stream through Ray Data as before, so data that does
not fit in memory still trains. The choice is made from the measured size and printed
(`IngestPlan.describe`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["epoch_rows", "fits_in_memory", "IngestPlan", "MEMORY", "memory_plan", "parquet_bytes",
           "plan_ingest", "STREAMING", "WorkerData"]

MEMORY = "memory"
STREAMING = "streaming"


@dataclass(frozen=True)
class IngestPlan:
    """Where the workers' batches come from; it travels to every worker inside the loop config.

    `columns` (memory only) maps a split name to the object ref of its columns
    (`dict[str, np.ndarray]`, rows in the dataset's order). `train_rows` sizes the schedule.
    """

    mode: str
    size_bytes: int
    limit_bytes: int
    train_rows: int
    columns: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the console: the size, the limit, and what follows from them."""
        size = f"{self.size_bytes / 2**20:.1f} MB"
        limit = f"train.in_memory_limit_mb={self.limit_bytes / 2**20:g}"
        if self.mode == MEMORY:
            return f"data: {size} fit in memory ({limit}): each worker loads the splits once"
        return f"data: {size} exceed {limit}: streamed through Ray Data every epoch"


def _limit(limit_mb: float) -> int:
    return int(limit_mb * 2**20)


def plan_ingest(datasets: dict, limit_mb: float) -> IngestPlan:
    """Measure materialised Ray `datasets` and choose memory or streaming (0 always streams)."""
    size = int(sum(dataset.size_bytes() for dataset in datasets.values()))
    rows = datasets["train"].count()  # cheap: materialised
    if _limit(limit_mb) <= 0 or size > _limit(limit_mb):
        return IngestPlan(STREAMING, size, _limit(limit_mb), rows)
    return memory_plan({split: _columns(dataset) for split, dataset in datasets.items()},
                       limit_mb)


def memory_plan(splits: dict[str, dict[str, np.ndarray]], limit_mb: float) -> IngestPlan:
    """Put columns already in the driver's memory into the object store, once per split."""
    import ray

    size = sum(values.nbytes for columns in splits.values() for values in columns.values())
    rows = len(next(iter(splits["train"].values())))
    return IngestPlan(MEMORY, int(size), _limit(limit_mb), rows,
                      {split: ray.put(columns) for split, columns in splits.items()})


def parquet_bytes(location: str) -> int:
    """Uncompressed size of the parquet files under `location`, from their footers."""
    import pyarrow.parquet as pq

    from mlsd_ray.core import storage

    fs, _ = storage.filesystem(location)
    total = 0
    for info in storage.list_files(location):
        if info.path.endswith(".parquet"):
            with fs.open_input_file(info.path) as handle:
                metadata = pq.read_metadata(handle)
            total += sum(metadata.row_group(i).total_byte_size
                         for i in range(metadata.num_row_groups))
    return total


def fits_in_memory(locations: list[str], limit_mb: float) -> bool:
    """Are the parquet splits at `locations` together within the in-memory limit?"""
    return 0 < sum(parquet_bytes(location) for location in locations) <= _limit(limit_mb)


def _columns(dataset) -> dict[str, np.ndarray]:
    """A materialised dataset as one array per column, in its block order."""
    batches = list(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    if not batches:
        return {name: np.empty(0) for name in dataset.schema().names}
    return {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}


def epoch_rows(count: int, rank: int, world: int, shuffle_seed: int | None) -> np.ndarray:
    """The rows of `count` that worker `rank` of `world` takes this epoch.

    Training (`shuffle_seed` given): one permutation shared by all workers, every world-th row
    from `rank` on, cut to count // world so that every DDP replica steps equally often (at
    most world - 1 rows sit out an epoch, different ones each epoch). Evaluation: every row of
    this worker's share, in order.
    """
    if shuffle_seed is None:
        return np.arange(rank, count, world)
    order = np.random.default_rng(shuffle_seed).permutation(count)
    return order[rank::world][:count // world]


class WorkerData:
    """One worker's view of the splits: `batches(split, ...)` for each epoch. Memory: the
    rows `epoch_rows` deals this worker. Streaming: its Ray Data shard, with Ray's local
    shuffle buffer."""

    def __init__(self, plan: IngestPlan, rank: int, world: int, shard_of=None):
        self.plan, self.rank, self.world = plan, rank, world
        self.shard_of = shard_of  # split -> this worker's DataIterator (streaming only)
        self._loaded: dict[str, dict[str, np.ndarray]] = {}

    def batches(self, split: str, batch_size: int, shuffle_seed: int | None = None
                ) -> Iterator[dict[str, np.ndarray]]:
        """This worker's batches of `split`: shuffled and equal across workers when
        `shuffle_seed` is given (training), else every row of its share in order (evaluation)."""
        if self.plan.mode == MEMORY:
            return self._memory_batches(split, batch_size, shuffle_seed)
        return self._stream_batches(split, batch_size, shuffle_seed)

    def _split(self, split: str) -> dict[str, np.ndarray]:
        if split not in self._loaded:
            import ray

            self._loaded[split] = ray.get(self.plan.columns[split])
        return self._loaded[split]

    def _memory_batches(self, split, batch_size, shuffle_seed):
        columns = self._split(split)
        mine = epoch_rows(len(next(iter(columns.values()))), self.rank, self.world, shuffle_seed)
        for start in range(0, len(mine), batch_size):
            rows = mine[start:start + batch_size]
            yield {name: values[rows] for name, values in columns.items()}

    def _stream_batches(self, split, batch_size, shuffle_seed):
        shard = self.shard_of(split)
        if shuffle_seed is None:
            return shard.iter_batches(batch_size=batch_size, batch_format="numpy")
        return shard.iter_batches(batch_size=batch_size, batch_format="numpy",
                                  local_shuffle_buffer_size=4 * batch_size,
                                  local_shuffle_seed=shuffle_seed * self.world + self.rank)
