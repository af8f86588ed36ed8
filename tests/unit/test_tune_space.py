"""The search space, the search plan and the failure summary of `mlsd tune` (no Ray)."""

import pytest

from mlsd_ray.core.errors import InputError
from mlsd_ray.tasks import get_task, load_config
from mlsd_ray.tuning.report import failure_summary
from mlsd_ray.tuning.search import search_plan
from mlsd_ray.tuning.space import SearchPlan, parse_param, trial_config, validate_space

IMAGE_SEARCHABLE = get_task("image").searchable


def test_parse_param_values_and_distributions():
    assert parse_param("train.lr=0.001,0.003") == ("train.lr", [0.001, 0.003])
    assert parse_param("train.batch_size=32,64") == ("train.batch_size", [32, 64])
    assert parse_param("model.name=seed_cnn,resnet18") == ("model.name", ["seed_cnn", "resnet18"])
    assert parse_param("train.lr=loguniform:1e-4:1e-2") == ("train.lr",
                                                             {"loguniform": [1e-4, 1e-2]})
    with pytest.raises(InputError, match="LOW:HIGH"):
        parse_param("train.lr=uniform:1")
    with pytest.raises(InputError, match="KEY=V1,V2"):
        parse_param("train.lr")


@pytest.mark.parametrize(("space", "message"), [
    ({"train.lr": [0.001, -0.1]}, r"train\.lr=-0\.1: config key 'train\.lr'"),
    ({"train.lr": {"loguniform": [-1, 0.1]}}, "loguniform needs low > 0"),
    ({"train.bogus": [1, 2]}, r"unknown config key 'train\.bogus'"),
    ({"train.batch_size": []}, "empty list"),
    ({"data.source": ["digits"]}, "cannot be searched"),
    ({"train.lr": {"uniform": [0.1, 0.01]}}, "low < high"),
    ({"train.lr": {"normal": [0, 1]}}, "must be a list of values"),
    ({}, "search space is empty"),
])
def test_invalid_space_is_named(space, message):
    with pytest.raises(InputError, match=message):
        validate_space(space, "random", load_config(), IMAGE_SEARCHABLE)


def test_grid_search_needs_values():
    with pytest.raises(InputError, match="grid search needs a list"):
        validate_space({"train.lr": {"loguniform": [1e-4, 1e-2]}}, "grid", load_config())


def test_space_reads_numbers_written_as_yaml_strings():
    clean = validate_space({"train.lr": {"loguniform": ["1e-4", "1e-2"]},
                            "data.augment.random_shift": ["0", "2"]}, "random", load_config(),
                           IMAGE_SEARCHABLE)
    assert clean == {"train.lr": {"loguniform": [1e-4, 1e-2]},
                     "data.augment.random_shift": [0, 2]}


def test_plan_counts_grid_trials_and_picks_the_scheduler():
    cfg = load_config(None, ["tune.search=grid", "tune.space={train.lr: [0.001, 0.01], "
                                                 "train.batch_size: [32, 64, 128]}"])
    plan = search_plan(cfg)
    assert plan == SearchPlan(search="grid", scheduler="asha", num_samples=1, trials=6,
                              epochs=cfg.train.epochs, metric="val_accuracy")
    tabular = load_config(None, ["tune.space={train.lr: [0.001, 0.01]}"], example="fraud")
    assert search_plan(tabular).metric == "val_score"  # PR-AUC / macro F1 / R² on val
    tabular.tune.cv = 3
    assert search_plan(tabular).scheduler == "none"  # every task cross-validates
    cfg.tune.cv = 3
    assert search_plan(cfg).scheduler == "none"  # auto: one report per configuration
    cfg.tune.scheduler = "asha"
    with pytest.raises(InputError, match="--scheduler none"):
        search_plan(cfg)


def test_random_search_over_few_discrete_values_runs_each_once():
    cfg = load_config(None, ["tune.space={train.lr: [0.001, 0.01]}", "tune.num_samples=8"])
    plan = search_plan(cfg)
    assert (plan.search, plan.trials) == ("grid", 2)
    cfg.tune.space = {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    plan = search_plan(cfg)
    assert (plan.search, plan.trials) == ("random", 8)


def test_trial_config_applies_dotted_overrides():
    cfg = trial_config(load_config(), {"train.lr": 0.02, "model.dropout": 0.3,
                                       "data.augment.random_shift": 2})
    assert (cfg.train.lr, cfg.model.dropout, cfg.data.augment.random_shift) == (0.02, 0.3, 2)


def test_failure_summary_counts_each_message():
    rows = [{"error": "the training loss became nan in epoch 1"}] * 2 + [{"error": "OOM"}]
    assert failure_summary(rows) == ("all 3 trial(s) failed: 2 × the training loss became nan "
                                     "in epoch 1; 1 × OOM")
