"""Every config we ship for clusters validates: launcher YAMLs against Ray's own ray-schema.json,
Serve configs against ServeDeploySchema and our ServeConfig, KubeRay manifests for the fields the
operator requires, runtime envs against Ray's known fields; the Ray version is pinned everywhere.
`pytest -v` lists each file with its result."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from ray.runtime_env import RuntimeEnv
from ray.serve.schema import ServeDeploySchema

from mlsd_ray.cli.jobs import STAGES
from mlsd_ray.core.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster"
LAUNCHER_FILES = ["aws.yaml", "gcp.yaml"]
KUBERAY_FILES = ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"]
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def serve_args_without_home(document: dict) -> dict:
    [app] = ServeDeploySchema.model_validate(document).applications
    assert app.import_path == "mlsd_ray.serve.app:build_app"
    args = dict(app.args)
    args.pop("home")
    ServeConfig.model_validate(args)  # our own builder accepts every key
    return args


def test_serve_config_is_valid_for_serve_and_for_our_app_builder():
    args = serve_args_without_home(load(CLUSTER / "serve.yaml"))
    assert args["model"] == "models:/digits-cnn@production"


@pytest.mark.parametrize("name", LAUNCHER_FILES)
def test_launcher_config_validates_against_rays_schema(name):
    config = load(CLUSTER / name)
    jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    assert set(workers) == {"cpu_worker", "gpu_worker"}
    for node_type in workers.values():  # autoscaling bounds
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert workers["gpu_worker"]["docker"]["worker_image"].endswith("-gpu")
    assert any("pip install" in c and "mlsd-ray" in c for c in config["setup_commands"])
    assert "." in config["file_mounts"].values()  # the project travels to every node


def test_rays_schema_rejects_a_misspelled_key():
    """The check above can fail: a typo in a launcher file is caught."""
    config = load(CLUSTER / "aws.yaml")
    config["available_node_types"]["cpu_worker"]["max_worker"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        jsonschema.validate(config, json.loads(RAY_SCHEMA.read_text()))


def check_cluster_spec(spec: dict, where: str) -> list[str]:
    """The RayCluster spec fields KubeRay requires (ray.io/v1), with the pinned Ray version."""
    problems = []
    if spec.get("rayVersion") != ray.__version__:
        problems.append(f"{where}.rayVersion is {spec.get('rayVersion')!r}")
    head = spec.get("headGroupSpec") or {}
    groups = [("headGroupSpec", head)] + [(f"workerGroupSpecs[{g.get('groupName')}]", g)
                                          for g in spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        if not isinstance(group.get("rayStartParams"), dict):
            problems.append(f"{where}.{name}.rayStartParams missing")
        containers = (((group.get("template") or {}).get("spec") or {}).get("containers")) or []
        if not containers or not all(c.get("name") and c.get("image") for c in containers):
            problems.append(f"{where}.{name}.template.spec.containers need name and image")
    for group in spec.get("workerGroupSpecs") or []:
        if not group.get("groupName"):
            problems.append(f"{where}: a worker group has no groupName")
        if not group.get("minReplicas", 0) <= group.get("replicas", 0) <= group.get(
                "maxReplicas", 0):
            problems.append(f"{where}: {group.get('groupName')} replicas outside min..max")
    return problems


@pytest.mark.parametrize("name", KUBERAY_FILES)
def test_kuberay_manifest_has_what_kuberay_requires(name):
    manifest = load(CLUSTER / "kuberay" / name)
    assert manifest["apiVersion"] == "ray.io/v1"
    assert manifest["metadata"]["name"]
    spec = manifest["spec"]
    kind = manifest["kind"]
    cluster_key = {"RayCluster": None, "RayJob": "rayClusterSpec",
                   "RayService": "rayClusterConfig"}[kind]
    cluster = spec if cluster_key is None else spec[cluster_key]
    assert check_cluster_spec(cluster, f"{name}:spec") == []
    if kind in ("RayCluster", "RayService"):  # long-lived: the head may restart (GCS FT)
        fault_tolerance = cluster["gcsFaultToleranceOptions"]
        assert re.fullmatch(r"[\w.-]+:\d+", fault_tolerance["redisAddress"])
        assert fault_tolerance["externalStorageNamespace"]
        head_env = {e["name"]: e["value"] for e in
                    cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["env"]}
        assert float(head_env["RAY_SERVE_KV_TIMEOUT_S"]) > 0
    if kind == "RayCluster":
        assert spec["enableInTreeAutoscaling"] is True
        groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
        assert set(groups) == {"cpu", "gpu"}
        gpu = groups["gpu"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert gpu["nvidia.com/gpu"] == "1"
    if kind == "RayJob":
        assert re.search(r"jobs/train\.py", spec["entrypoint"])
        yaml.safe_load(spec["runtimeEnvYAML"])
    if kind == "RayService":  # its Serve config is ours (home on shared storage)
        ours = serve_args_without_home(load(CLUSTER / "serve.yaml"))
        assert serve_args_without_home(yaml.safe_load(spec["serveConfigV2"])) == ours


def test_kuberay_check_catches_a_missing_image():
    spec = load(CLUSTER / "kuberay" / "raycluster.yaml")["spec"]
    del spec["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"]
    spec["rayVersion"] = "2.9.0"
    assert len(check_cluster_spec(spec, "spec")) == 2


def test_ray_version_is_pinned_to_the_projects_everywhere():
    files = [*CLUSTER.rglob("*.yaml"), CLUSTER / "Dockerfile"]
    found = []
    for path in files:
        text = path.read_text()
        found += [(path.name, v) for v in re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)", text)]
        found += [(path.name, v) for v in re.findall(r"rayVersion: \"([^\"]+)\"", text)]
        found += [(path.name, v) for v in re.findall(r"ray.__version__ == '([^']+)'", text)]
    assert {name for name, _ in found} >= {"aws.yaml", "gcp.yaml", "raycluster.yaml",
                                           "rayjob.yaml", "rayservice.yaml", "Dockerfile"}
    assert {v for _, v in found} == {ray.__version__}, found
    pin = re.search(r'"ray\[[^\]]+\]>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert pin and pin.group(1) <= ray.__version__ < pin.group(2)


def test_dockerfile_builds_from_the_pinned_ray_image_and_copies_what_exists():
    text = (CLUSTER / "Dockerfile").read_text()
    assert f"ARG RAY_IMAGE=rayproject/ray:{ray.__version__}-py" in text
    for source in re.findall(r"^COPY --chown=\S+ (.+) \S+$", text, re.M):
        for part in source.split():
            assert (ROOT / part).exists(), part
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "mlsd-home"} <= set(ignored)


@pytest.mark.parametrize("name", ["local.yaml", "launcher.yaml", "kuberay.yaml"])
def test_runtime_env_files_use_only_rays_fields(name):
    env = load(ROOT / "jobs" / "runtime-env" / name)
    assert set(env) <= RuntimeEnv.known_fields
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    RuntimeEnv(**env)


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_job_entrypoint(stage):
    text = (ROOT / "jobs" / f"{stage}.py").read_text()
    assert f'main("{stage}")' in text
