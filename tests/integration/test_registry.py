"""The MLflow registry with a real sqlite store: versions, aliases, resolution, tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd_ray import registry
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks import load_config
from mlsd_ray.tasks.image.checkpoint import load_model
from mlsd_ray.tasks.image.train import log_and_register, train_and_register
from tests.conftest import SMALL_DIGITS

pytestmark = pytest.mark.usefixtures("ray_session")


def test_two_trainings_make_two_versions_and_promote_moves_the_alias(workspace, digits_model):
    # version 1: the session's model, registered; version 2: `mlsd train`'s own path (train,
    # then log and register) on the same prepared data
    first = log_and_register(digits_model.result, digits_model.cfg, digits_model.dataset,
                             "digits-cnn", workspace)
    cfg = load_config(None, [*SMALL_DIGITS, "train.epochs=1"])
    second = train_and_register(cfg, workspace=workspace, dataset=digits_model.dataset)
    assert second.registered is not None
    assert (first.version, second.registered.version) == (1, 2)
    assert (Path(workspace.root) / "mlflow.db").is_file()
    # artifacts live under MLSD_HOME, not in whatever folder the command ran from
    artifacts = list((Path(workspace.root) / "mlflow-artifacts").rglob("checksums.json"))
    assert len(artifacts) == 2 and not Path("mlruns").exists()

    [model] = registry.list_models(workspace)
    assert model.name == "digits-cnn"
    assert [v.version for v in model.versions] == [2, 1]
    assert model.versions[0].data_fingerprint == model.versions[1].data_fingerprint
    assert model.versions[0].test_score == pytest.approx(second.test_accuracy, abs=1e-6)
    assert model.versions[0].score_name == "accuracy" and model.versions[0].task == "image"

    # `mlsd train`'s run was tracked live: each epoch logged while it trained, before the
    # version was registered; the dataset is its input, by fingerprint
    from mlflow import MlflowClient

    run = MlflowClient().get_run(second.registered.run_id)
    [epoch] = MlflowClient().get_metric_history(run.info.run_id, "val_accuracy")
    created = registry.show("digits-cnn/2", workspace).created
    assert run.info.status == "FINISHED" and epoch.step == 1 and epoch.timestamp <= created
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [
        digits_model.dataset.manifest["fingerprint"][:36]]

    assert registry.promote("digits-cnn", 1, "production", workspace).version == 1
    assert registry.promote("digits-cnn", 2, "production", workspace).version == 2
    shown = registry.show("digits-cnn@production", workspace)
    assert shown.version == 2 and shown.aliases == ["production"]
    assert shown.tags["git_commit"] and "schema" in shown.tags
    # --json keeps its shape: the version's fields, its name, tags and URI
    assert shown.to_dict()["uri"] == "models:/digits-cnn/2"
    assert set(model.to_dict()["versions"][0]) == set(shown.to_dict()) - {"name", "tags", "uri"}

    directory = registry.resolve("models:/digits-cnn@production", workspace)
    assert load_model(directory).metadata.run_name == second.run_name
    # a changed artifact in the local copy is refused, not loaded
    with open(Path(directory) / "preprocessing.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(InputError, match="does not match its checksum"):
        load_model(registry.resolve("models:/digits-cnn/2", workspace))

    with pytest.raises(InputError, match="no registered model version 'digits-cnn/7'"):
        registry.show("digits-cnn/7", workspace)
    with pytest.raises(InputError, match="no registered model version"):
        registry.promote("nope", 1, "production", workspace)


def test_a_version_is_an_mlflow_model_that_plain_mlflow_loads_and_serves(workspace, digits_model):
    """`mlflow.pyfunc.load_model("models:/digits-cnn@production")` with plain MLflow: the
    signature says uint8 images in, probabilities out; it answers what our own loader (and
    so the Serve replica, which runs the same `LoadedModel.probabilities`) answers; and
    `mlflow models serve` answers /invocations with the same numbers."""
    import os
    import subprocess
    import sys
    import time

    import mlflow
    import numpy as np
    import requests

    from mlsd_ray.core.ports import free_port

    registered = log_and_register(digits_model.result, digits_model.cfg, digits_model.dataset,
                                  "digits-cnn", workspace)
    registry.promote("digits-cnn", registered.version, "production", workspace)
    tracking, uri = workspace.tracking_uri, "models:/digits-cnn@production"
    mlflow.set_tracking_uri(tracking)

    signature = mlflow.models.get_model_info(uri).signature
    size = digits_model.cfg.data.image_size
    [images_in], [probabilities_out] = signature.inputs.inputs, signature.outputs.inputs
    assert (images_in.type, images_in.shape) == (np.dtype("uint8"), (-1, size, size, 1))
    assert (probabilities_out.type, probabilities_out.shape) == (np.dtype("float32"), (-1, 10))

    images, labels = digits_model.dataset.load_split("test")
    model = mlflow.pyfunc.load_model(uri)
    probabilities = model.predict(images[:32])
    for wrong in (images[:2].astype(np.float64), images[:2, :4]):  # dtype, shape
        with pytest.raises(mlflow.exceptions.MlflowException, match="uint8"):
            model.predict(wrong)
    ours = load_model(registry.resolve(uri, workspace)).predict(images[:32])
    assert probabilities.shape == (32, 10)
    np.testing.assert_allclose(probabilities, ours, atol=1e-6)
    assert (probabilities.argmax(axis=1) == labels[:32]).mean() > 0.3  # it learned something

    port, venv_bin = free_port(), os.path.dirname(sys.executable)
    server = subprocess.Popen(  # as from an activated venv: it starts the venv's uvicorn
        [os.path.join(venv_bin, "mlflow"), "models", "serve", "-m", uri, "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking,
             "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert server.poll() is None, server.communicate()[1][-2000:]
        answer = requests.post(f"http://127.0.0.1:{port}/invocations",
                               json={"inputs": images[:4].tolist()}, timeout=60)
        assert answer.status_code == 200, answer.text
        np.testing.assert_allclose(answer.json()["predictions"], probabilities[:4], atol=1e-5)
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=30)
    assert server.returncode is not None, errors[-2000:]
