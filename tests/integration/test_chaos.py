"""Serving under faults, over real HTTP and under load: model replicas SIGKILLed every 10 s,
the Serve controller killed once, the HTTP proxy killed (Serve starts a new one).

Two closed request loops run during each fault: one that counts a failed request as failed,
one that retries it once, the way a client with one retry would. Each test prints its figures
as a JSON line; docs/reliability.md records them.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests

from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.ports import free_port
from mlsd_ray.core.workspace import Workspace
from mlsd_ray.serve import control
from mlsd_ray.serve.predlog import log_location, wait_for_rows
from mlsd_ray.tasks.image.train import log_and_register
from tests.conftest import actor_processes
from tests.load import report, under_load, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]

APP = "chaos"
REPLICAS = 3
# 6 kills, one every 10 s: 60 s (MLSD_CHAOS_KILLS=N for another count)
KILLS = int(os.environ.get("MLSD_CHAOS_KILLS", "6"))
JSON = {"content-type": "application/json"}


@dataclass
class ChaosApp:
    url: str  # of POST /v1/predict
    body: bytes  # a request for one image
    settings: ServeConfig
    workspace: Workspace


@pytest.fixture(scope="module")
def app(tmp_path_factory, digits_model) -> Iterator[ChaosApp]:
    """The session's digits model served by 3 replicas."""
    from ray import serve

    workspace = Workspace.at(str(tmp_path_factory.mktemp("chaos") / "mlsd-home"))
    log_and_register(digits_model.result, digits_model.cfg, digits_model.dataset,
                     "digits-cnn", workspace)
    images, _ = digits_model.dataset.load_split("test")
    settings = ServeConfig(model="models:/digits-cnn/1", app_name=APP, port=free_port(),
                           num_cpus=0.1, autoscaling={"min_replicas": REPLICAS,
                                                      "max_replicas": REPLICAS})
    running = control.start(settings, workspace=workspace, log=lambda _: None)
    body = json.dumps({"instances": [images[0].tolist()]}).encode()
    yield ChaosApp(f"{running.url}/v1/predict", body, settings, workspace)
    serve.shutdown()


def replicas_running() -> int:
    from ray import serve

    [deployment] = serve.status().applications[APP].deployments.values()
    return deployment.replica_states.get("RUNNING", 0)


def rss_mb(process) -> float:
    return process.memory_info().rss / 2**20


def test_a_replica_killed_every_10_s(app):
    """SIGKILL a random one of 3 model replicas every 10 s, KILLS times, under load: Serve
    replaces each, a client with one retry loses almost nothing, neither the
    proxy nor the controller keeps growing, and the prediction log loses at most what a
    killed replica had buffered: one flush interval of its rows."""
    url, body = app.url, app.body
    [proxy], [controller] = actor_processes("ProxyActor"), actor_processes("ServeController")
    memory = {"proxy_mb": [rss_mb(proxy)], "controller_mb": [rss_mb(controller)]}
    replaced_s: list[float] = []
    since = dt.datetime.now(dt.timezone.utc)
    started = time.monotonic()
    with under_load(url, body) as tallies:
        for _ in range(KILLS):
            time.sleep(max(0.0, 10 - sum(replaced_s[-1:])))
            victim = random.choice(actor_processes(f"ServeReplica:{APP}:"))
            os.kill(victim.pid, signal.SIGKILL)
            # Replaced at all, within 90 s: how fast is a figure (report below), not a test
            # (docs/reliability.md); at CI's start, beside every worker's set-up, one took 30.2 s
            replaced_s.append(wait_for(lambda victim=victim: not victim.is_running()
                                       and len(actor_processes(f"ServeReplica:{APP}:"))
                                       == REPLICAS and replicas_running() == REPLICAS,
                                       timeout_s=90))
            memory["proxy_mb"].append(rss_mb(proxy))
            memory["controller_mb"].append(rss_mb(controller))
    seconds = time.monotonic() - started
    answered = tallies[0].outcomes[200] + tallies[1].outcomes[200]
    flushing = app.settings.prediction_log
    logged = wait_for_rows(log_location(flushing, app.workspace), since, answered,
                           timeout_s=flushing.flush_seconds + 5)
    # per kill, what one replica answers in one flush interval (its writer looks each second
    # whether the oldest row waited flush_seconds): its buffer at most
    bound = len(replaced_s) * min(flushing.flush_rows,
                                  answered / seconds / REPLICAS * (flushing.flush_seconds + 1))
    report(f"SIGKILL a model replica every 10 s, {KILLS} times", tallies,
           replaced_s=[round(s, 1) for s in replaced_s],
           memory_mb={k: [round(v) for v in series] for k, series in memory.items()},
           log_rows_lost=answered - logged, log_rows_lost_bound=round(bound))
    assert tallies[1].success_rate >= 0.99, tallies[1].outcomes
    assert tallies[0].success_rate >= 0.95, tallies[0].outcomes
    for series in memory.values():
        assert series[-1] - series[0] < 100, memory
    assert 0 <= answered - logged <= bound * 1.5


def test_the_controller_killed_once(app):
    """SIGKILL the Serve controller: the proxy and replicas go on answering every request
    while Ray restarts it; it comes back as a new process, with the same replicas."""
    url, body = app.url, app.body
    [controller] = actor_processes("ServeController")
    replicas = {p.pid for p in actor_processes(f"ServeReplica:{APP}:")}
    with under_load(url, body) as tallies:
        time.sleep(2)
        os.kill(controller.pid, signal.SIGKILL)
        back_s = wait_for(lambda: _replaced(controller) and replicas_running() == REPLICAS)
        time.sleep(3)
    report("SIGKILL the Serve controller once", tallies, controller_back_s=round(back_s, 1))
    assert {p.pid for p in actor_processes(f"ServeReplica:{APP}:")} == replicas
    assert tallies[0].success_rate == 1.0, tallies[0].outcomes
    assert tallies[1].success_rate == 1.0, tallies[1].outcomes


def test_the_http_proxy_killed_and_restarted(app):
    """SIGKILL the HTTP proxy: requests fail until the controller notices and starts a new
    proxy on the same port; then every request is answered again."""
    url, body = app.url, app.body
    [proxy] = actor_processes("ProxyActor")
    with under_load(url, body) as tallies:
        time.sleep(2)
        os.kill(proxy.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not proxy.is_running())
        wait_for(lambda: _answers(url, body), timeout_s=90)
        answering_s = time.monotonic() - killed
    [new_proxy] = actor_processes("ProxyActor")
    with under_load(url, body) as (steady, _):
        time.sleep(3)
    report("SIGKILL the HTTP proxy once", tallies, answering_again_s=round(answering_s, 1),
           after_restart_success=round(steady.success_rate, 4))
    assert new_proxy.pid != proxy.pid and answering_s < 30
    assert steady.success_rate == 1.0, steady.outcomes


def _replaced(controller) -> bool:
    """Is one controller running, and not `controller`? One look at the processes: between
    two looks the old one may have gone and the new one not yet started."""
    found = actor_processes("ServeController")
    return len(found) == 1 and found[0].pid != controller.pid


def _answers(url: str, body: bytes) -> bool:
    try:
        return requests.post(url, data=body, headers=JSON, timeout=5).status_code == 200
    except requests.RequestException:
        return False
