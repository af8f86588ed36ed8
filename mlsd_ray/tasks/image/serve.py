"""The image app: HTTP routes (FastAPI) and a batched model, in one replica or two hops
(`serve.topology`, serve/app.py's `bind_app`):

    client --HTTP--> ImageApp (validate, decode, auth, errors) --> ImageModel.run_batch
                                                                   (batching, prediction log)

    POST /v1/predict   instances (arrays, base64 PNG/JPEG) or multipart image files
    GET  /v1/health    200 once a replica holds the model
    GET  /v1/model     the served version, its classes and input
    /v2/...            the Open Inference Protocol (serve/oip.py): an `images` UINT8
                       [N, H, W, C] tensor, or `image_bytes` BYTES [N] of PNG/JPEG, in;
                       `probabilities` FP32 [N, classes] and `class_name` BYTES [N] out

What every app shares (topology, errors, auth, body limits, the prediction log, deployment
options, the builder for `serve run`) is in serve/app.py. Each model replica loads the
checkpoint that the deploying driver pinned when its machine sees it, else the registry's copy
(registry.py's `PinnedModel`), so the same app runs on a laptop and on a cluster with a shared
registry.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from ray import serve
from starlette.datastructures import UploadFile

import mlsd_ray.tasks.image.schemas as schemas
from mlsd_ray import __version__
from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import PinnedModel
from mlsd_ray.serve.app import (
    REQUEST_ID_HEADER,
    SESSION_HEADER,
    AppClasses,
    LoggingReplica,
    ModelRoutes,
    ReplicaSettings,
    add_error_handlers,
    authorize,
    bind_app,
    count_requests,
    declare_bearer_auth,
    health_answer,
    page,
    read_body,
    token_sha256,
)
from mlsd_ray.serve.metrics import ingress_metrics, model_metrics
from mlsd_ray.serve.oip import (
    OpenInferenceRoutes,
    Signature,
    Tensor,
    TensorSpec,
    add_open_inference_routes,
)
from mlsd_ray.serve.schemas import ClientError, RateLimit, documented_errors, parse_json

DRIFT_REFRESH_S = 10.0


api = FastAPI(title="mlsd-ray", version=__version__,
              description="Image classification served by Ray Serve. Errors are JSON "
                          '`{"error": {"code", "message"}}`; 4xx means the request was wrong.')

add_error_handlers(api, "the image task: POST /v1/predict, GET /v1/health, GET /v1/model, "
                        "and /v2 (the Open Inference Protocol)")
add_open_inference_routes(api)
count_requests(api)


def load_served_model(model: PinnedModel, workspace: Workspace) -> tuple[Any, dict]:
    """Load a pinned model's checkpoint; returns it and its public description."""
    from mlsd_ray.tasks.image.checkpoint import load_model

    loaded = load_model(model.checkpoint_here(workspace))
    name, metrics = model.name, dict(model.metrics)  # the task's score, on val and test
    if model.version == "local":  # a checkpoint folder: named after the run that wrote it
        name, metrics = loaded.metadata.run_name or model.name, {}
    pre = loaded.preprocessor
    info = {"model_name": name, "model_version": model.version, "uri": model.uri,
            "architecture": loaded.model_config["name"], "classes": pre.class_names,
            "metrics": metrics,
            "input": {"image_size": pre.image_size, "channels": pre.channels,
                      "accepts": "numeric H×W or H×W×C arrays (integers 0-255 or floats in "
                                 "[0, 1]), base64 PNG/JPEG, or multipart image files; any "
                                 "size is resized to the trained size"},
            "trained_run": loaded.metadata.run_name}
    return loaded, info


class ImageModel(LoggingReplica):
    """The network behind dynamic batching: one forward pass for many requests. Each batch is
    also counted (metrics) and recorded in the prediction log for `mlsd monitor`."""

    def __init__(self, model: PinnedModel, replica: ReplicaSettings):
        self.load(model, replica)

    def load(self, model: PinnedModel, replica: ReplicaSettings) -> None:
        replica.claim_process()
        self.loaded, self.info = load_served_model(model, replica.workspace)
        self.probabilities = self.loaded.probabilities
        if replica.runtime == "onnxruntime":
            from mlsd_ray.tasks.image.export import onnx_runtime_probabilities

            self.probabilities = onnx_runtime_probabilities(self.loaded, replica.threads)
        self.info["runtime"] = replica.runtime
        self.start_batching(replica)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = model_metrics()
        self.open_log(replica.log_settings, replica.workspace)

    def describe(self) -> dict:
        return {**self.info, "replica": self.replica, "prediction_log": self.log_stats()}

    async def explain_batch(self, payload: dict) -> dict:
        """{"images": [uint8 arrays], "class_index": int | None} -> attributions per image
        (tasks/image/explain.py), off the event loop."""
        from mlsd_ray.tasks.image.explain import explain_pixels, explainable

        if getattr(self, "explainer", None) is None:
            self.explainer = explainable(self.loaded)
        pixels = self.loaded.preprocessor.to_tensor(payload["images"])
        answers = await asyncio.to_thread(explain_pixels, self.explainer, pixels,
                                          self.info["classes"], payload["class_index"])
        return {"explanations": answers, "model_name": self.info["model_name"],
                "model_version": self.info["model_version"], "replica": self.replica}

    async def answer_batch(self, requests: list[dict]) -> list[dict]:
        """Each request: {"images": [uint8 arrays], "request_id", "received" (epoch s)};
        answers are class probabilities per image."""
        sizes = [len(r["images"]) for r in requests]
        flat = [image for r in requests for image in r["images"]]
        # Off the event loop, so the next batch fills while this one runs.
        probabilities, features = await asyncio.to_thread(self._forward, flat)
        self._observe(requests, probabilities, features)
        answers, start = [], 0
        for size in sizes:
            answers.append({"probabilities": probabilities[start:start + size],
                            "model_name": self.info["model_name"],
                            "model_version": self.info["model_version"],
                            "classes": self.info["classes"], "replica": self.replica,
                            "batch_images": len(flat)})
            start += size
        return answers

    def _forward(self, images: list[np.ndarray]) -> tuple[np.ndarray, dict]:
        import torch

        from mlsd_ray.tasks.image.features import image_features

        with torch.inference_mode():
            # [0, 1] at the trained size: what the features measure and the network takes
            pixels = self.loaded.preprocessor.to_tensor(images)
            features = image_features(pixels.permute(0, 2, 3, 1).numpy())
            return self.probabilities(pixels), features

    def _observe(self, requests: list[dict], probabilities: np.ndarray, features: dict) -> None:
        """Metrics and prediction-log rows for one batch (no I/O: the log writes elsewhere)."""
        classes = self.info["classes"]
        predicted = probabilities.argmax(axis=1)
        self.count_batch(len(predicted), [classes[index] for index in predicted.tolist()])
        if self.log is not None:
            self.record_answered(requests, "images", (
                {"predicted_class": classes[index], "confidence": float(probabilities[i].max()),
                 **{k: float(v[i]) for k, v in features.items()}}
                for i, index in enumerate(predicted.tolist())))


def _read_text(location: str) -> str:
    from mlsd_ray.core import storage

    return storage.read_text(location)


_PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": schemas.inline_schema(schemas.PredictRequest)},
    "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {
        "type": "array", "items": {"type": "string", "format": "binary"}}}}}}}}


_ERRORS = documented_errors()
MAX_EXPLAINED = 16  # images per POST /v1/explain
_EXPLAIN_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    **schemas.inline_schema(schemas.PredictRequest),
    "properties": {**schemas.inline_schema(schemas.PredictRequest)["properties"],
                   "class_index": {"type": "integer", "minimum": 0,
                                   "description": "The class to explain (default: the "
                                                  "predicted one)."}}}}}}}


@serve.ingress(api)
class ImageApp(ImageModel, ModelRoutes, OpenInferenceRoutes):
    """Validates and decodes requests, calls the model (in this replica or the Model
    deployment), shapes answers and errors."""

    def __init__(self, model, replica: ReplicaSettings, settings: dict):
        self.max_instances = settings["max_instances"]
        self.max_body_bytes = settings["max_body_bytes"]
        self.top_k = settings["top_k"]
        self.token_sha256 = settings.get("token_sha256")
        declare_bearer_auth(api, bool(self.token_sha256))
        self.sticky = settings["router"] == "consistent_hash"
        self.drift_file = settings.get("drift_file")
        self.drift_read_at = -DRIFT_REFRESH_S
        self.v2_max_body_bytes = self.max_body_bytes
        rate = settings.get("explain_per_second", 0)
        self.explain_limit = RateLimit(rate, "serve.explain_per_second") if rate else None
        self.attach(model, replica, sticky=self.sticky)

    def v2_signature(self, info: dict) -> Signature:
        """The Open Inference Protocol's tensors for this model (serve/oip.py)."""
        size, channels = info["input"]["image_size"], info["input"]["channels"]
        return Signature(
            inputs=[TensorSpec("images", "UINT8", [-1, size, size, channels])],
            alternatives=[TensorSpec("image_bytes", "BYTES", [-1])],
            outputs=[TensorSpec("probabilities", "FP32", [-1, len(info["classes"])]),
                     TensorSpec("class_name", "BYTES", [-1])])

    async def v2_infer(self, tensors: dict[str, np.ndarray],
                       request_id: str | None) -> list[Tensor]:
        """V2 tensors in, probabilities and class names out (any image size is resized)."""
        if "images" in tensors:
            images = schemas.images_from_tensor(tensors["images"], self.max_instances)
        elif "image_bytes" in tensors:
            images = schemas.images_from_bytes(tensors["image_bytes"], self.max_instances)
        else:
            raise ClientError(400, "missing_input", "send an input named images (UINT8 [N, H, "
                                                    "W, C]) or image_bytes (BYTES [N] of "
                                                    f"PNG/JPEG), not {', '.join(tensors)}")
        answer = await self.model.run_batch({"images": images,
                                             "request_id": request_id or uuid.uuid4().hex,
                                             "received": time.time()})
        probabilities = np.asarray(answer["probabilities"], dtype=np.float32)
        names = [answer["classes"][i].encode() for i in probabilities.argmax(axis=1)]
        return [Tensor("probabilities", "FP32", probabilities),
                Tensor("class_name", "BYTES", np.array(names, dtype=object))]

    @api.post("/v1/predict", response_model=schemas.PredictResponse, responses=_ERRORS,
              openapi_extra=_PREDICT_BODY, summary="Classify images")
    async def predict(self, request: Request) -> dict:
        """JSON `{"instances": [...]}` or a multipart upload of image files."""
        started, received = time.perf_counter(), time.time()
        self._authorize(request)
        images = await self._instances(request)
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        answer = await self.model.run_batch(
            {"images": images, "request_id": request_id, "received": received},
            self._session_key(request))
        await self._refresh_drift_gauge()
        return {"predictions": schemas.top_k(answer["probabilities"], answer["classes"],
                                             self.top_k),
                "model_name": answer["model_name"], "model_version": answer["model_version"],
                "latency_ms": round(1000 * (time.perf_counter() - started), 3),
                "replica": answer["replica"], "request_id": request_id}

    @api.post("/v1/explain", responses=_ERRORS, openapi_extra=_EXPLAIN_BODY,
              summary="Why the model answered: Integrated Gradients and Grad-CAM per image")
    async def explain_route(self, request: Request) -> dict:
        """JSON `{"instances": [...], "class_index": K (optional: the predicted class)}`:
        per image, each method's H×W map at the trained size. Rate-limited
        (serve.explain_per_second): it costs about 35 forward passes per image."""
        self._authorize(request)
        if self.explain_limit is None:
            raise ClientError(403, "explain_off", "POST /v1/explain is off here "
                                                  "(serve.explain_per_second: 0)")
        self.explain_limit.take()
        body = parse_json(await read_body(request, self.max_body_bytes))
        class_index = body.get("class_index") if isinstance(body, dict) else None
        classes = (await self.model.describe())["classes"]
        if class_index is not None and (isinstance(class_index, bool) or not isinstance(
                class_index, int) or not 0 <= class_index < len(classes)):
            raise ClientError(422, "bad_class_index", f"class_index {class_index!r}: the model "
                              f"has classes 0..{len(classes) - 1} ({', '.join(classes)})")
        images = schemas.instances_from_json(body, min(self.max_instances, MAX_EXPLAINED))
        return await self.model.explain({"images": images, "class_index": class_index})

    @api.get("/", include_in_schema=False)
    async def try_it(self) -> HTMLResponse:
        """A page to try the model: draw a digit or drop an image (serve/pages/image.html)."""
        return page("image.html")

    @api.get("/v1/health", responses=_ERRORS, summary="200 once the model is loaded")
    async def health(self):
        return await health_answer(self.model)

    @api.get("/v1/model", responses=_ERRORS, summary="The served model version and its schema")
    async def model_info(self, request: Request) -> dict:
        self._authorize(request)
        return await self.model.describe()

    async def _refresh_drift_gauge(self) -> None:
        """Publish the latest `mlsd monitor` score (read at most every DRIFT_REFRESH_S)."""
        if not self.drift_file or time.monotonic() - self.drift_read_at < DRIFT_REFRESH_S:
            return
        self.drift_read_at = time.monotonic()
        try:
            latest = json.loads(await asyncio.to_thread(_read_text, self.drift_file))
        except (OSError, ValueError):
            return  # no monitor run yet
        for version, score in latest.get("drift_score_by_version", {}).items():
            ingress_metrics()["drift"].set(score, tags={"model_version": str(version)})

    def _authorize(self, request: Request) -> None:
        authorize(request, self.token_sha256)

    async def _instances(self, request: Request) -> list[np.ndarray]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("application/json", "multipart/form-data"):
            raise ClientError(415, "unsupported_media_type",
                              f"content type {content_type or '(none)'!r}; send "
                              "application/json or multipart/form-data")
        body = await read_body(request, self.max_body_bytes)
        if content_type == "application/json":
            return schemas.instances_from_json(parse_json(body), self.max_instances)
        return await self._uploads(request, body)

    async def _uploads(self, request: Request, body: bytes) -> list[np.ndarray]:
        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=self.max_instances + 1)
        except Exception as exc:  # starlette's MultiPartException and parser errors
            raise ClientError(400, "malformed_multipart", f"cannot parse the form: {exc}") from exc
        files = [value for _, value in form.multi_items() if isinstance(value, UploadFile)]
        if not files:
            raise ClientError(422, "empty_instances", "the form has no image files")
        if len(files) > self.max_instances:
            raise ClientError(413, "too_many_instances", f"more than {self.max_instances} files")
        return [schemas.decode_upload(await f.read(), f.filename or "upload") for f in files]

    def _session_key(self, request: Request) -> str | None:
        """Split topology with consistent hashing keys on the session: the header, else the
        client's address (single hop: Serve's proxy keys on the header itself)."""
        if not self.sticky:
            return None
        return request.headers.get(SESSION_HEADER) or (request.client.host
                                                       if request.client else "")


CLASSES = AppClasses(routes=ImageApp, model=ImageModel, routes_name="Ingress",
                     model_name="Model")


def app_from_config(settings: ServeConfig, model: PinnedModel,
                    workspace: Workspace) -> serve.Application:
    """The image app in the configured topology, batching, autoscaling and router."""
    from mlsd_ray.core import storage

    route_settings = {"max_instances": settings.max_instances,
                      "explain_per_second": settings.explain_per_second,
                      "max_body_bytes": settings.max_body_bytes, "top_k": settings.top_k,
                      "router": settings.router,
                      "drift_file": storage.join(workspace.monitor, "latest.json"),
                      "token_sha256": token_sha256()}
    return bind_app(CLASSES, settings, model, workspace, route_settings)
