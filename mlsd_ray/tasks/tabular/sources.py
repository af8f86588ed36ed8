"""Tables for the tabular stages: a generated fraud table, two real scikit-learn tables, and
the user's CSV or parquet files.

    fraud-synth[:N]   N generated card transactions (default 20,000), about 1.5% fraud
    breast-cancer     scikit-learn's Wisconsin table: 569 tumours, 30 measurements, binary
    diabetes          scikit-learn's diabetes table: 442 patients, 10 measurements, regression
    csv:PATH          a CSV file (or a folder of them); the label column by `tabular.label`
    parquet:PATH      a parquet file or folder, likewise
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import cast

import numpy as np
import pandas as pd

from mlsd_ray.core.errors import InputError

FRAUD_ROWS = 20_000
FRAUD_RATE = 0.015
CATEGORIES = ["grocery", "restaurant", "fuel", "fashion", "travel", "electronics", "gaming",
              "crypto"]
CATEGORY_RISK = [-1.0, -0.8, -0.6, 0.0, 0.6, 0.9, 1.0, 1.6]
COUNTRIES = ["US", "GB", "DE", "FR", "IN", "BR", "NG", "RU"]
COUNTRY_SHARE = [0.45, 0.15, 0.12, 0.1, 0.07, 0.06, 0.03, 0.02]
COUNTRY_RISK = [-0.4, -0.3, -0.4, -0.3, 0.5, 0.6, 1.4, 1.3]
DEVICES = ["mobile", "desktop", "tablet", "unknown"]
DEVICE_RISK = [0.0, -0.3, -0.2, 1.2]
# Sharpens the risk so that the best possible model (the true probabilities) reaches a PR-AUC
# of about 0.72 at 1.5% fraud: hard, as real fraud is, but learnable from 20,000 rows.
RISK_SCALE = 2.2


@dataclass
class Table:
    """A loaded table: the frame (features and label), the label column, a name."""

    frame: pd.DataFrame
    label: str
    name: str


def load_table(spec: str, label: str | None = None, seed: int = 0) -> Table:
    """The table a `tabular.source` names; InputError for an unknown source or label."""
    kind, _, argument = spec.partition(":")
    if kind == "fraud-synth":
        rows = _count(argument, spec) if argument else FRAUD_ROWS
        table = Table(fraud_synth(rows, seed), "is_fraud", "fraud-synth")
    elif kind in ("breast-cancer", "diabetes"):
        table = _sklearn_table(kind)
    elif kind in ("csv", "parquet"):
        table = _file_table(kind, argument, label)
    else:
        raise InputError(f"unknown tabular source {spec!r}; use fraud-synth[:N], breast-cancer, "
                         "diabetes, csv:PATH or parquet:PATH")
    if label and label != table.label:
        table.label = label
    if table.label not in table.frame.columns:
        raise InputError(f"label column {table.label!r} is not in {spec}; its columns are: "
                         + ", ".join(map(str, table.frame.columns)))
    return table


def _count(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) < 100:
        raise InputError(f"{spec}: the row count must be a whole number of at least 100")
    return int(text)


def _sklearn_table(kind: str) -> Table:
    from sklearn import datasets

    if kind == "breast-cancer":
        bunch = datasets.load_breast_cancer(as_frame=True)
        frame = bunch.data.copy()
        frame["malignant"] = 1 - bunch.target  # scikit-learn's 0 is malignant: make it positive
        return Table(frame, "malignant", "breast-cancer")
    bunch = datasets.load_diabetes(as_frame=True, scaled=False)
    frame = bunch.data.copy()
    frame["progression"] = bunch.target.astype(float)
    return Table(frame, "progression", "diabetes")


def _file_table(kind: str, location: str, label: str | None) -> Table:
    if not label and os.path.exists(os.path.expanduser(location or "")):
        raise InputError(f"{kind}:{location}: name the label column with --label COLUMN "
                         "(or tabular.label)")
    frame, name = read_file(kind, location)
    # No label is refused above when the file exists, and by read_file when it does not.
    return Table(frame, cast(str, label), name)


def read_rows(spec: str, seed: int = 0) -> tuple[pd.DataFrame, str]:
    """The rows a source names, labelled or not (offline prediction reads unlabelled files
    too), and the source's name."""
    kind, _, argument = spec.partition(":")
    if kind in ("csv", "parquet"):
        return read_file(kind, argument)
    table = load_table(spec, seed=seed)
    return table.frame, table.name


def source_name(spec: str) -> str:
    """A table's name from its source: a file's (or folder's) stem, else the source's kind."""
    kind, _, location = spec.partition(":")
    if kind not in ("csv", "parquet"):
        return kind
    path = os.path.normpath(os.path.expanduser(location or kind))
    return os.path.splitext(os.path.basename(path))[0] or kind


def read_file(kind: str, location: str) -> tuple[pd.DataFrame, str]:
    """A CSV file (or a folder of them) or a parquet file, and its name."""
    path = os.path.expanduser(location)
    if not location or not os.path.exists(path):
        raise InputError(f"{kind} file or folder not found: {location or '(none given)'}")
    try:
        if kind == "parquet":
            frame = pd.read_parquet(path)
        else:
            files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.endswith(".csv")]
                     if os.path.isdir(path) else [path])
            frame = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        raise InputError(f"cannot read {kind}:{location}: {exc}") from exc
    return frame, source_name(f"{kind}:{location}")


def fraud_synth(rows: int = FRAUD_ROWS, seed: int = 0) -> pd.DataFrame:
    """Generated card transactions whose fraud follows a logistic model of their features.

    Fraud is likelier for large amounts, risky merchant categories and countries, unknown
    devices, night hours, bursts of transactions and new accounts; the intercept is set so
    that about FRAUD_RATE of the rows are fraud. About 5% of the feature values are then
    removed, and a few amounts and ages are made implausible (outliers a pipeline must survive).
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({
        "transaction_id": [f"t{seed}-{i:07d}" for i in range(rows)],
        "amount": np.round(rng.lognormal(3.6, 1.1, rows), 2),
        "merchant_category": rng.choice(CATEGORIES, rows),
        "country": rng.choice(COUNTRIES, rows, p=COUNTRY_SHARE),
        "hour": rng.integers(0, 24, rows),
        "device_type": rng.choice(DEVICES, rows, p=[0.55, 0.3, 0.1, 0.05]),
        "customer_age": np.clip(rng.normal(42, 14, rows), 18, 95).round(),
        "velocity_1h": rng.poisson(1.2, rows),
        "account_age_days": np.round(rng.exponential(800, rows)),
    })
    risk = _risk(frame)
    intercept = _intercept_for_rate(risk, FRAUD_RATE)
    frame["is_fraud"] = (rng.random(rows) < 1 / (1 + np.exp(-(risk + intercept)))).astype(int)
    _blank_values(frame, rng)
    _add_outliers(frame, rng)
    return frame


def _risk(frame: pd.DataFrame) -> np.ndarray:
    def lookup(column: str, names: list[str], risk: list[float]) -> np.ndarray:
        return frame[column].map(dict(zip(names, risk))).to_numpy()

    night = frame["hour"].between(0, 5).to_numpy()
    return RISK_SCALE * (1.1 * (np.log(frame["amount"].to_numpy()) - 3.6)
            + lookup("merchant_category", CATEGORIES, CATEGORY_RISK)
            + lookup("country", COUNTRIES, COUNTRY_RISK)
            + lookup("device_type", DEVICES, DEVICE_RISK)
            + 1.0 * night + 0.45 * frame["velocity_1h"].to_numpy()
            - 0.9 * np.log1p(frame["account_age_days"].to_numpy() / 30)
            - 0.01 * (frame["customer_age"].to_numpy() - 42))


def _intercept_for_rate(risk: np.ndarray, rate: float) -> float:
    """The intercept whose mean fraud probability is `rate` (bisection: it is monotone)."""
    low, high = -30.0, 30.0
    for _ in range(60):
        middle = (low + high) / 2
        if np.mean(1 / (1 + np.exp(-(risk + middle)))) < rate:
            low = middle
        else:
            high = middle
    return (low + high) / 2


def _blank_values(frame: pd.DataFrame, rng: np.random.Generator) -> None:
    """Missing values at realistic rates (device and age are often unknown, amount rarely)."""
    for column, share in (("amount", 0.01), ("merchant_category", 0.03), ("country", 0.04),
                          ("device_type", 0.1), ("customer_age", 0.09), ("velocity_1h", 0.04),
                          ("account_age_days", 0.05), ("hour", 0.02)):
        frame[column] = frame[column].astype(float if frame[column].dtype.kind in "if"
                                             else object)
        frame.loc[rng.random(len(frame)) < share, column] = np.nan


def _add_outliers(frame: pd.DataFrame, rng: np.random.Generator) -> None:
    """0.3% of amounts 40× too large, 0.2% of ages typed as 3 digits."""
    amounts = rng.random(len(frame)) < 0.003
    frame.loc[amounts, "amount"] = frame.loc[amounts, "amount"] * 40
    ages = rng.random(len(frame)) < 0.002
    frame.loc[ages, "customer_age"] = frame.loc[ages, "customer_age"] * 10
