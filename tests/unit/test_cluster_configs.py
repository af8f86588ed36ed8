"""Every config file we ship for Ray validates against Ray's own schema."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from mlsd_ray.config import ServeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_serve_config_is_valid_for_serve_and_for_our_app_builder():
    document = yaml.safe_load((ROOT / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(document)
    [app] = schema.applications
    assert app.import_path == "mlsd_ray.serve.app:build_app"
    args = dict(app.args)
    args.pop("home")
    assert ServeConfig.model_validate(args).model == "models:/digits-cnn@production"
