"""Running the Serve app: start (foreground or detached), status, rolling deploy, stop.

A detached app needs a Ray instance that outlives the command, so `mlsd serve --detach` starts a
local head with `ray start --head --block` in its own process group (or uses `RAY_ADDRESS`), and
`mlsd serve stop` stops only that process group. What is running is recorded in
`$MLSD_HOME/serve/APP.json` (URL, model, settings, Ray address), which status/deploy/stop read.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlsd_ray import registry
from mlsd_ray.core.config import ServeConfig
from mlsd_ray.core.errors import InputError, WorkError
from mlsd_ray.core.ports import free_port, port_in_use
from mlsd_ray.core.runtime import log_stderr, quiet_serve_console, reachable
from mlsd_ray.core.workspace import Workspace

if TYPE_CHECKING:
    from mlsd_ray.registry import PinnedModel
    from mlsd_ray.tasks.base import Task

__all__ = ["app_for_a_check", "apps_serving", "AppStatus", "check_the_serve_check_fits", "deploy",
           "forget_recorded_cluster", "get_json", "HAPROXY_DRAIN_S", "HAPROXY_ENV",
           "head_processes", "HeadExited", "HEALTH_TIMEOUT_S", "kill_group", "metrics_endpoints",
           "prepare_ingress", "RayHead", "read_state", "REDIS_PASSWORD_ENV", "remove_app",
           "RollingUpdate", "RunningApp", "SERVE_KV_TIMEOUT_S", "serve_logging",
           "serve_until_interrupted", "start", "start_head", "state_file", "status", "stop",
           "stop_head", "StoppedApp", "url_of", "wait_healthy"]

HEALTH_TIMEOUT_S = 120.0
HAPROXY_ENV = "RAY_SERVE_ENABLE_HA_PROXY"  # read by Serve's processes when they start


@dataclass(frozen=True)
class RayHead:
    """The Ray instance an app runs on: its GCS address, plus the process group and dashboard
    of the `ray start --head` that `mlsd serve --detach` started (None when it joined one)."""

    ray_address: str
    cluster_pid: int | None = None
    dashboard: str | None = None

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items()
                if value is not None or key == "cluster_pid"}


@dataclass
class RunningApp:
    """An app that `start` deployed: where it answers, what it serves, on which Ray. It is
    recorded in $MLSD_HOME/serve/APP.json, which status, deploy and stop read back.

    `endpoints` are full URLs by the task's names for them (e.g. "predict_url"); `settings`
    is the ServeConfig it was started with, the model pinned to its version."""

    app_name: str
    task: str
    url: str
    route_prefix: str
    model_path: str
    model: registry.PinnedModel
    served_version: str
    settings: ServeConfig
    head: RayHead
    workspace: Workspace
    detached: bool = False
    seconds_to_healthy: float = 0.0
    endpoints: dict[str, str] = field(default_factory=dict)

    @property
    def docs(self) -> str:
        """The app's OpenAPI page."""
        return f"{self.url}{self.route_prefix.rstrip('/')}/docs"

    @property
    def state_file(self) -> Path:
        return state_file(self.workspace, self.app_name)

    def endpoint(self, name: str) -> str:
        """The full URL of one of the task's routes, e.g. endpoint("score_url")."""
        if name not in self.endpoints:
            raise WorkError(f"app {self.app_name!r} ({self.task} task) has no {name}; it has "
                            f"{', '.join(sorted(self.endpoints)) or 'no named routes'}")
        return self.endpoints[name]

    def save(self) -> Path:
        """Write the record that status, deploy and stop read."""
        path = self.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path

    def to_dict(self) -> dict:
        """The record and `--json` form: flat, the endpoints beside the other fields."""
        return {"url": self.url, "docs": self.docs, "app_name": self.app_name,
                "task": self.task, "model": self.model.as_dict(),
                "route_prefix": self.route_prefix, "model_path": self.model_path,
                **self.endpoints, "seconds_to_healthy": self.seconds_to_healthy,
                "detached": self.detached, **self.head.to_dict(),
                "serve": self.settings.model_dump(mode="json"), "home": self.workspace.root,
                "served_version": self.served_version, "state_file": str(self.state_file)}

    @classmethod
    def from_dict(cls, record: dict) -> RunningApp:
        """A record `to_dict` wrote (APP.json)."""
        return cls(app_name=record["app_name"], task=record.get("task", "image"),
                   url=record["url"], route_prefix=record.get("route_prefix", "/"),
                   model_path=record.get("model_path", "/v1/model"),
                   model=registry.PinnedModel(**record["model"]),
                   served_version=str(record.get("served_version")),
                   settings=ServeConfig.model_validate(record["serve"]),
                   head=RayHead(record["ray_address"], record.get("cluster_pid"),
                                record.get("dashboard")),
                   workspace=Workspace(record["home"]), detached=bool(record.get("detached")),
                   seconds_to_healthy=float(record.get("seconds_to_healthy", 0.0)),
                   endpoints={key: value for key, value in record.items()
                              if key.endswith("_url")})


@dataclass(frozen=True)
class AppStatus:
    """`mlsd serve status`: the app's state, each deployment's state and replicas by state,
    the version its model route reports, and every node's Prometheus endpoint."""

    app_name: str
    url: str
    status: str
    deployments: dict[str, dict[str, Any]]
    model_version: str | None
    model: str | None
    ray_address: str
    detached: bool
    metrics: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RollingUpdate:
    """`mlsd deploy`: the app moved from one pinned model to another, and how long it took."""

    app_name: str
    url: str
    before: registry.PinnedModel
    after: registry.PinnedModel
    served_version: str
    seconds: float

    def to_dict(self) -> dict:
        return {"app_name": self.app_name, "url": self.url, "from": self.before.as_dict(),
                "to": self.after.as_dict(), "served_version": self.served_version,
                "seconds": self.seconds}


@dataclass(frozen=True)
class StoppedApp:
    """`mlsd serve stop`: which app, and whether the Ray head it started was stopped too."""

    app_name: str
    stopped_ray_head: bool

    def to_dict(self) -> dict:
        return {"app_name": self.app_name, "stopped": True,
                "stopped_ray_head": self.stopped_ray_head}


def state_file(workspace: Workspace, app_name: str) -> Path:
    return workspace.serve_state / f"{app_name}.json"


def apps_serving(workspace: Workspace, model_name: str) -> list[str]:
    """The recorded apps (state files under $MLSD_HOME/serve) that serve a version of the
    registered model `model_name`, by app name."""
    apps = []
    for path in sorted(workspace.serve_state.glob("*.json")):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and state.get("model", {}).get("name") == model_name:
            apps.append(state.get("app_name", path.stem))
    return apps


def read_state(workspace: Workspace, app_name: str) -> RunningApp:
    """The recorded app `app_name` (InputError when none is recorded)."""
    path = state_file(workspace, app_name)
    if not path.is_file():
        raise InputError(f"no running app {app_name!r} recorded in {path}; start one with "
                         "`mlsd serve --detach`")
    try:
        return RunningApp.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"the record {path} of app {app_name!r} is unreadable ({exc}); "
                         "remove it and start the app again") from exc


def url_of(settings: ServeConfig) -> str:
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::") else settings.host
    return f"http://{host}:{settings.port}"


def serve_logging(settings: ServeConfig) -> dict:
    """Serve's LoggingConfig for the proxy and the app: files only (quiet_serve_console keeps
    the console clean), with or without the per-request access line."""
    return {"enable_access_log": settings.access_log}


def start(settings: ServeConfig, workspace: Workspace, detach: bool = False,
          log: Callable[[str], None] = log_stderr) -> RunningApp:
    """Deploy the app of the task that trained the model (its checkpoint says which) and wait
    until it answers its health check; returns where and what is served."""
    import ray

    from mlsd_ray.tasks import task_of_checkpoint

    quiet_serve_console()
    model = registry.pin(settings.model_ref(), workspace)
    task = task_of_checkpoint(model.path)
    settings = settings.model_copy(update={"model": model.uri})
    joining_cluster = not ray.is_initialized() and bool(os.environ.get("RAY_ADDRESS"))
    cluster = _connect_for(workspace, settings, detach, log)
    try:
        return _deploy(settings, model, task, workspace, cluster, detach, joining_cluster, log)
    except BaseException:
        # No record names a head we started yet, so `mlsd serve stop` could not find it: after
        # a failed `mlsd serve --detach` it kept running, with Serve's port
        _stop_unrecorded(cluster)
        raise


def _deploy(settings: ServeConfig, model: PinnedModel, task: Task, workspace: Workspace,
            cluster: RayHead, detach: bool, joining_cluster: bool,
            log: Callable[[str], None]) -> RunningApp:
    """Serve the app of `task` on the Ray `start` joined; wait for its health check."""
    from ray import serve

    served = task.serve_application(settings, model, workspace)
    _check_serve_can_host(settings, served.route_prefix, joining_cluster)
    _fresh_proxy_for_a_new_router(settings, workspace, log)
    serve.start(proxy_location=settings.proxy_location,
                http_options={"host": settings.host, "port": settings.port},
                logging_config=serve_logging(settings))
    log(f"deploying {model.uri} ({task.name} task) as app {settings.app_name!r} "
        f"({settings.topology} topology, {settings.router} routing, "
        f"{settings.autoscaling.min_replicas}-"
        f"{settings.autoscaling.max_replicas} replicas)")
    started = time.perf_counter()
    serve.run(served.application, name=settings.app_name, route_prefix=served.route_prefix,
              logging_config=serve_logging(settings))
    url = url_of(settings)
    health = wait_healthy(url, path=served.health_path)
    app = RunningApp(app_name=settings.app_name, task=task.name, url=url,
                     route_prefix=served.route_prefix, model_path=served.model_path,
                     model=model, served_version=str(health["model_version"]),
                     settings=settings, head=cluster, workspace=workspace,
                     detached=detach,
                     seconds_to_healthy=round(time.perf_counter() - started, 2),
                     endpoints={name: f"{url}{path}" for name, path in served.endpoints.items()})
    app.save()
    return app


def serve_until_interrupted(app: RunningApp, log: Callable[[str], None] = log_stderr) -> None:
    """Foreground mode: keep this driver (and so a local Ray) alive until Ctrl-C, then stop."""
    import ray

    log(f"serving at {app.url} (docs {app.docs}); Ctrl-C stops")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        log("stopping")
    finally:
        remove_app(app.app_name)
        ray.shutdown()
        app.state_file.unlink(missing_ok=True)


def _running_serve() -> dict | None:
    """What Serve runs on the Ray this process is connected to (Serve's own details: its
    `http_options` and `applications`), or None when it does not run there."""
    # Ray 2.60 has no public call for the running instance's HTTP options; this is the
    # client serve.status() uses, which starts nothing when no controller runs.
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client.get_serve_details()


def _serve_holds_port(port: int, instead: str) -> InputError:
    """Another port asked of a running Serve, which Ray would ignore with only a warning."""
    return InputError(f"Serve already runs on this Ray and listens on port {port}, which all "
                      f"its apps share; {instead}, or stop its apps first (`mlsd serve stop`)")


def _check_serve_can_host(settings: ServeConfig, route_prefix: str,
                          joined_cluster: bool) -> None:
    """Serve runs once per Ray: its apps share one HTTP proxy, on the port Serve started
    with, and a route prefix belongs to one app. Ray ignores another port with only a
    warning (the app would answer where nobody looks) and refuses a taken prefix with its
    controller's traceback: refuse both before deploying, naming what runs. On a cluster
    just joined where Serve does not run yet, the port must be free (a running Serve holds
    its own port; a Ray of this process keeps its Serve's port across apps)."""
    details = _running_serve()
    if details is None:
        if joined_cluster:
            _check_port_free(settings)
        return
    port = details["http_options"]["port"]
    if port != settings.port:
        raise _serve_holds_port(port, f"serve on it (--port {port})")
    for name, app in details["applications"].items():
        if name != settings.app_name and app.get("route_prefix") == route_prefix:
            raise InputError(f"app {name!r} already serves {route_prefix} on this Ray; stop "
                             f"it first (`mlsd serve stop --app {name}`, with the --home it "
                             f"was started from), or move it to this model (`mlsd deploy "
                             f"--app {name}`)")


def _fresh_proxy_for_a_new_router(settings: ServeConfig, workspace: Workspace,
                                  log: Callable[[str], None]) -> None:
    """In the single topology Serve's HTTP proxy routes to the model replicas, and it builds a
    deployment's router once and keeps it while it lives (Ray 2.60 caches its handle by
    deployment name, across redeploys). So an app redeployed with another router gets a
    restarted Serve when no other app runs on it, and a clear refusal when one does."""
    from ray import serve

    path = state_file(workspace, settings.app_name)
    if settings.topology != "single" or not path.is_file():
        return
    before = json.loads(path.read_text()).get("serve", {})  # raw: any record, even a stale one
    if before.get("topology") != "single" or before.get("router") == settings.router:
        return
    current = serve.status()
    if not current.proxies:
        return  # Serve is not running: its next proxy starts fresh
    others = sorted(set(current.applications) - {settings.app_name})
    if others:
        raise InputError(f"app {settings.app_name!r} changes its router from "
                         f"{before.get('router')} to {settings.router}, but Serve's HTTP proxy "
                         "keeps the router it built while other apps run on it "
                         f"({', '.join(others)}); deploy under another --app-name, or set "
                         "serve.topology=split")
    log(f"router {before.get('router')} -> {settings.router}: restarting Serve, whose HTTP "
        "proxy keeps the router it built")
    serve.shutdown()


def check_the_serve_check_fits(settings: ServeConfig, workspace: Workspace,
                               keep_serving: bool) -> None:
    """Before the pipeline trains, on the Ray it joins (its serve check serves there): the
    check deploys app `settings.app_name` and, unless `keep_serving`, removes it afterwards.
    Where that app already serves (a user's `mlsd serve --detach`, whose Ray the next pipeline
    joins), the check would roll it over to the new model and then stop it, minutes later;
    and `keep_serving` cannot keep serving on serve.port while Serve listens on another. Both
    are refused now, with what to do (exit 2)."""
    from mlsd_ray.core import runtime

    runtime.ensure_ray(workspace)  # joined already when the data stage used Ray
    running = _running_serve()
    if running is None:
        return
    port, name = running["http_options"]["port"], settings.app_name
    if name in running["applications"] and not keep_serving:
        raise InputError(f"app {name!r} already serves on this Ray (port {port}); the "
                         "pipeline's serve check would move it to the new model and then "
                         "stop it. Stop it first (`mlsd serve stop`), keep the new model "
                         "serving in its place (--keep-serving), or skip the check "
                         "(--no-serve)")
    if keep_serving and port != settings.port:
        raise _serve_holds_port(port, f"keep serving there (--set serve.port={port})")


@contextlib.contextmanager
def app_for_a_check(settings: ServeConfig, workspace: Workspace, keep_serving: bool,
                    log: Callable[[str], None]) -> Iterator[RunningApp]:
    """The app of `settings`, started for the pipeline's serve check: on a free port when
    serve.port is taken (a check only: any port will do) unless it is to keep serving.
    Afterwards, whether the check passed or not: serve until Ctrl-C (`keep_serving`), else
    remove the app and its record. Where Serve already runs on this Ray, the check serves on
    its port, which all its apps share (check_the_serve_check_fits has refused a clash)."""
    running = _running_serve()
    if running is not None:
        settings = settings.model_copy(update={"port": running["http_options"]["port"]})
    elif not keep_serving and port_in_use(settings.host, settings.port):
        settings = settings.model_copy(update={"port": free_port(settings.host)})
    app = start(settings, workspace, log=log)
    try:
        yield app
    finally:
        if keep_serving:
            serve_until_interrupted(app, log)
        else:
            remove_app(settings.app_name)
            state_file(workspace, settings.app_name).unlink(missing_ok=True)


def remove_app(app_name: str) -> None:
    """Delete our app; shut Serve down only when no other app is left (a shared cluster)."""
    from ray import serve

    quiet_serve_console()

    serve.delete(app_name)
    if not serve.status().applications:
        serve.shutdown()


def _connect_for(workspace: Workspace, settings: ServeConfig, detach: bool,
                 log: Callable[[str], None]) -> RayHead:
    """Join Ray: RAY_ADDRESS, else (detached) a head we start, else a local in-process one."""
    import ray

    from mlsd_ray.core import runtime

    if ray.is_initialized() or os.environ.get("RAY_ADDRESS") or not detach:
        _check_ingress(settings, ray.is_initialized(), log)
        if not ray.is_initialized():  # a cluster's port is checked once joined (start())
            prepare_ingress(settings)
            if not os.environ.get("RAY_ADDRESS"):  # the local Ray we start has no Serve yet
                _check_port_free(settings)
        runtime.ensure_ray(workspace)
        return RayHead(ray.get_runtime_context().gcs_address)
    _check_port_free(settings)
    environment, extra_args = _fault_tolerance(settings)
    head = start_head(workspace, log, extra_args,
                      {**_ingress_environment(settings), **environment},
                      block=settings.gcs_redis is None)
    try:
        _join(head.ray_address, workspace)
    except BaseException:
        _stop_unrecorded(head)  # nobody can reach it
        raise
    return head


def _stop_unrecorded(head: RayHead) -> None:
    """Stop a head this command started, before any record of it was written; this driver
    leaves it first (ray.shutdown does nothing where it had not joined)."""
    if head.cluster_pid is not None:
        import ray

        ray.shutdown()
        stop_head(head.cluster_pid, head.ray_address, timeout=10)


# How long a replica behind HAProxy keeps answering after it is told to stop, so that every
# load balancer drops it first. Serve's default, 30 s, is for external ones (an ALB); the
# HAProxy on the replica's own machine hears within ~0.1 s and retries refused connections.
# With 30 s a rolling update under load took 31 s instead of 3 s (docs/benchmarks.md).
HAPROXY_DRAIN_S = "3"


# serve.router as HAProxy's `balance` algorithm, which Serve's HAProxy reads from
# HAPROXY_BALANCE_ENV when it starts: power of two random choices, round robin, least
# connections, and a hash of the session header (HAProxy balances requests without it round
# robin; Serve's proxy would hash the client's address).
HAPROXY_BALANCE_ENV = "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM"
HAPROXY_BALANCE = {"pow2": "random(2)", "round_robin": "roundrobin",
                   "least_connections": "leastconn", "consistent_hash": "hdr(x-session-id)"}


def _ingress_environment(settings: ServeConfig) -> dict[str, str]:
    """What Serve's processes must see when Ray starts for `settings.ingress` (and, behind
    HAProxy, `settings.router`)."""
    if settings.ingress != "haproxy":
        return {}
    return {HAPROXY_ENV: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": HAPROXY_DRAIN_S,
            HAPROXY_BALANCE_ENV: HAPROXY_BALANCE[settings.router]}


# How long Serve's controller waits on the GCS's key-value store before a control call (a
# deploy) fails. Serve's default is to wait as long as Ray does, so a deploy sent while the
# GCS was down hung; with this it fails and says so.
SERVE_KV_TIMEOUT_S = "10"
REDIS_PASSWORD_ENV = "MLSD_REDIS_PASSWORD"


def _fault_tolerance(settings: ServeConfig) -> tuple[dict[str, str], tuple[str, ...]]:
    """The environment and `ray start` flags of a head whose GCS keeps its state in the Redis
    of `settings.gcs_redis` (Ray's GCS fault tolerance); none without one."""
    if settings.gcs_redis is None:
        return {}, ()
    environment = {"RAY_REDIS_ADDRESS": settings.gcs_redis,
                   # fixed, so that a head started again (not only its GCS) finds its state
                   "RAY_external_storage_namespace": f"mlsd-{settings.app_name}",
                   "RAY_SERVE_KV_TIMEOUT_S": SERVE_KV_TIMEOUT_S}
    password = os.environ.get(REDIS_PASSWORD_ENV)
    return environment, (f"--redis-password={password}",) if password else ()


def prepare_ingress(settings: ServeConfig) -> None:
    """Make the Ray that this process starts next serve through `settings.ingress` (a command
    that starts Ray before it serves, such as the pipeline, calls this first)."""
    os.environ.update(_ingress_environment(settings))


def _check_ingress(settings: ServeConfig, running_here: bool,
                   log: Callable[[str], None]) -> None:
    """HAProxy is chosen when Serve's processes start: a Ray this process already runs without
    it cannot switch (InputError); of a cluster's we only know what it was told. So with the
    balancing of `settings.router`."""
    if settings.ingress != "haproxy":
        return
    balance, started_with = HAPROXY_BALANCE[settings.router], os.environ.get(HAPROXY_BALANCE_ENV)
    if os.environ.get(HAPROXY_ENV) == "1":
        if running_here and started_with not in (None, balance):
            raise InputError(f"serve.router={settings.router} needs HAProxy to balance by "
                             f"{balance}; the Ray this process runs started it with "
                             f"{started_with}")
        return
    if running_here:
        raise InputError(f"serve.ingress=haproxy needs a Ray started with {HAPROXY_ENV}=1; "
                         "this process already runs one without it")
    if os.environ.get("RAY_ADDRESS"):
        log(f"serve.ingress=haproxy: the cluster at RAY_ADDRESS uses HAProxy only if it was "
            f"started with {HAPROXY_ENV}=1, and balances as serve.router={settings.router} "
            f"only with {HAPROXY_BALANCE_ENV}={balance}")


def _check_port_free(settings: ServeConfig) -> None:
    reason = port_in_use(settings.host, settings.port)
    if reason:
        raise InputError(f"cannot serve on {settings.host}:{settings.port}: {reason}; pick "
                         "another with --port (or stop what uses it, e.g. `mlsd serve stop`)")


class HeadExited(WorkError):
    """`ray start --head` ended before its head came up."""


def start_head(workspace: Workspace, log: Callable[[str], None],
               extra_args: tuple[str, ...] = (),
               environment: dict[str, str] | None = None, block: bool = True) -> RayHead:
    """`ray start --head --block` in a new process group, with `environment` added to its
    processes'; returns its address and the group's pid.

    Without `block`, `ray start` returns once the head runs and leaves its processes in the
    group: then one of them (the GCS, for GCS fault tolerance) can die and be started again
    alone, where `--block` would stop all of them.

    This interpreter's bin directory goes first on the head's PATH, so that a Ray job's
    `python jobs/...` entrypoint runs in this environment (with torch, Ray and MLflow).

    A head that exits while starting is started once more: on a machine short of CPU, Ray's
    client server gives up waiting 30 s for its own node to register, and `ray start` then
    stops every head process (seen once in a CI run, with three other Ray clusters busy)."""
    from mlsd_ray.core import runtime

    runtime.tune_ray_daemons()  # into os.environ, which the head's processes inherit
    log_path = workspace.serve_state / "ray-head.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log(f"starting a local Ray head (log: {log_path})")
    try:
        return _start_head_once(log_path, extra_args, environment, block)
    except HeadExited:
        log("the Ray head exited while starting; starting it once more")
        return _start_head_once(log_path, extra_args, environment, block)


def _start_head_once(log_path: Path, extra_args: tuple[str, ...],
                     environment: dict[str, str] | None, block: bool) -> RayHead:
    """Start the head on fresh ports and wait up to 90 s until `ray start` says the node
    started and its dashboard listens. The dashboard alone is not enough: it listens before
    the raylet has registered, and `ray start` stops the whole head when that takes over 30 s
    (seen in a CI run on 2 busy cores)."""
    ray_bin = Path(sys.executable).with_name("ray")
    port, dashboard = free_port(), free_port()
    # Ports that default to fixed numbers get free ones: another Ray on this machine (a test
    # session, a user's `ray start`) holds 52365 and 10001, and a head whose dashboard agent
    # cannot bind takes no jobs ("No available agent to submit job").
    # unbuffered: the log shows "Ray runtime started." when it is said, not when `--block` ends
    command = [sys.executable, "-u", str(ray_bin), "start", "--head",
               *(["--block"] if block else []),
               f"--port={port}",
               "--node-ip-address=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={free_port()}",
               f"--ray-client-server-port={free_port()}",
               "--include-dashboard=true", "--disable-usage-stats", *extra_args]
    env = {**os.environ, **(environment or {}),
           "PATH": os.pathsep.join([str(ray_bin.parent), os.environ.get("PATH", "")]),
           # the head's processes ask Ray's state API about this head, not about whichever
           # cluster `ray start` recorded last (core/runtime.py: start_local_ray)
           "RAY_ADDRESS": f"127.0.0.1:{port}"}
    # Ray 2.60's `ray start --block` answers SIGTERM by draining its node for up to 30 s,
    # for a Kubernetes pod whose replicas can move to other nodes. A head of its own has
    # nowhere to move them, so `mlsd serve stop` waited out stop_head's 10 s for nothing
    # (12.1 s a stop, 4.0 s without the drain). A value the user set wins.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    with open(log_path, "ab") as out:
        said_before = out.tell()  # the log keeps every attempt: read this one's lines only
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() not in (None, 0) or (block and process.returncode is not None):
            kill_group(process.pid)  # whatever of the head is still running
            raise HeadExited(f"`ray start --head` exited with {process.returncode}; see "
                             f"{log_path}")
        if _said_started(log_path, said_before) and reachable(f"127.0.0.1:{dashboard}"):
            return RayHead(f"127.0.0.1:{port}", process.pid, f"http://127.0.0.1:{dashboard}")
        time.sleep(0.5)
    kill_group(process.pid)
    raise WorkError(f"the Ray head did not come up within 90 s; see {log_path}")


def _said_started(log_path: Path, offset: int) -> bool:
    """Whether `ray start` has logged, past `offset`, that its node started."""
    with open(log_path, "rb") as log:
        log.seek(offset)
        return b"Ray runtime started." in log.read()


def _join(address: str, workspace: Workspace) -> None:
    """Connect to a head on this machine by its recorded address.

    Ray turns token authentication on for a local head when a token exists (~/.ray/auth_token),
    but a driver given an explicit address only uses it with RAY_AUTH_MODE=token: set it the
    same way `ray start` decided, or the head refuses us (InvalidAuthToken).
    """
    import logging

    import ray

    # Ray's own rule for a local head (private API, pinned Ray 2.60): it also refreshes the
    # already-loaded C++ config, which setting the environment variable alone does not.
    from ray._private.authentication.authentication_token_setup import (
        maybe_enable_token_auth_if_token_available,
    )

    from mlsd_ray.core import runtime

    runtime.quiet_token_notice()
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
    runtime.ensure_ray(workspace)


def wait_healthy(url: str, timeout: float = HEALTH_TIMEOUT_S, path: str = "/v1/health") -> dict:
    """Poll GET url+path until 200; WorkError with the last answer after `timeout`."""
    deadline, last = time.monotonic() + timeout, "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=5) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, ValueError) as exc:
            last = str(exc)
        time.sleep(0.5)
    raise WorkError(f"{url} was not healthy within {timeout:.0f} s (last: {last})")


def get_json(url: str, timeout: float = 10) -> dict:
    """GET a JSON document from the running app (the token from MLSD_API_TOKEN if set)."""
    from mlsd_ray.serve.app import TOKEN_ENV

    request = urllib.request.Request(url)
    if os.environ.get(TOKEN_ENV):
        request.add_header("Authorization", f"Bearer {os.environ[TOKEN_ENV]}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def status(workspace: Workspace, app_name: str = "mlsd") -> AppStatus:
    """What runs: app and deployment states, replica counts, the served version."""
    from ray import serve

    quiet_serve_console()

    state = read_state(workspace, app_name)
    _join_recorded(state)
    apps = serve.status().applications
    if app_name not in apps:
        raise InputError(f"app {app_name!r} is not running in the Ray cluster at "
                         f"{state.head.ray_address}")
    app = apps[app_name]
    deployments = {name: {"status": str(d.status.value if hasattr(d.status, "value")
                                        else d.status),
                          "replicas": {str(k.value if hasattr(k, "value") else k): v
                                       for k, v in d.replica_states.items()}}
                   for name, d in app.deployments.items()}
    try:
        served = get_json(f"{state.url}{state.model_path}")
    except (OSError, ValueError) as exc:
        served = {"error": str(exc)}
    version = served.get("model_version")
    return AppStatus(app_name=app_name, url=state.url,
                     status=str(app.status.value if hasattr(app.status, "value") else app.status),
                     deployments=deployments,
                     model_version=None if version is None else str(version),
                     model=served.get("uri"), ray_address=state.head.ray_address,
                     detached=state.detached, metrics=metrics_endpoints())


def metrics_endpoints() -> list[str]:
    """Each live node's Prometheus endpoint (Ray's metrics agent), where ray_mlsd_* appear."""
    import ray

    return [f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]


def _join_recorded(state: RunningApp) -> None:
    """Join the Ray the app was started on; a clear error, at once, if its GCS is down."""
    if state.head.cluster_pid and not reachable(state.head.ray_address) and \
            head_processes(state.head.ray_address):
        raise WorkError(f"the Ray head at {state.head.ray_address} runs, but its GCS does not "
                        f"answer (down or restarting); {state.app_name!r} goes on answering "
                        f"on {state.url}: try again once the GCS is back")
    try:
        _join(state.head.ray_address, state.workspace)
    except ConnectionError as exc:
        raise InputError(f"the Ray instance at {state.head.ray_address} that served "
                         f"{state.app_name!r} is gone (stale record {state.state_file}); start "
                         "again with `mlsd serve --detach`") from exc


def deploy(model_ref: str, workspace: Workspace, app_name: str = "mlsd",
           log: Callable[[str], None] = log_stderr) -> RollingUpdate:
    """Move the running app to another model version of the same task (a rolling update)."""
    from ray import serve

    from mlsd_ray.tasks import task_of_checkpoint

    quiet_serve_console()
    state = read_state(workspace, app_name)
    model = registry.pin(model_ref, workspace)
    task = task_of_checkpoint(model.path)
    if task.name != state.task:
        raise InputError(f"{model_ref} is a {task.name} model; app {app_name!r} serves the "
                         f"{state.task} task: start another app for it")
    settings = state.settings.model_copy(update={"model": model.uri})
    _join_recorded(state)
    before = state.model
    log(f"rolling update of {app_name!r}: {before.uri} -> {model.uri}")
    started = time.perf_counter()
    served_app = task.serve_application(settings, model, state.workspace)
    serve.run(served_app.application, name=app_name, route_prefix=served_app.route_prefix,
              logging_config=serve_logging(settings))
    served = get_json(f"{state.url}{served_app.model_path}")
    state.model, state.settings = model, settings
    state.served_version = str(served["model_version"])
    state.save()
    return RollingUpdate(app_name=app_name, url=state.url, before=before, after=model,
                         served_version=state.served_version,
                         seconds=round(time.perf_counter() - started, 2))


def stop(workspace: Workspace, app_name: str = "mlsd") -> StoppedApp:
    """Delete the app; stop the Ray head instead if `mlsd serve --detach` started it (the
    app goes with it: shutting Serve down first waited up to 30 s for its controller)."""
    import ray

    state = read_state(workspace, app_name)
    if state.head.cluster_pid:
        stopped = stop_head(state.head.cluster_pid, state.head.ray_address)
        state_file(workspace, app_name).unlink(missing_ok=True)
        return StoppedApp(app_name, stopped)
    try:
        _join_recorded(state)
        remove_app(app_name)
    except InputError:
        pass  # its Ray is gone already: only the record is left to clean
    finally:
        if ray.is_initialized():
            ray.shutdown()
    state_file(workspace, app_name).unlink(missing_ok=True)
    return StoppedApp(app_name, False)


def forget_recorded_cluster(address: str) -> None:
    """Killing a `ray start` head leaves its address in Ray's record of the local cluster
    (`ray stop` would remove it); a later ray.init() would wait for the dead head forever."""
    from mlsd_ray.core.runtime import recorded_cluster_file

    path = Path(recorded_cluster_file())
    try:  # Ray records the head's own IP (not 127.0.0.1): compare the GCS ports
        if path.read_text().strip().rpartition(":")[2] == address.rpartition(":")[2]:
            path.unlink()
    except OSError:
        pass


def kill_group(pid: int, timeout: float = 30) -> bool:
    """SIGTERM the `ray start --block` group (it stops the processes it started), then SIGKILL
    whatever is left after `timeout` (measured: a gcs_server can outlive the SIGTERM)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _reap(pid)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    # It may end on its own between the last look and this kill (a loaded head in a CI run:
    # `mlsd serve stop` then failed with ProcessLookupError): either way it is stopped
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)
    return True


def _reap(pid: int) -> None:
    """Collect `pid`'s exit status when this process started it: until then an exited
    `ray start` stays a zombie, which keeps its group alive for killpg (a head started and
    stopped in one process waited out the whole timeout)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its own parent (or init) reaps it


def stop_head(pid: int, gcs_address: str, timeout: float = 10) -> bool:
    """Stop a head that `start_head` started: its process group, what of it outlived the group
    (Ray's processes and what they started, such as Serve's HAProxy, which would keep the app's
    port), and Ray's record of it. True if the group was still running."""
    import psutil

    processes = head_processes(gcs_address)  # before the group goes: then they are orphans
    stopped = kill_group(pid, timeout)
    # A worker the raylet was starting while the group went down is in no snapshot taken
    # before (a CI run found one holding the head's log after a failed start with two
    # replicas): look again until none is left.
    for _ in range(3):
        for process in processes:
            with contextlib.suppress(Exception):  # psutil.Error: already gone
                process.kill()
        # Gone, not only signalled: the app's port is free once HAProxy has exited.
        psutil.wait_procs(processes, timeout=timeout)
        processes = head_processes(gcs_address)
        if not processes:
            break
    forget_recorded_cluster(gcs_address)
    return stopped


def head_processes(gcs_address: str) -> list:
    """The processes of a head (psutil.Process): those that name its GCS port, and everything
    they started."""
    import psutil

    port = gcs_address.rpartition(":")[2]

    def of_this_head(arg: str) -> bool:
        return arg == f"--gcs_server_port={port}" or (
            arg.startswith("--gcs-address=") and arg.endswith(f":{port}"))

    found: dict[int, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        if any(of_this_head(arg) for arg in process.info["cmdline"] or []):
            found[process.pid] = process
            with contextlib.suppress(psutil.Error):
                found.update({child.pid: child for child in process.children(recursive=True)})
    return list(found.values())
