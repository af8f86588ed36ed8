"""Benchmark: `mlsd train` against the same work as a plain PyTorch script, side by side.

Prepares digits once (untimed), then for each seed runs, one after the other:
- bench/bare_digits.py: one process, no Ray, 2 threads, the same splits, model and recipe;
- bench/bare_digits.py --workers N for each layout of N >= 2 workers: the same script as plain
  PyTorch DDP (N gloo processes), which shows what data parallelism itself costs here;
- `mlsd train` for each of `--workers` (registration off, the same work): 2 Ray Train workers
  × 1 CPU (the default) and 0 (the loop in the `mlsd` process, training/local.py).
Each is timed from process start to the test accuracy printed. Steady-state images/s is the
median over epochs 2..N of each epoch's training phase (for `mlsd train`: from the run's
history). Prints one JSON line per seed and layout, and a summary line per layout with the
ratios. Targets: wall <= 2x bare, images/s >= 0.9x bare, test accuracy as bare's.

    python bench/train_throughput.py [--seeds 0,1,2] [--epochs 30] [--workers 2,0] [--home DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLSD = [sys.executable, "-m", "mlsd_ray.cli"]


def timed_json(command: list[str], env: dict) -> tuple[dict, float]:
    """Run `command`, return its last stdout line as JSON and its wall seconds."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), wall


def steady_rate(checkpoint: str) -> float:
    """Median images/s of epochs 2..N of a run, from its checkpoint's history."""
    import torch

    state = torch.load(Path(checkpoint) / "train_state.pt", weights_only=False)
    rates = [h["images_per_second"] for h in state["history"]]
    return statistics.median(rates[1:] or rates)


def bare_run(seed: int, epochs: int, dataset: str, env: dict, workers: int = 1
             ) -> tuple[dict, float]:
    """bench/bare_digits.py: one process with 2 threads, or `workers` plain DDP processes."""
    return timed_json([sys.executable, "bench/bare_digits.py", "--dataset", dataset,
                       "--seed", str(seed), "--epochs", str(epochs),
                       "--workers", str(workers)], env)


def ddp_columns(ddp: dict, ddp_wall: float, ours_wall: float, ours_rate: float) -> dict:
    """The row's comparison with plain PyTorch DDP in the same layout."""
    return {"bare_ddp_wall_s": round(ddp_wall, 1),
            "bare_ddp_images_per_s": ddp["images_per_second"],
            "bare_ddp_test_accuracy": ddp["test_accuracy"],
            "wall_ratio_mlsd_over_bare_ddp": round(ours_wall / ddp_wall, 2),
            "rate_ratio_mlsd_over_bare_ddp": round(ours_rate / ddp["images_per_second"], 3)}


def one_seed(seed: int, epochs: int, workers: list[int], dataset: str, env: dict) -> list[dict]:
    """Bare PyTorch (and plain DDP for each layout of several workers), then `mlsd train` with
    each number of workers: one row per layout."""
    bare, bare_wall = bare_run(seed, epochs, dataset, env)
    ddp = {count: bare_run(seed, epochs, dataset, env, count) for count in workers if count > 1}
    rows = []
    for count in workers:
        ours, ours_wall = timed_json([*MLSD, "train", "--json", "--epochs", str(epochs),
                                      "--num-workers", str(count),
                                      "--set", f"train.seed={seed}",
                                      "--set", "registry.auto_register=false"], env)
        ours_rate = steady_rate(ours["checkpoint"])
        rows.append({
            "benchmark": "train_throughput", "seed": seed, "epochs": epochs,
            "num_workers": count, "bare_wall_s": round(bare_wall, 1),
            "mlsd_wall_s": round(ours_wall, 1),
            "wall_ratio_mlsd_over_bare": round(ours_wall / bare_wall, 2),
            "bare_images_per_s": bare["images_per_second"],
            "mlsd_images_per_s": round(ours_rate, 1),
            "rate_ratio_mlsd_over_bare": round(ours_rate / bare["images_per_second"], 3),
            "bare_test_accuracy": bare["test_accuracy"],
            "mlsd_test_accuracy": round(ours["test_accuracy"], 4)})
        if count in ddp:
            rows[-1].update(ddp_columns(*ddp[count], ours_wall, ours_rate))
    return rows


def summary(rows: list[dict], count: int) -> dict:
    """The ratios of one layout over every seed."""
    mine = [r for r in rows if r["num_workers"] == count]
    against_ddp = {} if count < 2 else {
        "rate_ratio_mlsd_over_bare_ddp": round(statistics.mean(
            r["rate_ratio_mlsd_over_bare_ddp"] for r in mine), 3),
        "rate_ratio_bare_ddp_over_bare": round(statistics.mean(
            r["bare_ddp_images_per_s"] / r["bare_images_per_s"] for r in mine), 3)}
    return {
        "benchmark": "train_throughput_summary", "num_workers": count,
        "seeds": [r["seed"] for r in mine],
        "wall_ratio_mlsd_over_bare": round(statistics.mean(
            r["wall_ratio_mlsd_over_bare"] for r in mine), 2),
        "rate_ratio_mlsd_over_bare": round(statistics.mean(
            r["rate_ratio_mlsd_over_bare"] for r in mine), 3),
        "mlsd_test_accuracy": [r["mlsd_test_accuracy"] for r in mine],
        "bare_test_accuracy": [r["bare_test_accuracy"] for r in mine], **against_ddp,
        "targets": {"wall_ratio_max": 2.0, "rate_ratio_min": 0.9}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--workers", default="2,0",
                        help="train.num_workers of each `mlsd train` run (0: in its process)")
    parser.add_argument("--home", default=None, help="MLSD_HOME (default: a temporary one)")
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        env = {**os.environ, "MLSD_HOME": args.home or scratch}
        dataset, _ = timed_json([*MLSD, "data", "--json"], env)
        rows: list[dict] = []
        for seed in (int(s) for s in args.seeds.split(",")):
            for row in one_seed(seed, args.epochs, workers, dataset["path"], env):
                rows.append(row)
                print(json.dumps(row), flush=True)
    for count in workers:
        print(json.dumps(summary(rows, count)))


if __name__ == "__main__":
    main()
