"""What every Serve app shares about requests: the client error that becomes
`{"error": {"code", "message"}}` with a 4xx status, its OpenAPI shape, and JSON parsing that
names where a malformed body stopped. No Ray here: unit-testable. (A task's own request
shapes live with the task: tasks/image/schemas.py, tasks/tabular/records.py.)"""

from __future__ import annotations

import json
import math
import time
from typing import Any

from pydantic import BaseModel

__all__ = ["ClientError", "documented_errors", "ERROR_STATUSES", "ErrorBody", "ErrorResponse",
           "parse_json", "ProtocolErrorResponse", "RateLimit"]


class ClientError(Exception):
    """Something the client sent is wrong: becomes `{"error": {"code", "message"}}` + 4xx."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ProtocolErrorResponse(BaseModel):
    """The Open Inference Protocol's error body, which /v2 answers with."""

    error: str


# Every status an app's route may answer besides 200: its OpenAPI lists them, so a client (and
# schemathesis, in CI) knows them all. 429: past serve.explain_per_second; 503: overloaded;
# 504: serve.request_timeout_s passed.
ERROR_STATUSES = (400, 401, 403, 404, 413, 415, 422, 429, 503, 504)


def documented_errors(body: type[BaseModel] = ErrorResponse) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI `responses`: each status of ERROR_STATUSES with its error body."""
    return {status: {"model": body} for status in ERROR_STATUSES}


def parse_json(body: bytes) -> object:
    """The body as JSON, or ClientError 400 naming where parsing stopped."""
    try:
        return json.loads(body)
    except RecursionError:  # Python's parser recurses once per level: [[[[... 150,000 deep
        raise ClientError(400, "malformed_json", "request body nests JSON too deeply") from None
    except ValueError as exc:  # not JSON, not UTF-8, or an integer of over 4,300 digits
        raise ClientError(400, "malformed_json", f"request body is not valid JSON: {exc}") from exc


class RateLimit:
    """At most `per_second` calls a second, in bursts of up to max(1, per_second): a token
    bucket. `take()` raises ClientError 429 with Retry-After when it is empty."""

    def __init__(self, per_second: float, setting: str):
        self.per_second, self.setting = per_second, setting
        self.capacity = max(1.0, per_second)
        self.tokens, self.at = self.capacity, time.monotonic()

    def take(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.per_second)
        self.at = now
        if self.tokens < 1:
            wait = math.ceil((1 - self.tokens) / self.per_second)
            raise ClientError(429, "rate_limited", f"at most {self.per_second:g} requests per "
                              f"second here ({self.setting}); try again in {wait} s",
                              {"Retry-After": str(wait)})
        self.tokens -= 1
