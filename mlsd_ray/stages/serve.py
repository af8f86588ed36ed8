"""The Serve application of every parts task (its routes under `/v1`, the Open Inference
Protocol's under `/v2`: serve/oip.py):

    POST /v1/predict   {"instances": [{input column: value}, ...]} -> an answer per instance
    GET  /v1/health    200 with the served model_version once a replica holds the model
    GET  /v1/model     the served version, its task, input columns, target and metric
    GET  /             a page to send one request from a browser
    /v2/...            one tensor per input column (FP64 numbers, FP32 [N, L] vectors, BYTES
                       text) in; `prediction` (FP64, or BYTES for a class) out

An instance is checked before it reaches the model: a missing input column, or what the task's
`DataPart.problems` finds (the same check that quarantines training rows), is a 422 naming
the instance and the reason. The model replica batches instances of many requests into one
forward pass (serve/batching.py), counts them for Prometheus, and writes a prediction-log row
per instance (its monitoring features, the prediction and its class) for `mlsd monitor`.
Auth, body limits, errors, the time limit and the topology are serve/app.py's.
"""

# No `from __future__ import annotations` in this module: FastAPI inside a Serve ingress then
# sees `request: Request` as the string "Request" and asks for a query parameter named request.

import asyncio
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from ray import serve

from mlsd_ray import __version__
from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import PinnedModel
from mlsd_ray.serve.app import (
    REQUEST_ID_HEADER,
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
from mlsd_ray.serve.metrics import model_metrics
from mlsd_ray.serve.oip import (
    OpenInferenceRoutes,
    Signature,
    Tensor,
    TensorSpec,
    add_open_inference_routes,
)
from mlsd_ray.serve.schemas import ClientError, documented_errors, parse_json
from mlsd_ray.stages.parts import parts_of
from mlsd_ray.tasks import get_task

__all__ = ["PREFIX", "parts_application", "PartsApp", "PartsModel"]

PREFIX = "/v1"
api = FastAPI(title="mlsd-ray model", version=__version__,
              description='Answers with a task built from parts. Errors are JSON `{"error": '
                          '{"code", "message"}}`.')
add_error_handlers(api, f"POST {PREFIX}/predict, GET {PREFIX}/health, GET {PREFIX}/model, "
                        "and /v2 (the Open Inference Protocol)")
add_open_inference_routes(api)
count_requests(api)
_ERRORS = documented_errors()
_PREDICT_BODY = {"requestBody": {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["instances"],
    "properties": {"instances": {"type": "array", "minItems": 1, "items": {
        "type": "object", "description": "An input: column name -> value (GET /v1/model "
        "lists the columns)."}}}}}}}}


# Helpers the routes call are defined before the class: `serve.ingress` serialises the
# class when it is decorated, with only the module names that exist by then.


def _tensor_spec(column: dict) -> TensorSpec:
    """An input column as a V2 tensor: FP32 [N, length] for a vector, FP64 [N] for a number,
    BYTES [N] for text."""
    if column["kind"] == "vector":
        return TensorSpec(column["name"], "FP32", [-1, column["length"]])
    return TensorSpec(column["name"], "BYTES" if column["kind"] == "text" else "FP64", [-1])


def _rows_from_tensors(tensors: dict, inputs: list[dict]) -> list[dict]:
    """V2 input tensors (one per input column, the same length) as instances."""
    missing = [c["name"] for c in inputs if c["name"] not in tensors]
    if missing:
        raise ClientError(400, "missing_input", f"no input tensor {', '.join(missing)} "
                                                f"(inputs: {[c['name'] for c in inputs]})")
    lengths = {len(tensors[c["name"]]) for c in inputs}
    if len(lengths) != 1:
        raise ClientError(400, "invalid_request", f"input tensors of different lengths "
                                                  f"{sorted(lengths)}")
    columns = {}
    for column in inputs:
        values = tensors[column["name"]]
        columns[column["name"]] = [v.decode() if isinstance(v, bytes) else
                                   (v.tolist() if isinstance(v, np.ndarray) else v.item()
                                    if hasattr(v, "item") else v) for v in values]
    count = lengths.pop()
    return [{name: values[i] for name, values in columns.items()} for i in range(count)]


class PartsModel(LoggingReplica):
    """The task's trained model behind dynamic batching, logging what it answers."""

    def __init__(self, model: PinnedModel, replica: ReplicaSettings):
        self.load(model, replica)

    def load(self, model: PinnedModel, replica: ReplicaSettings) -> None:
        from mlsd_ray.stages.model import load_trained
        from mlsd_ray.tasks import task_of_checkpoint

        replica.claim_process()
        directory = model.checkpoint_here(replica.workspace)
        task = task_of_checkpoint(directory)
        self.loaded = load_trained(task, directory)
        self.start_batching(replica)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = model_metrics()
        local = model.version == "local"  # a checkpoint folder: named after its run
        data = self.loaded.parts.data
        self.info = {"model_name": self.loaded.metadata.run_name if local else model.name,
                     "model_version": model.version, "uri": model.uri, "task": task.name,
                     "task_spec": self.loaded.metadata.task,  # what --task names
                     "inputs": self.loaded.columns, "target": data.target,
                     "metric": self.loaded.parts.model.metric}
        self.open_log(replica.log_settings, replica.workspace)

    def describe(self) -> dict:
        return {**self.info, "replica": self.replica, "prediction_log": self.log_stats()}

    async def answer_batch(self, requests: list[dict]) -> list[dict]:
        """Each request: {"rows": checked instances, "request_id", "received" (epoch s)};
        its answer: the predictions for its rows, in order."""
        import pandas as pd

        sizes = [len(r["rows"]) for r in requests]
        frame = pd.DataFrame([row for r in requests for row in r["rows"]])
        predictions = await asyncio.to_thread(self.loaded.predict, frame)
        codec = self.loaded.parts.codec
        outcomes = [codec.outcome(p) for p in predictions]
        self.count_batch(len(frame), None if outcomes[0] is None else
                         [str(o) for o in outcomes])
        self._log(requests, frame, predictions)
        answers, start = [], 0
        for size in sizes:
            answers.append({"predictions": list(predictions[start:start + size]),
                            "replica": self.replica, "batch_rows": len(frame),
                            "model_version": self.info["model_version"]})
            start += size
        return answers

    def _log(self, requests: list[dict], frame, predictions) -> None:
        """One prediction-log row per instance (queued only: the log writes elsewhere)."""
        from mlsd_ray.stages.model import log_columns

        if self.log is not None:
            columns = log_columns(self.loaded.parts, frame, predictions)
            self.record_answered(requests, "rows", columns.astype(object).where(
                columns.notna(), None).to_dict("records"))


@serve.ingress(api)
class PartsApp(PartsModel, ModelRoutes, OpenInferenceRoutes):
    """Checks instances, calls the model, answers with the codec's answers."""

    def __init__(self, model, replica: ReplicaSettings, settings: dict):
        self.settings = settings
        declare_bearer_auth(api, bool(settings["token_sha256"]))
        self.v2_max_body_bytes = settings["max_body_bytes"]
        self.served: dict | None = None
        task = get_task(settings["task"])
        self.parts, section = parts_of(task, settings["task"])
        self.section = getattr(task.config_class.from_record(settings["config"]), section)
        self.attach(model, replica, sticky=False)

    async def _info(self) -> dict:
        if self.served is None:
            self.served = await self.model.describe()
        return self.served

    def _check(self, rows: list[Any], info: dict) -> list[dict]:
        """The instances as rows of the input columns; ClientError 422 for the first bad one."""
        import pandas as pd

        if not isinstance(rows, list) or not rows:
            raise ClientError(422, "invalid_request", 'send {"instances": [{column: value}, '
                                                      '...]} with at least one instance')
        if len(rows) > self.settings["max_instances"]:
            raise ClientError(413, "too_many_instances", f"{len(rows)} instances; at most "
                              f"{self.settings['max_instances']} (serve.max_instances)")
        names = [c["name"] for c in info["inputs"]]
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                raise ClientError(422, "invalid_instance", f"instance {index} is not an object")
            missing = [n for n in names if n not in row]
            if missing:
                raise ClientError(422, "missing_input", f"instance {index} has no "
                                  f"{', '.join(map(repr, missing))} (inputs: {names})")
        kept = [{n: row[n] for n in names} for row in rows]
        try:
            reasons = self.parts.data.problems(pd.DataFrame(kept), self.section)
        except Exception as exc:  # a value the task's check cannot even read
            raise ClientError(422, "invalid_instance", f"instances unreadable: {exc}") from None
        for index, reason in enumerate(reasons.fillna("").astype(str)):
            if reason:
                raise ClientError(422, "invalid_instance", f"instance {index}: {reason}")
        return kept

    async def _predict(self, rows: list[Any], request_id: str, received: float
                       ) -> tuple[list, dict, dict]:
        info = await self._info()
        checked = await asyncio.to_thread(self._check, rows, info)
        answer = await self.model.run_batch({"rows": checked, "request_id": request_id,
                                             "received": received})
        return answer["predictions"], answer, info

    @api.post(f"{PREFIX}/predict", responses=_ERRORS, openapi_extra=_PREDICT_BODY,
              summary="Predict: an answer per instance")
    async def predict(self, request: Request) -> dict:
        started, received = time.perf_counter(), time.time()
        authorize(request, self.settings["token_sha256"])
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ClientError(415, "unsupported_media_type",
                              f"content type {content_type or '(none)'!r}; send "
                              "application/json")
        body = parse_json(await read_body(request, self.settings["max_body_bytes"]))
        if not isinstance(body, dict) or "instances" not in body:
            raise ClientError(422, "invalid_request", 'send {"instances": [{column: value}, '
                                                      '...]}')
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        predictions, answer, info = await self._predict(body["instances"], request_id,
                                                        received)
        return {"predictions": [self.parts.codec.answer(p) for p in predictions],
                "model_name": info["model_name"], "model_version": answer["model_version"],
                "replica": answer["replica"], "request_id": request_id,
                "latency_ms": round(1000 * (time.perf_counter() - started), 3)}

    def v2_signature(self, info: dict) -> Signature:
        """One tensor per input column; the prediction out."""
        classes = self.parts.codec.outcome(0.0) is not None
        return Signature(inputs=[_tensor_spec(c) for c in info["inputs"]],
                         outputs=[TensorSpec("prediction", "BYTES" if classes else "FP64",
                                             [-1])], alternatives=[])

    async def v2_infer(self, tensors: dict, request_id: str | None) -> list[Tensor]:
        """V2 tensors in (rows by position); the predictions out (BYTES for classes)."""
        info = await self._info()
        rows = _rows_from_tensors(tensors, info["inputs"])
        predictions, _, _ = await self._predict(rows, request_id or uuid.uuid4().hex,
                                                time.time())
        outcomes = [self.parts.codec.outcome(p) for p in predictions]
        if outcomes and outcomes[0] is not None:
            return [Tensor("prediction", "BYTES",
                           np.array([str(o).encode() for o in outcomes], dtype=object))]
        return [Tensor("prediction", "FP64", np.asarray(predictions, np.float64).ravel())]

    def _authorize(self, request: Request) -> None:
        authorize(request, self.settings["token_sha256"])

    @api.get("/", include_in_schema=False)
    async def try_it(self) -> HTMLResponse:
        """A page to send one request (serve/pages/predict.html)."""
        return page("predict.html")

    @api.get(f"{PREFIX}/health", responses=_ERRORS, summary="200 once the model is loaded")
    async def health(self):
        return await health_answer(self.model)

    @api.get(f"{PREFIX}/model", responses=_ERRORS,
             summary="The served version, its input columns, target and metric")
    async def model_info(self, request: Request) -> dict:
        authorize(request, self.settings["token_sha256"])
        return await self.model.describe()


def parts_application(task, settings: ServeConfig, model: PinnedModel, workspace: Workspace,
                      config: dict) -> serve.Application:
    """The app of a parts task in the configured topology, batching, autoscaling and router;
    `config` is the trained model's config (its task section checks instances)."""
    title = "".join(part.title() for part in task.name.replace("-", "_").split("_"))
    classes = AppClasses(routes=PartsApp, model=PartsModel, routes_name=f"{title}Ingress",
                         model_name=f"{title}Model")
    route_settings = {"max_instances": settings.max_instances,
                      "max_body_bytes": settings.max_body_bytes,
                      "token_sha256": token_sha256(), "task": config["task"], "config": config}
    return bind_app(classes, settings, model, workspace, route_settings)
