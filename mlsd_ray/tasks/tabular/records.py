"""Checking the records a client sends to `/v1/fraud/score` against the model's columns.

Each problem is handled as the `tabular.on_*` settings say: impute (the value goes to the
model as missing, and the fitted imputer fills it), ignore (noted in the answer), or a 422
naming the record and the field. A column the model was trained without an imputer for
cannot take a missing value: that is always a 422.
"""

from __future__ import annotations

import math
from typing import Any

from mlsd_ray.serve.schemas import ClientError


def _fail(message: str) -> ClientError:
    return ClientError(422, "invalid_record", message)


def records_from_json(body: Any, max_records: int) -> list[dict]:
    """The `records` list of `{"records": [{field: value}, ...]}`."""
    if not isinstance(body, dict) or "records" not in body:
        raise ClientError(422, "missing_records", 'send {"records": [{"field": value, ...}]}')
    records = body["records"]
    if not isinstance(records, list) or not records:
        raise ClientError(422, "empty_records", "records must be a non-empty list of objects")
    if len(records) > max_records:
        raise ClientError(413, "too_many_records", f"{len(records)} records; at most "
                                                   f"{max_records} per request")
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise _fail(f"records[{index}] must be an object of field: value, got "
                        f"{type(record).__name__}")
    return records


def records_from_tensors(tensors: dict, max_records: int) -> list[dict]:
    """Records from V2 tensors (serve/oip.py): one [N] tensor per column (numbers, or BYTES
    for categories; NaN is missing), or `records`, BYTES [N] each a JSON object."""
    import json

    import numpy as np

    if "records" in tensors:
        rows = []
        for index, raw in enumerate(tensors["records"].reshape(-1)):
            try:
                rows.append(json.loads(bytes(raw)))
            except ValueError as exc:
                raise ClientError(400, "malformed_json", f"records[{index}] is not JSON: "
                                                         f"{exc}") from exc
        return records_from_json({"records": rows}, max_records)
    lengths = {name: len(array) if array.ndim else 1 for name, array in tensors.items()}
    if len(set(lengths.values())) != 1 or any(a.ndim != 1 and a.shape[1:] != (1,)
                                              for a in tensors.values()):
        raise ClientError(400, "bad_shape", f"each column is one [N] tensor of the same N; got "
                                            f"{ {n: list(a.shape) for n, a in tensors.items()} }")
    columns = {name: [_plain(v) for v in np.asarray(array).reshape(-1)]
               for name, array in tensors.items()}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    return records_from_json({"records": rows}, max_records)


def _plain(value: Any) -> Any:
    """A tensor element as the JSON value a record would hold."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    item = value.item() if hasattr(value, "item") else value
    return None if isinstance(item, float) and math.isnan(item) else item


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check_record(record: dict, index: int, columns: list[dict], policy: dict,
                 label: str | None = None) -> tuple[dict, list[str]]:
    """The record as the model takes it (missing values as None) and notes for the answer."""
    where = f"records[{index}]"
    known = {c["name"] for c in columns}
    extra = sorted(set(record) - known - ({label} if label else set()))
    notes = []
    if extra:
        if policy["on_extra_column"] == "reject":
            raise _fail(f"{where}: unknown field(s) {extra}; the model's fields are "
                        f"{sorted(known)}")
        notes.append(f"ignored field(s) {extra}")
    clean: dict[str, Any] = {}
    for column in columns:
        name = column["name"]
        if name not in record and policy["on_missing_column"] == "reject":
            raise _fail(f"{where}: missing field {name!r}")
        value = record.get(name)
        if _is_missing(value):
            if column["impute"] == "none" or (name in record and policy["on_nan"] == "reject"):
                raise _fail(f"{where}.{name} is null or missing, and this model "
                            + ("has no imputation for it" if column["impute"] == "none"
                               else "is configured to reject missing values (tabular.on_nan)"))
            notes.append(f"{name} imputed")
            clean[name] = None
            continue
        clean[name] = _typed(value, column, where, policy, notes)
    return clean, notes


def _typed(value: Any, column: dict, where: str, policy: dict, notes: list[str]) -> Any:
    name = column["name"]
    if column["kind"] == "numeric":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(f"{where}.{name}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise _fail(f"{where}.{name}: {value!r} is not a finite number")
        return float(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise _fail(f"{where}.{name}: expected a category (text), got {value!r}")
    text = str(value)
    categories = column.get("categories")
    if categories is not None and text not in categories:
        if policy["on_unseen_category"] == "reject":
            raise _fail(f"{where}.{name}: unseen category {text!r}; known: {sorted(categories)}")
        notes.append(f"{name}: unseen category {text!r} encoded as none")
    return text
