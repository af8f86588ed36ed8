"""Who may change an app's decisions over HTTP (serve/app.py `authorize_change`): the admin
token when one is set; nobody when none is, unless serve.allow_unauthenticated_writes."""

from __future__ import annotations

import hashlib

import pytest
from starlette.requests import Request

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.serve.app import authorize_change
from mlsd_ray.serve.schemas import ClientError

ADMIN = hashlib.sha256(b"s3cret").hexdigest()


def put(authorization: str | None = None) -> Request:
    headers = [(b"authorization", authorization.encode())] if authorization else []
    return Request({"type": "http", "method": "PUT", "path": "/v1/fraud/rules",
                    "headers": headers})


def test_changes_are_off_without_an_admin_token_unless_allowed():
    assert ServeConfig().allow_unauthenticated_writes is False  # the safe default
    with pytest.raises(ClientError) as refused:
        authorize_change(put(), None)
    assert refused.value.status == 403 and refused.value.code == "changes_off"
    assert "serve.allow_unauthenticated_writes" in refused.value.message
    authorize_change(put(), None, allow_unauthenticated=True)  # allowed: no error


def test_an_admin_token_is_required_whenever_one_is_set():
    for allowed in (False, True):  # the token wins over the setting
        for wrong in (None, "Bearer nope", "Basic s3cret"):
            with pytest.raises(ClientError) as refused:
                authorize_change(put(wrong), ADMIN, allow_unauthenticated=allowed)
            assert refused.value.status == 401
        authorize_change(put("Bearer s3cret"), ADMIN, allow_unauthenticated=allowed)
