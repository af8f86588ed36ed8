"""The MLflow registry with a real sqlite store: versions, aliases, resolution, tampering."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlsd_ray import registry
from mlsd_ray.checkpoint import load_model
from mlsd_ray.config import load_config
from mlsd_ray.errors import InputError
from mlsd_ray.train import train_and_register

pytestmark = pytest.mark.usefixtures("ray_session")


def test_two_trainings_make_two_versions_and_promote_moves_the_alias(home):
    cfg = load_config(None, ["data.image_size=8", "data.augment.random_shift=1", "train.epochs=1",
                             "train.num_workers=1", "train.batch_size=64"])
    first = train_and_register(cfg, home=home)
    second = train_and_register(cfg, home=home)
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
