"""The stages of a task built from parts, without Ray: docs/tasks.md's forecasting task read,
checked, split, encoded and shifted; its instances turned into V2 tensors and back; and the
sentences a task that lacks a part gets."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlsd_ray.core.errors import InputError
from mlsd_ray.stages import MonitoringPart, Parts, PartsTask, regression_scores
from mlsd_ray.stages.data import assign_splits, column_specs, dataset_name, read_rows
from mlsd_ray.tasks import get_task

DOC = Path(__file__).parents[2] / "docs" / "tasks.md"


@pytest.fixture(scope="module")
def forecast(tmp_path_factory):
    """The doc's forecast_task module, imported from a folder outside mlsd_ray."""
    site = tmp_path_factory.mktemp("site")
    section = DOC.read_text().split("## A task of a new kind")[1].split("\n## ")[0]
    (site / "forecast_task.py").write_text(
        "\n\n".join(re.findall(r"```python\n(.*?)```", section, re.S)))
    sys.path.insert(0, str(site))
    try:
        import forecast_task

        yield forecast_task
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("forecast_task", None)


def section(forecast, **keys):
    return forecast.ForecastSection(**keys)


def test_the_doc_task_loads_and_ranks_by_its_models_metric(forecast):
    task = get_task("forecast_task:ForecastTask")
    assert isinstance(task, PartsTask) and task.metric == "val_r2"


def test_rows_are_windows_and_a_bad_value_is_named(forecast, tmp_path):
    path = tmp_path / "series.csv"
    path.write_text("value\n" + "\n".join(["1.0"] * 10 + ["oops"] + ["2.0"] * 10) + "\n")
    parts, cfg = forecast.ForecastTask.parts, section(forecast, source=f"csv:{path}", window=4)
    rows = read_rows(parts, cfg)
    assert len(rows) == 21 - 4 and list(rows.columns) == ["window", "next", "t"]
    reasons = parts.data.problems(rows, cfg)
    assert (reasons == "window has a missing value").sum() == 4  # the windows that hold it
    assert reasons.iloc[0] == "" and rows["next"].isna().sum() == 1


def test_a_source_without_a_needed_column_is_refused(forecast, tmp_path):
    path = tmp_path / "rows.parquet"
    pd.DataFrame({"window": [[1.0, 2.0]]}).to_parquet(path)
    with pytest.raises(InputError, match="has no column 'next', 't'"):
        read_rows(forecast.ForecastTask.parts, section(forecast, source=f"rows:{path}"))


def test_a_time_ordered_split_holds_out_the_latest_rows(forecast):
    rows = pd.DataFrame({"t": np.arange(100)[::-1]})
    split = assign_splits(rows, "t", section(forecast, val_fraction=0.1, test_fraction=0.2))
    assert set(rows["t"][split == "test"]) == set(range(80, 100))
    assert set(rows["t"][split == "val"]) == set(range(70, 80))
    shuffled = assign_splits(rows, None, section(forecast, val_fraction=0.1, test_fraction=0.2))
    assert (shuffled == "test").sum() == 20 and set(rows["t"][shuffled == "test"]) != set(
        range(80, 100))


def test_the_codec_round_trips_on_the_train_scale(forecast):
    codec = forecast.ForecastTask.parts.codec
    rows = pd.DataFrame({"window": [list(np.arange(4.0)), list(np.arange(4.0) + 4)],
                         "next": [4.0, 8.0]})
    state = codec.fit(rows)
    x = codec.encode(rows, state)
    assert x.shape == (2, 4, 1) and x.dtype == np.float32
    assert np.allclose(codec.decode(codec.target(rows, state), state), [4.0, 8.0])


def test_default_monitoring_summarises_vectors_and_shifts_every_input():
    rows = pd.DataFrame({"window": [[1.0, 3.0], [2.0, 2.0]], "amount": [1.0, 2.0]})
    monitoring = MonitoringPart()
    features = monitoring.features(rows, ("window", "amount"))
    assert list(features.columns) == ["window_mean", "window_std", "amount"]
    assert features["window_mean"].tolist() == [2.0, 2.0]
    scaled = monitoring.shift(rows, ("window", "amount"), "scale", 3.0,
                              np.random.default_rng(0))
    assert list(scaled["window"][0]) == [3.0, 9.0] and scaled["amount"].tolist() == [3.0, 6.0]


def test_column_kinds_and_dataset_names():
    rows = pd.DataFrame({"window": [[1.0, 2.0]], "n": [1.0], "word": ["a"]})
    assert column_specs(rows, ("window", "n", "word")) == [
        {"name": "window", "kind": "vector", "length": 2}, {"name": "n", "kind": "number"},
        {"name": "word", "kind": "text"}]
    assert dataset_name("seasonal:4000") == "seasonal"
    assert dataset_name("csv:/data/sales 2026.csv") == "sales 2026"
    assert dataset_name("rows:/x/shifted.parquet") == "shifted"


def test_v2_tensors_become_instances_and_a_missing_one_is_named():
    from mlsd_ray.serve.schemas import ClientError
    from mlsd_ray.stages.serve import _rows_from_tensors

    inputs = [{"name": "window", "kind": "vector", "length": 2}, {"name": "word", "kind": "text"}]
    rows = _rows_from_tensors({"window": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32),
                               "word": np.array([b"a", b"b"], dtype=object)}, inputs)
    assert rows == [{"window": [1.0, 2.0], "word": "a"}, {"window": [3.0, 4.0], "word": "b"}]
    with pytest.raises(ClientError, match="no input tensor word"):
        _rows_from_tensors({"window": np.zeros((1, 2))}, inputs)


def test_regression_scores():
    scores = regression_scores(np.array([1.0, 2.0, 3.0]), np.array([1.0, 2.0, 4.0]))
    assert scores["mae"] == pytest.approx(1 / 3) and scores["r2"] == pytest.approx(1 - 1 / (14 / 3))


def test_a_task_that_lacks_a_part_is_named_with_what_the_part_is_for(forecast, monkeypatch):
    class NoParts(PartsTask):
        name = "no-parts"
        config_class = forecast.ForecastConfig
        section = "forecast"

    class WrongCodec(PartsTask):
        name = "wrong-codec"
        config_class = forecast.ForecastConfig
        section = "nowhere"
        parts = Parts(data=forecast.Windows(), codec=forecast.GRU(), model=forecast.GRU())

    monkeypatch.setattr(forecast, "NoParts", NoParts, raising=False)
    monkeypatch.setattr(forecast, "WrongCodec", WrongCodec, raising=False)
    with pytest.raises(InputError, match=r"lacks parts: a Parts\(data=\.\.\., codec=\.\.\., "
                                         r"model=\.\.\.\), the typed parts every stage calls"):
        get_task("forecast_task:NoParts")
    with pytest.raises(InputError, match="lacks parts.codec: a Codec, rows to the model's "
                                         "arrays .*; section: the name of the task's own"):
        get_task("forecast_task:WrongCodec")


def test_cross_validation_folds_chain_forward_in_time_and_shuffle_otherwise():
    from mlsd_ray.stages.train import fold_indices

    rows = pd.DataFrame({"t": np.random.default_rng(0).permutation(60)})
    folds = fold_indices(rows, "t", 3, seed=0)
    assert len(folds) == 3
    for train, val in folds:  # no fold learns from its future
        assert rows["t"].to_numpy()[train].max() < rows["t"].to_numpy()[val].min()
    shuffled = fold_indices(rows, None, 3, seed=0)
    assert sorted(np.concatenate([val for _, val in shuffled]).tolist()) == list(range(60))
    with pytest.raises(InputError, match="--cv 4: train\\+val hold 5 rows; use at most --cv 2"):
        fold_indices(rows.head(5), None, 4, seed=0)


def test_deleting_the_most_attributed_positions_first_leaves_less_of_the_answer():
    import torch

    from mlsd_ray.stages.explain import attributions, sanity_checks

    torch.manual_seed(0)
    weights = torch.tensor([[4.0, 2.0, 1.0, 0.5, 0.25, 0.1]])  # a linear "forecast"
    module = torch.nn.Linear(6, 1, bias=False)
    module.weight.data = weights
    randomised = torch.nn.Linear(6, 1, bias=False)
    encoded = np.ones((5, 6), dtype=np.float32)
    checks = sanity_checks(module.eval(), randomised.eval(), encoded,
                           attributions(module, encoded))
    # the largest weights go first: after 1 of 6 positions, 4.0 of 7.85 is gone
    assert checks.deletion_auc["integrated_gradients"] < checks.random_deletion_auc


@pytest.mark.parametrize("keep_old_data", [True, False])
def test_a_retrain_combines_old_and_new_rows_as_retrain_keep_old_data_says(forecast, tmp_path,
                                                                          keep_old_data,
                                                                          monkeypatch):
    from mlsd_ray.core import runtime
    from mlsd_ray.core.workspace import Workspace

    # rows checked here, even where an earlier test of this process joined Ray (whose
    # workers could not import the doc's module from this test's folder)
    monkeypatch.setattr(runtime, "ray_is_up", lambda: False)
    from mlsd_ray.stages.data import prepare_rows
    from mlsd_ray.stages.retrain import combine

    workspace, parts = Workspace.at(str(tmp_path)), forecast.ForecastTask.parts
    old, new = (prepare_rows(name, parts, section(forecast, source="seasonal:300", seed=seed),
                             workspace, lambda _: None) for name, seed in (("old", 0), ("new", 1)))
    combined = combine(old, new, workspace, keep_old_data)
    size = {s: len(combined.load_split(s)) for s in ("train", "val", "test")}
    olds, news = ({s: len(p.load_split(s)) for s in ("train", "val", "test")} for p in (old, new))
    # the test split always holds both: the champion is judged on its own holdout too
    assert size["test"] == olds["test"] + news["test"]
    for split in ("train", "val"):
        assert size[split] == news[split] + (olds[split] if keep_old_data else 0)
    assert combined.codec_state == old.codec_state
