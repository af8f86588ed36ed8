"""Benchmark: image-folder preparation with Ray Data vs the same transforms in one process.

Generates (once, cached) a folder of PNGs, then runs the data stage's per-image work -- read,
decode, validate, content hash, resize, normalise -- twice: through Ray Data on the local CPUs
(the reader `mlsd data` uses) and in a plain single-process loop calling the same functions.
A third run splits the loop over --cpus plain processes (no Ray): the ceiling this machine
gives to any parallel version of the work. Prints one JSON line with images/s for each and the
ratios. `ray.init` is excluded; the first
Ray run (which also starts worker processes) is reported apart as "cold", and the ratio is the
median of warm runs over the median of loop runs (with the extremes beside it). The file
listing is timed in both.

    python bench/data_throughput.py [--images 20000] [--size 64] [--out-size 32] [--cpus 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsd_ray.tasks.image.config import DataConfig  # noqa: E402
from mlsd_ray.tasks.image.data.sources import FolderSource, read_files  # noqa: E402
from mlsd_ray.tasks.image.data.transforms import Preprocessor  # noqa: E402
from mlsd_ray.tasks.image.data.validate import ValidationSpec, validate_batch  # noqa: E402

CLASSES = 10


def make_folder(root: Path, count: int, size: int) -> Path:
    """`count` random-noise-plus-gradient PNGs in CLASSES class folders (reused when present)."""
    folder = root / f"pngs-{count}-{size}"
    done = folder / ".complete"
    if done.exists():
        return folder
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    for i in range(count):
        label = i % CLASSES
        (folder / f"class{label}").mkdir(parents=True, exist_ok=True)
        base = (ramp[None, :, None] * (label + 1) / CLASSES).repeat(size, 0).repeat(3, 2)
        image = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"class{label}" / f"{i:06d}.png")
    done.touch()
    return folder


def validate_and_normalize(batch: dict, spec: ValidationSpec, preprocessor: Preprocessor) -> dict:
    """The data stage's validation, then normalisation as training applies it."""
    valid = validate_batch(batch, spec)
    return {"image": preprocessor(valid["image"]).numpy(), "label": valid["label"]}


def run_ray(folder: Path, spec: ValidationSpec, preprocessor: Preprocessor,
            rows_per_task: int) -> tuple[int, float]:
    """The reader `mlsd data` uses (FolderSource), then validation and normalisation."""
    start = time.perf_counter()
    source = FolderSource(str(folder), DataConfig(source=f"folder:{folder}",
                                                  rows_per_task=rows_per_task))
    source.check()
    dataset = source.read(then=functools.partial(validate_and_normalize, spec=spec,
                                                 preprocessor=preprocessor))
    rows = dataset.materialize().count()  # prepared blocks stay in the object store
    return rows, time.perf_counter() - start


def run_loop(folder: Path, spec: ValidationSpec, preprocessor: Preprocessor,
             batch_size: int = 512, part: int = 0, parts: int = 1) -> tuple[int, float]:
    """The same functions, one process: list, then read, validate, normalise in batches.

    With `parts` > 1 this process takes every `parts`-th file starting at `part`.
    """
    start = time.perf_counter()
    source = FolderSource(str(folder), DataConfig(source=f"folder:{folder}"))
    source.check()
    rows = 0
    files = source._files[part::parts]
    for begin in range(0, len(files), batch_size):
        chunk = files[begin:begin + batch_size]
        batch = {"id": np.array([rel for rel, _ in chunk], dtype=object),
                 "source": np.array([info.path for _, info in chunk], dtype=object),
                 "label": np.array([rel.split("/", 1)[0] for rel, _ in chunk], dtype=object),
                 "path": np.array([info.path for _, info in chunk], dtype=object)}
        out = read_files(batch, str(folder), then=functools.partial(
            validate_and_normalize, spec=spec, preprocessor=preprocessor))
        rows += len(out["label"])
    return rows, time.perf_counter() - start


def _loop_part(args) -> tuple[int, float]:
    return run_loop(*args)


def run_processes(folder: Path, spec: ValidationSpec, preprocessor: Preprocessor,
                  processes: int) -> tuple[int, float]:
    """The hardware's ceiling for this work: the loop split over N plain processes, no Ray."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # fork after torch threads can hang
    with context.Pool(processes) as pool:
        one_file = (folder, spec, preprocessor, 512, 0, 10**9)
        pool.map(_loop_part, [one_file] * processes)  # warm-up: imports in every process
        start = time.perf_counter()
        parts = pool.map(_loop_part, [(folder, spec, preprocessor, 512, p, processes)
                                      for p in range(processes)])
        return sum(rows for rows, _ in parts), time.perf_counter() - start


def rate(rows: int, seconds: float, expected: int) -> float:
    """Images per second, after checking that every image came through."""
    assert rows == expected, f"{rows} rows processed, expected {expected}"
    return rows / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--size", type=int, default=64, help="side of the generated PNGs")
    parser.add_argument("--out-size", type=int, default=32, help="side after resizing")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--rows-per-task", type=int, default=DataConfig().rows_per_task,
                        help="files per Ray Data task (data.rows_per_task)")
    parser.add_argument("--repeats", type=int, default=3, help="warm runs of each; median")
    parser.add_argument("--cache", default=str(Path(__file__).parent / ".cache"))
    args = parser.parse_args()

    print(f"generating/reusing {args.images} PNGs of {args.size}×{args.size}...", file=sys.stderr)
    folder = make_folder(Path(args.cache), args.images, args.size)
    spec = ValidationSpec(args.out_size, 3, tuple(f"class{c}" for c in range(CLASSES)))
    preprocessor = Preprocessor(args.out_size, 3, [0.5] * 3, [0.25] * 3)

    import ray

    from mlsd_ray.core.runtime import _tune_data_context, set_progress_bars

    init_start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    init_s = time.perf_counter() - init_start
    set_progress_bars(False)
    _tune_data_context()  # the same DataContext settings `mlsd data` runs with
    # The first run also pays for starting worker processes and their imports: reported as
    # "cold". The ratio is taken on the warm runs (a running cluster), median of --repeats.
    cold_rows, cold_s = run_ray(folder, spec, preprocessor, args.rows_per_task)
    ray_rates = [rate(*run_ray(folder, spec, preprocessor, args.rows_per_task), args.images)
                 for _ in range(args.repeats)]
    ray.shutdown()
    # The loop runs after Ray has shut down, so neither run shares the CPUs with the other.
    loop_rates = [rate(*run_loop(folder, spec, preprocessor), args.images)
                  for _ in range(args.repeats)]
    ceiling_rates = [rate(*run_processes(folder, spec, preprocessor, args.cpus), args.images)
                     for _ in range(args.repeats)]
    ray_rate, loop_rate = statistics.median(ray_rates), statistics.median(loop_rates)
    ceiling = statistics.median(ceiling_rates)
    result = {"benchmark": "data_throughput", "images": args.images, "size": args.size,
              "out_size": args.out_size, "cpus": args.cpus, "rows_per_task": args.rows_per_task,
              "cores_on_machine": os.cpu_count(), "repeats": args.repeats,
              "single_process_images_per_s": round(loop_rate, 1),
              "ray_data_images_per_s": round(ray_rate, 1),
              "ratio_ray_over_single": round(ray_rate / loop_rate, 3),
              "ratio_min_max": [round(min(ray_rates) / max(loop_rates), 3),
                                round(max(ray_rates) / min(loop_rates), 3)],
              "processes_images_per_s": round(ceiling, 1),
              "ratio_processes_over_single": round(ceiling / loop_rate, 3),
              "ray_share_of_process_ceiling": round(ray_rate / ceiling, 3),
              "ray_data_cold_images_per_s": round(rate(cold_rows, cold_s, args.images), 1),
              "cold_ratio_ray_over_single": round(rate(cold_rows, cold_s, args.images)
                                                  / loop_rate, 3),
              "ray_init_s": round(init_s, 2), "target_ratio": 1.5}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
