"""The baseline of bench/train_throughput.py: `mlsd train`'s work as a plain PyTorch script.

No Ray: read the prepared train/val/test splits (parquet) into tensors, train seed_cnn with
the same recipe as configs/default.yaml (AdamW, one-cycle, label smoothing, a random shift of
2 pixels, batch 64, 30 epochs), keep the weights of the best val epoch, and score them on test.
One process with 2 threads by default; `--workers 2` is the same script as plain PyTorch DDP
(two gloo processes of one thread, batch 32 each, as `mlsd train`'s two workers). Prints one
JSON line: test accuracy, seconds per phase, steady-state images/s.

    python bench/bare_digits.py --dataset $MLSD_HOME/datasets/digits/<fingerprint> [--seed 0]
        [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torchvision.transforms import v2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mlsd_ray.tasks.image.models import build_model  # noqa: E402  (the same nn.Sequential, nothing else)


def load(dataset: Path, split: str, shape: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images as float N×C×H×W in [0, 1], and int64 labels."""
    table = pq.read_table(dataset / split, columns=["image", "label"])
    column = table.column("image").combine_chunks()
    values = getattr(column, "storage", column).flatten().to_numpy(zero_copy_only=False)
    images = torch.from_numpy(np.asarray(values, dtype=np.uint8).reshape(-1, *shape).copy())
    labels = torch.from_numpy(table.column("label").to_numpy().astype(np.int64))
    return images.permute(0, 3, 1, 2).float().div_(255), labels


def accuracy(model, images, labels, mean, std) -> float:
    model.eval()
    with torch.no_grad():
        predicted = model((images - mean) / std).argmax(1)
    return (predicted == labels).float().mean().item()


def train(args, rank: int = 0, world: int = 1) -> dict | None:
    """Train on this rank's share of every epoch (all of it with one process); DDP over gloo
    when `world` > 1, each rank with batch_size // world. Rank 0 returns the JSON line."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    manifest = json.loads((args.dataset / "manifest.json").read_text())
    shape = manifest["schema"]["image"]["shape"]
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (
        load(args.dataset, split, shape) for split in ("train", "val", "test"))
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True)
    loaded = time.perf_counter()

    model = build_model("seed_cnn", shape[2], shape[0], len(manifest["class_names"]))
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=5e-4)
    batch, share = args.batch_size // world, len(x_train) // world
    steps = -(-share // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr,
                                                   total_steps=args.epochs * steps)
    shift = v2.RandomCrop(shape[0], padding=2)
    best, best_state, rates = -1.0, None, []
    for epoch in range(args.epochs):
        epoch_started = time.perf_counter()
        model.train()
        # DDP: one permutation for every rank (same seed), each rank every world-th row of it.
        # One process keeps drawing from the global generator, as this script always did, so
        # its results per seed stay comparable with the earlier runs in docs/performance.md.
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(
            args.seed * 1000 + epoch)) if world > 1 else torch.randperm(len(x_train))
        for rows in order[rank::world][:share].split(batch):
            x = torch.stack([shift(image) for image in x_train[rows]])
            loss = F.cross_entropy(model((x - mean) / std), y_train[rows], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        rates.append(share * world / (time.perf_counter() - epoch_started))
        val = accuracy(model, x_val, y_val, mean, std)  # every rank: the same weights
        if val > best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    trained = time.perf_counter()
    model.load_state_dict(best_state)
    if rank:
        return None
    return {"workers": world, "threads": args.threads,
            "test_accuracy": round(accuracy(model, x_test, y_test, mean, std), 4),
            "best_val_accuracy": round(best, 4),
            "images_per_second": round(statistics.median(rates[1:] or rates), 1),
            "import_and_load_s": round(loaded - STARTED, 2),
            "train_s": round(trained - loaded, 2),
            "in_process_s": round(time.perf_counter() - STARTED, 2)}


def _ddp_rank(rank: int, args, port: int) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=args.workers)
    line = train(args, rank, args.workers)
    if line:
        print(json.dumps(line), flush=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64, help="over all workers")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--workers", type=int, default=1,
                        help="DDP processes (gloo, torch.multiprocessing); 1: no DDP")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per process (default: 2 // workers, at least 1)")
    args = parser.parse_args()
    args.threads = args.threads or max(1, 2 // args.workers)
    if args.workers == 1:
        print(json.dumps(train(args)))
        return
    import torch.multiprocessing as mp

    mp.spawn(_ddp_rank, args=(args, _free_port()), nprocs=args.workers)


if __name__ == "__main__":
    main()
