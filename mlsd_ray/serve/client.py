"""A small client for the HTTP API: `mlsd predict --url URL FILE...` and the pipeline's check."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from mlsd_ray.core.errors import InputError, WorkError

__all__ = ["b64_instance", "post_json", "predict_files"]


def post_json(url: str, payload: dict, timeout: float = 60) -> dict:
    """POST JSON to the app; the API's error message becomes the exception's text."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"content-type": "application/json"})
    token = os.environ.get("MLSD_API_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())["error"]
            message = f"{error['code']}: {error['message']}"
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise (InputError if exc.code < 500 else WorkError)(
            f"{url} answered {exc.code}: {message}") from exc
    except OSError as exc:
        raise WorkError(f"cannot reach {url}: {exc}") from exc


def b64_instance(data: bytes) -> dict:
    return {"b64": base64.b64encode(data).decode("ascii")}


def predict_files(url: str, files: list[Path]) -> dict:
    """Send image files as base64 instances in one request; the app's answer (JSON)."""
    instances = []
    for path in files:
        try:
            instances.append(b64_instance(Path(path).read_bytes()))
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    return post_json(f"{url.rstrip('/')}/v1/predict", {"instances": instances})
