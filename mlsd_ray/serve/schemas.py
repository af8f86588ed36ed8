"""What every Serve app shares about requests: the client error that becomes
`{"error": {"code", "message"}}` with a 4xx status, its OpenAPI shape, and JSON parsing that
names where a malformed body stopped. No Ray here: unit-testable. (A task's own request
shapes live with the task: tasks/image/schemas.py, tasks/tabular/records.py.)"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel


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
# schemathesis, in CI) knows them all. 503: overloaded; 504: serve.request_timeout_s passed.
ERROR_STATUSES = (400, 401, 403, 404, 413, 415, 422, 503, 504)


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
