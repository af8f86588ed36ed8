"""Baseline for bench/serve_load.py: the same model and preprocessing in plain FastAPI + uvicorn.

One process, no Ray, no batching: each request is decoded with the same functions as our
ingress (mlsd_ray.serve.schemas) and runs its own forward pass.

    BENCH_CHECKPOINT=DIR python -m uvicorn bench.plain_server:app --port 8001
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlsd_ray.serve.schemas import ClientError, parse_json  # noqa: E402
from mlsd_ray.tasks.image import schemas  # noqa: E402
from mlsd_ray.tasks.image.checkpoint import load_model  # noqa: E402

torch.set_num_threads(1)
LOADED = load_model(os.environ["BENCH_CHECKPOINT"])
app = FastAPI()


@app.post("/v1/predict")
async def predict(request: Request):
    try:
        images = schemas.instances_from_json(parse_json(await request.body()), 256)
    except ClientError as exc:
        return JSONResponse(status_code=exc.status, content=exc.body())
    with torch.inference_mode():
        logits = LOADED.model(LOADED.preprocessor(images))
        probabilities = torch.softmax(logits.float(), dim=1).numpy()
    return {"predictions": schemas.top_k(probabilities, LOADED.preprocessor.class_names, 3)}
