"""Where the wall time of one `mlsd train` on digits goes: one JSON line per phase.

Runs the training stage in this process, phase by phase, with the same functions `mlsd
train` calls (runtime.ensure_ray, train.build_trainer with its ingest plan, fit, the test
score), and splits the fit with the per-epoch timers the loop reports (`time_<phase>_s`).
All-reduce is measured apart, since DDP overlaps it with the backward pass: two gloo
processes with one thread each reduce the model's gradients as often as an epoch does.

    python bench/train_profile.py [--epochs 30] [--workers 2] [--set KEY=VALUE]...
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

STARTED = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def clock(phases: dict, name: str, since: float) -> float:
    now = time.perf_counter()
    phases[name] = round(now - since, 2)
    return now


def all_reduce_seconds(parameters: int, steps: int, world: int = 2) -> float:
    """Seconds for `steps` gloo all-reduces of `parameters` float32 values across `world`
    single-threaded processes on this machine."""
    import torch.multiprocessing as mp

    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_reduce_worker, args=(world, parameters, steps, results), nprocs=world, join=True)
    return results[0]


def _reduce_worker(rank: int, world: int, parameters: int, steps: int, results) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29533", rank=rank,
                            world_size=world)
    gradients = torch.randn(parameters)
    dist.all_reduce(gradients)  # warm-up: connections
    dist.barrier()
    started = time.perf_counter()
    for _ in range(steps):
        dist.all_reduce(gradients)
    results[rank] = time.perf_counter() - started
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()

    import pandas as pd
    import torch

    from mlsd_ray.core.runtime import configure, ensure_ray
    from mlsd_ray.core.workspace import Workspace
    from mlsd_ray.tasks import load_config
    from mlsd_ray.tasks.image.data.prepare import prepare_dataset
    from mlsd_ray.tasks.image.models import build_model
    from mlsd_ray.tasks.image.train import (
        build_trainer,
        epoch_line,
        predict_split,
    )
    from mlsd_ray.training.checkpoint import RANK_METRIC
    from mlsd_ray.training.progress import EpochRelay

    phases: dict[str, float] = {}
    mark = clock(phases, "process start and imports", STARTED)
    cfg = load_config(None, [f"train.epochs={args.epochs}", f"train.num_workers={args.workers}",
                             "registry.auto_register=false", *args.overrides])
    quiet = lambda _: None  # noqa: E731
    with tempfile.TemporaryDirectory() as folder:
        workspace = Workspace.at(folder)
        configure(verbose=False)
        ensure_ray(workspace)
        mark = clock(phases, "Ray start", mark)
        dataset = prepare_dataset(cfg, workspace=workspace, log=quiet)
        mark = clock(phases, "data stage (mlsd data; reused by mlsd train)", mark)
        reports: list[dict] = []  # every epoch's report, as the driver hears it
        relay = EpochRelay(lambda m: reports.append(m) or epoch_line(m, cfg.train.epochs),
                           quiet)
        trainer = build_trainer(cfg, dataset, "profile", workspace.runs,
                                callbacks=[relay.callback()], log=quiet)
        mark = clock(phases, "ingest plan (splits into the object store), loop config", mark)
        with relay:
            result = trainer.fit()
        fit_s = time.perf_counter() - mark
        mark = clock(phases, "fit (below: split by the loop's timers)", mark)
        checkpoint, _ = max(result.best_checkpoints, key=lambda cm: cm[1][RANK_METRIC])
        with checkpoint.as_directory() as directory:
            from mlsd_ray.tasks.image.checkpoint import load_model

            accuracy = predict_split(load_model(directory), dataset, "test").accuracy
        clock(phases, "best checkpoint: load and score test", mark)
        history = pd.DataFrame(reports)

    epochs = len(history)
    per_epoch = {column: float(history[column].sum()) for column in history
                 if column.startswith("time_")}
    in_epochs = float(history["epoch_seconds"].sum())
    rates = history["images_per_second"].tolist()
    steady = statistics.median(rates[1:] or rates)
    model = build_model(cfg.model.name, 1, dataset.manifest["preprocessing"]["image_size"], 10)
    parameters = sum(p.numel() for p in model.parameters())
    steps = -(-dataset.manifest["counts"]["splits"]["train"] // cfg.train.batch_size) * epochs
    reduce_s = all_reduce_seconds(parameters, steps) if args.workers > 1 else 0.0
    fit_rows = {
        **{f"fit: {k.removeprefix('time_').removesuffix('_s')} (all epochs)": round(v, 2)
           for k, v in per_epoch.items()},
        "fit: of which all-reduce (gloo, measured apart)": round(reduce_s, 2),
        "fit: worker group start, reports, shutdown (rest of fit)": round(fit_s - in_epochs, 2),
    }
    for phase, seconds in {**phases, **fit_rows}.items():
        print(json.dumps({"benchmark": "train_profile", "phase": phase, "seconds": seconds}))
    print(json.dumps({"benchmark": "train_profile_summary", "epochs": epochs,
                      "workers": args.workers, "wall_s": round(time.perf_counter() - STARTED, 1),
                      "test_accuracy": round(accuracy, 4),
                      "steady_images_per_s": round(steady, 1), "parameters": parameters,
                      "torch_threads_driver": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
