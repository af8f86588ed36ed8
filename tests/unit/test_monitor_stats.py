"""Drift statistics, input features, shifts and the prediction log, without Ray."""

from __future__ import annotations

import datetime as dt
import re
import time

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_digits

from mlsd_ray.core.config import MonitorConfig, PredictionLogConfig
from mlsd_ray.monitor import drift
from mlsd_ray.serve.predlog import PredictionLog, parse_since, read_log
from mlsd_ray.tasks.image.features import FEATURES, image_features, reference_profile
from mlsd_ray.tasks.image.traffic import choose, shift_images

CFG = MonitorConfig()


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    images = np.rint(data.images * 255 / 16).astype(np.uint8)[..., None]
    order = np.random.default_rng(0).permutation(len(images))
    return images[order], data.target[order]


def rows_for(images, predicted, confidence=0.9) -> pd.DataFrame:
    frame = pd.DataFrame(image_features(images))
    frame["predicted_class"] = [str(p) for p in predicted]
    frame["confidence"] = confidence
    return frame


def reference_of(images, labels) -> dict:
    reference = reference_profile(images, labels, [str(d) for d in range(10)])
    reference["confidence"] = [0.9] * 200
    return reference


def test_psi_is_zero_for_the_same_sample_and_large_for_a_moved_one():
    rng = np.random.default_rng(0)
    sample = rng.normal(size=2000)
    assert drift.psi(sample, sample) == pytest.approx(0.0, abs=1e-9)
    assert drift.psi(sample, rng.normal(size=500)) < 0.1
    assert drift.psi(sample, rng.normal(loc=1.0, size=500)) > 0.5
    assert np.isfinite(drift.psi(np.zeros(100), np.ones(100)))  # constant reference


def test_features_are_one_per_image_and_follow_rotation_and_inversion(digits):
    images, _ = digits
    features = image_features(images[:50])
    assert set(features) == set(FEATURES)
    assert all(v.shape == (50,) for v in features.values())
    inverted = image_features(255 - images[:50])
    assert np.allclose(inverted["brightness"], 1 - features["brightness"], atol=1e-5)
    rotated = image_features(shift_images(images[:200], "rotate", 30, None))
    upright = image_features(images[:200])
    assert rotated["orientation"].mean() - upright["orientation"].mean() > 10


def test_unshifted_samples_raise_no_alarm_in_19_of_20_draws(digits):
    images, labels = digits
    reference = reference_of(images[:1200], labels[:1200])
    alarms = 0
    for seed in range(20):
        pick = np.random.default_rng(seed).choice(np.arange(1200, 1797), 200, replace=False)
        result = drift.check_model(rows_for(images[pick], labels[pick]), reference, CFG)
        alarms += result.verdict == drift.DRIFT
    assert alarms <= 1


@pytest.mark.parametrize("shift, amount, expected", [
    ("rotate", 30, "orientation"), ("invert", 0, "brightness"), ("noise", 40, "edges")])
def test_each_shift_is_flagged_naming_the_feature(digits, shift, amount, expected):
    images, labels = digits
    reference = reference_of(images[:1200], labels[:1200])
    rng = np.random.default_rng(1)
    shifted = shift_images(images[1200:1400], shift, amount, rng)
    result = drift.check_model(rows_for(shifted, labels[1200:1400]), reference, CFG)
    assert result.verdict == drift.DRIFT
    assert expected in result.drifted_features
    assert expected in result.summary


def test_imbalanced_predictions_are_flagged_as_skew(digits):
    images, labels = digits
    reference = reference_of(images[:1200], labels[:1200])
    pick = choose(labels[1200:], 200, "imbalance", 0.7, np.random.default_rng(0)) + 1200
    result = drift.check_model(rows_for(images[pick], labels[pick]), reference, CFG)
    assert result.skew and result.skew.drifted and result.skew.predicted_share["0"] > 0.6


def test_a_confidence_drop_is_flagged(digits):
    images, labels = digits
    reference = reference_of(images[:1200], labels[:1200])
    rows = rows_for(images[1200:1400], labels[1200:1400], confidence=0.5)
    result = drift.check_model(rows, reference, CFG)
    assert result.confidence and result.confidence.drifted and result.verdict == drift.DRIFT


def test_too_few_rows_are_not_tested(digits):
    images, labels = digits
    result = drift.check_model(rows_for(images[:5], labels[:5]), reference_of(images, labels),
                               CFG)
    assert result.verdict == drift.TOO_FEW and "min_samples" in (result.note or "")


def test_prediction_log_buffers_bounds_and_flushes(tmp_path):
    settings = PredictionLogConfig(flush_rows=1000, flush_seconds=60, max_buffered_rows=5)
    log = PredictionLog(str(tmp_path / "log"), settings, "replica/1")
    now = dt.datetime.now(dt.timezone.utc)
    log.record([{"time": now, "request_id": f"r{i}", "predicted_class": "1",
                 "confidence": 0.5} for i in range(8)])
    assert log.stats()["buffered"] == 5 and log.dropped == 3  # bounded, drops counted
    assert not list((tmp_path / "log").glob("**/*.parquet"))  # record() does no I/O
    log.close()
    frame = read_log(str(tmp_path / "log"))
    assert list(frame["request_id"]) == [f"r{i}" for i in range(5)]
    assert read_log(str(tmp_path / "log"), since=now + dt.timedelta(seconds=1)).empty
    assert read_log(str(tmp_path / "missing")).empty


def test_prediction_log_flushes_on_its_own_after_flush_seconds(tmp_path):
    settings = PredictionLogConfig(flush_rows=1000, flush_seconds=0.2)
    log = PredictionLog(str(tmp_path), settings, "r")
    log.record([{"time": dt.datetime.now(dt.timezone.utc), "request_id": "a"}])
    deadline = time.monotonic() + 10
    while log.written == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert log.written == 1 and len(read_log(str(tmp_path))) == 1
    log.close()


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("15m", 900), ("1h", 3600),
                                           ("2d", 172800)])
def test_parse_since(text, seconds):
    assert parse_since(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["1w", "h", "-1h", "abc"])
def test_parse_since_rejects_other_forms(text):
    with pytest.raises(ValueError, match="90s, 15m, 1h, 2d"):
        parse_since(text)


# ----------------------------------------------------------------------------- tables


@pytest.fixture(scope="module")
def transactions():
    from mlsd_ray.tasks.tabular.config import TabularConfig
    from mlsd_ray.tasks.tabular.preprocess import plan_columns
    from mlsd_ray.tasks.tabular.sources import fraud_synth

    frame = fraud_synth(6000, seed=0).drop(columns=["transaction_id"])
    plan = plan_columns(frame, "is_fraud", TabularConfig())
    return frame, plan


def table_rows(frame: pd.DataFrame, plan: list[dict]) -> pd.DataFrame:
    """Prediction-log rows of these records, as the fraud app writes them."""
    from mlsd_ray.tasks.tabular.monitoring import log_rows
    from mlsd_ray.tasks.tabular.preprocess import coerce

    typed, _ = coerce(frame, plan)
    records = typed.astype(object).where(typed.notna(), None).to_dict("records")
    outputs = np.tile([0.9, 0.1], (len(records), 1))
    return pd.DataFrame(log_rows(records, outputs, "binary", ["0", "1"], 0.5))


def table_reference(frame: pd.DataFrame, plan: list[dict]) -> dict:
    from mlsd_ray.tasks.tabular.monitoring import column_reference

    return column_reference(frame, plan)


def test_unshifted_table_traffic_raises_no_alarm_in_19_of_20_draws(transactions):
    frame, plan = transactions
    reference = table_reference(frame.iloc[:4000], plan)
    alarms = 0
    for seed in range(20):
        rows = frame.iloc[4000:].sample(300, random_state=seed)
        alarms += drift.check_model(table_rows(rows, plan), reference, CFG).verdict == drift.DRIFT
    assert alarms <= 1


@pytest.mark.parametrize("kind, column, amount, flagged", [
    ("scale", "amount", 5.0, "features drifted: amount"),
    ("missing", "country", 0.5, "missing values changed: country"),
    ("category", "merchant_category", 0.8, "features drifted: merchant_category"),
])
def test_each_column_shift_is_flagged_naming_the_column(transactions, kind, column, amount,
                                                        flagged):
    from mlsd_ray.tasks.tabular.traffic import TableShift

    frame, plan = transactions
    reference = table_reference(frame.iloc[:4000], plan)
    shift = TableShift.of(kind, column, amount, plan)
    rows = shift.apply(frame.iloc[4000:4300], np.random.default_rng(0))
    result = drift.check_model(table_rows(rows, plan), reference, CFG)
    assert result.verdict == drift.DRIFT
    assert flagged in result.summary
    others = set(result.drifted_features) | set(result.missing_changed)
    assert others == {column}  # only the shifted column


def test_a_category_never_seen_in_training_counts_apart():
    values = pd.Series(["a"] * 50 + ["zz"] * 50)
    result = drift.category_shift(values, {"a": 90, "b": 10}, CFG)
    assert result.drifted and result.current_share["(unseen)"] == 0.5


@pytest.mark.parametrize("kind, column, amount, message", [
    ("tilt", "amount", None, "unknown shift 'tilt'"),
    ("scale", None, None, "--shift scale needs --column"),
    ("scale", "amout", None, "'amout' is not a column"),
    ("scale", "country", None, "needs a numeric column; 'country' is categorical"),
    ("missing", "country", 2.0, "a share in (0, 1]"),
])
def test_table_shifts_name_bad_options(transactions, kind, column, amount, message):
    from mlsd_ray.core.errors import InputError
    from mlsd_ray.tasks.tabular.traffic import TableShift

    with pytest.raises(InputError, match=re.escape(message)):
        TableShift.of(kind, column, amount, transactions[1])
