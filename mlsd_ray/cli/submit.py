"""`mlsd submit`: run a stage as a Ray job on a cluster (jobs/STAGE.py), through the Jobs API.

The config is resolved and validated here (a bad key fails in a second, not on the cluster) and
travels with the job as MLSD_CONFIG_YAML; the project directory is the job's working dir.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import socket
import time
import urllib.parse
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from mlsd_ray.cli.jobs import CONFIG_ENV, RESULT_PREFIX, STAGES
from mlsd_ray.core import storage
from mlsd_ray.core.config import Config, dump_yaml
from mlsd_ray.core.errors import InputError, WorkError

CONNECT_TIMEOUT_S = 5.0
AGENT_WAIT_S = 60.0
TAIL_LINES = 30
# Forwarded to the job when set here: where outputs go and the registry.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLSD_SHARED_STORAGE")


def check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise InputError(f"unknown stage {stage!r}; the stages are: {', '.join(STAGES)}")


def dashboard_url(address: str | None) -> str:
    """http://HOST:PORT of the Ray dashboard (the Jobs API), checked to answer within seconds."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise InputError("no cluster address: give --address http://HEAD:8265 (the Ray "
                         "dashboard) or set RAY_ADDRESS")
    url = address if "://" in address else f"http://{address}"
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise InputError(f"--address {address!r} is not the dashboard's http://HOST:PORT "
                         "(jobs go through the dashboard, port 8265 by default, not ray://)")
    port = parsed.port or (443 if parsed.scheme == "https" else 8265)
    try:
        socket.create_connection((parsed.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray dashboard at {parsed.hostname}:{port}: "
                         f"{exc.strerror or exc}. Is the cluster up? (`ray start --head` "
                         "serves it on port 8265; for a remote head, `ray dashboard "
                         "CLUSTER.yaml` or `kubectl port-forward` it to this machine)") from None
    return f"{parsed.scheme}://{parsed.hostname}:{port}"


def project_dir() -> Path:
    """The directory to ship as the job's working dir: the one holding jobs/STAGE.py."""
    for candidate in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (candidate / "jobs" / "train.py").is_file() and (candidate / "mlsd_ray").is_dir():
            return candidate
    raise InputError("run `mlsd submit` from the mlsd-ray project directory (the one with "
                     "jobs/ and mlsd_ray/): it is uploaded as the job's working dir")


def runtime_env(cfg: Config, env_file: Path | None, home: str | None) -> dict:
    """The job's runtime env: the file's, plus our working dir, config and storage settings."""
    env: dict = {}
    if env_file is not None:
        try:
            env = yaml.safe_load(env_file.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read the runtime env {env_file}: {exc}") from None
        from ray.runtime_env import RuntimeEnv

        unknown = (set(env) - RuntimeEnv.known_fields if isinstance(env, dict)
                   else {"(not a mapping)"})
        if unknown:
            raise InputError(f"{env_file}: unknown runtime env keys {sorted(unknown)}")
    env_vars = {k: str(v) for k, v in (env.get("env_vars") or {}).items()}
    env_vars[CONFIG_ENV] = dump_yaml(cfg)
    location = home or os.environ.get("MLSD_HOME")
    if location:  # a local path is made absolute here; it must exist on the cluster's nodes
        env_vars["MLSD_HOME"] = storage.home(location)
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return {**env, "working_dir": env.get("working_dir") or str(project_dir()),
            "env_vars": env_vars}


def submit(stage: str, address: str | None, cfg: Config, args: list[str],
           env_file: Path | None = None, home: str | None = None, smoke: bool = False,
           wait: bool = False, log: Callable[[str], None] = print) -> dict:
    """Submit jobs/STAGE.py; with `wait`, stream its log and return its outcome."""
    from ray.job_submission import JobSubmissionClient

    check_stage(stage)
    url = dashboard_url(address)
    env = runtime_env(cfg, env_file, home)
    entrypoint = " ".join(["python", f"jobs/{stage}.py", *(["--smoke"] if smoke else []),
                           *map(shlex.quote, args)])
    _quiet_ray_client_logs()
    use_local_token()
    try:
        client = JobSubmissionClient(url)
    except Exception as exc:  # ConnectionError, auth errors: Ray's message says which
        raise InputError(f"the Jobs API at {url} refused us: {exc}") from None
    job_id = submit_when_ready(client, entrypoint, env, stage, log)
    log(f"submitted {job_id} to {url}: {entrypoint}")
    summary = {"job_id": job_id, "address": url, "entrypoint": entrypoint,
               "working_dir": env["working_dir"]}
    if not wait:
        log(f"follow it: ray job logs -f --address {url} {job_id}   "
            f"(status: ray job status --address {url} {job_id}; dashboard: {url})")
        return {**summary, "status": str(client.get_job_status(job_id).value)}
    lines = asyncio.run(_stream(client, job_id, log))
    info = client.get_job_info(job_id)
    summary.update(status=str(info.status.value), result=_result(lines),
                   seconds=_duration(info))
    if info.status.value != "SUCCEEDED":
        tail = "\n".join(list(lines)[-TAIL_LINES:])
        raise WorkError(f"job {job_id} {info.status.value}"
                        + (f": {info.message}" if info.message else "")
                        + f"\nlast lines of its log:\n{tail}")
    return summary


def submit_when_ready(client, entrypoint: str, env: dict, stage: str,
                       log: Callable[[str], None]) -> str:
    """submit_job, retried while the head's job agent is still starting: a head answers on its
    dashboard port a few seconds before it accepts jobs ("No available agent to submit job"),
    and on a busy machine its dashboard may close the connection without an answer. A retry
    reuses the submission id, so a job the head did take is not submitted twice."""
    from requests.exceptions import ConnectionError as DroppedConnection

    deadline = time.monotonic() + AGENT_WAIT_S
    submission_id = f"mlsd-{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    dropped = False
    while True:
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=env,
                                     submission_id=submission_id, metadata={"mlsd_stage": stage})
        except DroppedConnection as exc:
            if time.monotonic() > deadline:
                raise WorkError(f"the cluster did not take the job: {exc}") from None
            dropped = True
            log("the cluster's dashboard closed the connection; retrying")
        except RuntimeError as exc:
            if dropped and "already exists" in str(exc):
                return submission_id  # the dropped attempt got through
            if "No available agent" not in str(exc) or time.monotonic() > deadline:
                raise WorkError(f"the cluster did not take the job: {exc}") from None
            log("the cluster's job agent is still starting; retrying")
        time.sleep(2)


def use_local_token() -> None:
    """Send the token in ~/.ray/auth_token when there is one. Ray 2.60 turns token auth on for a
    head started where a token exists (any local ray.init() creates one), but a client only
    sends it with RAY_AUTH_MODE=token; an explicit RAY_AUTH_MODE is left as it is."""
    from ray._private.authentication.authentication_token_setup import (  # private, Ray 2.60
        maybe_enable_token_auth_if_token_available,
    )

    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _quiet_ray_client_logs() -> None:
    """Ray's client logs each packaging step and its default excludes at INFO/WARNING; we print
    what was submitted ourselves."""
    for name in ("ray._private.runtime_env", "ray._private.authentication",
                 "ray.dashboard.modules.dashboard_sdk"):
        logging.getLogger(name).setLevel(logging.ERROR)


async def _stream(client, job_id: str, log: Callable[[str], None]) -> deque:
    """Print the job's log as it comes; keep the last lines (for the result and for errors)."""
    kept: deque = deque(maxlen=500)
    async for chunk in client.tail_job_logs(job_id):
        for line in chunk.splitlines():
            kept.append(line)
            if not line.startswith(RESULT_PREFIX):
                log(line)
    return kept


def _result(lines) -> dict | None:
    """The stage's summary: the job's `MLSD_RESULT {json}` line."""
    for line in reversed(lines):
        if line.startswith(RESULT_PREFIX):
            try:
                return json.loads(line[len(RESULT_PREFIX):])
            except ValueError:
                return None
    return None


def _duration(info) -> float | None:
    if info.start_time and info.end_time:
        return round((info.end_time - info.start_time) / 1000, 1)
    return None
