"""Benchmark: Ray Train (one worker) against a bare PyTorch loop, same model, data and batch.

Both train the same model on the same prepared dataset with the same batch size and the same
per-step code (mlsd_ray.engine), evaluating on val and saving a checkpoint every epoch. Each is
run for 1 epoch and for 1 + N epochs; the difference gives steady-state images/s, free of
start-up (Ray's worker start, dataset materialisation, the first epoch's warm-up). Prints one
JSON line with both rates and the ratio. Target: >= 0.9x on CPU, >= 0.95x on GPU.

    python bench/train_throughput.py [--images 8000] [--size 32] [--epochs 3] [--gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsd_ray.checkpoint import save_checkpoint  # noqa: E402
from mlsd_ray.config import load_config  # noqa: E402
from mlsd_ray.data.prepare import PreparedDataset, prepare_dataset  # noqa: E402
from mlsd_ray.data.transforms import Augmenter  # noqa: E402
from mlsd_ray.engine import Step, evaluate, train_one_epoch  # noqa: E402
from mlsd_ray.models import build_model  # noqa: E402
from mlsd_ray.train import _autocast_dtype, _optimizer, _scheduler, loop_config, run_train  # noqa: E402


def bare_pytorch(cfg, dataset: PreparedDataset, epochs: int, device: torch.device) -> float:
    """Seconds for `epochs` epochs of the plain loop (data already in memory, like Ray's)."""
    x_train, y_train = dataset.load_split("train")
    x_val, y_val = dataset.load_split("val")
    config = loop_config(cfg, dataset, "bench")
    torch.manual_seed(0)
    model = build_model(**config["model"]).to(device)
    if device.type == "cuda" and cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    batch = cfg.train.batch_size
    steps = -(-len(x_train) // batch)
    optimizer = _optimizer(model, cfg.train)
    scheduler = _scheduler(optimizer, cfg.train, steps)
    step = Step(dataset.preprocessor, device, Augmenter(cfg.data.augment, x_train.shape[1]),
                channels_last=device.type == "cuda" and cfg.train.channels_last,
                autocast_dtype=_autocast_dtype(cfg.train, device))
    started = time.perf_counter()
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(epoch))
        order = order.numpy()
        batches = ({"image": x_train[order[i:i + batch]], "label": y_train[order[i:i + batch]]}
                   for i in range(0, len(order), batch))
        train_one_epoch(model, batches, optimizer, step, scheduler, cfg.train.label_smoothing)
        evaluate(model, ({"image": x_val[i:i + batch], "label": y_val[i:i + batch]}
                         for i in range(0, len(x_val), batch)), step)
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(directory, model, config["model"], config["preprocessing"],
                            config["reference"], config["metadata"],
                            {"epoch": epoch, "optimizer": optimizer.state_dict()})
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def ray_train(cfg, home: str, epochs: int, name: str) -> float:
    """Seconds of `mlsd train`'s fit for `epochs` epochs (one worker), start-up included."""
    cfg = cfg.model_copy(deep=True)
    cfg.train.epochs = epochs
    return run_train(cfg, home=home, run_name=name, log=lambda _: None).wall_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="measured epochs after the first")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--model", default="seed_cnn")
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    import ray

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=True, log_to_driver=False, logging_level="ERROR")
    from mlsd_ray.runtime import set_progress_bars

    set_progress_bars(False)
    device = torch.device("cuda" if args.gpu else "cpu")
    cfg = load_config(None, [
        f"data.source=synthetic:{args.images}", f"data.synthetic.image_size={args.size}",
        f"model.name={args.model}", f"train.batch_size={args.batch_size}",
        "train.num_workers=1", f"train.cpus_per_worker={cpus}", f"train.use_gpu={args.gpu}",
        "registry.auto_register=false"])
    torch.set_num_threads(cpus)  # Ray gives its worker as many threads as CPUs
    with tempfile.TemporaryDirectory() as home:
        dataset = prepare_dataset(cfg, home=home, log=lambda _: None)
        train_images = dataset.manifest["counts"]["splits"]["train"]
        bare = [bare_pytorch(cfg, dataset, n, device) for n in (1, 1 + args.epochs)]
        ray_s = [ray_train(cfg, home, n, f"bench-{n}") for n in (1, 1 + args.epochs)]
    bare_rate = train_images * args.epochs / (bare[1] - bare[0])
    ray_rate = train_images * args.epochs / (ray_s[1] - ray_s[0])
    print(json.dumps({
        "benchmark": "train_throughput", "device": torch.cuda.get_device_name() if args.gpu
        else f"cpu x{cpus}", "model": args.model, "train_images": train_images,
        "image_size": args.size, "batch_size": args.batch_size, "measured_epochs": args.epochs,
        "bare_pytorch_images_per_s": round(bare_rate, 1),
        "ray_train_images_per_s": round(ray_rate, 1),
        "ratio_ray_over_bare": round(ray_rate / bare_rate, 3),
        "ray_first_epoch_s": round(ray_s[0], 1), "bare_first_epoch_s": round(bare[0], 1),
        "target_ratio": 0.95 if args.gpu else 0.9}))


if __name__ == "__main__":
    main()
