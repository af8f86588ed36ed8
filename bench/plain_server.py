"""Baselines for bench/serve_load.py: the same model and preprocessing in plain FastAPI + uvicorn.

One process, no Ray. Each request is decoded with the same functions as our Serve app
(mlsd_ray.serve.schemas, mlsd_ray.tasks.image.schemas) on one torch thread, like a replica of
one CPU. Two modes:

- unbatched (server A): each request runs its own forward pass;
- micro-batched (server B, BENCH_MAX_BATCH > 1): requests wait in an in-process queue up to
  BENCH_BATCH_WAIT_S seconds for up to BENCH_MAX_BATCH images, and one forward pass answers
  them all, as `@serve.batch` does in our replica.

    BENCH_CHECKPOINT=DIR [BENCH_MAX_BATCH=32 BENCH_BATCH_WAIT_S=0.005] \
        python -m uvicorn bench.plain_server:app --port 8001
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsd_ray.serve.schemas import ClientError, parse_json  # noqa: E402
from mlsd_ray.tasks.image import schemas  # noqa: E402
from mlsd_ray.tasks.image.checkpoint import load_model  # noqa: E402

torch.set_num_threads(1)
LOADED = load_model(os.environ["BENCH_CHECKPOINT"])
MAX_BATCH = int(os.environ.get("BENCH_MAX_BATCH", "1"))
BATCH_WAIT_S = float(os.environ.get("BENCH_BATCH_WAIT_S", "0.005"))
app = FastAPI()


def forward(images: list[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
        logits = LOADED.model(LOADED.preprocessor(images))
        return torch.softmax(logits.float(), dim=1).numpy()


class MicroBatcher:
    """Collects the images of concurrent requests into one forward pass: the first request
    opens a batch, which runs when it holds MAX_BATCH images or BATCH_WAIT_S has passed."""

    def __init__(self) -> None:
        self.waiting: asyncio.Queue = asyncio.Queue()
        self.worker: asyncio.Task | None = None

    async def probabilities(self, images: list[np.ndarray]) -> np.ndarray:
        if self.worker is None:
            self.worker = asyncio.create_task(self._run())
        answer = asyncio.get_running_loop().create_future()
        await self.waiting.put((images, answer))
        return await answer

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.waiting.get()]
            deadline = loop.time() + BATCH_WAIT_S
            while sum(len(images) for images, _ in batch) < MAX_BATCH:
                try:
                    batch.append(await asyncio.wait_for(self.waiting.get(),
                                                        deadline - loop.time()))
                except asyncio.TimeoutError:  # (TimeoutError itself from 3.11 on)
                    break
            self._answer(batch)

    @staticmethod
    def _answer(batch: list) -> None:
        try:
            probabilities = forward([image for images, _ in batch for image in images])
        except Exception as exc:  # every waiting request hears about it
            for _, answer in batch:
                answer.set_exception(exc)
            return
        start = 0
        for images, answer in batch:
            answer.set_result(probabilities[start:start + len(images)])
            start += len(images)


BATCHER = MicroBatcher() if MAX_BATCH > 1 else None


@app.post("/v1/predict")
async def predict(request: Request):
    try:
        images = schemas.instances_from_json(parse_json(await request.body()), 256)
    except ClientError as exc:
        return JSONResponse(status_code=exc.status, content=exc.body())
    probabilities = (await BATCHER.probabilities(images)) if BATCHER else forward(images)
    return {"predictions": schemas.top_k(probabilities, LOADED.preprocessor.class_names, 3)}
