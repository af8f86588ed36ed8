"""What a Ray started to serve through HAProxy is told (serve/control.py `prepare_ingress`):
HAProxy itself, a short drain, and the `balance` algorithm that serve.router maps to."""

from __future__ import annotations

import os

import pytest

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.serve.control import prepare_ingress


@pytest.mark.parametrize("router, balance", [
    ("pow2", "random(2)"), ("round_robin", "roundrobin"),
    ("least_connections", "leastconn"), ("consistent_hash", "hdr(x-session-id)")])
def test_each_router_becomes_haproxys_balance(monkeypatch, router, balance):
    monkeypatch.setattr(os, "environ", {})
    prepare_ingress(ServeConfig(model="m", ingress="haproxy", router=router))
    assert os.environ == {"RAY_SERVE_ENABLE_HA_PROXY": "1",
                          "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
                          "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": balance}


def test_the_proxy_needs_nothing_at_start(monkeypatch):
    monkeypatch.setattr(os, "environ", {})
    prepare_ingress(ServeConfig(model="m", router="round_robin"))
    assert os.environ == {}
