import pytest
import yaml

from mlsd_ray.core.config import ServeConfig, dump_yaml
from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks import load_config, with_served_model
from mlsd_ray.tasks.image.config import ImageConfig
from mlsd_ray.tasks.tabular.config import TabularTaskConfig


def test_defaults_work_without_a_file():
    cfg = load_config()
    assert cfg.data.source == "digits"
    assert cfg.data.val_fraction + cfg.data.test_fraction < 0.9


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  seed: 3\n  image_size: 16\n  augment:\n    hflip: true\n")
    cfg = load_config(path, ["data.seed=7", "data.augment.rotation_deg=0", "data.channels=3"])
    assert cfg.data.seed == 7
    assert cfg.data.image_size == 16
    assert cfg.data.augment.hflip is True
    assert cfg.data.augment.rotation_deg == 0
    assert cfg.data.channels == 3


def test_unknown_key_is_named():
    with pytest.raises(InputError, match=r"unknown config key 'data\.bogus'"):
        load_config(None, ["data.bogus=1"])


def test_unknown_section_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trian:\n  epochs: 2\n")
    with pytest.raises(InputError, match="unknown config key 'trian'"):
        load_config(path)


def test_bad_value_names_the_key():
    with pytest.raises(InputError, match=r"data\.val_fraction"):
        load_config(None, ["data.val_fraction=1.5"])
    with pytest.raises(InputError, match=r"data\.channels"):
        load_config(None, ["data.channels=2"])


def test_fractions_must_leave_training_data():
    with pytest.raises(InputError, match="val_fraction \\+ test_fraction"):
        load_config(None, ["data.val_fraction=0.5", "data.test_fraction=0.45"])


@pytest.mark.parametrize("bad", ["data.seed", "=3", "data"])
def test_malformed_override(bad):
    with pytest.raises(InputError, match="KEY=VALUE"):
        load_config(None, [bad])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("data: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(broken)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(InputError, match="mapping"):
        load_config(scalar)


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(None, ["data.seed=5", "data.class_names=[a, b]"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg
    assert isinstance(cfg, ImageConfig)


@pytest.mark.parametrize("name, config_class", [("default", ImageConfig),
                                                ("tabular", TabularTaskConfig)])
def test_shipped_configs_match_the_code(name, config_class):
    from pathlib import Path

    shipped = Path(__file__).parents[2] / "configs" / f"{name}.yaml"
    assert load_config(shipped) == with_served_model(config_class())
    # and it lists every key, not only the ones that differ from an empty file
    assert yaml.safe_load(shipped.read_text()) == config_class().to_dict()


def test_a_key_of_another_tasks_section_is_unknown():
    with pytest.raises(InputError, match="unknown config key 'tabular'"):
        load_config(None, ["tabular.source=diabetes"])
    with pytest.raises(InputError, match="unknown config key 'data'"):
        load_config(None, ["task=tabular", "data.seed=1"])


def test_serve_model_defaults_to_the_production_model_of_the_configs_own_training():
    assert load_config(None).serve.model == "models:/digits-cnn@production"
    assert load_config(None, ["task=tabular"]).serve.model == \
        "models:/fraud-synth-mlp@production"
    assert load_config(None, ["task=tabular", "tabular.source=csv:~/data/churn.csv"]
                       ).serve.model == "models:/churn-mlp@production"
    assert load_config(None, ["registry.model_name=mine"]).serve.model == \
        "models:/mine@production"
    assert load_config(None, ["serve.model=models:/other/3"]).serve.model == "models:/other/3"
    with pytest.raises(InputError, match="serve.model is not set"):
        ServeConfig().model_ref()  # a bare `serve run` section names its model itself
