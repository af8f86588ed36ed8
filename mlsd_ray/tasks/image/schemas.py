"""The image app's request decoding and response shapes. No Ray here: unit-testable.

An instance is a numeric array (H×W or H×W×C; integers in [0, 255] or floats in [0, 1] or
[0, 255], the same rules as the data stage) or `{"b64": "<PNG/JPEG bytes>"}`. Decoding reuses the
data stage's validators, so serving accepts exactly what training accepted.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np
from pydantic import BaseModel, Field

from mlsd_ray.serve.schemas import ClientError
from mlsd_ray.tasks.image.data.validate import Rejected, coerce_array, decode_bytes

MAX_SIDE = 1024  # pixels: a larger instance is refused before it reaches the model


class EncodedImage(BaseModel):
    """A PNG or JPEG file in base64."""

    b64: str


class PredictRequest(BaseModel):
    """`POST /v1/predict` with a JSON body (documented in OpenAPI; decoding is ours)."""

    instances: list[list | EncodedImage] = Field(
        ..., description="Numeric arrays (H×W or H×W×C) or "
        '{"b64": "<base64 PNG/JPEG>"} objects.', min_length=1)


class Prediction(BaseModel):
    """One instance's answer."""

    class_index: int
    class_name: str
    probabilities: dict[str, float] = Field(..., description="Top-k class name -> probability.")


class PredictResponse(BaseModel):
    predictions: list[Prediction]
    model_name: str
    model_version: str
    latency_ms: float = Field(..., description="Server-side time for this request.")
    replica: str = Field(..., description="The model replica that answered.")
    request_id: str = Field(..., description="Also the x-request-id header; the prediction "
                            "log's key for this request.")


def instances_from_json(payload: object, max_instances: int) -> list[np.ndarray]:
    """Decode `{"instances": [...]}` into uint8 H×W×C arrays; ClientError on the first bad one."""
    if not isinstance(payload, dict) or "instances" not in payload:
        raise ClientError(422, "missing_instances", 'body must be a JSON object with an '
                                                    '"instances" list')
    items = payload["instances"]
    if not isinstance(items, list):
        raise ClientError(422, "bad_instances", '"instances" must be a list')
    if not items:
        raise ClientError(422, "empty_instances", '"instances" is empty: send at least one')
    if len(items) > max_instances:
        raise ClientError(413, "too_many_instances", f"{len(items)} instances; at most "
                                                     f"{max_instances} per request")
    return [decode_instance(item, index) for index, item in enumerate(items)]


def decode_instance(item: object, index: int) -> np.ndarray:
    """One instance -> uint8 H×W×C, or ClientError 422 naming the instance and the problem."""
    try:
        if isinstance(item, dict):
            image = decode_bytes(_b64_bytes(item, index), MAX_SIDE)
        elif isinstance(item, list):
            image = coerce_array(item)
        else:
            raise ClientError(422, "bad_instance", f"instance {index}: expected a numeric "
                                                   f'array or {{"b64": ...}}, got '
                                                   f"{type(item).__name__}")
    except Rejected as exc:
        raise ClientError(422, exc.reason, f"instance {index}: {exc.detail}") from exc
    return check_size(image, f"instance {index}")


def images_from_tensor(array: np.ndarray, max_instances: int) -> list[np.ndarray]:
    """A V2 `images` tensor, [N, H, W] or [N, H, W, C] (UINT8, or floats in [0, 1]), as
    uint8 H×W×C images; ClientError naming the first bad one."""
    if array.ndim not in (3, 4):
        raise ClientError(400, "bad_shape", f"images must be [N, H, W] or [N, H, W, C], not "
                                            f"{list(array.shape)}")
    _check_count(len(array), max_instances)
    images = []
    for index, pixels in enumerate(array):
        try:
            images.append(check_size(coerce_array(pixels), f"image {index}"))
        except Rejected as exc:
            raise ClientError(400, exc.reason, f"image {index}: {exc.detail}") from exc
    return images


def images_from_bytes(array: np.ndarray, max_instances: int) -> list[np.ndarray]:
    """A V2 `image_bytes` tensor ([N] of PNG/JPEG bytes) as uint8 H×W×C images."""
    _check_count(array.size, max_instances)
    return [decode_upload(bytes(item), f"image {index}")
            for index, item in enumerate(array.reshape(-1))]


def _check_count(count: int, max_instances: int) -> None:
    if count == 0:
        raise ClientError(400, "empty_instances", "no images: send at least one")
    if count > max_instances:
        raise ClientError(413, "too_many_instances", f"{count} images; at most "
                                                     f"{max_instances} per request")


def decode_upload(data: bytes, name: str) -> np.ndarray:
    """An uploaded image file -> uint8 H×W×C, or ClientError 422."""
    if not data:
        raise ClientError(422, "empty_file", f"uploaded file {name!r} is empty")
    try:
        return check_size(decode_bytes(data, MAX_SIDE), f"file {name!r}")
    except Rejected as exc:
        raise ClientError(422, exc.reason, f"file {name!r}: {exc.detail}") from exc


def check_size(image: np.ndarray, what: str) -> np.ndarray:
    """Refuse images too small to mean anything or too large to resize cheaply."""
    height, width = image.shape[:2]
    if min(height, width) < 2 or max(height, width) > MAX_SIDE:
        raise ClientError(422, "bad_shape", f"{what}: {height}×{width} pixels; sides must be "
                                            f"between 2 and {MAX_SIDE}")
    return image


def _b64_bytes(item: dict, index: int) -> bytes:
    if set(item) != {"b64"} or not isinstance(item["b64"], str):
        raise ClientError(422, "bad_instance", f'instance {index}: an object must be exactly '
                                               f'{{"b64": "<base64 image>"}}')
    try:
        return base64.b64decode(item["b64"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ClientError(422, "bad_base64", f"instance {index}: b64 is not valid base64: "
                                             f"{exc}") from exc


def top_k(probabilities: np.ndarray, class_names: list[str], k: int) -> list[dict]:
    """Per row: the argmax class and the k most likely classes with their probabilities."""
    answers = []
    for row in probabilities:
        order = np.argsort(-row)[:k]
        best = int(order[0])
        answers.append({"class_index": best, "class_name": class_names[best],
                        "probabilities": {class_names[i]: round(float(row[i]), 6)
                                          for i in order}})
    return answers


def inline_schema(model: type[BaseModel]) -> dict:
    """`model`'s JSON schema with its `$defs` written in place: an OpenAPI request body given
    as `openapi_extra` cannot point into a `$defs` of its own."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if set(node) == {"$ref"} and node["$ref"].startswith("#/$defs/"):
                return inline(defs[node["$ref"].removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item) for item in node]
        return node

    return inline(schema)
