"""The fraud Serve application (its routes under `/v1/fraud`, and the Open Inference
Protocol's under `/v2`: serve/oip.py):

    POST /v1/fraud/score    {"records": [{field: value}, ...]} -> a decision per record
    GET  /v1/fraud/health   200 once the model is loaded
    GET  /v1/fraud/model    the served version, its columns, the policy in force
    GET  /v1/fraud/policy   threshold, decline_above, the rules
    PUT  /v1/fraud/policy   {"threshold": 0.4, "decline_above": 0.95}: changed at once
    PUT  /v1/fraud/rules    a rules YAML body: checked, then in force; a bad file is refused
                            with its line and reason, and the rules in force stay
                            (both PUTs need MLSD_ADMIN_TOKEN: 403 when the app started
                            without one, 401 without it in `Authorization: Bearer`)
    /v2/...                 one [N] tensor per column (FP64, or BYTES for a category), or
                            `records` BYTES [N] of JSON objects, in; `score` FP32 and
                            `decision` BYTES (binary), `probabilities` and `class`
                            (multiclass) or `prediction` FP64 (regression) out

The model batches records from many requests into one forward pass (serve/batching.py) and
autoscales like the image model, and it writes a prediction-log row per record (the record's
columns, score and predicted class: tabular/monitoring.py) for `mlsd monitor`. The routes
check records (records.py), apply the threshold and the rules (rules.py), and keep the policy
in a file under MLSD_HOME: every replica reads the policy last set from it (a PUT reaches one
replica; the others see the file change), and so does a restarted one. Routes and model share
a replica or not as `serve.topology` says (serve/app.py's `bind_app`).
"""


import asyncio
import json
import os
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from ray import serve

from mlsd_ray import __version__
from mlsd_ray.core import storage
from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.registry import PinnedModel
from mlsd_ray.serve.app import (
    ADMIN_TOKEN_ENV,
    REQUEST_ID_HEADER,
    AppClasses,
    LoggingReplica,
    ModelRoutes,
    ReplicaSettings,
    add_error_handlers,
    authorize,
    authorize_change,
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
from mlsd_ray.serve.schemas import ClientError, RateLimit, documented_errors, parse_json
from mlsd_ray.tasks.tabular.config import TabularConfig
from mlsd_ray.tasks.tabular.monitoring import predicted_classes
from mlsd_ray.tasks.tabular.records import check_record, records_from_json, records_from_tensors
from mlsd_ray.tasks.tabular.rules import RulesError, decide, parse_rules

PREFIX = "/v1/fraud"
DEFAULT_RULES = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "examples",
                                              "fraud-rules.yaml"))
api = FastAPI(title="mlsd-ray fraud scoring", version=__version__,
              description="Scores transactions with a tabular model and a rules engine. "
                          'Errors are JSON `{"error": {"code", "message"}}`.')
add_error_handlers(api, f"the tabular task: POST {PREFIX}/score, GET {PREFIX}/health, "
                        f"GET {PREFIX}/model, GET|PUT {PREFIX}/policy, PUT {PREFIX}/rules, "
                        "and /v2 (the Open Inference Protocol)")
add_open_inference_routes(api)
_ERRORS = documented_errors()


def _json_body(schema: dict) -> dict:
    """A route's OpenAPI request body (the routes read and check the body themselves)."""
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


_SCORE_BODY = _json_body({
    "type": "object", "required": ["records"],
    "properties": {"records": {"type": "array", "minItems": 1, "items": {
        "type": "object", "description": "A transaction: column name -> value; a missing "
        "column is imputed, an unknown one ignored (both noted in the result)."}}}})
MAX_EXPLAINED = 64  # records per POST /v1/fraud/explain
_POLICY_BODY = _json_body({
    "type": "object", "minProperties": 1, "additionalProperties": False,
    "properties": {"threshold": {"type": "number", "minimum": 0, "maximum": 1},
                   "decline_above": {"type": ["number", "null"], "minimum": 0,
                                     "maximum": 1}}})
_RULES_BODY = {"requestBody": {"required": True, "content": {"application/yaml": {
    "schema": {"type": "string", "description": "The rules file (see "
               "mlsd_ray/examples/fraud-rules.yaml)"}}}}}
count_requests(api)
# No `from __future__ import annotations` in this module: FastAPI inside a Serve ingress then
# sees `request: Request` as the string "Request" and asks for a query parameter named request.


def _require_json(request: Request) -> None:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise ClientError(415, "unsupported_media_type",
                          f"content type {content_type or '(none)'!r}; send application/json")


class TabularModel(LoggingReplica):
    """The MLP and its fitted preparation behind dynamic batching, logging what it scores."""

    def __init__(self, model: PinnedModel, replica: ReplicaSettings):
        self.load(model, replica)

    def load(self, model: PinnedModel, replica: ReplicaSettings) -> None:
        from mlsd_ray.tasks.tabular.train import load_tabular

        replica.claim_process()
        self.loaded = load_tabular(model.checkpoint_here(replica.workspace))
        self.start_batching(replica)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.metrics = model_metrics()
        featurizer, decision = self.loaded.featurizer, self.loaded.decision
        local = model.version == "local"  # a checkpoint folder: named after its run
        self.info = {"model_name": self.loaded.metadata.run_name if local else model.name,
                     "model_version": model.version, "uri": model.uri,
                     "task": decision["task"], "classes": decision["classes"],
                     "label": decision["label"], "threshold": decision.get("threshold"),
                     "decision": decision, "columns": [
                         {**{k: e[k] for k in ("name", "kind", "impute", "scale", "encode")},
                          "categories": featurizer.categories(e["name"])}
                         for e in featurizer.plan]}
        self.open_log(replica.log_settings, replica.workspace)

    def describe(self) -> dict:
        return {**self.info, "replica": self.replica, "prediction_log": self.log_stats()}

    async def explain_batch(self, payload: dict) -> dict:
        """{"records": checked records} -> per record, Integrated Gradients summed per input
        column (tasks/tabular/explain.py), and the output they explain; off the event loop."""
        import pandas as pd

        from mlsd_ray.tasks.tabular.explain import record_attributions

        frame = pd.DataFrame(payload["records"])
        task = self.info["task"]
        outputs = await asyncio.to_thread(self.loaded.predict, frame)
        attributions = await asyncio.to_thread(record_attributions, self.loaded, frame, task)
        explained = {"binary": f"score of {self.info['classes'][1]!r}",
                     "multiclass": "probability of the predicted class"}.get(task, "prediction")
        answers = [{"attributions": columns, "explained": explained,
                    "output": round(float(output[1] if task == "binary" else
                                          (max(output) if task == "multiclass" else output)), 6)}
                   for columns, output in zip(attributions, outputs.tolist(), strict=True)]
        return {"explanations": answers, "model_name": self.info["model_name"],
                "model_version": self.info["model_version"], "replica": self.replica}

    async def answer_batch(self, requests: list[dict]) -> list[dict]:
        """Each request: {"records": checked records, "request_id", "received" (epoch s)};
        answers: the positive-class score per record (binary), probabilities (multiclass) or
        predictions (regression)."""
        import pandas as pd

        sizes = [len(r["records"]) for r in requests]
        records = [record for r in requests for record in r["records"]]
        frame = pd.DataFrame(records)
        outputs = await asyncio.to_thread(self.loaded.predict, frame)
        self.count_batch(len(frame), predicted_classes(
            outputs, self.info["task"], self.info["classes"], self.info["threshold"]))
        self._log(requests, records, outputs)
        answers, start = [], 0
        for size in sizes:
            part = outputs[start:start + size]
            start += size
            values = (part[:, 1] if self.info["task"] == "binary" else part).tolist()
            answers.append({"outputs": values, "replica": self.replica,
                            "batch_records": len(frame),
                            "model_version": self.info["model_version"]})
        return answers

    def _log(self, requests: list[dict], records: list[dict], outputs) -> None:
        """One prediction-log row per record (queued only: the log writes elsewhere)."""
        from mlsd_ray.tasks.tabular.monitoring import log_rows

        if self.log is not None:
            info = self.info
            self.record_answered(requests, "records", log_rows(
                records, outputs, info["task"], info["classes"], info["threshold"]))


@serve.ingress(api)
class FraudApp(TabularModel, ModelRoutes, OpenInferenceRoutes):
    """Checks records, calls the model, applies threshold and rules, serves the policy."""

    def __init__(self, model, replica: ReplicaSettings, settings: dict):
        self.settings = settings
        declare_bearer_auth(api, bool(settings["token_sha256"]),
                            writes=(f"{PREFIX}/policy", f"{PREFIX}/rules"))
        self.served: dict | None = None  # the model's description, once asked
        self.policy_file = settings["policy_file"]
        self.policy_stamp = self._policy_stamp()
        self.policy = self._initial_policy()
        self.v2_max_body_bytes = settings["max_body_bytes"]
        rate = settings["explain_per_second"]
        self.explain_limit = RateLimit(rate, "serve.explain_per_second") if rate else None
        self.attach(model, replica, sticky=False)

    def _initial_policy(self) -> dict:
        """The policy last set (the file), else the deployed rules and the model's threshold."""
        saved = None
        if os.path.isfile(self.policy_file):
            with open(self.policy_file) as handle:
                saved = json.load(handle)
        if saved and saved.get("model_uri") == self.settings["model_uri"]:
            return {**saved, "rules": parse_rules(saved["rules_text"])}
        return {"threshold": None, "decline_above": self.settings["decline_above"],
                "rules_text": self.settings["rules_text"],
                "rules": parse_rules(self.settings["rules_text"]),
                "model_uri": self.settings["model_uri"]}

    def _policy_stamp(self) -> int | None:
        try:
            return os.stat(self.policy_file).st_mtime_ns
        except FileNotFoundError:
            return None

    def _save_policy(self) -> None:
        # whole or not at all (storage.write_bytes): replicas may write, and read, at once
        storage.write_json(self.policy_file,
                           {k: v for k, v in self.policy.items() if k != "rules"})
        self.policy_stamp = self._policy_stamp()

    async def _model_info(self) -> dict:
        """The model's description (asked once), with the policy last set by any replica."""
        if self.served is None:
            self.served = await self.model.describe()
        stamp = self._policy_stamp()
        if stamp != self.policy_stamp:  # another replica changed it
            self.policy_stamp, self.policy = stamp, self._initial_policy()
        if self.policy["threshold"] is None:
            self.policy["threshold"] = self.served["threshold"]
        return self.served

    @api.post(f"{PREFIX}/score", responses=_ERRORS, openapi_extra=_SCORE_BODY,
              summary="Score transactions: a decision, score and rules per record")
    async def score(self, request: Request) -> dict:
        started, received = time.perf_counter(), time.time()
        authorize(request, self.settings["token_sha256"])
        _require_json(request)
        body = parse_json(await read_body(request, self.settings["max_body_bytes"]))
        records = records_from_json(body, self.settings["max_instances"])
        request_id = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        results, answer, info = await self._score_records(records, request_id, received)
        return {"results": results, "model_name": info["model_name"],
                "model_version": answer["model_version"], "task": info["task"],
                "threshold": self.policy["threshold"], "replica": answer["replica"],
                "request_id": request_id,
                "latency_ms": round(1000 * (time.perf_counter() - started), 3)}

    @api.post(f"{PREFIX}/explain", responses=_ERRORS, openapi_extra=_SCORE_BODY,
              summary="Why each transaction got its score: attributions per input column")
    async def explain(self, request: Request) -> dict:
        """`{"records": [...]}` as for /score: per record, each input column's share of the
        score (Integrated Gradients on the MLP, summed over a column's encoded features),
        largest first. Rate-limited (serve.explain_per_second): each record costs
        IG_STEPS (32) forward and backward passes."""
        authorize(request, self.settings["token_sha256"])
        if self.explain_limit is None:
            raise ClientError(403, "explain_off", f"POST {PREFIX}/explain is off here "
                                                  "(serve.explain_per_second: 0)")
        self.explain_limit.take()
        _require_json(request)
        body = parse_json(await read_body(request, self.settings["max_body_bytes"]))
        records = records_from_json(body, min(self.settings["max_instances"], MAX_EXPLAINED))
        info = await self._model_info()
        checked = [check_record(r, i, info["columns"], self.settings, info["label"])
                   for i, r in enumerate(records)]
        answer = await self.model.explain({"records": [clean for clean, _ in checked]})
        for explanation, (_, notes) in zip(answer["explanations"], checked, strict=True):
            if notes:
                explanation["notes"] = notes
        return answer

    async def _score_records(self, records: list[dict], request_id: str,
                             received: float) -> tuple[list[dict], dict, dict]:
        """Check the records, score them in the model's batch, apply the policy: the results,
        the model's answer and its description."""
        info = await self._model_info()
        checked = [check_record(r, i, info["columns"], self.settings, info["label"])
                   for i, r in enumerate(records)]
        answer = await self.model.run_batch({"records": [clean for clean, _ in checked],
                                             "request_id": request_id, "received": received})
        results = [self._result(record, output, notes, info)
                   for record, output, (_, notes) in zip(records, answer["outputs"], checked,
                                                         strict=True)]
        return results, answer, info

    def v2_signature(self, info: dict) -> Signature:
        """The Open Inference Protocol's tensors for this model (serve/oip.py)."""
        inputs = [TensorSpec(c["name"], "BYTES" if c["kind"] == "categorical" else "FP64", [-1])
                  for c in info["columns"]]
        outputs = {"binary": [TensorSpec("score", "FP32", [-1]),
                              TensorSpec("decision", "BYTES", [-1])],
                   "multiclass": [TensorSpec("probabilities", "FP32",
                                             [-1, len(info["classes"] or [])]),
                                  TensorSpec("class", "BYTES", [-1])],
                   }.get(info["task"], [TensorSpec("prediction", "FP64", [-1])])
        return Signature(inputs=inputs, outputs=outputs,
                         alternatives=[TensorSpec("records", "BYTES", [-1])])

    async def v2_infer(self, tensors: dict, request_id: str | None) -> list[Tensor]:
        """V2 tensors in; the task's outputs, with the policy's decisions, out."""
        import numpy as np

        records = records_from_tensors(tensors, self.settings["max_instances"])
        results, answer, info = await self._score_records(
            records, request_id or uuid.uuid4().hex, time.time())
        if info["task"] == "binary":
            return [Tensor("score", "FP32", np.array([r["score"] for r in results], np.float32)),
                    Tensor("decision", "BYTES", np.array([r["decision"].encode()
                                                          for r in results], dtype=object))]
        if info["task"] == "multiclass":
            return [Tensor("probabilities", "FP32", np.asarray(answer["outputs"], np.float32)),
                    Tensor("class", "BYTES", np.array([str(r["class"]).encode()
                                                       for r in results], dtype=object))]
        return [Tensor("prediction", "FP64", np.asarray(answer["outputs"], np.float64))]

    def _authorize(self, request: Request) -> None:
        authorize(request, self.settings["token_sha256"])

    def _result(self, record: dict, output: Any, notes: list[str], info: dict) -> dict:
        if info["task"] == "binary":
            result = decide(record, output, self.policy["threshold"],
                            self.policy["decline_above"], self.policy["rules"])
        elif info["task"] == "multiclass":
            best = max(range(len(output)), key=output.__getitem__)
            result = {"class": info["classes"][best], "probability": round(output[best], 6)}
        else:
            result = {"prediction": round(float(output), 6)}
        return {**result, "notes": notes} if notes else result

    @api.get("/", include_in_schema=False)
    async def try_it(self) -> HTMLResponse:
        """A page to try the model: one record in a form (serve/pages/fraud.html)."""
        return page("fraud.html")

    @api.get(f"{PREFIX}/health", responses=_ERRORS, summary="200 once the model is loaded")
    async def health(self):
        return await health_answer(self.model)

    @api.get(f"{PREFIX}/model", responses=_ERRORS,
             summary="The served version, its input columns and the policy")
    async def model_info(self, request: Request) -> dict:
        authorize(request, self.settings["token_sha256"])
        return {**await self._model_info(), "policy": self._public_policy()}

    def _public_policy(self) -> dict:
        return {"threshold": self.policy["threshold"],
                "decline_above": self.policy["decline_above"],
                "rules": [{"name": r.name, "when": r.when, "action": r.action}
                          for r in self.policy["rules"]]}

    @api.get(f"{PREFIX}/policy", responses=_ERRORS,
             summary="The threshold and rules in force")
    async def get_policy(self, request: Request) -> dict:
        authorize(request, self.settings["token_sha256"])
        await self._model_info()
        return self._public_policy()

    @api.put(f"{PREFIX}/policy", responses=_ERRORS, openapi_extra=_POLICY_BODY,
             summary="Change the threshold or decline_above, without a restart")
    async def put_policy(self, request: Request) -> dict:
        authorize_change(request, self.settings["admin_sha256"],
                         self.settings["allow_unauthenticated_writes"])
        _require_json(request)
        body = parse_json(await read_body(request, self.settings["max_body_bytes"]))
        await self._model_info()
        if not isinstance(body, dict) or not body or set(body) - {"threshold", "decline_above"}:
            raise ClientError(422, "invalid_policy", 'send {"threshold": 0..1} and/or '
                                                     '{"decline_above": 0..1}')
        for key, value in body.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value <= 1:
                if not (key == "decline_above" and value is None):
                    raise ClientError(422, "invalid_policy", f"{key} must be a number in "
                                                             f"[0, 1], got {value!r}")
        self.policy.update({k: None if v is None else float(v) for k, v in body.items()})
        self._save_policy()
        return self._public_policy()

    @api.put(f"{PREFIX}/rules", responses=_ERRORS, openapi_extra=_RULES_BODY,
             summary="Replace the rules (a YAML body); a bad file changes nothing")
    async def put_rules(self, request: Request) -> dict:
        authorize_change(request, self.settings["admin_sha256"],
                         self.settings["allow_unauthenticated_writes"])
        text = (await read_body(request, self.settings["max_body_bytes"])).decode(
            "utf-8", errors="replace")
        info = await self._model_info()
        try:
            rules = parse_rules(text, {c["name"] for c in info["columns"]})
        except RulesError as exc:
            raise ClientError(400, "invalid_rules", f"rules not changed: {exc}") from exc
        self.policy.update(rules=rules, rules_text=text)
        self._save_policy()
        return self._public_policy()


def policy_file(workspace: Workspace, app_name: str) -> str:
    """Where the ingress keeps the policy last set (local to the machine, like the state file)."""

    return str(workspace.serve_state / f"{app_name}-policy.json")


CLASSES = AppClasses(routes=FraudApp, model=TabularModel, routes_name="FraudIngress",
                     model_name="FraudModel")


def fraud_app(settings: ServeConfig, tabular: TabularConfig, model: PinnedModel,
              workspace: Workspace, rules_text: str | None = None) -> serve.Application:
    """The fraud app in the configured topology, batching, autoscaling and router."""
    if rules_text is None:
        with open(tabular.rules or DEFAULT_RULES) as handle:
            rules_text = handle.read()
    parse_rules(rules_text)  # a bad file fails the deploy, with its line
    route_settings = {
        "max_instances": settings.max_instances, "max_body_bytes": settings.max_body_bytes,
        "token_sha256": token_sha256(), "admin_sha256": token_sha256(ADMIN_TOKEN_ENV),
        "allow_unauthenticated_writes": settings.allow_unauthenticated_writes,
        "model_uri": settings.model, "rules_text": rules_text,
        "decline_above": tabular.decline_above,
        "explain_per_second": settings.explain_per_second,
        "policy_file": policy_file(workspace, settings.app_name),
        **tabular.model_dump(include={"on_missing_column", "on_extra_column",
                                      "on_unseen_category", "on_nan"})}
    return bind_app(CLASSES, settings, model, workspace, route_settings)
