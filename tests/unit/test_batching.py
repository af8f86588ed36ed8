"""mlsd_ray/serve/batching.py: batches form when the model is free, not on a timer."""

from __future__ import annotations

import asyncio

import pytest

from mlsd_ray.serve.batching import Batcher


class Model:
    """A batch function that takes `seconds` (asyncio.sleep: the loop stays free, as with a
    forward pass in a thread) and records each batch's size."""

    def __init__(self, seconds: float = 0.0, fail_on: int | None = None):
        self.seconds, self.fail_on, self.sizes = seconds, fail_on, []

    async def __call__(self, items: list[int]) -> list[int]:
        self.sizes.append(len(items))
        await asyncio.sleep(self.seconds)
        if self.fail_on in items:
            raise ValueError(f"item {self.fail_on}")
        return [item * 10 for item in items]


def test_requests_that_arrive_while_a_batch_runs_form_the_next_batch_together():
    """Serve's batch would seal one 5 ms after the first of them arrived (two or three
    requests) and queue it; here the 20 that came, 2 ms apart, during the 0.5 s pass go in
    one batch."""
    model = Model(seconds=0.5)
    batcher = Batcher(model, max_batch_size=32, wait_s=0.005)

    async def scenario():
        first = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.02)  # the first batch (just item 0) is running now
        later = []
        for item in range(1, 21):
            later.append(asyncio.ensure_future(batcher.submit(item)))
            await asyncio.sleep(0.002)  # spread over 40 ms, as requests arrive
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(scenario())
    assert first == 0 and later == [item * 10 for item in range(1, 21)]
    assert model.sizes == [1, 20]


def test_a_batch_holds_at_most_max_batch_size():
    model = Model()
    batcher = Batcher(model, max_batch_size=32, wait_s=0.005)

    async def scenario():
        return await asyncio.gather(*(batcher.submit(item) for item in range(70)))

    assert asyncio.run(scenario()) == [item * 10 for item in range(70)]
    assert model.sizes == [32, 32, 6]


def test_a_failed_batch_fails_its_callers_only():
    model = Model(fail_on=3)
    batcher = Batcher(model, max_batch_size=4, wait_s=0.005)

    async def scenario():
        failed = await asyncio.gather(*(batcher.submit(item) for item in range(4)),
                                      return_exceptions=True)
        return failed, await batcher.submit(7)

    failed, after = asyncio.run(scenario())
    assert all(isinstance(answer, ValueError) for answer in failed)
    assert after == 70 and model.sizes == [4, 1]


def test_a_caller_that_gave_up_is_left_out_of_the_batch():
    model = Model(seconds=0.05)
    batcher = Batcher(model, max_batch_size=32, wait_s=0.005)

    async def scenario():
        running = asyncio.ensure_future(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher.submit(1))
        kept = asyncio.ensure_future(batcher.submit(2))
        await asyncio.sleep(0.01)
        gone.cancel()  # a client that disconnected while the model was busy
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await running, await kept

    assert asyncio.run(scenario()) == (0, 20)
    assert model.sizes == [1, 1]
