"""Job entrypoints, `mlsd submit` and the shared-storage rule, without a cluster."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml

from mlsd_ray.cli.jobs import CONFIG_ENV, RESULT_PREFIX, job_config, main
from mlsd_ray.cli.submit import check_stage, dashboard_url, runtime_env
from mlsd_ray.core import cluster
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks import load_config, stored_config


def local_disk(path: str) -> str:
    return "ext4"


def nfs(path: str) -> str:
    return "nfs4"


TWO_MACHINES = ["10.0.0.1", "10.0.0.2"]


def test_one_machine_may_use_any_path():
    assert cluster.storage_problems("/home/me/h", "sqlite:////home/me/h/mlflow.db",
                                    ["127.0.0.1"], local_disk) == []


def test_two_machines_with_local_home_and_sqlite_registry_name_both(monkeypatch):
    monkeypatch.delenv(cluster.SHARED_ENV, raising=False)
    problems = cluster.storage_problems("/home/me/h", "sqlite:////home/me/h/mlflow.db",
                                        TWO_MACHINES, local_disk)
    assert len(problems) == 2
    assert "MLSD_HOME is /home/me/h" in problems[0] and "ext4" in problems[0]
    assert "sqlite:////home/me/h/mlflow.db" in problems[1]


@pytest.mark.parametrize("home,uri", [
    ("s3://bucket/h", "http://mlflow:5000"),
    ("gs://bucket/h", "postgresql://db/mlflow"),
    ("/mnt/shared/h", "sqlite:////mnt/shared/h/mlflow.db"),  # an NFS mount
])
def test_two_machines_with_shared_storage_pass(monkeypatch, home, uri):
    monkeypatch.delenv(cluster.SHARED_ENV, raising=False)
    assert cluster.storage_problems(home, uri, TWO_MACHINES, nfs) == []


def test_declared_shared_storage_passes(monkeypatch):
    monkeypatch.setenv(cluster.SHARED_ENV, "1")
    assert cluster.storage_problems("/data/h", "file:///data/mlruns", TWO_MACHINES,
                                    local_disk) == []


def test_mount_type_finds_the_root_filesystem():
    assert cluster.mount_type("/") is not None  # Linux: /proc/mounts lists /


def test_unknown_stage_lists_the_stages():
    with pytest.raises(InputError, match="pipeline, data, train, tune, retrain, deploy"):
        check_stage("trian")


@pytest.mark.parametrize("address,message", [
    ("ray://head:10001", "not the dashboard"),
    ("127.0.0.1:1", "cannot reach the Ray dashboard at 127.0.0.1:1"),
])
def test_bad_addresses_fail_within_seconds(address, message):
    started = time.monotonic()
    with pytest.raises(InputError, match=message):
        dashboard_url(address)
    assert time.monotonic() - started < 10


def test_runtime_env_carries_config_home_and_working_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_vars:\n  A: 1\n")
    cfg = load_config(None, ["train.epochs=3"])
    env = runtime_env(cfg, env_file, "relative-home")
    assert Path(env["working_dir"], "jobs", "train.py").is_file()  # this project
    assert env["env_vars"]["A"] == "1"
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert env["env_vars"]["MLSD_HOME"].startswith("/")  # made absolute
    assert stored_config(yaml.safe_load(env["env_vars"][CONFIG_ENV])).train.epochs == 3


def test_runtime_env_file_with_unknown_key_is_refused(tmp_path):
    env_file = tmp_path / "env.yaml"
    env_file.write_text("env_var: {}\n")
    with pytest.raises(InputError, match="env_var"):
        runtime_env(load_config(), env_file, None)


def test_job_config_layers_sent_config_then_smoke_then_set(monkeypatch):
    sent = load_config(None, ["train.lr=0.01", "train.epochs=7"])
    from mlsd_ray.core.config import dump_yaml

    monkeypatch.setenv(CONFIG_ENV, dump_yaml(sent))
    cfg = job_config("train", True, None, ["train.num_workers=1"])
    assert (cfg.train.lr, cfg.train.epochs, cfg.train.num_workers) == (0.01, 2, 1)
    assert cfg.data.image_size == 8


def run_job(stage: str, argv: list[str], capsys) -> tuple[int, dict, str]:
    """jobs/STAGE.py ARGV in this process: its exit code, MLSD_RESULT and stderr."""
    with pytest.raises(SystemExit) as exited:
        main(stage, argv)
    out, err = capsys.readouterr()
    results = [line for line in out.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(results[-1].removeprefix(RESULT_PREFIX)) if results else {}
    return exited.value.code, result, err


def test_a_job_refuses_unknown_keys_with_exit_2(capsys):
    code, result, _ = run_job("data", ["--set", "data.imagesize=8"], capsys)
    assert code == 2 and "imagesize" in result["error"]["message"]


def test_a_job_takes_the_clis_options_and_refuses_others(capsys):
    """The same option definitions as `mlsd train` (cli/support.py): --example, --task, ..."""
    code, _, err = run_job("train", ["--bogus"], capsys)
    assert code == 2 and "No such option" in err
    with pytest.raises(SystemExit) as shown:
        main("train", ["--help"])
    assert shown.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--config", "--set", "--home", "--smoke", "--source", "--run-name",
                 "--example", "--label", "--task"):
        assert flag in text, flag
    assert "<bool>" not in text  # flags render as flags, as in `mlsd --help`


def test_fraud_example_config_runs_as_tabular_jobs(capsys):
    cfg = job_config("train", False, Path("mlsd_ray/examples/fraud.yaml"), [], "breast-cancer")
    assert cfg.task == "tabular" and cfg.tabular.source == "breast-cancer"
    code, result, _ = run_job("retrain", ["--config", "mlsd_ray/examples/fraud.yaml"], capsys)
    assert code == 2 and "retrain needs --source SPEC" in result["error"]["message"]


class StartingHead:
    """A job client whose head drops the first connections, as a busy, just-started head's
    dashboard did; `took_first` says whether a dropped attempt reached the job manager."""

    def __init__(self, drops: int, took_first: bool):
        self.drops, self.took_first, self.ids = drops, took_first, []

    def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
        from requests.exceptions import ConnectionError as DroppedConnection

        self.ids.append(submission_id)
        if len(self.ids) <= self.drops:
            raise DroppedConnection("Remote end closed connection without response")
        if self.took_first:
            raise RuntimeError(f"Job with submission_id {submission_id} already exists.")
        return submission_id


@pytest.mark.parametrize("took_first", [False, True])
def test_a_dropped_connection_is_retried_under_the_same_submission_id(monkeypatch, took_first):
    from mlsd_ray.cli import submit

    monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)
    head, said = StartingHead(drops=2, took_first=took_first), []
    job_id = submit.submit_when_ready(head, "python jobs/train.py", {}, "train", said.append)
    assert job_id == head.ids[0] == head.ids[-1] and len(head.ids) == 3
    assert said == ["the cluster's dashboard closed the connection; retrying"] * 2
