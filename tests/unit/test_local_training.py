"""`train.num_workers: 0`: the loop in this process, with checkpoints kept and resumed as a Ray
Train run keeps them (training/local.py). The loops here are small functions that report
through the same host calls the real loop makes (training/loop.py:_report)."""

from __future__ import annotations

import os
import tempfile

import pytest

from mlsd_ray.training.checkpoint import RANK_METRIC
from mlsd_ray.training.host import current
from mlsd_ray.training.local import InProcessTrainer

SCORES = [0.5, 0.9, 0.7, 0.8, 0.6]  # the best epoch is the 2nd


def scoring_loop(config: dict) -> None:
    """Reports SCORES from the checkpoint it resumes from; each epoch checkpoints its number."""
    host = current()
    latest = host.latest_checkpoint()
    start = int(open(f"{latest.path}/epoch.txt").read()) if latest else 0
    config["starts"].append(start)
    for epoch in range(start, config["epochs"]):
        if epoch == config.get("fail_at") and len(config["starts"]) == 1:
            raise RuntimeError(f"lost in epoch {epoch + 1}")
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "epoch.txt"), "w") as out:
                out.write(str(epoch + 1))
            host.report({"epoch": epoch + 1, RANK_METRIC: SCORES[epoch]}, directory)


def trainer(run_dir, epochs: int, max_failures: int = 0, fail_at: int | None = None,
            seen: list | None = None) -> InProcessTrainer:
    class Seen:
        def after_report(self, run_context, metrics, checkpoint):
            (seen if seen is not None else []).append((metrics[0]["epoch"], checkpoint))

    config = {"epochs": epochs, "starts": [], "fail_at": fail_at}
    return InProcessTrainer(scoring_loop, config, str(run_dir), keep=2,
                            max_failures=max_failures, datasets={}, use_gpu=False,
                            callbacks=[Seen()])


def kept_epochs(run_dir) -> list[str]:
    return sorted(name for name in os.listdir(run_dir) if name.startswith("checkpoint_"))


def test_keeps_the_best_two_and_the_latest_and_tells_the_callbacks(tmp_path):
    seen: list = []
    result = trainer(tmp_path / "run", epochs=5, seen=seen).fit()
    assert kept_epochs(tmp_path / "run") == ["checkpoint_epoch_0002", "checkpoint_epoch_0004",
                                             "checkpoint_epoch_0005"]
    best, metrics = max(result.best_checkpoints, key=lambda cm: cm[1][RANK_METRIC])
    assert metrics["epoch"] == 2 and best.path.endswith("checkpoint_epoch_0002")
    assert result.metrics["epoch"] == 5
    assert [epoch for epoch, _ in seen] == [1, 2, 3, 4, 5]
    assert all(checkpoint is not None for _, checkpoint in seen)


def test_a_rerun_of_the_name_resumes_after_the_latest(tmp_path):
    trainer(tmp_path / "run", epochs=3).fit()
    again = trainer(tmp_path / "run", epochs=5)
    result = again.fit()
    assert again.train_loop_config["starts"] == [3]
    assert [m["epoch"] for m in result.reports] == [4, 5]


def test_a_failure_retries_from_the_latest_checkpoint(tmp_path):
    retried = trainer(tmp_path / "run", epochs=4, max_failures=1, fail_at=2)
    assert retried.fit().metrics["epoch"] == 4
    assert retried.train_loop_config["starts"] == [0, 2]


def test_a_failure_past_max_failures_is_a_worker_group_error_naming_it(tmp_path):
    from ray.train import TrainingFailedError

    from mlsd_ray.training.trainer import failure_message

    with pytest.raises(TrainingFailedError) as failed:
        trainer(tmp_path / "run", epochs=4, max_failures=0, fail_at=1).fit()
    assert failure_message(failed.value) == "RuntimeError: lost in epoch 2"


def test_a_copy_cut_short_is_not_taken_for_a_checkpoint(tmp_path):
    trainer(tmp_path / "run", epochs=2).fit()
    (tmp_path / "run" / "checkpoint_epoch_0003").mkdir()  # no report.json: never finished
    again = trainer(tmp_path / "run", epochs=3)
    again.fit()
    assert again.train_loop_config["starts"] == [2]
