"""How training workers share the in-memory splits, and when a checkpoint is due (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from mlsd_ray.core.config import TrainConfig
from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.training.ingest import MEMORY, STREAMING, IngestPlan, epoch_rows
from mlsd_ray.training.loop import checkpoint_due


@pytest.mark.parametrize("count, world", [(1259, 2), (1259, 3), (10, 4), (64, 1)])
def test_training_shares_are_disjoint_equal_and_reshuffled_each_epoch(count, world):
    shares = [epoch_rows(count, rank, world, shuffle_seed=7) for rank in range(world)]
    assert {len(share) for share in shares} == {count // world}  # DDP steps equally often
    taken = np.concatenate(shares)
    assert len(set(taken.tolist())) == len(taken)  # no row twice in an epoch
    assert count - len(taken) < world  # at most world - 1 rows sit out
    again = [epoch_rows(count, rank, world, shuffle_seed=7) for rank in range(world)]
    assert all((a == b).all() for a, b in zip(shares, again))  # seeded: resumable
    if world > 1:
        other = epoch_rows(count, 0, world, shuffle_seed=8)
        assert not np.array_equal(np.sort(shares[0]), np.sort(other))  # a new epoch, a new deal


def test_evaluation_covers_every_row_once():
    shares = [epoch_rows(269, rank, 2, shuffle_seed=None) for rank in range(2)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(269))


def test_the_plan_says_which_way_and_why():
    assert "fit in memory" in IngestPlan(MEMORY, 400_000, 2**30, 1259).describe()
    streamed = IngestPlan(STREAMING, 3 * 2**30, 2**30, 10**6).describe()
    assert "streamed through Ray Data" in streamed and "in_memory_limit_mb=1024" in streamed


def epoch(number: int, rank: float) -> dict:
    return {"epoch": number, RANK_METRIC: rank, "val_accuracy": rank}


@pytest.mark.parametrize("history, current, expected", [
    ([], epoch(1, 0.5), True),  # the first epoch is the best so far
    ([epoch(1, 0.9)], epoch(2, 0.8), False),  # worse, not periodic, not last
    ([epoch(1, 0.9)], epoch(2, 0.95), True),  # a new best
    ([epoch(i, 0.9) for i in range(1, 5)], epoch(5, 0.1), True),  # every 5th
    ([epoch(i, 0.9) for i in range(1, 10)], epoch(10, 0.1), True),  # the last
])
def test_checkpoints_every_n_epochs_at_each_best_and_at_the_end(history, current, expected):
    cfg = TrainConfig(epochs=10, checkpoint_every=5)
    assert checkpoint_due(history, current, cfg, stop=False) is expected


def test_an_early_stop_always_checkpoints():
    cfg = TrainConfig(epochs=10, checkpoint_every=0)
    assert checkpoint_due([epoch(1, 0.9), epoch(2, 0.9)], epoch(3, 0.5), cfg, stop=True)
    assert not checkpoint_due([epoch(1, 0.9)], epoch(2, 0.5), cfg, stop=False)
