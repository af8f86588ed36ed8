"""The MLflow registry with a real sqlite store: versions, aliases, resolution, tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd_ray import registry
from mlsd_ray.core.config import load_config
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks.image.checkpoint import load_model
from mlsd_ray.tasks.image.train import train_and_register
from tests.conftest import SMALL_DIGITS

pytestmark = pytest.mark.usefixtures("ray_session")


def test_two_trainings_make_two_versions_and_promote_moves_the_alias(home, digits_model):
    # version 1: the session's model, registered; version 2: `mlsd train`'s own path (train,
    # then log and register) on the same prepared data
    first = {"registered": registry.log_and_register(
        digits_model.result, digits_model.cfg, digits_model.dataset, "digits-cnn", home)}
    cfg = load_config(None, [*SMALL_DIGITS, "train.epochs=1"])
    second = train_and_register(cfg, home=home, dataset=digits_model.dataset)
    assert (first["registered"]["version"], second["registered"]["version"]) == (1, 2)
    assert (Path(home) / "mlflow.db").is_file()
    # artifacts live under MLSD_HOME, not in whatever folder the command ran from
    artifacts = list((Path(home) / "mlflow-artifacts").rglob("checksums.json"))
    assert len(artifacts) == 2 and not Path("mlruns").exists()

    [model] = registry.list_models(home)
    assert model["name"] == "digits-cnn"
    assert [v["version"] for v in model["versions"]] == [2, 1]
    assert model["versions"][0]["data_fingerprint"] == model["versions"][1]["data_fingerprint"]
    assert model["versions"][0]["test_accuracy"] == pytest.approx(second["test_accuracy"],
                                                                  abs=1e-6)

    assert registry.promote("digits-cnn", 1, "production", home)["version"] == 1
    assert registry.promote("digits-cnn", 2, "production", home)["version"] == 2
    shown = registry.show("digits-cnn@production", home)
    assert shown["version"] == 2 and shown["aliases"] == ["production"]
    assert shown["tags"]["git_commit"] and "schema" in shown["tags"]

    directory = registry.resolve("models:/digits-cnn@production", home)
    assert load_model(directory).metadata["run_name"] == second["run_name"]
    # a changed artifact in the local copy is refused, not loaded
    with open(Path(directory) / "preprocessing.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(InputError, match="does not match its checksum"):
        load_model(registry.resolve("models:/digits-cnn/2", home))

    with pytest.raises(InputError, match="no registered model version 'digits-cnn/7'"):
        registry.show("digits-cnn/7", home)
    with pytest.raises(InputError, match="no registered model version"):
        registry.promote("nope", 1, "production", home)
