"""What every task's Serve app shares: the topology (`bind_app`), JSON errors
(`{"error": {"code", "message"}}` with a 4xx for what the client got wrong), bearer-token auth,
body limits, the prediction log a model replica writes, the model deployment's options
(autoscaling, concurrency, router), and `build_app`, the builder behind `serve run` and the
Serve configs in cluster/ (`import_path: mlsd_ray.serve.app:build_app`).

Topology (`serve.topology`):

    single (default)  client --HTTP--> proxy --> App replica (routes + batched model)
    split             client --HTTP--> proxy --> Ingress replica (routes) --> Model replica

One hop less is the fast path: every hop costs CPU per request
(docs/benchmarks.md measures both). Split lets
the model scale apart from the CPU work of decoding requests, e.g. GPU model replicas behind
CPU ingress replicas. Either way one class holds a task's routes: it reaches the model through
`LocalModel` (the batched method of its own replica) or `RemoteModel` (a handle).

A task's own app (its routes, decoding and answers) lives with the task:
tasks/image/serve.py, tasks/tabular/serve.py; `Task.serve_application` binds it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import hmac
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, cast

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.config import RequestRouterConfig
from starlette.exceptions import HTTPException
from starlette.types import ExceptionHandler

from mlsd_ray.core.config import PredictionLogConfig, ServeConfig
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import PinnedModel
from mlsd_ray.serve.batching import Batcher
from mlsd_ray.serve.metrics import ingress_metrics
from mlsd_ray.serve.routers import ROUTER_CLASSES
from mlsd_ray.serve.schemas import ClientError

__all__ = ["add_error_handlers", "ADMIN_TOKEN_ENV", "AppClasses", "authorize", "authorize_change",
           "bind_app", "build_app", "count_requests", "declare_bearer_auth", "error_for_path",
           "error_response", "health_answer", "LocalModel", "LoggingReplica", "model_options",
           "ModelRoutes", "OVERLOAD_RETRY_AFTER_S", "page", "read_body", "RemoteModel",
           "ReplicaSettings", "REQUEST_ID_HEADER", "RequestMetrics", "RequestTimeLimit",
           "SESSION_HEADER", "TOKEN_ENV", "token_sha256"]

TOKEN_ENV = "MLSD_API_TOKEN"
ADMIN_TOKEN_ENV = "MLSD_ADMIN_TOKEN"
OVERLOAD_RETRY_AFTER_S = 1  # seconds, in the Retry-After of a 503 past serve.max_queued_requests
SESSION_HEADER = "x-session-id"
REQUEST_ID_HEADER = "x-request-id"  # Serve's proxy sets it when the client did not


# ----------------------------------------------------------------------------- model replicas


@dataclass(frozen=True)
class ReplicaSettings:
    """What a model replica needs besides the model: its workspace, batching, torch threads,
    the prediction log's settings and the time a request may take in it."""

    workspace: Workspace
    max_batch_size: int
    batch_wait_timeout_s: float
    threads: int
    log_settings: dict
    request_timeout_s: float | None = None
    runtime: str = "torch"  # what runs the network: torch, or onnxruntime (serve.runtime)

    @classmethod
    def from_config(cls, settings: ServeConfig, workspace: Workspace) -> ReplicaSettings:
        return cls(workspace, settings.max_batch_size, settings.batch_wait_timeout_s,
                   max(1, round(settings.num_cpus)), settings.prediction_log.model_dump(),
                   settings.request_timeout_s, settings.runtime)

    def claim_process(self) -> None:
        """Set up the replica's process for its forward passes: torch on its own CPUs only
        (replicas share the machine), and freed tensors kept for the next batch
        (core/memory.py: seed_cnn's batch of 32 ran 5,299 -> 7,451 images/s)."""
        from mlsd_ray.core.memory import claim_cpus_for_torch

        claim_cpus_for_torch(self.threads)


class LoggingReplica:
    """What both apps' model deployments share: dynamic batching (`run_batch`, answered by the
    task's `answer_batch` many requests at a time), each batch's metrics (`count_batch`),
    the prediction log the replica writes for `mlsd monitor` (rows are only queued on the
    request path, serve/predlog.py), the dropped-rows metric, and the last rows written when
    Serve shuts the replica down."""

    log = None
    replica: str  # set by the task's `load`, with `metrics` (serve/metrics.py's model_metrics)
    metrics: dict
    info: dict  # the served model's description: at least model_name and model_version
    batcher: Batcher[dict, dict]

    def start_batching(self, replica: ReplicaSettings) -> None:
        """Batches of up to serve.max_batch_size requests, each waiting at most
        serve.batch_wait_timeout_s for companions (serve/batching.py says why not
        `serve.batch`)."""
        self.batcher = Batcher(self.answer_batch, replica.max_batch_size,
                               replica.batch_wait_timeout_s)

    async def run_batch(self, request: dict) -> dict:
        """One request, answered together with other callers' requests (`answer_batch`)."""
        return await self.batcher.submit(request)

    async def answer_batch(self, requests: list[dict]) -> list[dict]:
        """The task's forward pass for many requests: one answer per request, in order."""
        raise NotImplementedError

    def count_batch(self, size: int, outcomes: list[str] | None) -> None:
        """One forward pass for Prometheus: its size, the version this replica serves (set
        with every batch: a value set once at start never reached Ray's metrics agent), and
        the predictions by outcome: the class or decision of each answer (`outcomes`), or
        "value" for each of a model that answers with numbers (None)."""
        version = str(self.info["model_version"])
        self.metrics["batch"].observe(size)
        self.metrics["version"].set(1, tags={"model_name": str(self.info["model_name"]),
                                             "model_version": version})
        counts = Counter(outcomes) if outcomes is not None else {"value": size}
        for outcome, count in counts.items():
            self.metrics["predictions"].inc(count, tags={"model_version": version,
                                                         "outcome": outcome})

    def open_log(self, log_settings: dict | None, workspace: Workspace) -> None:
        """Open the prediction log the task's `load` was configured with (serve.prediction_log;
        off: rows are not kept)."""
        from mlsd_ray.serve.predlog import PredictionLog, log_location

        settings = PredictionLogConfig(**(log_settings or {}))
        self.log = (PredictionLog(log_location(settings, workspace), settings, self.replica)
                    if settings.enabled else None)

    def record_predictions(self, rows: list[dict]) -> None:
        """Queue one prediction-log row per answered input (never blocks the request)."""
        if self.log is None:
            return
        self.log.record(rows)
        # Set with every batch, zero included: a value set once in the replica's constructor
        # never reached Ray's metrics agent (the gauge was missing from a fresh app's scrape).
        self.metrics["dropped"].set(self.log.dropped)

    def record_answered(self, requests: list[dict], inputs: str,
                        task_rows: Iterable[dict]) -> None:
        """Queue one prediction-log row per answered input: the app's columns (time, request
        id, model name, version and URI, latency since the request was received) and the
        task's (`task_rows`, one per input in request order). Each request holds its inputs
        under `inputs`, its `request_id` and when it was `received` (epoch seconds)."""
        if self.log is None:
            return
        now = dt.datetime.now(dt.timezone.utc)
        task_rows, rows = iter(task_rows), []
        for request in requests:
            common = {"time": now, "request_id": request["request_id"],
                      "model_name": self.info["model_name"],
                      "model_version": self.info["model_version"], "model_uri": self.info["uri"],
                      "latency_ms": round(1000 * (now.timestamp() - request["received"]), 3)}
            rows += [{**common, **next(task_rows)} for _ in request[inputs]]
        self.record_predictions(rows)

    def log_stats(self) -> dict | None:
        return self.log.stats() if self.log else None

    async def __del__(self):
        """Serve calls this on shutdown: write what the log still buffers."""
        log = getattr(self, "log", None)
        if log is not None:
            await asyncio.to_thread(log.close)


# ----------------------------------------------------------------------------- topology


class LocalModel:
    """The model in the routes' own replica (single hop): its batched method, called directly."""

    def __init__(self, replica):
        self._replica = replica

    async def run_batch(self, payload: dict, session_key: str | None = None) -> dict:
        return await self._replica.run_batch(payload)

    async def describe(self) -> dict:
        return self._replica.describe()

    async def explain(self, payload: dict) -> dict:
        return await self._replica.explain_batch(payload)


class RemoteModel:
    """The model deployment behind an ingress (split topology), through its handle. Every
    call maps the handle's failures to HTTP answers: past serve.max_queued_requests a 503
    with Retry-After, as Serve's proxy answers in the single topology; a replica that died
    under a prediction is retried once (predictions are idempotent)."""

    def __init__(self, handle, sticky: bool):
        self._handle = handle
        self._sticky = sticky  # consistent hashing: route by the session key

    async def run_batch(self, payload: dict, session_key: str | None = None) -> dict:
        handle = self._handle
        if self._sticky and session_key is not None:
            handle = handle.options(session_id=session_key)
        return await self._call(handle.run_batch, payload, retries=1)

    async def describe(self) -> dict:
        return await self._call(self._handle.describe)

    async def explain(self, payload: dict) -> dict:
        return await self._call(self._handle.explain_batch, payload)

    @staticmethod
    async def _call(method, *args, retries: int = 0):
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        for attempt in range(retries + 1):
            try:
                return await method.remote(*args)
            except BackPressureError as exc:
                raise ClientError(503, "overloaded", f"{exc.message} Try again shortly.",
                                  {"Retry-After": str(OVERLOAD_RETRY_AFTER_S)}) from exc
            except (RayActorError, ActorUnavailableError) as exc:
                if attempt == retries:
                    raise ClientError(503, "model_unavailable",
                                      f"model replica unavailable: {exc}") from exc
        raise AssertionError("unreachable")


class ModelRoutes:
    """Mixin of a task's routes class, which also inherits the task's model replica (a
    LoggingReplica with `load`, `run_batch` and `describe`; used in the single topology only):
    `attach` reaches the model either way."""

    model: LocalModel | RemoteModel

    if TYPE_CHECKING:  # the task's model replica, which the routes class also inherits
        def load(self, model: PinnedModel, replica: ReplicaSettings) -> None: ...

    def attach(self, model, replica: ReplicaSettings, sticky: bool) -> None:
        """`model` is a PinnedModel (single: load it here) or the Model deployment's handle."""
        RequestTimeLimit.seconds = replica.request_timeout_s  # one replica per process
        if isinstance(model, PinnedModel):
            self.load(model, replica)
            self.model = LocalModel(self)
        else:
            self.model = RemoteModel(model, sticky)


@dataclass(frozen=True)
class AppClasses:
    """A task's two classes and their deployments' names: `routes` (FastAPI routes, a
    subclass of `model` and ModelRoutes, wrapped by serve.ingress) and `model` (the batched
    model replica)."""

    routes: type
    model: type
    routes_name: str
    model_name: str


def bind_app(classes: AppClasses, settings: ServeConfig, model: PinnedModel,
             workspace: Workspace, route_settings: dict) -> serve.Application:
    """The application in the configured topology. Single: one deployment named after the
    model (the routes and the batched model together) with the model's options (autoscaling,
    router, CPUs). Split: the routes as `routes_name` (one ingress replica) in front of the
    model deployment."""
    replica = ReplicaSettings.from_config(settings, workspace)
    options = model_options(settings)
    if settings.topology == "single":
        return _deployment(classes.routes, classes.model_name).options(
            **options).bind(model, replica, route_settings)
    scorer = _deployment(classes.model, classes.model_name).options(
        **options).bind(model, replica)
    return _deployment(classes.routes, classes.routes_name).options(
        ray_actor_options={"num_cpus": settings.ingress_num_cpus},
        health_check_period_s=settings.health_check_period_s,
        max_ongoing_requests=max(256, 4 * settings.max_ongoing_requests),
    ).bind(scorer, replica, route_settings)


def _deployment(cls: type, name: str) -> serve.Deployment:
    """`serve.deployment` applied to a class: Ray annotates only its decorator form."""
    return cast(serve.Deployment, serve.deployment(cls, name=name))


# ----------------------------------------------------------------------------- HTTP


@functools.cache
def _page_text(name: str) -> str:
    return resources.files("mlsd_ray.serve").joinpath("pages", name).read_text()


def page(name: str) -> HTMLResponse:
    """A page of serve/pages/ for a person to try the model in a browser: HTML and inline
    JavaScript, no build step, calling the app's own API (so it shows the API's errors)."""
    return HTMLResponse(_page_text(name))


async def health_answer(model) -> dict | JSONResponse:
    """`GET /v1/health` of every app: 200 with the served model's name and version once a
    replica holds it (`model`: LocalModel or RemoteModel), else 503 `not_ready`."""
    try:
        info = await asyncio.wait_for(model.describe(), timeout=30)
    except Exception as exc:  # no replica yet, or it died: not ready
        return error_response(503, "not_ready", f"model not ready: {type(exc).__name__}")
    return {"status": "ok", "model_name": info["model_name"],
            "model_version": info["model_version"]}


def error_response(status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error every app answers with."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"code": code, "message": message}})


async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


def error_for_path(path: str, status: int, code: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """Our JSON error, in the Open Inference Protocol's shape (`{"error": "..."}`) under /v2."""
    if path == "/v2" or path.startswith("/v2/"):
        return JSONResponse(status_code=status, headers=headers, content={"error": message})
    return error_response(status, code, message, headers)


def _http_error_handler(served: str):
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = str(exc.detail)
        if exc.status_code in codes:  # e.g. a request meant for another task's app
            message = (f"{message}: {request.method} {request.url.path}; this app serves "
                       f"{served}")
        headers = dict(exc.headers or {})
        if exc.status_code == 405:  # RFC 9110: Allow lists every method the path takes
            headers["Allow"] = _allowed_methods(request, headers.get("Allow", ""))
        return error_for_path(request.url.path, exc.status_code,
                              codes.get(exc.status_code, "http_error"), message, headers)

    return http_error


def _allowed_methods(request: Request, raised: str) -> str:
    """The methods of every route whose path matches the request's; `raised`, Starlette's own
    Allow, when none does. (Starlette names the first such route's only: GET for a path with
    a GET and a PUT route.) Serve's ingress moves the app's routes into a router that FastAPI
    includes as one node (`_IncludedRouter`, its `original_router` holds them)."""
    path = request.scope.get("path", "")
    methods = {method for route in _all_routes(request.app.router.routes)
               if route.path_regex.match(path) for method in route.methods or ()}
    return ", ".join(sorted(methods)) if methods else raised


def _all_routes(routes) -> list:
    """The routes with a path and methods, also inside nested routers."""
    found = []
    for route in routes:
        nested = getattr(getattr(route, "original_router", None), "routes", None) or \
            getattr(route, "routes", None)
        if nested:
            found += _all_routes(nested)
        elif getattr(route, "path_regex", None) is not None and hasattr(route, "methods"):
            found.append(route)
    return found


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(422, "invalid_request", str(exc.errors()))


class RequestMetrics:
    """Prometheus counts of HTTP requests by route template and status, and their latency
    (serve/metrics.py's ingress metrics).

    Plain ASGI: Starlette's `@app.middleware("http")` runs every request through a task group
    and memory streams, which cost more CPU per request than the model's share of a batch.
    The route is the template FastAPI matched (`/v2/models/{model_name}/infer`), so tags stay
    few whatever paths clients send; unmatched paths count as "other".
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_note_status(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            route = getattr(scope.get("route"), "path", "other")
            metrics = ingress_metrics()
            metrics["requests"].inc(tags={"route": route, "status": str(status)})
            metrics["latency"].observe(1000 * (time.perf_counter() - started),
                                       tags={"route": route})


class RequestTimeLimit:
    """A request still unanswered after `serve.request_timeout_s` in this replica gets 504
    with our JSON error body, and its work is cancelled (a batch already running finishes for
    the others in it). A response already started is left to finish.

    Plain ASGI, like RequestMetrics. `seconds` is set once the replica knows its settings
    (`ModelRoutes.attach`); None: no limit."""

    seconds: float | None = None

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not self.seconds:
            await self.app(scope, receive, send)
            return
        started = False

        async def send_noting_start(message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await asyncio.wait_for(self.app(scope, receive, send_noting_start), self.seconds)
        except asyncio.TimeoutError:
            if started:
                raise
            response = error_for_path(scope["path"], 504, "timeout",
                                      f"no answer within {self.seconds:g} s "
                                      "(serve.request_timeout_s); try again")
            await response(scope, receive, send)


def add_error_handlers(app: FastAPI, served: str) -> None:
    """Every error as `{"error": {"code", "message"}}` (both Serve apps share this); a 404 or
    405 names the task the app serves and its routes (`served`)."""
    # Starlette types a handler as taking any Exception; it calls each with its own class only.
    app.add_exception_handler(ClientError, cast(ExceptionHandler, _client_error))
    app.add_exception_handler(HTTPException, _http_error_handler(served))
    app.add_exception_handler(RequestValidationError, cast(ExceptionHandler, _validation_error))


def count_requests(app: FastAPI) -> None:
    """Prometheus request counts and latency for every route of the app (RequestMetrics),
    within the time limit (RequestTimeLimit), so that its 504s are counted too."""
    app.add_middleware(RequestTimeLimit)
    app.add_middleware(RequestMetrics)  # added last: outermost


def authorize(request: Request, token_sha256: str | None, env: str = TOKEN_ENV) -> None:
    """401 unless the request carries the server's bearer token (when one is set)."""
    if not token_sha256:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    digest = hashlib.sha256(token.encode()).hexdigest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(digest, token_sha256):
        raise ClientError(401, "unauthorized", f"send 'Authorization: Bearer <token>' "
                                               f"with the server's {env}")


def authorize_change(request: Request, admin_sha256: str | None,
                     allow_unauthenticated: bool = False) -> None:
    """Routes that change how the app decides (the fraud policy and rules) need the admin
    token, and are off when none was set where the app started: an open API must not let
    anyone who can score also rewrite the rules. `allow_unauthenticated`
    (serve.allow_unauthenticated_writes) opens them to every client instead."""
    if admin_sha256:
        authorize(request, admin_sha256, ADMIN_TOKEN_ENV)
    elif not allow_unauthenticated:
        raise ClientError(403, "changes_off", f"changing this over HTTP is off: start the app "
                                              f"with {ADMIN_TOKEN_ENV} set, then send "
                                              f"'Authorization: Bearer <that token>' (or, on "
                                              f"a trusted network only, set "
                                              f"serve.allow_unauthenticated_writes)")


def declare_bearer_auth(api: FastAPI, every_route: bool, writes: tuple[str, ...] = ()) -> None:
    """Declare the bearer scheme in `api`'s OpenAPI, and require it where the app does: on
    every operation when the app has an API token (`every_route`), else on the `writes`
    (the paths whose PUT changes the app). Clients and generators (schemathesis, openapi
    codegen) then know to send `Authorization: Bearer <token>`."""
    build = api.openapi

    def openapi() -> dict[str, Any]:
        schema = build()  # FastAPI's, built once and cached on `api`
        schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
        schemes["bearer"] = {"type": "http", "scheme": "bearer", "description": (
            f"the token in {TOKEN_ENV} (every route, when set) or {ADMIN_TOKEN_ENV} (changes)")}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                if every_route or (method == "put" and path in writes):
                    operation["security"] = [{"bearer": []}]
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def token_sha256(env: str = TOKEN_ENV) -> str | None:
    """The digest of the token in `env` (MLSD_API_TOKEN by default), if set: replicas keep
    only the digest."""
    token = os.environ.get(env)
    return hashlib.sha256(token.encode()).hexdigest() if token else None


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> ClientError:
    return ClientError(413, "body_too_large", f"request body of {size} bytes or more; the "
                                              f"limit is {limit}")


# ----------------------------------------------------------------------------- builder


def build_app(args: dict) -> serve.Application:
    """Application builder: args = the `serve` config keys plus optional `home` (the MLSD_HOME
    of `serve run` configs; the workspace is resolved here, once). Builds the app of the task
    that trained `model` (its checkpoint says which), as `mlsd serve` does."""
    from mlsd_ray import registry
    from mlsd_ray.tasks import task_of_checkpoint

    args = dict(args)
    workspace = Workspace.at(args.pop("home", None))
    settings = ServeConfig.model_validate(args)
    model = registry.pin(settings.model_ref(), workspace)
    task = task_of_checkpoint(model.path)
    return task.serve_application(settings, model, workspace).application


def model_options(settings: ServeConfig) -> dict:
    """The model deployment's options: autoscaling, concurrency, resources, router."""
    options: dict[str, Any] = {
        "autoscaling_config": settings.autoscaling.model_dump(),
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        # past the queue: 503 with Retry-After (the proxy's answer, or ours in RemoteModel)
        "backpressure_config": {"status_code": 503, "retry_after_s": OVERLOAD_RETRY_AFTER_S},
        "health_check_period_s": settings.health_check_period_s,
        "ray_actor_options": {"num_cpus": settings.num_cpus, "num_gpus": settings.num_gpus}}
    router = ROUTER_CLASSES[settings.router]
    if router:
        # Ray annotates RequestRouterConfig's `**kwargs` as dict[str, Any] (each value a dict).
        options["request_router_config"] = RequestRouterConfig(
            request_router_class=router)  # type: ignore[arg-type]
    return options


