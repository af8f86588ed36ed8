"""Benchmark: how full dynamic batches get in a Serve replica, with nothing else in the way.

A minimal Serve deployment whose batched handler (batch size 32, 5 ms wait) either sleeps
`--work-ms` in a thread (no CPU) or runs a ResNet-18 forward at 64×64 in a thread, called by
`--callers` concurrent DeploymentHandle callers from this driver, batched two ways:
`serve` (Serve's `@serve.batch`) and `mlsd` (mlsd_ray/serve/batching.py, what our replicas
use). Prints one JSON line per work and batching: calls/s and the batch sizes.

    python bench/serve_batch_fill.py [--callers 32] [--calls 20] [--work-ms 22]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import time

import ray
from ray import serve

from mlsd_ray.serve.batching import Batcher


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class Batched:
    """One batched method; `work` is "sleep" (a thread that waits) or "resnet18";
    `batching` is "serve" (serve.batch) or "mlsd" (our Batcher)."""

    def __init__(self, work: str, work_ms: float, batching: str):
        import torch

        torch.set_num_threads(1)
        self.work, self.seconds, self.torch = work, work_ms / 1000, torch
        self.batching = batching
        self.batcher = Batcher(self.run_mlsd, max_batch_size=32, wait_s=0.005)
        self.sizes: collections.Counter = collections.Counter()
        if work == "resnet18":
            from torchvision.models import resnet18

            self.model = resnet18(num_classes=10).eval()

    def _run(self, count: int) -> None:
        if self.work == "sleep":
            time.sleep(self.seconds)
            return
        with self.torch.inference_mode():
            self.model(self.torch.zeros(count, 3, 64, 64))

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def run(self, items: list) -> list:
        return await self.run_mlsd(items)

    async def run_mlsd(self, items: list) -> list:
        self.sizes[len(items)] += 1
        await asyncio.to_thread(self._run, len(items))
        return items

    async def __call__(self, item):
        if self.batching == "mlsd":
            return await self.batcher.submit(item)
        return await self.run(item)

    def batch_sizes(self) -> dict:
        return dict(self.sizes)


def measure(work: str, batching: str, args) -> dict:
    handle = serve.run(Batched.bind(work, args.work_ms, batching), name=f"fill-{work}",
                       route_prefix=None)

    async def caller() -> None:
        for index in range(args.calls):
            await handle.remote(index)

    async def all_callers() -> float:
        started = time.perf_counter()
        await asyncio.gather(*[caller() for _ in range(args.callers)])
        return time.perf_counter() - started

    seconds = asyncio.run(all_callers())
    sizes = handle.batch_sizes.remote().result()
    serve.delete(f"fill-{work}")
    batches, calls = sum(sizes.values()), sum(size * n for size, n in sizes.items())
    return {"bench": "serve_batch_fill", "work": work, "batching": batching,
            "callers": args.callers,
            "calls": calls, "seconds": round(seconds, 2),
            "calls_per_s": round(calls / seconds, 1), "batches": batches,
            "mean_batch_size": round(calls / batches, 2), "max_batch_size_allowed": 32,
            "work_ms_at_batch_1": args.work_ms if work == "sleep" else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--callers", type=int, default=32)
    parser.add_argument("--calls", type=int, default=20, help="calls per caller")
    parser.add_argument("--work-ms", type=float, default=22.0,
                        help="the sleep's length: resnet18's batch-1 forward on this VM")
    args = parser.parse_args()
    ray.init(num_cpus=2, log_to_driver=False, logging_level="ERROR")
    try:
        for work in ("sleep", "resnet18"):
            for batching in ("serve", "mlsd"):
                print(json.dumps(measure(work, batching, args)), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
