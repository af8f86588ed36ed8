"""`mlsd simulate-traffic` for tables: held-out rows sent to the scoring app, with a
controlled shift of one column.

Rows come from a split of the prepared table (the test split by default: rows the model never
trained on), so unshifted traffic looks like the training data and the shift is the only change:

    none      as they are
    scale     the numeric --column multiplied by --amount (default 3)
    missing   a share --amount (default 0.5) of --column's values removed
    category  a share --amount (default 0.8) of the categorical --column set to its rarest
              value in the split

`--save FILE.csv` also writes the sent rows with their labels: labelled new data, a `csv:FILE`
source for the data and training stages.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mlsd_ray.core.errors import InputError
from mlsd_ray.monitor.traffic import Delivery, TrafficReport, deliver

SHIFTS = ("none", "scale", "missing", "category")
DEFAULT_AMOUNT = {"none": 0.0, "scale": 3.0, "missing": 0.5, "category": 0.8}


@dataclass(frozen=True)
class TableShift:
    """One shift of one column (see the module docstring)."""

    kind: str
    column: str | None
    amount: float

    @classmethod
    def of(cls, kind: str, column: str | None, amount: float | None,
           plan: list[dict]) -> TableShift:
        """The shift, checked against the table's columns; InputError naming what is wrong."""
        if kind not in SHIFTS:
            raise InputError(f"unknown shift {kind!r} for a table; choose one of: "
                             f"{', '.join(SHIFTS)}")
        amount = DEFAULT_AMOUNT[kind] if amount is None else amount
        if kind == "none":
            return cls(kind, None, amount)
        kinds = {entry["name"]: entry["kind"] for entry in plan}
        if not column:
            raise InputError(f"--shift {kind} needs --column: one of {', '.join(kinds)}")
        if column not in kinds:
            raise InputError(f"--column {column!r} is not a column of this table; its columns "
                             f"are: {', '.join(kinds)}")
        wanted = {"scale": "numeric", "category": "categorical"}.get(kind)
        if wanted and kinds[column] != wanted:
            raise InputError(f"--shift {kind} needs a {wanted} column; {column!r} is "
                             f"{kinds[column]}")
        if kind in ("missing", "category") and not 0 < amount <= 1:
            raise InputError(f"--amount for {kind} is a share in (0, 1], not {amount}")
        return cls(kind, column, amount)

    def apply(self, frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
        """A shifted copy of `frame`."""
        frame = frame.copy()
        if self.kind == "scale":
            frame[self.column] = pd.to_numeric(frame[self.column], errors="coerce") * self.amount
        elif self.kind in ("missing", "category"):
            picked = rng.random(len(frame)) < self.amount
            column = frame[self.column].astype(object)
            if self.kind == "missing":
                column[picked] = None
            else:
                column[picked] = column.dropna().astype(str).value_counts().index[-1]
            frame[self.column] = column
        return frame


def records(frame: pd.DataFrame) -> list[dict]:
    """JSON-ready records: numpy scalars as Python ones, missing values as null."""
    plain = frame.astype(object).where(frame.notna(), None)
    return [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}
            for row in plain.to_dict("records")]


def send(url: str, rows: list[dict], batch: int,
         concurrency: int) -> tuple[Delivery, Counter]:
    """POST the records, `batch` per request, `concurrency` requests at a time; the delivery
    and how often each outcome (decision, class or "value") came back."""
    from mlsd_ray.tasks.tabular.serve import PREFIX

    bodies = [{"records": rows[start:start + batch]} for start in range(0, len(rows), batch)]
    delivery, answers = deliver(f"{url.rstrip('/')}{PREFIX}/score", bodies, concurrency,
                                lambda response: response["results"])
    outcomes = Counter(str(r.get("decision", r.get("class", "value")))
                       for results in answers for r in results)
    return delivery, outcomes


def simulate_table_traffic(url: str | None, table, shift: str = "none",
                           amount: float | None = None, column: str | None = None,
                           count: int = 200, split: str = "test", seed: int = 0,
                           batch: int = 8, concurrency: int = 4,
                           save: str | None = None) -> TrafficReport:
    """Sample, shift and send (and/or save) rows from one split of a prepared table."""
    if not url and not save:
        raise InputError("give --url to send traffic, --save FILE.csv to write it, or both")
    plan = table.manifest["preprocessing"]["plan"]
    change = TableShift.of(shift, column, amount, plan)
    frame = table.load_split(split)
    rng = np.random.default_rng(seed)
    size = len(frame) if count <= 0 else min(count, len(frame))
    frame = change.apply(frame.iloc[np.sort(rng.choice(len(frame), size, replace=False))],
                         rng)
    report = TrafficReport("records", len(frame), change.kind, change.amount, split, seed,
                           column=change.column, url=url)
    if save:
        Path(save).parent.mkdir(parents=True, exist_ok=True)
        frame.to_csv(save, index=False)
        report.saved = str(save)
    if url:
        # the model's columns only: ids and other dropped columns are not the model's input
        inputs = records(frame[[entry["name"] for entry in plan]])
        report.delivery, outcomes = send(url, inputs, batch, concurrency)
        report.outcomes = dict(outcomes)
    return report
