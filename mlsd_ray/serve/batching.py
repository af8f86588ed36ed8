"""Dynamic batching in a model replica: many requests, one forward pass.

Serve's `@serve.batch` seals a batch `batch_wait_timeout_s` after its first request, even
while the previous batch still runs, and queues it behind that one. With a forward pass
longer than the wait, every batch then holds what arrived in one wait (about 2.5 requests
with 32 callers, a 22 ms pass and a 5 ms wait: bench/serve_batch_fill.py), however many
requests wait meanwhile. `Batcher` forms a batch only when the previous one has finished, so
a batch holds everything that arrived while the model was busy, up to `max_batch_size`: the
rule an in-process micro-batcher follows (bench/plain_server.py), and Triton's dynamic
batcher. A request waits at most `wait_s` for companions, counted from its own arrival, so
under load a batch starts at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

__all__ = ["Answer", "Batcher", "Item"]

Item = TypeVar("Item")
Answer = TypeVar("Answer")


@dataclass
class _Waiting(Generic[Item, Answer]):
    item: Item
    arrived: float
    future: asyncio.Future[Answer] = field(repr=False)


class Batcher(Generic[Item, Answer]):
    """`await batcher.submit(item)` -> its answer, computed by `run(items)` (one answer per
    item, in order) together with the items of other callers. An exception raised by `run`
    goes to every caller of that batch. Create and use it on one event loop (a replica's)."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[list[Answer]]],
                 max_batch_size: int, wait_s: float):
        self._run, self.max_batch_size, self.wait_s = run, max_batch_size, wait_s
        self._queue: asyncio.Queue[_Waiting[Item, Answer]] = asyncio.Queue()
        self._consumer: asyncio.Task | None = None

    async def submit(self, item: Item) -> Answer:
        """Queue `item` for the next batch and wait for its answer."""
        if self._consumer is None or self._consumer.done():
            self._consumer = asyncio.get_running_loop().create_task(self._batches())
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Waiting(item, time.monotonic(), future))
        return await future

    async def _batches(self) -> None:
        while True:
            batch = await self._next_batch()
            if batch:
                await self._answer(batch)

    async def _next_batch(self) -> list[_Waiting[Item, Answer]]:
        """Everything waiting (up to max_batch_size); if that is less, what else arrives
        until the first of them has waited `wait_s`. Callers that gave up are left out."""
        batch = [await self._queue.get()]
        deadline = batch[0].arrived + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return [waiting for waiting in batch if not waiting.future.done()]

    async def _answer(self, batch: list[_Waiting[Item, Answer]]) -> None:
        try:
            answers = await self._run([waiting.item for waiting in batch])
            if len(answers) != len(batch):
                raise RuntimeError(f"the batch function answered {len(answers)} times for "
                                   f"{len(batch)} items")
        except Exception as exc:  # every caller of the batch gets it, as from serve.batch
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            return
        for waiting, answer in zip(batch, answers):
            if not waiting.future.done():
                waiting.future.set_result(answer)
